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

Activation widths (optional, ``problem.act_units``): binary ``z[j, m]`` = activation
quantizer j takes ``act_candidate_bits[m]``, ``Σ_m z[j, m] = 1``, objective ``+ Σ Ω_a[j, m]
z[j, m]``. Size and average bits count weights only. BOPs ``Σ_layers MACs·b_w·b_a`` (and a
latency measured per (b_w, b_a)) are bilinear in the two choices; they are summed per
(weight unit i, activation unit j) into a ``[B, C]`` table and linearized exactly like the
pairwise terms: ``p[ij, k, m] = x[i, k]·z[j, m]`` in [0, 1] with the marginal equalities
``Σ_m p = x[i, k]``, ``Σ_k p = z[j, m]`` (or McCormick's rows, same ``pairs`` option). With
x and z integral these force p to the product, so budget rows over p are exact. Every layer
reading quantizer j uses z[j], which is the tie by activation quantizer; the weights of those
layers keep their own x. Activation units have no pairwise loss terms: their Ω is Hessian
(or measured) per quantizer, and interactions are modelled between weight units only. Metrics
with joint costs are not separable over units, so their smallest/largest achievable values
come from an ILP too.

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
re-solved: a reported total never exceeds the request, and nothing feasible is cut (with
activation units the cut covers the activation columns too).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
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


# ---------------------------------------------------------------- variables
@dataclass(frozen=True)
class _Layout:
    """Where each variable lives in the flat vector: x (weights), z (activations), y
    (weight pairs), p (joint weight-activation products)."""

    n_l: int
    n_b: int
    n_a: int
    n_c: int
    pair_keys: tuple[tuple[int, int], ...]
    joint_keys: tuple[tuple[int, int], ...]

    @property
    def n_x(self) -> int:
        return self.n_l * self.n_b

    @property
    def n_z(self) -> int:
        return self.n_a * self.n_c

    @property
    def n_vars(self) -> int:
        return (self.n_x + self.n_z + len(self.pair_keys) * self.n_b * self.n_b
                + len(self.joint_keys) * self.n_b * self.n_c)

    def x_cols(self, i: int) -> list[int]:
        return list(range(i * self.n_b, (i + 1) * self.n_b))

    def z_cols(self, j: int) -> list[int]:
        start = self.n_x + j * self.n_c
        return list(range(start, start + self.n_c))

    def pair_base(self, p: int) -> int:
        return self.n_x + self.n_z + p * self.n_b * self.n_b

    def joint_base(self, q: int) -> int:
        return self.pair_base(len(self.pair_keys)) + q * self.n_b * self.n_c

    def decode(self, x: np.ndarray) -> tuple[list[int], list[int]]:
        """Weight and activation columns of a (rounded) solution vector."""
        xs = np.round(x[:self.n_x]).reshape(self.n_l, self.n_b)
        zs = np.round(x[self.n_x:self.n_x + self.n_z]).reshape(self.n_a, self.n_c)
        acts = [int(m) for m in zs.argmax(1)] if self.n_a else []
        return [int(k) for k in xs.argmax(1)], acts


@dataclass
class _Objective:
    """What one solve minimizes: unary x and z terms, weight pairs, joint (x, z) terms.

    :meth:`normalized` shifts every table by its minimum (a constant: each unit takes one
    column, each joint block sums to 1) and scales everything to O(1)."""

    x: np.ndarray
    z: np.ndarray
    pairs: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    joint: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)

    @classmethod
    def of(cls, problem: AllocationProblem) -> _Objective:
        assert problem.act_omega is not None
        return cls(problem.omega, problem.act_omega, dict(problem.pair_costs))

    def normalized(self) -> _Objective:
        omega = self.x - self.x.min(axis=1, keepdims=True)
        pairs = _shifted_nonzero(self.pairs)
        joint = _shifted_nonzero(self.joint)
        act = self.z - self.z.min(axis=1, keepdims=True) if self.z.size else self.z
        scale = max([float(np.abs(omega).max(initial=0.0))]
                    + [float(np.abs(c).max()) for c in pairs.values()]
                    + ([float(np.abs(act).max())] if act.size else [])
                    + [float(np.abs(c).max()) for c in joint.values()])
        scale = scale if scale > 0 else 1.0
        return _Objective(omega / scale, act / scale, {k: v / scale for k, v in pairs.items()},
                          {k: v / scale for k, v in joint.items()})

    def vector(self, layout: _Layout) -> np.ndarray:
        c = np.zeros(layout.n_vars)
        c[:layout.n_x] = self.x.ravel()
        c[layout.n_x:layout.n_x + layout.n_z] = self.z.ravel()
        for p, key in enumerate(layout.pair_keys):
            base = layout.pair_base(p)
            c[base:base + layout.n_b ** 2] = self.pairs[key].ravel()
        for q, key in enumerate(layout.joint_keys):
            if key in self.joint:
                base = layout.joint_base(q)
                c[base:base + layout.n_b * layout.n_c] = self.joint[key].ravel()
        return c


