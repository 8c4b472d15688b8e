"""Top-k Hessian eigenvalues (largest magnitude), per layer and for the whole model.

Two methods on the same HVPs:

* ``lanczos`` (default): full re-orthogonalization; stops when every wanted Ritz pair's
  residual ``β_m·|s_m,i|`` is ≤ ``tol·|θ_i|``. For a symmetric matrix the residual norm
  bounds the eigenvalue error, so "converged" guarantees a relative error ≤ tol.
  Memory: one basis vector per step.
* ``power``: power iteration with Gram–Schmidt deflation (HAWQ / PyHessian); stops on a
  relative change of the Rayleigh quotient < tol. Memory: k vectors.

Problems (layers, global) run in lockstep so each step is one sweep over the data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hawq_onnx.hessian.hvp import HessianVectorProduct
from hawq_onnx.hessian.lanczos import LanczosState, lanczos
from hawq_onnx.hessian.operators import group_apply, random_starts

EIGEN_METHODS = ("lanczos", "power")


@dataclass
class EigenEstimate:
    """The k largest-magnitude eigenvalues of one operator (sorted by |λ|, descending)."""

    values: list[float]
    converged: bool
    products: int  # Hessian-vector products spent on this operator
    method: str
    residuals: list[float] | None = None


def top_eigenvalues(
    hvp: HessianVectorProduct,
    groups: Sequence[Sequence[int]],
    k: int,
    generator: torch.Generator,
    method: str = "lanczos",
    tol: float = 1e-3,
    max_iter: int = 100,
    progress: Callable[[int], None] | None = None,
) -> list[EigenEstimate]:
    """One :class:`EigenEstimate` per group of blocks; ``progress(1)`` per sweep."""
    if k < 1:
        raise ValueError("k must be at least 1")
    if method == "lanczos":
        return _lanczos_top(hvp, groups, k, generator, tol, max_iter, progress)
    if method == "power":
        return _power_top(hvp, groups, k, generator, tol, max_iter, progress)
    raise ValueError(f"unknown eigen method {method!r}; choose from {EIGEN_METHODS}")


# ---------------------------------------------------------------------- Lanczos
def _lanczos_top(hvp: HessianVectorProduct, groups: Sequence[Sequence[int]], k: int,
                 generator: torch.Generator, tol: float, max_iter: int,
                 progress: Callable[[int], None] | None) -> list[EigenEstimate]:
    dims = [hvp.layout.size_of(g) for g in groups]
    eps = float(torch.finfo(hvp.dtype).eps)

    def stop(p: int, alphas: list[float], betas: list[float]) -> bool:
        if len(alphas) < min(k, dims[p]):
            return False
        state = LanczosState(list(alphas), list(betas))
        _, residuals, ok = _ritz_top(state, k, tol, eps, dims[p])
        return ok

    starts = random_starts(hvp, groups, generator)
    states = lanczos(group_apply(hvp, groups), starts, max_iter, stop, progress)
    out = []
    for state, dim in zip(states, dims, strict=True):
        values, residuals, ok = _ritz_top(state, k, tol, eps, dim)
        out.append(EigenEstimate([float(v) for v in values], ok, len(state.alphas),
                                 "lanczos", [float(r) for r in residuals]))
    return out


def _ritz_top(state: LanczosState, k: int, tol: float, eps: float,
              dim: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """The top-k Ritz values by magnitude, their residual norms, and whether all converged."""
    if not state.alphas:
        return np.zeros(0), np.zeros(0), True
    theta, s = state.ritz()
    order = np.argsort(-np.abs(theta))[:k]
    values = theta[order]
    residuals = abs(state.betas[-1]) * np.abs(s[-1, order])
    exact = state.breakdown or len(state.alphas) >= dim
    if exact:
        residuals = np.zeros_like(residuals)
    scale = float(np.abs(theta).max())
    bound = np.maximum(tol * np.abs(values), 100 * eps * scale)
    return values, residuals, bool(exact or (residuals <= bound).all())


# ---------------------------------------------------------------------- power iteration
@dataclass
class _PowerState:
    vector: torch.Tensor
    found: list[torch.Tensor]
    values: list[float]
    flags: list[bool]
    previous: float | None = None
    iteration: int = 0
    products: int = 0


def _power_top(hvp: HessianVectorProduct, groups: Sequence[Sequence[int]], k: int,
               generator: torch.Generator, tol: float, max_iter: int,
               progress: Callable[[int], None] | None) -> list[EigenEstimate]:
    apply = group_apply(hvp, groups)
    dims = [hvp.layout.size_of(g) for g in groups]
    starts = random_starts(hvp, groups, generator)
    states = [_PowerState(s / s.norm(), [], [], []) for s in starts]
    wanted = [min(k, d) for d in dims]
    active = [p for p in range(len(groups)) if wanted[p] > 0]
    while active:
        vectors = [_deflate(states[p].vector, states[p].found) for p in active]
        products = apply(active, vectors)
        still = []
        for p, v, hv in zip(active, vectors, products, strict=True):
            if _power_step(states[p], v, hv, tol, max_iter, generator):
                if len(states[p].values) >= wanted[p]:
                    continue
            still.append(p)
        active = still
        if progress is not None:
            progress(1)
    return [_power_result(s) for s in states]


def _power_step(state: _PowerState, v: torch.Tensor, hv: torch.Tensor, tol: float,
                max_iter: int, generator: torch.Generator) -> bool:
    """One iteration; returns True when the current eigenvalue is settled."""
    state.products += 1
    state.iteration += 1
    value = float(torch.dot(v.double(), hv.double()))
    norm = float(hv.norm())
    settled = (state.previous is not None
               and abs(value - state.previous) <= tol * abs(value)) or norm == 0.0
    if settled or state.iteration >= max_iter:
        state.values.append(value)
        state.flags.append(bool(settled))
        state.found.append(v)
        fresh = torch.randint(0, 2, v.shape, generator=generator).to(v) * 2 - 1
        state.vector, state.previous, state.iteration = fresh / fresh.norm(), None, 0
        return True
    state.vector, state.previous = hv / norm, value
    return False


def _deflate(v: torch.Tensor, found: list[torch.Tensor]) -> torch.Tensor:
    for u in found:
        v = v - torch.dot(u, v) * u
    return v / v.norm()


def _power_result(state: _PowerState) -> EigenEstimate:
    order = np.argsort(-np.abs(np.asarray(state.values)))
    return EigenEstimate([state.values[i] for i in order], all(state.flags), state.products,
                         "power")
