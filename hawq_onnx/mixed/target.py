"""Accuracy target: the smallest configuration whose measured drop stays within ``max_drop``.

The allocator's Pareto frontier (one optimal allocation per budget, sorted by the budget
metric) is ordered from least to most precise. Measured accuracy along it is *nearly*
monotone, so:

1. the most precise point is measured first: if even it misses the target, no point will
   reliably meet it, and it is returned (flagged) as the best found;
2. bisection finds the first point that meets the target (``⌈log2 n⌉`` more measurements);
3. the boundary is re-checked: the ``recheck`` cheaper points just below the boundary are
   measured too (accuracy is not perfectly monotone, and a cheaper point may pass after
   all); whenever one passes the boundary moves down and the check repeats below it.

Every measurement is cached per configuration, with the same evaluation data and seed
throughout, so re-checks never re-run a model and the result is reproducible.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hawq_onnx.mixed.problem import Allocation

#: ``measure(allocation) -> drop`` (onnxruntime-measured accuracy drop, lower is better).
MeasureFn = Callable[[Allocation], float]


@dataclass
class Probe:
    """One measured frontier point."""

    index: int
    drop: float
    passed: bool
    step: str  # "most_precise" | "bisect" | "recheck"


@dataclass
class TargetResult:
    """The chosen point and how it was found."""

    max_drop: float
    frontier: list[Allocation]
    chosen: int
    met: bool
    probes: list[Probe] = field(default_factory=list)

    @property
    def allocation(self) -> Allocation:
        return self.frontier[self.chosen]

    @property
    def drop(self) -> float:
        return next(p.drop for p in self.probes if p.index == self.chosen)

    def to_dict(self) -> dict[str, Any]:
        return {"max_drop": self.max_drop, "met": self.met, "chosen": self.chosen,
                "drop": self.drop, "frontier_points": len(self.frontier),
                "evaluations": len(self.probes),
                "probes": [self._probe_dict(p) for p in self.probes]}

    def _probe_dict(self, probe: Probe) -> dict[str, Any]:
        point = self.frontier[probe.index]
        out: dict[str, Any] = {"index": probe.index, "bits": point.bits}
        if point.act_bits:
            out["act_bits"] = point.act_bits
        out.update(drop=probe.drop, passed=probe.passed, step=probe.step)
        return out


class _Measured:
    """Cached measurements of frontier points (in the order they were taken)."""

    def __init__(self, frontier: Sequence[Allocation], measure: MeasureFn,
                 max_drop: float) -> None:
        self.frontier, self.measure, self.max_drop = frontier, measure, max_drop
        self.probes: dict[int, Probe] = {}

    def passes(self, index: int, step: str) -> bool:
        if index not in self.probes:
            drop = float(self.measure(self.frontier[index]))
            self.probes[index] = Probe(index, drop, drop <= self.max_drop + 1e-12, step)
        return self.probes[index].passed


def accuracy_target(frontier: Sequence[Allocation], measure: MeasureFn, max_drop: float,
                    *, recheck: int = 2) -> TargetResult:
    """The smallest frontier point (by the frontier's own order) with drop <= ``max_drop``.

    ``frontier`` must be sorted from least to most precise (as
    :func:`hawq_onnx.mixed.ilp.pareto_front` returns it). When no point passes, the result
    has ``met=False`` and holds the measured point with the lowest drop (the most precise
    one unless the measurements say otherwise).
    """
    if not frontier:
        raise ValueError("the frontier is empty")
    points = list(frontier)
    state = _Measured(points, measure, max_drop)
    top = len(points) - 1
    if not state.passes(top, "most_precise"):
        best = min(state.probes.values(), key=lambda p: (p.drop, -p.index))
        return TargetResult(max_drop, points, best.index, False, list(state.probes.values()))
    low, high = -1, top  # invariant: high passes; low fails (or is the virtual -1)
    while high - low > 1:
        mid = (low + high) // 2
        if state.passes(mid, "bisect"):
            high = mid
        else:
            low = mid
    high = _recheck_below(state, high, recheck)
    return TargetResult(max_drop, points, high, True, list(state.probes.values()))


def _recheck_below(state: _Measured, boundary: int, width: int) -> int:
    """Measure up to ``width`` points below the boundary; move down to any that passes."""
    moved = True
    while moved:
        moved = False
        for index in range(boundary - 1, max(boundary - 1 - width, -1), -1):
            if state.passes(index, "recheck"):
                boundary, moved = index, True
                break
    return boundary


__all__ = ["MeasureFn", "Probe", "TargetResult", "accuracy_target"]