def _shifted_nonzero(tables: dict[tuple[int, int], np.ndarray]
                     ) -> dict[tuple[int, int], np.ndarray]:
    out = {key: np.asarray(c, dtype=np.float64) for key, c in tables.items()
           if np.any(np.asarray(c) != 0)}
    out = {key: c - c.min() for key, c in out.items()}
    return {key: c for key, c in out.items() if np.any(c != 0)}


# ---------------------------------------------------------------- totals and feasibility
def metric_total(problem: AllocationProblem, metric: str, columns: list[int],
                 act_columns: Sequence[int] | None = None) -> float:
    """The value a metric takes for one column choice (the report's formula)."""
    if metric == "avg_weight_bits":
        bits = np.asarray(problem.candidate_bits, dtype=np.float64)[columns]
        params = problem.params
        return float(np.dot(params, bits) / params.sum()) if params.sum() > 0 else 0.0
    table = problem.table(metric)
    joint = problem.joint_table(metric)
    if table is None and not joint:
        raise AllocationProblemError(f"a {metric} budget needs the problem's {metric} table")
    total = float(table[np.arange(problem.n_layers), columns].sum()) if table is not None \
        else 0.0
    if joint:
        if act_columns is None or len(act_columns) != problem.n_acts:
            raise AllocationProblemError(f"{metric} depends on activation widths: "
                                         "act_columns are needed")
        for (i, j), cost in sorted(joint.items()):
            total += float(cost[columns[i], act_columns[j]])
    return total


def objective_value(problem: AllocationProblem, columns: list[int],
                    act_columns: Sequence[int] | None = None) -> float:
    """Σ Ω plus pairwise costs for a column choice (plus activation Ω when given)."""
    total = float(problem.omega[np.arange(problem.n_layers), columns].sum())
    for (i, j), cost in problem.pair_costs.items():
        total += float(np.asarray(cost)[columns[i], columns[j]])
    if act_columns is not None and problem.n_acts:
        assert problem.act_omega is not None
        total += float(problem.act_omega[np.arange(problem.n_acts), list(act_columns)].sum())
    return total


def _pin_mask(count: int, candidate_bits: list[int], pins: dict[int, int]) -> np.ndarray:
    """[count, len(candidate_bits)] mask of the columns each unit may take (a pin leaves one)."""
    mask = np.ones((count, len(candidate_bits)), dtype=bool)
    for i, bits in pins.items():
        mask[i] = False
        mask[i, candidate_bits.index(bits)] = True
    return mask


def _allowed(problem: AllocationProblem) -> np.ndarray:
    """[L, B] mask of columns each weight unit may take."""
    return _pin_mask(problem.n_layers, problem.candidate_bits, problem.pins)


def _act_allowed(problem: AllocationProblem) -> np.ndarray:
    """[A, C] mask of columns each activation unit may take."""
    return _pin_mask(problem.n_acts, problem.act_candidate_bits, problem.act_pins)


def smallest_achievable(problem: AllocationProblem, metric: str) -> float:
    """Min of a metric over allocations that respect the pins (separable metrics directly,
    metrics with joint weight-activation costs by an ILP)."""
    if problem.joint_table(metric):
        return _extreme(problem, metric, 1.0)
    table = problem.table(metric)
    if table is None:
        raise AllocationProblemError(f"a {metric} budget needs the problem's {metric} table")
    masked = np.where(_allowed(problem), table, np.inf)
    cols = [int(c) for c in masked.argmin(axis=1)]
    return metric_total(problem, metric, cols)


