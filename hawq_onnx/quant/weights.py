"""Weight quantizers: symmetric integer grids per tensor, per channel or per block.

All weights are quantized symmetrically (zero point 0) onto the signed b-bit grid
``[-2^(b-1), 2^(b-1)-1]``: that is what integer kernels expect of weights and what lets the
bias be folded into an int32 accumulator. A scale unit ("row") is a whole tensor, one output
channel, or one block of ``group_size`` consecutive elements along the reduction axis.

Round-to-nearest of ``max|w| / qmax`` is exact enough at 8 bits; at 4 bits and below the
scale that minimizes the squared error is markedly smaller than the max (outliers are worth
clipping), so :func:`quantize_weight` searches it per row. The same function is the ``Q_b``
of the mixed-precision sensitivity tables, so the allocator scores exactly what is exported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hawq_onnx.quant.plan import WeightSpec

#: fractions of ``max|w|/qmax`` tried by the MSE scale search (coarse-to-fine is not needed:
#: the error is smooth in the scale and 96 points cost little next to the model's run time).
_SEARCH_GRID = np.linspace(1.0, 0.05, 96, dtype=np.float64)
INT32_MAX = 2**31 - 1


def qrange(bits: int) -> tuple[int, int]:
    """The signed b-bit integer range."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


@dataclass(frozen=True)
class WeightLayout:
    """Where the channels and the reduction dimension of one weight constant are.

    ``channel_axes``: candidate per-channel axes; the first is used unless there are several
    (grouped ConvTranspose), then the one with the lower error wins. Empty: per-tensor only.
    ``reduction_axis``: the axis blocks run along for group-wise quantization (None: this
    weight cannot be quantized group-wise).
    """

    channel_axes: tuple[int, ...] = ()
    reduction_axis: int | None = None


@dataclass
class QuantizedWeight:
    """Integer values plus what DequantizeLinear needs to restore them."""

    values: np.ndarray  # int64, the weight's shape, inside qrange(bits)
    scale: np.ndarray  # float32: () per tensor, (C,) per channel, blocked shape per block
    bits: int
    axis: int | None = None  # DequantizeLinear axis (per channel / per block)
    block_size: int | None = None

    @property
    def granularity(self) -> str:
        if self.block_size is not None:
            return "group"
        return "per_tensor" if self.axis is None else "per_channel"

    def expanded_scale(self) -> np.ndarray:
        """The scale broadcast to the weight's shape (float32)."""
        shape = self.values.shape
        if self.axis is None:
            return np.broadcast_to(self.scale, shape)
        if self.block_size is None:
            view = [1] * len(shape)
            view[self.axis] = shape[self.axis]
            return np.broadcast_to(self.scale.reshape(view), shape)
        repeated = np.repeat(self.scale, self.block_size, axis=self.axis)
        index = [slice(None)] * len(shape)
        index[self.axis] = slice(0, shape[self.axis])
        return repeated[tuple(index)]

    def dequantize(self) -> np.ndarray:
        """What DequantizeLinear computes, in float32."""
        return (self.values.astype(np.float32) * self.expanded_scale()).astype(np.float32)

    def channel_scale(self) -> np.ndarray:
        """Scale per output channel (length of the channel axis), per-tensor broadcast."""
        if self.block_size is not None:
            raise ValueError("block-quantized weights have no per-channel scale")
        return np.asarray(self.scale, dtype=np.float32).reshape(-1)


# --------------------------------------------------------------------------- row quantizer


def _round_rows(rows: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    low, high = qrange(bits)
    return np.clip(np.rint(rows / scale[:, None]), low, high)


def _max_scale(rows: np.ndarray, bits: int) -> np.ndarray:
    """``max|w| / qmax`` per row in float32; all-zero rows get scale 1 (any positive works)."""
    absmax = np.abs(rows).max(axis=1) if rows.shape[1] else np.zeros(rows.shape[0])
    scale = (absmax / qrange(bits)[1]).astype(np.float32)
    return np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)


