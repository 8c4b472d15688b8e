"""Clipping ranges from a streamed histogram: min/max, percentile, entropy (KL), MSE.

Every method reads the same :class:`StreamingHistogram`, so one pass over the calibration
data serves all of them, and the choice of method costs nothing extra.

* ``minmax``: the exact observed extremes (no clipping).
* ``percentile``: drop ``(100 - p) / 2`` percent of the samples from each tail (of ``|x|``
  for symmetric quantization).
* ``entropy``: TensorRT's rule: the threshold whose clipped-and-quantized distribution is
  closest in KL divergence to the observed one, found per sign of the data (non-negative
  tensors keep their full unsigned grid) with ReLU's exact zeros left out.
* ``mse``: the range minimizing the expected squared quantization error (rounding plus
  clipping), evaluated on bin centres for every candidate at once.
"""

from __future__ import annotations

import math

import numpy as np

from hawq_onnx.calibration.histogram import StreamingHistogram
from hawq_onnx.quant.plan import ActSpec

#: the KL search merges the |x| histogram down to at most this many bins (TensorRT uses 2048)
_KL_BINS = 2048
_KL_MAX_CANDIDATES = 512
_MSE_GRID = np.linspace(1.0, 0.02, 99)


def select_range(hist: StreamingHistogram, method: str, spec: ActSpec,
                 percentile: float = 99.999) -> tuple[float, float]:
    """The ``(low, high)`` range to quantize a tensor with; (0, 0) if nothing was seen."""
    if hist.count == 0:
        return 0.0, 0.0
    if method == "minmax" or hist.max == hist.min:
        low, high = hist.min, hist.max
    elif method == "percentile":
        low, high = _percentile_range(hist, spec, percentile)
    elif method == "entropy":
        low, high = _entropy_range(hist, spec)
    elif method == "mse":
        low, high = _mse_range(hist, spec)
    else:
        raise ValueError(f"unknown calibration method '{method}'")
    return float(low), float(high)


def _clamp(hist: StreamingHistogram, low: float, high: float) -> tuple[float, float]:
    return max(low, hist.min), min(high, hist.max)


# --------------------------------------------------------------------------- percentile


def _percentile_range(hist: StreamingHistogram, spec: ActSpec, percentile: float
                      ) -> tuple[float, float]:
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    if spec.symmetric:
        counts, width = hist.folded()
        cdf = np.cumsum(counts)
        index = int(np.searchsorted(cdf, cdf[-1] * percentile / 100.0, side="left"))
        threshold = (index + 1) * width
        return _clamp(hist, -threshold, threshold)
    tail = hist.count * (100.0 - percentile) / 200.0
    cdf = np.cumsum(hist.counts)
    low_index = int(np.searchsorted(cdf, tail, side="right"))
    high_index = int(np.searchsorted(cdf, hist.count - tail, side="left"))
    edges = hist.edges()
    return _clamp(hist, float(edges[low_index]), float(edges[min(high_index + 1, hist.bins)]))


# --------------------------------------------------------------------------- entropy


def _coarsen(counts: np.ndarray, limit: int) -> tuple[np.ndarray, int]:
    """Merge bin pairs (exactly) until at most ``limit`` bins remain; returns the factor."""
    factor = 1
    while counts.size > limit:
        if counts.size % 2:
            counts = np.append(counts, 0)
        counts = counts.reshape(-1, 2).sum(axis=1)
        factor *= 2
    return counts, factor


def _kl_divergence(reference: np.ndarray, candidate: np.ndarray) -> float:
    """KL(reference || candidate); infinite when the candidate is empty (every value of
    the kept range lies in the clipped tail), not 0/0."""
    if candidate.sum() <= 0:
        return math.inf
    p = reference / reference.sum()
    q = candidate / candidate.sum()
    mask = p > 0
    q = np.where(mask & (q <= 0), 1e-12, q)
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def _expanded_quantized(counts: np.ndarray, levels: int) -> np.ndarray:
    """``counts`` merged into ``levels`` groups, spread back over the non-empty bins."""
    size = counts.size
    group = (np.arange(size) * levels) // size
    nonzero = (counts > 0).astype(np.float64)
    totals = np.bincount(group, weights=counts, minlength=levels)
    members = np.bincount(group, weights=nonzero, minlength=levels)
    return np.where(nonzero > 0, totals[group] / np.maximum(members[group], 1), 0.0)


