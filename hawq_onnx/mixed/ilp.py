"""Exact bit-width allocation: a 0/1 integer program solved by HiGHS (``scipy.optimize.milp``).

Formulation (HAWQ-V3, extended with pairwise terms):

- binary ``x[i, k]`` = layer i takes ``candidate_bits[k]``; ``Σ_k x[i, k] = 1``;
- minimize ``Σ Ω[i, k] x[i, k] + Σ_(i<j) Σ_(a,b) P_ij[a, b] y[ij, a, b]``;
- budgets: ``Σ cost[i, k] x[i, k] <= budget`` for every metric the caller bounds;
- pins fix ``x[i, k]`` by bounds; ties are already merged into one ``LayerChoice``;
- pairwise terms use variables ``y[ij, a, b] = x[i, a]·x[j, b]`` in [0, 1]. The textbook
  linearization is McCormick's envelope: ``y <= x[i, a]``, ``y <= x[j, b]``,
  ``y >= x[i, a] + x[j, b] - 1`` (3·B² rows per pair). Because each layer takes exactly one
  width, the marginal equalities ``Σ_b y[ij, a, b] = x[i, a]`` and ``Σ_a y[ij, a, b] =
  x[j, b]`` (2·B rows) are also valid, and together with ``y >= 0`` they imply all three
  McCormick inequalities, even for fractional x (``y_ab <= Σ_b' y_ab' = x_a``;
  ``y_ab = x_a − Σ_(b'≠b) y_ab' >= x_a − (1 − x_b)``). So the default
  (``pairs="marginal"``) is McCormick's envelope, tightened, in far fewer rows. Measured
  on 60 layers, 5 widths, 118 random-sign neighbour pairs: marginal 0.2–0.7 s per solve;
  McCormick rows alone hit a 60 s limit without proving optimality (objective 19–37 %
  worse); both together give the marginal answer 3–5x slower. ``pairs="mccormick"`` and
  ``"both"`` remain available (and are tested against brute force).

Numerics, which decide whether "exact" holds in practice: the objective is shifted per layer
(a constant) and scaled to O(1); both MIP gaps are zero and HiGHS' MIP, primal and dual
feasibility tolerances are 1e-10 (defaults 1e-6/1e-7). Ω spans many decades (4^-b per bit
times traces that differ by 10^3 between layers), and the decisive differences between
high-width choices are ~1e-7 of the largest entry: with the gaps alone at zero, 20 of 900
random 5-layer problems with realistic Ω came back up to 0.23 % worse than brute force;
with the tighter tolerances, none (the MIP feasibility tolerance is the one that matters).

Budget rows are divided by their budget; after solving, totals are recomputed from the
rounded solution with the same formula the report uses. A feasibility tolerance can still
accept a configuration a few bits over a budget of billions (seen with HiGHS' default
1e-7), so such a configuration is excluded by a no-good cut
(``Σ_i x[i, c_i] <= L - 1``, which removes exactly that one point) and the problem is
re-solved: a reported total never exceeds the request, and nothing feasible is cut.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_array

from hawq_onnx.mixed.problem import (
    Allocation,
    AllocationProblem,
    AllocationProblemError,
    Budget,
    InfeasibleBudgetError,
)

METRICS = ("avg_weight_bits", "size_bytes", "bops", "latency")
_MAX_CUTS = 50
PAIR_FORMS = ("marginal", "mccormick", "both")
#: exactness on Ω spanning many decades (see the module docstring); scipy forwards the
#: options it does not list to HiGHS verbatim.
_HIGHS_OPTIONS: dict[str, Any] = {
    "presolve": True, "mip_rel_gap": 0.0, "mip_abs_gap": 0.0,
    "mip_feasibility_tolerance": 1e-10, "primal_feasibility_tolerance": 1e-10,
    "dual_feasibility_tolerance": 1e-10}


@dataclass
class _Rows:
    """Sparse constraint rows accumulated as COO triplets."""

    rows: list[int]
    cols: list[int]
    vals: list[float]
    lower: list[float]
    upper: list[float]

    @classmethod
    def empty(cls) -> _Rows:
        return cls([], [], [], [], [])

    def add(self, cols: list[int], vals: list[float], lower: float, upper: float) -> None:
        r = len(self.lower)
        self.rows.extend([r] * len(cols))
        self.cols.extend(cols)
        self.vals.extend(vals)
        self.lower.append(lower)
        self.upper.append(upper)

    def constraint(self, n_vars: int) -> LinearConstraint:
        a = coo_array((self.vals, (self.rows, self.cols)), shape=(len(self.lower), n_vars))
        return LinearConstraint(a.tocsc(), np.array(self.lower), np.array(self.upper))


# ---------------------------------------------------------------- totals and feasibility
def metric_total(problem: AllocationProblem, metric: str, columns: list[int]) -> float:
    """The value a metric takes for one column choice (the report's formula)."""
    if metric == "avg_weight_bits":
        bits = np.asarray(problem.candidate_bits, dtype=np.float64)[columns]
        params = problem.params
        return float(np.dot(params, bits) / params.sum()) if params.sum() > 0 else 0.0
    table = problem.table(metric)
    if table is None:
        raise AllocationProblemError(f"a {metric} budget needs the problem's {metric} table")
    return float(table[np.arange(problem.n_layers), columns].sum())


def objective_value(problem: AllocationProblem, columns: list[int]) -> float:
    """Σ Ω plus pairwise costs for a column choice."""
    total = float(problem.omega[np.arange(problem.n_layers), columns].sum())
    for (i, j), cost in problem.pair_costs.items():
        total += float(np.asarray(cost)[columns[i], columns[j]])
    return total


def _allowed(problem: AllocationProblem) -> np.ndarray:
    """[L, B] mask of columns each layer may take (pins leave one)."""
    mask = np.ones((problem.n_layers, problem.n_bits), dtype=bool)
    for i, bits in problem.pins.items():
        mask[i] = False
        mask[i, problem.candidate_bits.index(bits)] = True
    return mask


def smallest_achievable(problem: AllocationProblem, metric: str) -> float:
    """Min of a metric over allocations that respect the pins (metrics are separable)."""
    table = problem.table(metric)
    if table is None:
        raise AllocationProblemError(f"a {metric} budget needs the problem's {metric} table")
    masked = np.where(_allowed(problem), table, np.inf)
    cols = [int(c) for c in masked.argmin(axis=1)]
    return metric_total(problem, metric, cols)


def largest_achievable(problem: AllocationProblem, metric: str) -> float:
    """Max of a metric over allocations that respect the pins."""
    table = problem.table(metric)
    if table is None:
        raise AllocationProblemError(f"no {metric} table")
    masked = np.where(_allowed(problem), table, -np.inf)
    return metric_total(problem, metric, [int(c) for c in masked.argmax(axis=1)])


def _format(metric: str, value: float) -> str:
    if metric == "avg_weight_bits":
        return f"{value:.4f} bits"
    if metric == "size_bytes":
        return f"{value:.0f} bytes ({value / 1024:.2f} KB)"
    if metric == "latency":
        return f"{value * 1e3:.4f} ms"
    return f"{value:.4g} BOPs"


def _check_budget_feasible(problem: AllocationProblem, budget: Budget) -> None:
    for metric, limit in budget.items():
        low = smallest_achievable(problem, metric)
        if low > limit * (1 + 1e-12):
            raise InfeasibleBudgetError(
                f"{metric} budget {_format(metric, limit)} is infeasible: the smallest "
                f"achievable is {_format(metric, low)}")


# ------------------------------------------------------------------------ model building
def _budget_row(problem: AllocationProblem, metric: str, limit: float
                ) -> tuple[np.ndarray, float]:
    """Coefficients over x (flattened [L, B]) and the right-hand side, normalized."""
    table = problem.table(metric)
    assert table is not None
    if metric == "avg_weight_bits":
        rhs = limit * problem.params.sum()
    else:
        rhs = limit
    scale = abs(rhs) if rhs != 0 else 1.0
    return table.ravel() / scale, rhs / scale


def _objective(problem: AllocationProblem) -> tuple[np.ndarray, dict, float]:
    """Shifted, scaled objective over x and the pairwise y blocks."""
    omega = problem.omega - problem.omega.min(axis=1, keepdims=True)
    pairs = {key: np.asarray(c, dtype=np.float64) for key, c in problem.pair_costs.items()
             if np.any(np.asarray(c) != 0)}
    pairs = {key: c - c.min() for key, c in pairs.items()}
    pairs = {key: c for key, c in pairs.items() if np.any(c != 0)}
    scale = max([float(np.abs(omega).max(initial=0.0))]
                + [float(np.abs(c).max()) for c in pairs.values()])
    scale = scale if scale > 0 else 1.0
    return omega.ravel() / scale, {k: v / scale for k, v in pairs.items()}, scale


def _solve_once(problem: AllocationProblem, rows_budget: list[tuple[np.ndarray, float]],
                time_limit: float, excluded: list[list[int]], pairs_form: str
                ) -> tuple[Any, int]:
    n_l, n_b = problem.n_layers, problem.n_bits
    c_x, pairs, _ = _objective(problem)
    pair_keys = sorted(pairs)
    n_x = n_l * n_b
    n_vars = n_x + len(pair_keys) * n_b * n_b
    c = np.concatenate([c_x] + [pairs[k].ravel() for k in pair_keys]) if pair_keys else c_x
    rows = _Rows.empty()
    for i in range(n_l):
        rows.add(list(range(i * n_b, (i + 1) * n_b)), [1.0] * n_b, 1.0, 1.0)
    for coef, rhs in rows_budget:
        nz = np.flatnonzero(coef)
        rows.add(nz.tolist(), coef[nz].tolist(), -np.inf, rhs)
    for columns in excluded:  # no-good cuts: this exact configuration is not allowed
        cols = [i * n_b + k for i, k in enumerate(columns)]
        rows.add(cols, [1.0] * n_l, -np.inf, n_l - 1.0)
    for p, (i, j) in enumerate(pair_keys):
        _add_pair_rows(rows, n_x + p * n_b * n_b, i, j, n_b, pairs_form)
    lower = np.zeros(n_vars)
    upper = np.ones(n_vars)
    upper[:n_x] = _allowed(problem).ravel().astype(np.float64)
    integrality = np.zeros(n_vars)
    integrality[:n_x] = 1
    with warnings.catch_warnings(), _quiet_stdout():  # scipy warns it forwards unlisted options
        warnings.filterwarnings("ignore", message="Unrecognized options", category=RuntimeWarning)
        res = milp(c, integrality=integrality, bounds=Bounds(lower, upper),
                   constraints=rows.constraint(n_vars),
                   options={**_HIGHS_OPTIONS, "time_limit": time_limit})
    return res, n_x


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Silence C-level stdout while HiGHS runs: it prints postsolve notices
    ("HighsMipSolverData::transformNewIntegerFeasibleSolution ...") whatever its log
    options say, and they would land in the middle of CLI output."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # no real file descriptor: nothing to do
        yield
        return
    sys.stdout.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def _add_pair_rows(rows: _Rows, base: int, i: int, j: int, n_b: int, form: str) -> None:
    """Rows tying y[a, b] to x[i, a]·x[j, b] (see the module docstring for the forms)."""
    if form in ("mccormick", "both"):
        _add_mccormick_rows(rows, base, i, j, n_b)
    if form in ("marginal", "both"):
        _add_marginal_rows(rows, base, i, j, n_b)


def _add_mccormick_rows(rows: _Rows, base: int, i: int, j: int, n_b: int) -> None:
    for a in range(n_b):
        xa = i * n_b + a
        for b in range(n_b):
            xb = j * n_b + b
            y = base + a * n_b + b
            rows.add([y, xa], [1.0, -1.0], -np.inf, 0.0)
            rows.add([y, xb], [1.0, -1.0], -np.inf, 0.0)
            rows.add([y, xa, xb], [1.0, -1.0, -1.0], -1.0, np.inf)


def _add_marginal_rows(rows: _Rows, base: int, i: int, j: int, n_b: int) -> None:
    for a in range(n_b):
        ys = [base + a * n_b + b for b in range(n_b)]
        rows.add(ys + [i * n_b + a], [1.0] * n_b + [-1.0], 0.0, 0.0)
    for b in range(n_b):
        ys = [base + a * n_b + b for a in range(n_b)]
        rows.add(ys + [j * n_b + b], [1.0] * n_b + [-1.0], 0.0, 0.0)


# --------------------------------------------------------------------------------- API
def solve(problem: AllocationProblem, budget: Budget, *, time_limit: float = 60.0,
          pairs: str = "marginal") -> Allocation:
    """The allocation minimizing predicted loss (Ω plus pairwise terms) under the budget.

    ``pairs``: how pairwise terms are linearized, "marginal" (default), "mccormick" or
    "both"; all are exact. On ``time_limit`` the best allocation found is returned with a
    status saying so.

    Raises :class:`InfeasibleBudgetError` naming the smallest achievable value when no
    allocation fits.
    """
    problem.validate()
    if pairs not in PAIR_FORMS:
        raise AllocationProblemError(f"pairs must be one of {PAIR_FORMS}, got '{pairs}'")
    _check_budget_feasible(problem, budget)
    limits = dict(budget.items())
    rows = [_budget_row(problem, m, lim) for m, lim in limits.items()]
    excluded: list[list[int]] = []
    for _ in range(_MAX_CUTS):
        res, n_x = _solve_once(problem, rows, time_limit, excluded, pairs)
        if res.x is None:
            _raise_joint_infeasible(problem, budget, res.message)
        columns = [int(k) for k in
                   np.round(res.x[:n_x]).reshape(problem.n_layers, problem.n_bits).argmax(1)]
        if all(metric_total(problem, m, columns) <= lim for m, lim in limits.items()):
            status = "optimal" if res.status == 0 else f"feasible ({res.message.strip()})"
            return make_allocation(problem, columns, status)
        excluded.append(columns)  # over by less than the solver's tolerance: cut it off
    raise InfeasibleBudgetError("solver tolerances kept exceeding the budget; loosen it slightly")


def _raise_joint_infeasible(problem: AllocationProblem, budget: Budget, message: str) -> None:
    """Each budget alone is feasible but not together: name the best reachable first metric."""
    items = budget.items()
    metric, limit = items[0]
    others = Budget(**{m: v for m, v in items[1:]})
    try:
        low = minimize_metric(problem, metric, others)
    except InfeasibleBudgetError:
        raise InfeasibleBudgetError(f"budgets {dict(items)} are infeasible together") from None
    raise InfeasibleBudgetError(
        f"{metric} budget {_format(metric, limit)} is infeasible under the other budgets: "
        f"the smallest achievable is {_format(metric, low)}")


def minimize_metric(problem: AllocationProblem, metric: str, budget: Budget) -> float:
    """The smallest value of ``metric`` reachable under ``budget`` (an ILP on costs)."""
    table = problem.table(metric)
    if table is None:
        raise AllocationProblemError(f"no {metric} table")
    costs = AllocationProblem(problem.layers, problem.candidate_bits, table,
                              size_bytes=problem.size_bytes, bops=problem.bops,
                              latency=problem.latency, pins=dict(problem.pins))
    return metric_total(costs, metric, solve(costs, budget).columns)


def make_allocation(problem: AllocationProblem, columns: list[int], status: str) -> Allocation:
    """Totals for a column choice (also used by brute force, tests and baselines)."""
    bits = [problem.candidate_bits[k] for k in columns]
    return Allocation(
        bits=bits,
        objective=objective_value(problem, columns),
        size_bytes=metric_total(problem, "size_bytes", columns),
        avg_weight_bits=metric_total(problem, "avg_weight_bits", columns),
        bops=metric_total(problem, "bops", columns) if problem.bops is not None else None,
        latency=(metric_total(problem, "latency", columns)
                 if problem.latency is not None else None),
        status=status,
        columns=list(columns),
    )


def pareto_front(problem: AllocationProblem, metric: str = "size_bytes", points: int = 12,
                 base: Budget | None = None, *, time_limit: float = 60.0,
                 pairs: str = "marginal") -> list[Allocation]:
    """Budget sweep from the smallest to the largest achievable ``metric``.

    Returns allocations sorted by increasing metric with strictly decreasing objective:
    duplicates and dominated points (another point is no larger in metric and objective)
    are dropped. ``base`` adds fixed budgets on the other metrics.
    """
    if metric not in METRICS:
        raise AllocationProblemError(f"unknown metric '{metric}'")
    base = base or Budget()
    low = smallest_achievable(problem, metric)
    high = largest_achievable(problem, metric)
    found: list[Allocation] = []
    for budget_value in np.linspace(low, high, max(points, 2)):
        limits = {**dict(base.items()), metric: float(budget_value)}
        try:
            found.append(solve(problem, Budget(**limits), time_limit=time_limit,
                               pairs=pairs))
        except InfeasibleBudgetError:
            continue
    return _non_dominated(found, metric)


def _non_dominated(allocs: list[Allocation], metric: str) -> list[Allocation]:
    def value(a: Allocation) -> float:
        v = getattr(a, metric)
        return math.inf if v is None else float(v)

    front: list[Allocation] = []
    for alloc in sorted(allocs, key=lambda a: (value(a), a.objective)):
        if front and alloc.objective >= front[-1].objective:
            continue
        front.append(alloc)
    return front


def flipped_layers(problem: AllocationProblem, budget: Budget,
                   alternatives: Sequence[np.ndarray], **options: Any) -> list[int]:
    """Layers whose width changes when Ω is replaced by any of ``alternatives`` (e.g.
    :meth:`SensitivityTable.omega_at` at ±2 SE): the allocations the trace estimates'
    uncertainty does not settle."""
    base = solve(problem, budget, **options).bits
    flipped: set[int] = set()
    for omega in alternatives:
        other = replace(problem, omega=np.asarray(omega, dtype=np.float64))
        bits = solve(other, budget, **options).bits
        flipped.update(i for i, (a, b) in enumerate(zip(base, bits, strict=True)) if a != b)
    return sorted(flipped)


def brute_force(problem: AllocationProblem, budget: Budget) -> Allocation | None:
    """Exhaustive search over B^L, vectorized (tests and tiny problems only)."""
    import itertools

    allowed = _allowed(problem)
    combos = np.array(list(itertools.product(*[np.flatnonzero(r) for r in allowed])),
                      dtype=np.int64).reshape(-1, problem.n_layers)
    rows = np.arange(problem.n_layers)
    objective = problem.omega[rows, combos].sum(axis=1)
    for (i, j), cost in problem.pair_costs.items():
        objective = objective + np.asarray(cost)[combos[:, i], combos[:, j]]
    feasible = np.ones(len(combos), dtype=bool)
    for metric, limit in budget.items():
        table = problem.table(metric)
        if table is None:
            raise AllocationProblemError(f"no {metric} table")
        total = table[rows, combos].sum(axis=1)
        if metric == "avg_weight_bits":
            total = total / problem.params.sum()
        feasible &= total <= limit
    if not feasible.any():
        return None
    best = int(np.flatnonzero(feasible)[np.argmin(objective[feasible])])
    return make_allocation(problem, combos[best].tolist(), "brute_force")


__all__ = ["METRICS", "PAIR_FORMS", "brute_force", "flipped_layers", "largest_achievable",
           "make_allocation", "metric_total", "minimize_metric", "objective_value",
           "pareto_front", "smallest_achievable", "solve"]