def largest_achievable(problem: AllocationProblem, metric: str) -> float:
    """Max of a metric over allocations that respect the pins."""
    if problem.joint_table(metric):
        return _extreme(problem, metric, -1.0)
    table = problem.table(metric)
    if table is None:
        raise AllocationProblemError(f"no {metric} table")
    masked = np.where(_allowed(problem), table, -np.inf)
    return metric_total(problem, metric, [int(c) for c in masked.argmax(axis=1)])


def _metric_objective(problem: AllocationProblem, metric: str, sign: float) -> _Objective:
    """``sign`` times a metric's costs as an objective (no Ω)."""
    table = problem.table(metric)
    x = np.zeros((problem.n_layers, problem.n_bits)) if table is None else table
    joint = {key: sign * cost for key, cost in problem.joint_table(metric).items()}
    return _Objective(sign * x, np.zeros((problem.n_acts, problem.n_act_bits)), {}, joint)


def _extreme(problem: AllocationProblem, metric: str, sign: float) -> float:
    """Min (sign 1) or max (sign -1) of a metric, pins respected, no budget."""
    columns, act_columns, _ = _run(problem, _metric_objective(problem, metric, sign),
                                   Budget(), 60.0, "marginal")
    return metric_total(problem, metric, columns, act_columns)


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
def _layout(problem: AllocationProblem, objective: _Objective, metrics: Sequence[str]
            ) -> _Layout:
    joint = set(objective.joint)
    for metric in metrics:
        joint.update(problem.joint_table(metric))
    return _Layout(problem.n_layers, problem.n_bits, problem.n_acts, problem.n_act_bits,
                   tuple(sorted(objective.pairs)), tuple(sorted(joint)))


def _budget_row(problem: AllocationProblem, layout: _Layout, metric: str, limit: float
                ) -> tuple[np.ndarray, float]:
    """Coefficients over all variables and the right-hand side, normalized."""
    table = problem.table(metric)
    if metric == "avg_weight_bits":
        rhs = limit * problem.params.sum()
    else:
        rhs = limit
    scale = abs(rhs) if rhs != 0 else 1.0
    coef = np.zeros(layout.n_vars)
    if table is not None:
        coef[:layout.n_x] = table.ravel() / scale
    joint = problem.joint_table(metric)
    for q, key in enumerate(layout.joint_keys):
        if key in joint:
            base = layout.joint_base(q)
            coef[base:base + layout.n_b * layout.n_c] = joint[key].ravel() / scale
    return coef, rhs / scale


def _solve_once(problem: AllocationProblem, layout: _Layout, c: np.ndarray,
                rows_budget: list[tuple[np.ndarray, float]], time_limit: float,
                excluded: list[tuple[list[int], list[int]]], pairs_form: str) -> Any:
    n_l, n_a = layout.n_l, layout.n_a
    rows = _Rows.empty()
    for i in range(n_l):
        rows.add(layout.x_cols(i), [1.0] * layout.n_b, 1.0, 1.0)
    for j in range(n_a):
        rows.add(layout.z_cols(j), [1.0] * layout.n_c, 1.0, 1.0)
    for coef, rhs in rows_budget:
        nz = np.flatnonzero(coef)
        rows.add(nz.tolist(), coef[nz].tolist(), -np.inf, rhs)
    for columns, act_columns in excluded:  # no-good cuts: this exact configuration only
        cols = [layout.x_cols(i)[k] for i, k in enumerate(columns)]
        cols += [layout.z_cols(j)[m] for j, m in enumerate(act_columns)]
        rows.add(cols, [1.0] * len(cols), -np.inf, len(cols) - 1.0)
    for p, (i, j) in enumerate(layout.pair_keys):
        _add_pair_rows(rows, layout.pair_base(p), layout.x_cols(i), layout.x_cols(j),
                       pairs_form)
    for q, (i, j) in enumerate(layout.joint_keys):
        _add_pair_rows(rows, layout.joint_base(q), layout.x_cols(i), layout.z_cols(j),
                       pairs_form)
    lower = np.zeros(layout.n_vars)
    upper = np.ones(layout.n_vars)
    upper[:layout.n_x] = _allowed(problem).ravel().astype(np.float64)
    upper[layout.n_x:layout.n_x + layout.n_z] = _act_allowed(problem).ravel().astype(np.float64)
    integrality = np.zeros(layout.n_vars)
    integrality[:layout.n_x + layout.n_z] = 1
    with warnings.catch_warnings(), _quiet_stdout():  # scipy warns it forwards unlisted options
        warnings.filterwarnings("ignore", message="Unrecognized options", category=RuntimeWarning)
        return milp(c, integrality=integrality, bounds=Bounds(lower, upper),
                    constraints=rows.constraint(layout.n_vars),
                    options={**_HIGHS_OPTIONS, "time_limit": time_limit})


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