def kl_threshold(counts: np.ndarray, width: float, levels: int) -> float:
    """The |x| threshold minimizing KL(observed || clipped and quantized) (TensorRT)."""
    counts = counts.astype(np.float64)
    last = int(np.flatnonzero(counts)[-1]) + 1 if counts.any() else 0
    counts = counts[:last]
    counts, factor = _coarsen(counts, _KL_BINS)
    width *= factor
    if counts.size <= levels:
        return counts.size * width
    stride = max(1, math.ceil((counts.size - levels) / _KL_MAX_CANDIDATES))
    best, best_kl = counts.size, math.inf
    for stop in range(levels, counts.size + 1, stride):
        reference = counts[:stop].copy()
        reference[-1] += counts[stop:].sum()
        divergence = _kl_divergence(reference, _expanded_quantized(counts[:stop], levels))
        if divergence < best_kl:
            best, best_kl = stop, divergence
    return best * width


def _entropy_range(hist: StreamingHistogram, spec: ActSpec) -> tuple[float, float]:
    """KL thresholds per sign (signed data: half the levels each side), so a spike on one
    side (a background pixel value) cannot clip the other; a symmetric grid takes the larger
    side. Exact zeros are left out (ReLU's spike is exact on every grid)."""
    levels = 2**spec.bits
    if levels >= hist.bins:  # 16 bits: finer than the histogram, clipping only hurts
        return hist.min, hist.max
    if spec.symmetric:
        threshold = 0.0
        for positive in (True, False):
            counts, width = hist.side(positive=positive, drop_zeros=positive)
            threshold = max(threshold, kl_threshold(counts, width, levels // 2))
        return _clamp(hist, -threshold, threshold)
    high = hist.max
    if hist.max > 0:
        counts, width = hist.side(positive=True, drop_zeros=True)
        high = kl_threshold(counts, width, levels if hist.min >= 0 else levels // 2)
    low = hist.min
    if hist.min < 0:
        counts, width = hist.side(positive=False)
        low = -kl_threshold(counts, width, levels if hist.max <= 0 else levels // 2)
    return _clamp(hist, low, high)


# --------------------------------------------------------------------------- mse


def _scales_and_zero_points(lows: np.ndarray, highs: np.ndarray, spec: ActSpec
                            ) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Vectorized :func:`hawq_onnx.quant.activations.act_qparams`: the float32 scale is
    what the model stores, so a range too small (or too large) for float32 gets act_qparams'
    fallback scale 1.0 after rounding, never a zero that divides."""
    lows, highs = np.minimum(lows, 0.0), np.maximum(highs, 0.0)
    if spec.symmetric:
        qmin, qmax = -(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1
        scales = np.maximum(np.abs(lows), np.abs(highs)) / qmax
    else:
        qmin, qmax = 0, 2**spec.bits - 1
        scales = (highs - lows) / qmax
    scales = scales.astype(np.float32).astype(np.float64)
    scales = np.where(np.isfinite(scales) & (scales > 0), scales, 1.0)
    zero_points = np.zeros_like(scales) if spec.symmetric else \
        np.clip(np.rint(-lows / scales), 0, qmax)
    return scales, zero_points, qmin, qmax


def _errors(centers: np.ndarray, weights: np.ndarray, lows: np.ndarray, highs: np.ndarray,
            spec: ActSpec) -> np.ndarray:
    scales, zero_points, qmin, qmax = _scales_and_zero_points(lows, highs, spec)
    q = np.clip(np.rint(centers[None, :] / scales[:, None]) + zero_points[:, None], qmin, qmax)
    restored = (q - zero_points[:, None]) * scales[:, None]
    return (np.square(restored - centers[None, :]) * weights[None, :]).sum(axis=1)


def _mse_range(hist: StreamingHistogram, spec: ActSpec) -> tuple[float, float]:
    part = hist.occupied()
    centers = np.clip(hist.centers()[part], hist.min, hist.max)
    weights = hist.counts[part].astype(np.float64)
    if spec.symmetric:
        bound = max(abs(hist.min), abs(hist.max))
        thresholds = bound * _MSE_GRID
        best = thresholds[int(np.argmin(_errors(centers, weights, -thresholds, thresholds,
                                                spec)))]
        return _clamp(hist, -best, best)
    low, high = hist.min, hist.max
    for _ in range(2):  # coordinate descent: the two ends barely interact
        highs = hist.max * _MSE_GRID if hist.max > 0 else np.array([high])
        high = float(highs[int(np.argmin(_errors(centers, weights, np.full_like(highs, low),
                                                 highs, spec)))])
        lows = min(hist.min, 0.0) * _MSE_GRID if hist.min < 0 else np.array([low])
        low = float(lows[int(np.argmin(_errors(centers, weights, lows,
                                               np.full_like(lows, high), spec)))])
    return _clamp(hist, low, high)


__all__ = ["kl_threshold", "select_range"]
