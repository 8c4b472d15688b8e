"""Lanczos iterations with full re-orthogonalization, run in lockstep for many problems.

Why lockstep: per-layer eigenvalues and densities need one product per layer per step; with
the double-backprop HVP every vector applied to the same micro-batch shares its forward and
backward pass, so all layers (and all SLQ runs) advance together in one sweep over the data.

Each problem is a symmetric operator on its own flat space (a layer's block, or all weights);
``apply(vectors)`` maps a list of flat vectors (one per active problem) to their products.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

ApplyFn = Callable[[list[int], list[torch.Tensor]], list[torch.Tensor]]
# ``stop(problem, alphas, betas)`` may end a problem early (e.g. its Ritz values converged).
StopFn = Callable[[int, list[float], list[float]], bool]


@dataclass
class LanczosState:
    """The tridiagonal matrix ``T`` built so far: diagonal ``alphas``, off-diagonal ``betas``
    (``betas[j]`` couples steps j and j+1; the last one is the residual norm)."""

    alphas: list[float] = field(default_factory=list)
    betas: list[float] = field(default_factory=list)
    breakdown: bool = False  # the Krylov space became invariant: T's eigenvalues are exact

    def tridiagonal(self) -> np.ndarray:
        m = len(self.alphas)
        t = np.diag(np.asarray(self.alphas, dtype=np.float64))
        off = np.asarray(self.betas[:m - 1], dtype=np.float64)
        return t + np.diag(off, 1) + np.diag(off, -1)

    def ritz(self) -> tuple[np.ndarray, np.ndarray]:
        """Eigenvalues and eigenvectors of T (symmetric solver)."""
        values, vectors = np.linalg.eigh(self.tridiagonal())
        return values, vectors


def lanczos(
    apply: ApplyFn,
    starts: Sequence[torch.Tensor],
    steps: int,
    stop: StopFn | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[LanczosState]:
    """Run up to ``steps`` Lanczos steps from each start vector (normalized here);
    ``progress(1)`` after each sweep."""
    states = [LanczosState() for _ in starts]
    bases: list[list[torch.Tensor]] = [[s / s.norm()] for s in starts]
    active = [p for p, s in enumerate(starts) if s.numel() > 0 and float(s.norm()) > 0]
    limit = [min(steps, int(s.numel())) for s in starts]
    while active:
        products = apply(active, [bases[p][-1] for p in active])
        still: list[int] = []
        for p, w in zip(active, products, strict=True):
            if _advance(states[p], bases[p], w, limit[p]):
                if stop is None or not stop(p, states[p].alphas, states[p].betas):
                    still.append(p)
        active = still
        if progress is not None:
            progress(1)
    return states


def _advance(state: LanczosState, basis: list[torch.Tensor], w: torch.Tensor,
             limit: int) -> bool:
    """Add one step; returns whether another step is possible."""
    q = basis[-1]
    alpha = float(torch.dot(q.double(), w.double()))
    state.alphas.append(alpha)
    w = _orthogonalize(w, basis)
    beta = float(w.double().norm())
    state.betas.append(beta)
    scale = max(abs(a) for a in state.alphas) + max(state.betas[:-1], default=0.0)
    if beta <= 10 * torch.finfo(w.dtype).eps * max(scale, 1e-300):
        state.breakdown = True
        return False
    if len(state.alphas) >= limit:
        return False
    basis.append(w / beta)
    return True


def _orthogonalize(w: torch.Tensor, basis: list[torch.Tensor]) -> torch.Tensor:
    """Classical Gram–Schmidt against the whole basis, twice ("twice is enough")."""
    q = torch.stack(basis)
    for _ in range(2):
        w = w - q.t() @ (q @ w)
    return w