def _mse_scale(rows: np.ndarray, bits: int) -> np.ndarray:
    """The grid fraction of the max scale with the least squared error, per row."""
    base = _max_scale(rows, bits).astype(np.float64)
    best = base.copy()
    best_err = np.full(rows.shape[0], np.inf)
    for fraction in _SEARCH_GRID:
        scale = (base * fraction).astype(np.float32)
        err = np.square(_round_rows(rows, scale, bits) * scale[:, None] - rows).sum(axis=1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = np.where(better, scale, best)
    return best.astype(np.float32)


def quantize_rows(rows: np.ndarray, bits: int, method: str,
                  min_scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Quantize each row of a 2-D float array with its own scale: ``(values, scale)``.

    ``min_scale`` (per row) raises scales that are too small for some other constraint (the
    int32 bias range).
    """
    rows = np.asarray(rows, dtype=np.float32)
    scale = _mse_scale(rows, bits) if method == "mse" else _max_scale(rows, bits)
    if min_scale is not None:
        scale = np.maximum(scale, np.asarray(min_scale, dtype=np.float32))
    return _round_rows(rows, scale, bits).astype(np.int64), scale


# --------------------------------------------------------------------------- layouts


def _per_channel(weight: np.ndarray, axis: int, spec: WeightSpec,
                 min_scale: np.ndarray | None) -> QuantizedWeight:
    moved = np.moveaxis(weight, axis, 0)
    rows = moved.reshape(moved.shape[0], -1)
    values, scale = quantize_rows(rows, spec.bits, spec.scale_search, min_scale)
    values = np.moveaxis(values.reshape(moved.shape), 0, axis)
    return QuantizedWeight(values, scale, spec.bits, axis=axis)


def _per_tensor(weight: np.ndarray, spec: WeightSpec,
                min_scale: np.ndarray | None) -> QuantizedWeight:
    floor = None if min_scale is None else np.asarray([np.max(min_scale)])
    values, scale = quantize_rows(weight.reshape(1, -1), spec.bits, spec.scale_search, floor)
    return QuantizedWeight(values.reshape(weight.shape), scale.reshape(()), spec.bits)


def _blocked(weight: np.ndarray, axis: int, block: int, spec: WeightSpec) -> QuantizedWeight:
    moved = np.moveaxis(weight, axis, -1)
    length = moved.shape[-1]
    blocks = math.ceil(length / block)
    padding = [(0, 0)] * (moved.ndim - 1) + [(0, blocks * block - length)]
    padded = np.pad(moved, padding)
    values, scale = quantize_rows(padded.reshape(-1, block), spec.bits, spec.scale_search)
    values = values.reshape(padded.shape)[..., :length]
    scale = scale.reshape(moved.shape[:-1] + (blocks,))
    return QuantizedWeight(np.moveaxis(values, -1, axis), np.moveaxis(scale, -1, axis),
                           spec.bits, axis=axis, block_size=block)


def squared_error(weight: np.ndarray, quantized: QuantizedWeight) -> float:
    return float(np.square(quantized.dequantize().astype(np.float64) - weight).sum())


def quantize_weight(weight: np.ndarray, spec: WeightSpec, layout: WeightLayout,
                    min_scale: np.ndarray | None = None) -> QuantizedWeight:
    """Quantize ``weight`` as ``spec`` asks, on the axes ``layout`` allows.

    Group-wise falls back to per-channel where the weight has no reduction axis (Conv) or
    the group does not divide it into at least two blocks; per-channel falls back to
    per-tensor where there is no channel axis. ``min_scale`` is per channel (per-channel
    only; per-tensor uses its maximum).
    """
    weight = np.asarray(weight, dtype=np.float32)
    if weight.size == 0:
        return QuantizedWeight(np.zeros(weight.shape, np.int64), np.ones((), np.float32),
                               spec.bits)
    if weight.ndim == 0:
        scalar = _per_tensor(weight.reshape(1), spec, min_scale)
        return QuantizedWeight(scalar.values.reshape(()), scalar.scale, spec.bits)
    if spec.granularity == "group" and layout.reduction_axis is not None and spec.group_size:
        length = weight.shape[layout.reduction_axis]
        if length > spec.group_size:
            return _blocked(weight, layout.reduction_axis, spec.group_size, spec)
    if spec.granularity == "per_tensor" or not layout.channel_axes:
        return _per_tensor(weight, spec, min_scale)
    candidates = [_per_channel(weight, axis, spec, min_scale if axis == layout.channel_axes[0]
                               else None) for axis in layout.channel_axes]
    if len(candidates) == 1:
        return candidates[0]
    return min(candidates, key=lambda q: squared_error(weight, q))


def fake_quantize(weight: np.ndarray, spec: WeightSpec, layout: WeightLayout) -> np.ndarray:
    """``Q_b(W)``: quantize and dequantize (the exact values the exported model computes)."""
    return quantize_weight(weight, spec, layout).dequantize()


# --------------------------------------------------------------------------- bias


def bias_min_weight_scale(bias: np.ndarray, act_scale: float) -> np.ndarray:
    """The smallest weight scale per channel that keeps ``bias / (s_x * s_w)`` inside int32
    (with a 2x margin, so rounding and accumulation never reach the limit)."""
    limit = INT32_MAX / 2
    return (np.abs(bias.astype(np.float64)) / (float(act_scale) * limit)).astype(np.float32)


def quantize_bias(bias: np.ndarray, act_scale: float, weight_scale: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Bias as int32 with scale ``s_x * s_w`` (per channel) and zero point 0.

    Raises ValueError when a value would not fit int32: callers must have raised the weight
    scale with :func:`bias_min_weight_scale` first.
    """
    scale = (np.float32(act_scale) * np.asarray(weight_scale, dtype=np.float32)).astype(
        np.float32)
    scale = np.broadcast_to(scale, bias.shape).astype(np.float32)
    values = np.rint(bias.astype(np.float64) / scale.astype(np.float64))
    if np.any(np.abs(values) > INT32_MAX):
        raise ValueError("bias does not fit int32 at scale s_x * s_w")
    return values.astype(np.int32), scale


__all__ = ["INT32_MAX", "QuantizedWeight", "WeightLayout", "bias_min_weight_scale",
           "fake_quantize", "qrange", "quantize_bias", "quantize_rows", "quantize_weight",
           "squared_error"]