def _add_pair_rows(rows: _Rows, base: int, cols_i: list[int], cols_j: list[int],
                   form: str) -> None:
    """Rows tying y[a, b] to v[cols_i[a]]·v[cols_j[b]] (see the module docstring)."""
    if form in ("mccormick", "both"):
        _add_mccormick_rows(rows, base, cols_i, cols_j)
    if form in ("marginal", "both"):
        _add_marginal_rows(rows, base, cols_i, cols_j)


def _add_mccormick_rows(rows: _Rows, base: int, cols_i: list[int], cols_j: list[int]) -> None:
    n_j = len(cols_j)
    for a, xa in enumerate(cols_i):
        for b, xb in enumerate(cols_j):
            y = base + a * n_j + b
            rows.add([y, xa], [1.0, -1.0], -np.inf, 0.0)
            rows.add([y, xb], [1.0, -1.0], -np.inf, 0.0)
            rows.add([y, xa, xb], [1.0, -1.0, -1.0], -1.0, np.inf)


def _add_marginal_rows(rows: _Rows, base: int, cols_i: list[int], cols_j: list[int]) -> None:
    n_i, n_j = len(cols_i), len(cols_j)
    for a, xa in enumerate(cols_i):
        ys = [base + a * n_j + b for b in range(n_j)]
        rows.add(ys + [xa], [1.0] * n_j + [-1.0], 0.0, 0.0)
    for b, xb in enumerate(cols_j):
        ys = [base + a * n_j + b for a in range(n_i)]
        rows.add(ys + [xb], [1.0] * n_i + [-1.0], 0.0, 0.0)


def _run(problem: AllocationProblem, objective: _Objective, budget: Budget, time_limit: float,
         pairs_form: str) -> tuple[list[int], list[int], str]:
    """Solve, cutting off configurations a solver tolerance let over a budget."""
    normalized = objective.normalized()
    limits = dict(budget.items())
    layout = _layout(problem, normalized, list(limits))
    c = normalized.vector(layout)
    rows = [_budget_row(problem, layout, m, lim) for m, lim in limits.items()]
    excluded: list[tuple[list[int], list[int]]] = []
    for _ in range(_MAX_CUTS):
        res = _solve_once(problem, layout, c, rows, time_limit, excluded, pairs_form)
        if res.x is None:
            _raise_joint_infeasible(problem, budget, res.message)
        columns, act_columns = layout.decode(res.x)
        if all(metric_total(problem, m, columns, act_columns) <= lim
               for m, lim in limits.items()):
            status = "optimal" if res.status == 0 else f"feasible ({res.message.strip()})"
            return columns, act_columns, status
        excluded.append((columns, act_columns))  # over by less than the tolerance: cut it
    raise InfeasibleBudgetError("solver tolerances kept exceeding the budget; loosen it slightly")


# --------------------------------------------------------------------------------- API
def solve(problem: AllocationProblem, budget: Budget, *, time_limit: float = 60.0,
          pairs: str = "marginal") -> Allocation:
    """The allocation minimizing predicted loss (Ω, pairwise terms and activation Ω) under
    the budget.

    ``pairs``: how products are linearized (weight pairs and joint weight-activation
    blocks), "marginal" (default), "mccormick" or "both"; all are exact. On ``time_limit``
    the best allocation found is returned with a status saying so.

    Raises :class:`InfeasibleBudgetError` naming the smallest achievable value when no
    allocation fits.
    """
    problem.validate()
    if pairs not in PAIR_FORMS:
        raise AllocationProblemError(f"pairs must be one of {PAIR_FORMS}, got '{pairs}'")
    _check_budget_feasible(problem, budget)
    columns, act_columns, status = _run(problem, _Objective.of(problem), budget, time_limit,
                                        pairs)
    return make_allocation(problem, columns, status, act_columns)


