"""Fashion-MNIST CNN (Conv-BN-ReLU-MaxPool x3, then two Gemm layers).

Writes fashion_cnn_op13.onnx (BatchNormalization kept as separate nodes, so an importer's
Conv+BN folding has a real target), fashion_cnn_op17.onnx (BN fused by the exporter), and
the shared Fashion-MNIST data files fashion_calib.npz / fashion_eval.npz.

Run: .venv/bin/python -m models.fashion_cnn
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from models import common

SEED = 0
EPOCHS = 4
N_CALIB, N_EVAL = 512, 2000
DOC = ("Fashion-MNIST classifier (3x Conv-BN-ReLU-MaxPool, 2 Gemm) trained by "
       "models/fashion_cnn.py. Input: 28x28 grey images, (x/255 - {mean}) / {std}.")


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2))


class FashionCNN(nn.Module):
    """28x28 -> 14 -> 7 -> 3 spatial, then a 576-128-10 MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(conv_block(1, 16), conv_block(16, 32), conv_block(32, 64))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 3 * 3, 128), nn.ReLU(),
                                        nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def write_data_files(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                     y_test: np.ndarray) -> None:
    """Calibration rows come from the training split, evaluation rows from the test split."""
    rng = np.random.default_rng(SEED)
    calib = np.sort(rng.choice(len(x_train), N_CALIB, replace=False))
    evals = np.sort(rng.choice(len(x_test), N_EVAL, replace=False))
    common.write_npz(common.MODELS_DIR / "fashion_calib.npz",
                     {"input": x_train[calib], "labels": y_train[calib]})
    common.write_npz(common.MODELS_DIR / "fashion_eval.npz",
                     {"input": x_test[evals], "labels": y_test[evals]})


def metadata() -> dict[str, str]:
    return {"class_names": common.json_list(common.FASHION_CLASSES),
            "dataset": "Fashion-MNIST (Debian dataset-fashion-mnist)",
            "normalization": f"(x/255 - {common.FASHION_MEAN}) / {common.FASHION_STD}"}


def main() -> None:
    common.seed_everything(SEED)
    x_train, y_train, x_test, y_test = common.load_fashion()
    write_data_files(x_train, y_train, x_test, y_test)
    model = FashionCNN()
    print("fashion_cnn: training", flush=True)
    common.train_classifier(model, torch.from_numpy(x_train), torch.from_numpy(y_train),
                            epochs=EPOCHS, batch_size=128, lr=3e-3, seed=SEED)
    eval_file = common.MODELS_DIR / "fashion_eval.npz"
    with np.load(eval_file) as data:
        x_eval, y_eval = data["input"], data["labels"]
    torch_acc = common.torch_accuracy(model, torch.from_numpy(x_eval), torch.from_numpy(y_eval))
    doc = DOC.format(mean=common.FASHION_MEAN, std=common.FASHION_STD)
    example = torch.from_numpy(x_eval[:2])
    for opset, keep_bn in ((13, True), (17, False)):
        onnx_model = common.export_torchscript(model, example, opset=opset, input_name="input",
                                               keep_batchnorm=keep_bn)
        onnx_model = common.finalize(onnx_model, opset=opset, doc=doc, metadata=metadata())
        common.check_parity(onnx_model, model, x_eval[:256])
        path = common.MODELS_DIR / f"fashion_cnn_op{opset}.onnx"
        digest = common.save_model(onnx_model, path)
        common.report(path, digest, common.ort_accuracy(path, eval_file), torch_acc)


if __name__ == "__main__":
    main()
