"""A small ResNet on scikit-learn's 8x8 digits: residual Add blocks, one 1x1 downsample conv.

Writes digits_resnet_op17.onnx and digits_calib.npz / digits_eval.npz (a fixed stratified
75/25 split; calibration rows from the training part, evaluation = the whole test part).

Run: .venv/bin/python -m models.digits_resnet
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from models import common

SEED = 0
EPOCHS = 30
OPSET = 17
N_CALIB = 256
DOC = ("ResNet-style classifier for scikit-learn's 8x8 digits, trained by "
       "models/digits_resnet.py. Input: 1x8x8 images scaled to (x/16 - 0.5) / 0.5.")


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn plus a shortcut; the shortcut is a strided 1x1 conv + BN when the
    shape changes, so the graph has both an identity Add and a projected Add."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class DigitsResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = BasicBlock(16, 16, stride=1)
        self.layer2 = BasicBlock(16, 32, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    digits = load_digits()
    images = ((digits.images.astype(np.float32) / 16.0 - 0.5) / 0.5)[:, None]
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.25, random_state=SEED, stratify=labels)
    return x_train, y_train, x_test, y_test


def shift_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random one-pixel translations: the 8x8 training set is tiny, so this curbs overfit."""
    dy, dx = (int(v) for v in torch.randint(-1, 2, (2,), generator=gen))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def main() -> None:
    common.seed_everything(SEED)
    x_train, y_train, x_test, y_test = load_split()
    rng = np.random.default_rng(SEED)
    calib = np.sort(rng.choice(len(x_train), N_CALIB, replace=False))
    common.write_npz(common.MODELS_DIR / "digits_calib.npz",
                     {"input": x_train[calib], "labels": y_train[calib]})
    eval_file = common.MODELS_DIR / "digits_eval.npz"
    common.write_npz(eval_file, {"input": x_test, "labels": y_test})
    model = DigitsResNet()
    print("digits_resnet: training", flush=True)
    common.train_classifier(model, torch.from_numpy(x_train), torch.from_numpy(y_train),
                            epochs=EPOCHS, batch_size=64, lr=3e-3, seed=SEED,
                            augment=shift_augment)
    torch_acc = common.torch_accuracy(model, torch.from_numpy(x_test), torch.from_numpy(y_test))
    onnx_model = common.export_torchscript(model, torch.from_numpy(x_test[:2]), opset=OPSET,
                                           input_name="input")
    meta = {"class_names": common.json_list([str(d) for d in range(10)]),
            "dataset": "scikit-learn load_digits, train_test_split(test_size=0.25, "
                       f"random_state={SEED}, stratify=labels)",
            "normalization": "(x/16 - 0.5) / 0.5"}
    onnx_model = common.finalize(onnx_model, opset=OPSET, doc=DOC, metadata=meta)
    common.check_parity(onnx_model, model, x_test)
    path = common.MODELS_DIR / f"digits_resnet_op{OPSET}.onnx"
    digest = common.save_model(onnx_model, path)
    common.report(path, digest, common.ort_accuracy(path, eval_file), torch_acc)


if __name__ == "__main__":
    main()
