"""Hutchinson trace estimation with a standard-error stopping rule.

Why one global probe: for a Rademacher vector z split into per-layer blocks z_l,
``E[z_lᵀ (H z)_l] = Tr(H_ll)`` because the cross terms vanish in expectation, so one HVP
per probe estimates every layer's trace at once (the per-layer loop costs L times more and
is kept as a diagnostic). Why the SE rule: "stop when the mean changes by < 1e-3" stops far
too early; probes are drawn in chunks until ``SE(mean_l) ≤ rel_tol·|mean_l|`` for every block.

Once a block meets the rule its estimate is final and later probes leave it out (zero in
that block). The estimates of the remaining blocks stay unbiased and their variance can only
drop: the cross terms with the dropped blocks, the main noise for small layers next to big
ones, are gone. The cost per probe is unchanged (one HVP).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from hawq_onnx.hessian.blocks import BlockVector, rademacher
from hawq_onnx.hessian.hvp import HessianVectorProduct

# ``sample(k, active)`` returns a [k, blocks] array: one row of per-block estimates per
# probe, NaN for the blocks not in ``active`` (a boolean mask).
Sampler = Callable[[int, np.ndarray], np.ndarray]
Progress = Callable[[int], None]


@dataclass(frozen=True)
class StoppingRule:
    rel_tol: float = 0.05
    min_probes: int = 16
    max_probes: int = 256
    chunk: int = 8

    def __post_init__(self) -> None:
        if not (self.rel_tol > 0 and 1 <= self.min_probes <= self.max_probes and self.chunk > 0):
            raise ValueError(f"invalid stopping rule {self}")


@dataclass
class TraceEstimate:
    """Per-block Hutchinson samples (NaN where a probe left the block out) and summary."""

    samples: np.ndarray  # [probes, blocks]
    rule: StoppingRule

    @property
    def probes(self) -> int:
        return int(self.samples.shape[0])

    @property
    def counts(self) -> np.ndarray:
        """Samples per block."""
        return np.sum(~np.isnan(self.samples), axis=0)

    @property
    def mean(self) -> np.ndarray:
        return _column_stats(self.samples)[0]

    @property
    def se(self) -> np.ndarray:
        return _column_stats(self.samples)[1]

    @property
    def converged(self) -> np.ndarray:
        mean, se = _column_stats(self.samples)
        return se <= self.rule.rel_tol * np.abs(mean)

    @property
    def total_mean(self) -> float:
        """The trace of the whole (all-layer) Hessian: the sum of the diagonal blocks."""
        return float(self.mean.sum())

    @property
    def total_se(self) -> float:
        """Exact from the per-probe sums while every probe covered every block; after
        blocks dropped out, the root sum of squared block SEs (cross-block covariance
        ignored)."""
        if not np.isnan(self.samples).any():
            return float(_column_stats(self.samples.sum(axis=1, keepdims=True))[1][0])
        return float(np.sqrt(np.sum(self.se**2)))


def _column_stats(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard error of each column, ignoring NaN (inf SE below two samples)."""
    counts = np.sum(~np.isnan(samples), axis=0)
    mean = np.zeros(samples.shape[1])
    se = np.full(samples.shape[1], np.inf)
    for j in range(samples.shape[1]):
        column = samples[~np.isnan(samples[:, j]), j]
        if counts[j]:
            mean[j] = column.mean()
        if counts[j] >= 2:
            se[j] = column.std(ddof=1) / np.sqrt(counts[j])
    return mean, se


def run_hutchinson(sample: Sampler, blocks: int, rule: StoppingRule,
                   progress: Progress | None = None) -> TraceEstimate:
    """Draw probes chunk by chunk until the SE rule holds for every block or the cap;
    blocks that meet the rule (after ``min_probes``) are left out of later probes."""
    rows: list[np.ndarray] = []
    active = np.ones(blocks, dtype=bool)
    drawn = 0
    while drawn < rule.max_probes:
        k = min(rule.chunk, rule.max_probes - drawn)
        rows.append(np.asarray(sample(k, active.copy()), dtype=np.float64).reshape(k, blocks))
        drawn += k
        if progress is not None:
            progress(k)
        if drawn >= rule.min_probes:
            active = ~TraceEstimate(np.concatenate(rows), rule).converged
            if not active.any():
                break
    return TraceEstimate(np.concatenate(rows), rule)


def global_probe_sampler(hvp: HessianVectorProduct, generator: torch.Generator) -> Sampler:
    """One Rademacher HVP per probe over all active blocks gives a sample for each."""

    def sample(k: int, active: np.ndarray) -> np.ndarray:
        blocks = [int(b) for b in np.flatnonzero(active)]
        probes = [_draw(hvp, generator, blocks) for _ in range(k)]
        products = hvp.apply(probes, outputs=[blocks] * k)
        rows = np.full((k, len(active)), np.nan)
        for row, z, hz in zip(rows, probes, products, strict=True):
            row[blocks] = [_dot(z[b], hz[b]) for b in blocks]
        return rows

    return sample


def per_layer_sampler(hvp: HessianVectorProduct, generator: torch.Generator) -> Sampler:
    """Diagnostic mode: one HVP per active layer and probe, on that layer's block only."""

    def sample(k: int, active: np.ndarray) -> np.ndarray:
        blocks = [int(b) for b in np.flatnonzero(active)]
        probes = [_draw(hvp, generator, [b]) for _ in range(k) for b in blocks]
        products = hvp.apply(probes, outputs=[list(z) for z in probes])
        values = [_dot(z[b], hz[b]) for z, hz in zip(probes, products, strict=True)
                  for b in z]
        rows = np.full((k, len(active)), np.nan)
        rows[:, blocks] = np.array(values).reshape(k, len(blocks))
        return rows

    return sample


def _draw(hvp: HessianVectorProduct, generator: torch.Generator,
          blocks: list[int]) -> BlockVector:
    return {b: rademacher(generator, hvp.layout.shapes[b], hvp.dtype, hvp.device)
            for b in blocks}


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() * b.double()).sum())
