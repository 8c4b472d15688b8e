"""MobileNetV3-style net on Fashion-MNIST, exported at opset 21 with a fixed batch of 1.

Depthwise 3x3 + pointwise 1x1 convolutions with BatchNorm (fused into the convs by the
exporter, which gives the wide per-channel weight ranges real depthwise models have),
HardSwish, two inverted-residual blocks with Add, GlobalAveragePool and a Gemm head. The
static [1,1,28,28] input mimics edge models that are exported without dynamic axes.
Uses models/fashion_calib.npz / fashion_eval.npz (written by models.fashion_cnn).

Run: .venv/bin/python -m models.mobilenet
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from models import common

SEED = 0
EPOCHS = 3
OPSET = 21
DOC = ("MobileNet-style Fashion-MNIST classifier (depthwise/pointwise convs, HardSwish, "
       "inverted residuals) trained by models/mobilenet.py; static batch of 1. Input: "
       "28x28 grey images, (x/255 - {mean}) / {std}.")


def conv_bn(c_in: int, c_out: int, kernel: int, *, stride: int = 1, groups: int = 1,
            act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out)]
    if act:
        layers.append(nn.Hardswish())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise 3x3 -> linear project (1x1), added to the input."""

    def __init__(self, channels: int, expanded: int) -> None:
        super().__init__()
        self.block = nn.Sequential(conv_bn(channels, expanded, 1),
                                   conv_bn(expanded, expanded, 3, groups=expanded),
                                   conv_bn(expanded, channels, 1, act=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class MobileNet(nn.Module):
    """28 -> 14 (stem) -> 7 (strided depthwise) spatial; 16 -> 32 -> 64 channels. The
    inverted residuals run at 7x7 to keep CPU training within a couple of minutes."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(1, 16, 3, stride=2),
            conv_bn(16, 16, 3, stride=2, groups=16), conv_bn(16, 32, 1, act=False),
            InvertedResidual(32, 96),
            conv_bn(32, 64, 1),
            InvertedResidual(64, 128))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def main() -> None:
    common.seed_everything(SEED)
    x_train, y_train, _, _ = common.load_fashion()
    model = MobileNet()
    print("mobilenet: training", flush=True)
    common.train_classifier(model, torch.from_numpy(x_train), torch.from_numpy(y_train),
                            epochs=EPOCHS, batch_size=128, lr=4e-3, seed=SEED)
    eval_file = common.MODELS_DIR / "fashion_eval.npz"
    with np.load(eval_file) as data:
        x_eval, y_eval = data["input"], data["labels"]
    torch_acc = common.torch_accuracy(model, torch.from_numpy(x_eval), torch.from_numpy(y_eval))
    onnx_model = common.export_torchscript(model, torch.from_numpy(x_eval[:1]), opset=OPSET,
                                           input_name="input", dynamic_batch=False)
    meta = {"class_names": common.json_list(common.FASHION_CLASSES),
            "dataset": "Fashion-MNIST (Debian dataset-fashion-mnist)",
            "normalization": f"(x/255 - {common.FASHION_MEAN}) / {common.FASHION_STD}"}
    doc = DOC.format(mean=common.FASHION_MEAN, std=common.FASHION_STD)
    onnx_model = common.finalize(onnx_model, opset=OPSET, doc=doc, metadata=meta)
    common.check_parity(onnx_model, model, x_eval[:64])
    path = common.MODELS_DIR / f"mobilenet_op{OPSET}.onnx"
    digest = common.save_model(onnx_model, path)
    common.report(path, digest, common.ort_accuracy(path, eval_file), torch_acc)


if __name__ == "__main__":
    main()
