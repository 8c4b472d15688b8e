"""Error-feedback rounding (GPTQ / OBQ): round a weight so the layer's *output* moves least.

Round-to-nearest minimizes ``‖Q − W‖²`` element by element, but what the network sees is the
layer output ``W x``; its expected squared change is ``Σ_rows (q − w)ᵀ H (q − w)`` with
``H = E[x xᵀ]`` the layer's input second-moment matrix. Optimal Brain Quantization rounds one
input dimension at a time and moves the not-yet-rounded weights of each row along
``H⁻¹`` to cancel the error just made; GPTQ (Frantar et al., 2023) showed the update can use
one Cholesky factor of ``H⁻¹`` for all rows and that visiting dimensions by decreasing
``diag(H)`` ("act order") helps at 3–4 bits. Here the scales are fixed beforehand (the
exporter's own MSE or max scales), so only the integers change and everything downstream
(DequantizeLinear, bias floors, reports) is the same as for round-to-nearest.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from scipy.linalg import cho_solve

from hawq_onnx.quant.weights import QuantizedWeight, qrange

#: Tikhonov damping as a fraction of mean(diag H): keeps the Cholesky factor well defined for
#: rank-deficient inputs (fewer calibration rows than input dimensions, constant features).
DEFAULT_DAMPING = 0.01


def _damped_inverse_factor(gram: np.ndarray, damping: float) -> np.ndarray:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` (``(H + λI)⁻¹ = Uᵀ U``)."""
    gram = np.array(gram, dtype=np.float64)
    diag = np.diag(gram).copy()
    dead = diag <= 0
    gram[dead, dead] = 1.0  # inputs that are always zero: any rounding is exact there
    mean = float(np.mean(np.diag(gram)))
    lam = damping * (mean if mean > 0 else 1.0)
    size = gram.shape[0]
    for attempt in range(8):  # raise the damping until H + λI is numerically positive definite
        try:
            lower = np.linalg.cholesky(gram + lam * (10.0 ** attempt) * np.eye(size))
            break
        except np.linalg.LinAlgError:
            continue
    else:
        raise np.linalg.LinAlgError("input second-moment matrix is not positive definite")
    inverse = cho_solve((lower, True), np.eye(size))
    return np.linalg.cholesky((inverse + inverse.T) / 2).T


def error_feedback_round(matrix: np.ndarray, scale: np.ndarray, low: int, high: int,
                         gram: np.ndarray, *, damping: float = DEFAULT_DAMPING,
                         act_order: bool = True) -> np.ndarray:
    """Integers ``q`` (int64, ``matrix``'s shape) with ``q * scale`` close to ``matrix`` in the
    metric of ``gram``.

    ``matrix`` is ``[rows, K]`` (one row per output channel, K the reduction dimension the
    ``[K, K]`` ``gram`` describes); ``scale`` is the fixed per-element scale (same shape, or
    anything that broadcasts to it); ``[low, high]`` the integer range.
    """
    weights = np.array(matrix, dtype=np.float64)
    scales = np.broadcast_to(np.asarray(scale, dtype=np.float64), weights.shape).copy()
    size = weights.shape[1]
    if gram.shape != (size, size):
        raise ValueError(f"gram is {gram.shape}, the weight has {size} input dimensions")
    order = np.argsort(-np.diag(gram), kind="stable") if act_order else np.arange(size)
    weights, scales = weights[:, order], scales[:, order]
    factor = _damped_inverse_factor(np.asarray(gram)[np.ix_(order, order)], damping)
    values = np.empty(weights.shape, dtype=np.int64)
    for column in range(size):
        current = weights[:, column]
        rounded = np.clip(np.rint(current / scales[:, column]), low, high)
        values[:, column] = rounded.astype(np.int64)
        error = (current - rounded * scales[:, column]) / factor[column, column]
        weights[:, column + 1:] -= np.outer(error, factor[column, column + 1:])
    restored = np.empty_like(values)
    restored[:, order] = values
    return restored


def _as_rows(array: np.ndarray, out_axis: int) -> np.ndarray:
    """``[out channels, K]``: the other axes flattened in order (the unfolding's order)."""
    moved = np.moveaxis(array, out_axis, 0)
    return moved.reshape(moved.shape[0], -1)


def refine_rounding(weight: np.ndarray, quantized: QuantizedWeight, out_axis: int,
                    gram: np.ndarray) -> QuantizedWeight:
    """``quantized`` with its integers re-rounded by error feedback (scales unchanged).

    ``gram`` is ``[K, K]``, or ``[G, K, K]`` for a grouped convolution (output channels
    split into G equal consecutive groups). The round-to-nearest integers are kept if error
    feedback does not lower the layer's output error (it can fail to with heavy damping or
    clipped rows), so this never makes a layer worse in the metric it optimizes.
    """
    matrix = _as_rows(np.asarray(weight, dtype=np.float32), out_axis)
    scale = _as_rows(quantized.expanded_scale(), out_axis)
    low, high = qrange(quantized.bits)
    nearest = _as_rows(quantized.values, out_axis)
    grams = gram if gram.ndim == 3 else gram[None]  # one per group of output channels
    rows = matrix.shape[0] // len(grams)
    values = np.empty_like(nearest)
    gain = 0.0
    for group, group_gram in enumerate(grams):
        part = slice(group * rows, (group + 1) * rows)
        values[part] = error_feedback_round(matrix[part], scale[part], low, high, group_gram)
        gain += output_error(matrix[part], nearest[part] * scale[part], group_gram) \
            - output_error(matrix[part], values[part] * scale[part], group_gram)
    if gain <= 0:
        return quantized
    moved_shape = np.moveaxis(quantized.values, out_axis, 0).shape
    restored = np.moveaxis(values.reshape(moved_shape), 0, out_axis)
    return replace(quantized, values=np.ascontiguousarray(restored))


def output_error(matrix: np.ndarray, dequantized: np.ndarray, gram: np.ndarray) -> float:
    """``Σ_rows (q − w)ᵀ H (q − w)``: the expected squared change of the layer output."""
    delta = np.asarray(dequantized, dtype=np.float64) - np.asarray(matrix, dtype=np.float64)
    return float(np.einsum("rk,kl,rl->", delta, np.asarray(gram, dtype=np.float64), delta))


__all__ = ["DEFAULT_DAMPING", "error_feedback_round", "output_error", "refine_rounding"]
