"""Which pairwise loss terms enter the ILP.

Why: the corrected loss model has a term for every pair of layers (measured for graph
neighbours, rescaled Hessian couplings for the rest), L(L−1)/2 tables of B² linearized
products, and the solve time grows steeply with them: on a 54-layer model (PaddleOCR's
classifier, 1,431 tables) HiGHS does not prove optimality within its 60 s limit, with the 200
largest it takes 18 s, with 120 7 s; on a 22-layer chain 60 / 100 / 150 tables take 4 / 15 /
over 60 s. The ILP gets every measured pair plus the largest remaining ones up to
``--max-ilp-pairs`` (default :data:`MAX_ILP_PAIRS`); the terms left out change any
configuration's predicted loss by at most the sum of their largest entries, which the report
states. Predictions (Spearman, the report's predicted ΔL) still use every pair. Every zoo
model (at most 15 units, 105 pairs) fits whole.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np

Pair = tuple[int, int]

#: pairwise tables the ILP takes (more when more pairs were measured).
MAX_ILP_PAIRS = 120


@dataclass(frozen=True)
class IlpPairs:
    """The pair tables given to the ILP and a bound on what was left out."""

    pairs: dict[Pair, np.ndarray]
    dropped: int
    #: Σ over dropped pairs of max |table|: the most any configuration's predicted ΔL moves.
    dropped_bound: float


def ilp_pairs(pairs: Mapping[Pair, np.ndarray], keep: Collection[Pair],
              limit: int = MAX_ILP_PAIRS) -> IlpPairs:
    """Every pair in ``keep`` plus the others with the largest ``max |table|`` until
    ``limit`` tables are in (all of them when they fit)."""
    size = {p: float(np.abs(t).max()) for p, t in pairs.items()}
    kept = {p: t for p, t in pairs.items() if p in keep}
    others = sorted((p for p in pairs if p not in keep), key=lambda p: (-size[p], p))
    room = max(limit - len(kept), 0)
    kept.update((p, pairs[p]) for p in others[:room])
    dropped = others[room:]
    bound = sum(size[p] for p in dropped)
    return IlpPairs(dict(sorted(kept.items())), len(dropped), bound)


__all__ = ["MAX_ILP_PAIRS", "IlpPairs", "ilp_pairs"]