def _raise_joint_infeasible(problem: AllocationProblem, budget: Budget, message: str) -> None:
    """Each budget alone is feasible but not together: name the best reachable first metric."""
    items = budget.items()
    if not items:
        raise InfeasibleBudgetError(f"no allocation respects the pins ({message.strip()})")
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
    if problem.table(metric) is None and not problem.joint_table(metric):
        raise AllocationProblemError(f"no {metric} table")
    _check_budget_feasible(problem, budget)
    objective = _metric_objective(problem, metric, 1.0)
    columns, act_columns, _ = _run(problem, objective, budget, 60.0, "marginal")
    return metric_total(problem, metric, columns, act_columns)


def make_allocation(problem: AllocationProblem, columns: list[int], status: str,
                    act_columns: Sequence[int] | None = None) -> Allocation:
    """Totals for a column choice (also used by brute force, tests and baselines)."""
    bits = [problem.candidate_bits[k] for k in columns]
    acts = list(act_columns) if act_columns is not None else []
    if problem.n_acts and len(acts) != problem.n_acts:
        raise AllocationProblemError("the problem allocates activation widths: act_columns "
                                     "are needed")
    joint_acts = acts if problem.n_acts else None
    return Allocation(
        bits=bits,
        objective=objective_value(problem, columns, joint_acts),
        size_bytes=metric_total(problem, "size_bytes", columns),
        avg_weight_bits=metric_total(problem, "avg_weight_bits", columns),
        bops=(metric_total(problem, "bops", columns, joint_acts)
              if problem.bops is not None else None),
        latency=(metric_total(problem, "latency", columns, joint_acts)
                 if problem.latency is not None else None),
        status=status,
        columns=list(columns),
        act_bits=[problem.act_candidate_bits[m] for m in acts],
        act_columns=acts,
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


def _combinations(mask: np.ndarray) -> np.ndarray:
    """Every column choice a [units, columns] mask allows, as rows."""
    import itertools

    choices = list(itertools.product(*[np.flatnonzero(r) for r in mask]))
    return np.array(choices, dtype=np.int64).reshape(len(choices), mask.shape[0])


def brute_force(problem: AllocationProblem, budget: Budget) -> Allocation | None:
    """Exhaustive search over B^L (times C^A with activation units), vectorized (tests and
    tiny problems only)."""
    weights = _combinations(_allowed(problem))
    acts = _combinations(_act_allowed(problem))
    pick_w, pick_a = (g.ravel() for g in np.meshgrid(np.arange(len(weights)),
                                                     np.arange(len(acts)), indexing="ij"))
    combos, act_combos = weights[pick_w], acts[pick_a]
    rows = np.arange(problem.n_layers)
    objective = problem.omega[rows, combos].sum(axis=1)
    for (i, j), cost in problem.pair_costs.items():
        objective = objective + np.asarray(cost)[combos[:, i], combos[:, j]]
    if problem.n_acts:
        assert problem.act_omega is not None
        objective = objective + problem.act_omega[np.arange(problem.n_acts), act_combos].sum(1)
    feasible = np.ones(len(combos), dtype=bool)
    for metric, limit in budget.items():
        table = problem.table(metric)
        joint = problem.joint_table(metric)
        if table is None and not joint:
            raise AllocationProblemError(f"no {metric} table")
        total = table[rows, combos].sum(axis=1) if table is not None else 0.0
        for (i, j), cost in joint.items():
            total = total + cost[combos[:, i], act_combos[:, j]]
        if metric == "avg_weight_bits":
            total = total / problem.params.sum()
        feasible &= total <= limit
    if not feasible.any():
        return None
    best = int(np.flatnonzero(feasible)[np.argmin(objective[feasible])])
    return make_allocation(problem, combos[best].tolist(), "brute_force",
                           act_combos[best].tolist() if problem.n_acts else None)


__all__ = ["METRICS", "PAIR_FORMS", "brute_force", "flipped_layers", "largest_achievable",
           "make_allocation", "metric_total", "minimize_metric", "objective_value",
           "pareto_front", "smallest_achievable", "solve"]
