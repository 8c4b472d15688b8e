"""A streaming histogram whose memory does not grow with the number of samples.

Why this design: percentile, entropy and MSE calibration all need the value distribution of
each activation, and onnxruntime's own calibrators keep every batch's activations in memory
to build it at the end. Here each batch is binned immediately and dropped.

Bins lie on a lattice anchored at 0 with a power-of-two width: bin ``a`` (an absolute index)
covers ``[a*w, (a+1)*w)``. When a batch falls outside the covered range the width doubles
until everything fits, and pairs of old bins merge *exactly* into new ones (``a -> a // 2``):
re-binning never interpolates, so the result does not depend on batch order beyond the final
bin width. Folding the lattice at 0 gives the exact histogram of ``|x|`` for symmetric
methods.
"""

from __future__ import annotations

import math

import numpy as np

DEFAULT_BINS = 4096


class StreamingHistogram:
    """Exact min/max plus a histogram of at least ``bins / 2`` occupied bins."""

    def __init__(self, bins: int = DEFAULT_BINS) -> None:
        if bins < 16:
            raise ValueError("a histogram needs at least 16 bins")
        self.bins = bins
        self.width: float | None = None
        self.start = 0  # absolute index of counts[0]
        self.counts = np.zeros(bins, dtype=np.int64)
        self.min = math.inf
        self.max = -math.inf
        self.count = 0
        self.zeros = 0  # exact zeros (ReLU's spike): always representable, never clipped

    # ------------------------------------------------------------------ updates
    def update(self, values: np.ndarray) -> None:
        """Add a batch of values (any shape; NaNs are ignored)."""
        flat = np.asarray(values, dtype=np.float32).reshape(-1)
        if flat.size and not np.isfinite(flat).all():
            flat = flat[np.isfinite(flat)]
        if flat.size == 0:
            return
        low, high = float(flat.min()), float(flat.max())
        self.min, self.max = min(self.min, low), max(self.max, high)
        self._cover(self.min, self.max)
        assert self.width is not None
        index = np.floor(flat.astype(np.float64) / self.width).astype(np.int64) - self.start
        np.clip(index, 0, self.bins - 1, out=index)
        self.counts += np.bincount(index, minlength=self.bins)
        self.count += int(flat.size)
        self.zeros += int(flat.size - np.count_nonzero(flat))

    def merge(self, other: StreamingHistogram) -> None:
        """Add another histogram's counts (e.g. from a parallel worker)."""
        if other.count == 0:
            return
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)
        self._cover(self.min, self.max)
        assert self.width is not None and other.width is not None
        counts, start = other.counts, other.start
        shift = round(math.log2(self.width / other.width))
        if shift < 0:
            raise ValueError("merge the finer histogram into the coarser one")
        absolute = (np.arange(other.bins, dtype=np.int64) + start) >> shift
        self.counts += np.bincount(absolute - self.start, weights=counts,
                                   minlength=self.bins).astype(np.int64)[: self.bins]
        self.count += other.count
        self.zeros += other.zeros

    def _cover(self, low: float, high: float) -> None:
        """Make the lattice cover ``[low, high]``, coarsening (exactly) when needed."""
        if self.width is None:
            span = high - low if high > low else max(abs(high), 1e-30)
            self.width = 2.0 ** math.ceil(math.log2(span / (self.bins - 2)))
            self.start = math.floor(low / self.width)
        shift = 0
        width = self.width
        while (math.floor(high / width) - math.floor(low / width)) >= self.bins:
            width *= 2.0
            shift += 1
        new_start = math.floor(low / width)
        if shift == 0 and new_start >= self.start and \
                math.floor(high / width) < self.start + self.bins:
            return
        self._rebin(shift, width, new_start)

    def _rebin(self, shift: int, width: float, new_start: int) -> None:
        absolute = (np.arange(self.bins, dtype=np.int64) + self.start) >> shift
        occupied = self.counts > 0
        counts = np.zeros(self.bins, dtype=np.int64)
        np.add.at(counts, absolute[occupied] - new_start, self.counts[occupied])
        self.counts, self.width, self.start = counts, width, new_start

    # ------------------------------------------------------------------ views
    def edges(self) -> np.ndarray:
        """Bin edges (``bins + 1`` values)."""
        assert self.width is not None
        return (np.arange(self.bins + 1, dtype=np.float64) + self.start) * self.width

    def centers(self) -> np.ndarray:
        assert self.width is not None
        return (np.arange(self.bins, dtype=np.float64) + self.start + 0.5) * self.width

    def occupied(self) -> slice:
        """The slice of bins between the first and last non-empty one."""
        nonzero = np.flatnonzero(self.counts)
        if nonzero.size == 0:
            return slice(0, 0)
        return slice(int(nonzero[0]), int(nonzero[-1]) + 1)

    def folded(self) -> tuple[np.ndarray, float]:
        """The histogram of ``|x|`` on the same lattice: ``(counts, width)``, bin j covering
        ``[j*w, (j+1)*w)`` (exact, since the lattice is anchored at 0)."""
        negative, width = self.side(positive=False)
        positive, _ = self.side(positive=True)
        size = max(negative.size, positive.size)
        return np.pad(negative, (0, size - negative.size)) + np.pad(
            positive, (0, size - positive.size)), width

    def side(self, *, positive: bool, drop_zeros: bool = False) -> tuple[np.ndarray, float]:
        """The histogram of ``|x|`` for the values of one sign (zeros count as positive):
        ``(counts, width)`` with bin j covering ``[j*w, (j+1)*w)``. ``drop_zeros`` leaves the
        exact zeros out (they are exact on every grid and only distort shape-based
        criteria such as KL)."""
        assert self.width is not None
        absolute = np.arange(self.bins, dtype=np.int64) + self.start
        mask = absolute >= 0 if positive else absolute < 0
        index = absolute[mask] if positive else -absolute[mask] - 1
        size = int(index.max()) + 1 if index.size else 1
        counts = np.bincount(index, weights=self.counts[mask], minlength=size).astype(np.int64)
        if positive and drop_zeros:
            counts[0] -= self.zeros
        return counts, self.width


__all__ = ["DEFAULT_BINS", "StreamingHistogram"]
