"""Activation quantization parameters (scale, zero point) from a calibrated range.

Asymmetric unsigned is the default: after ReLU the whole range is non-negative and an
unsigned grid with zero point 0 spends every level on real values (and lets onnxruntime drop
the ReLU into the integer kernel). Symmetric signed puts zero point 0 in the middle. The
range always contains 0 so that zero padding and ReLU's zero are exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hawq_onnx.quant.plan import ActSpec


@dataclass(frozen=True)
class ActQParams:
    """Per-tensor parameters of one QuantizeLinear/DequantizeLinear pair."""

    scale: float  # a float32 value
    zero_point: int
    bits: int
    signed: bool

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def dtype(self) -> np.dtype:
        kind = "int" if self.signed else "uint"
        return np.dtype(f"{kind}{self.bits}")

    def fake_quantize(self, values: np.ndarray) -> np.ndarray:
        """What QuantizeLinear followed by DequantizeLinear computes (float32)."""
        scale = np.float32(self.scale)
        q = np.clip(np.rint(values / scale) + self.zero_point, self.qmin, self.qmax)
        return ((q - self.zero_point) * scale).astype(np.float32)


def act_qparams(low: float, high: float, spec: ActSpec) -> ActQParams:
    """Scale and zero point covering ``[low, high]`` (widened to contain 0)."""
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    if spec.symmetric:
        qmax = 2 ** (spec.bits - 1) - 1
        scale = np.float32(max(abs(low), abs(high)) / qmax)
        return ActQParams(_positive(scale), 0, spec.bits, True)
    qmax = 2**spec.bits - 1
    scale = _positive(np.float32((high - low) / qmax))
    zero_point = int(np.clip(np.rint(-low / scale), 0, qmax))
    return ActQParams(scale, zero_point, spec.bits, False)


def _positive(scale: np.float32) -> float:
    """A usable scale: an all-zero tensor still needs a finite positive one."""
    value = float(scale)
    return value if np.isfinite(value) and value > 0 else 1.0


__all__ = ["ActQParams", "act_qparams"]
