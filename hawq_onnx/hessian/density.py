"""Eigenvalue spectral density by stochastic Lanczos quadrature (SLQ).

Each run starts Lanczos (full re-orthogonalization) from a normalized Rademacher vector; the
eigenpairs of the tridiagonal T (symmetric solver) give quadrature nodes θ_k (Ritz values)
and weights τ_k (squared first components). Averaged over runs, ``Σ τ_k δ(λ − θ_k)``
approximates the spectral density of H divided by its dimension d.

The quadrature is exact for polynomials of degree < 2m, so ``d·Σ τθ`` and ``d·Σ τθ²`` are
exactly the Hutchinson estimates ``zᵀHz`` and ``zᵀH²z`` of the start vector: the trace
column is a free cross-check of the Hutchinson traces and ``Σ τθ²·d`` estimates ‖H‖_F².
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hawq_onnx.hessian.hvp import HessianVectorProduct
from hawq_onnx.hessian.lanczos import lanczos
from hawq_onnx.hessian.operators import group_apply, random_starts


@dataclass
class SpectralDensity:
    """SLQ nodes and weights of every run for one operator of dimension ``dim``."""

    dim: int
    nodes: list[list[float]]
    weights: list[list[float]]

    @property
    def runs(self) -> int:
        return len(self.nodes)

    def _moments(self, power: int) -> np.ndarray:
        return np.array([self.dim * float(np.dot(w, np.power(n, power)))
                         for n, w in zip(self.nodes, self.weights, strict=True)])

    @property
    def trace(self) -> float:
        return float(self._moments(1).mean())

    @property
    def trace_se(self) -> float:
        values = self._moments(1)
        return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else np.inf

    @property
    def frobenius_sq(self) -> float:
        return float(self._moments(2).mean())

    def curve(self, grid: np.ndarray, sigma: float | None = None) -> np.ndarray:
        return smoothed_density(self.nodes, self.weights, grid, sigma)


def smoothed_density(nodes: Sequence[Sequence[float]], weights: Sequence[Sequence[float]],
                     grid: np.ndarray, sigma: float | None = None) -> np.ndarray:
    """The density on ``grid``: each run's quadrature smoothed with Gaussians of width
    ``sigma`` (default: 1 % of the node range), averaged over runs; integrates to one."""
    flat_nodes = np.concatenate([np.asarray(n, dtype=np.float64) for n in nodes])
    flat_weights = np.concatenate([np.asarray(w, dtype=np.float64) for w in weights])
    flat_weights /= max(len(nodes), 1)
    if sigma is None:
        span = float(flat_nodes.max() - flat_nodes.min()) if flat_nodes.size else 1.0
        sigma = max(span, 1e-12) / 100
    diff = (grid[:, None] - flat_nodes[None, :]) / sigma
    return (np.exp(-0.5 * diff**2) / (sigma * np.sqrt(2 * np.pi))) @ flat_weights


def spectral_density(
    hvp: HessianVectorProduct,
    groups: Sequence[Sequence[int]],
    generator: torch.Generator,
    steps: int = 64,
    runs: int = 4,
    progress: Callable[[int], None] | None = None,
) -> list[SpectralDensity]:
    """One density per group; all groups and runs advance together (``progress(1)`` per
    Lanczos step)."""
    if steps < 1 or runs < 1:
        raise ValueError("steps and runs must be positive")
    expanded = [g for g in groups for _ in range(runs)]
    starts = random_starts(hvp, groups, generator, count=runs)
    states = lanczos(group_apply(hvp, expanded), starts, steps, progress=progress)
    out: list[SpectralDensity] = []
    for i, group in enumerate(groups):
        nodes, weights = [], []
        for state in states[i * runs:(i + 1) * runs]:
            theta, s = state.ritz()
            nodes.append([float(t) for t in theta])
            weights.append([float(w) for w in s[0, :] ** 2])
        out.append(SpectralDensity(hvp.layout.size_of(group), nodes, weights))
    return out
