"""The mixed-precision allocation problem, its budget and its answer.

Why a separate, plain-data module: the sensitivity tables (Ω), the cost tables (bytes, BOPs,
latency), the inter-layer corrections (pairwise costs) and the accuracy-target search are
built by different parts of the package; they meet only here. The solver
(:mod:`hawq_onnx.mixed.ilp`) reads these objects and nothing else.

Indexing: ``layers[i]`` is one allocatable unit (a weight initializer, or a group of them
tied to one width); column ``k`` of every ``[L, B]`` table belongs to ``candidate_bits[k]``.

Activation widths (optional): ``act_units[j]`` is one activation quantizer (a Q/DQ pair's
scale and zero point, shared by every tensor that copies them), column ``m`` of every
``[A, C]`` table belongs to ``act_candidate_bits[m]``. Costs that depend on both widths of a
layer (BOPs ``MACs·b_w·b_a``, latency) live in ``joint[metric][(i, j)]``, a ``[B, C]`` table
summed over the layers that read weight unit i through activation quantizer j. Every layer
reading quantizer j sees its one width, so tying by activation quantizer needs no extra
constraint, and the weights of those layers stay free.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hawq_onnx.errors import HawqError


class InfeasibleBudgetError(HawqError):
    """No allocation meets the budget; the message names the smallest achievable value."""


class AllocationProblemError(HawqError):
    """The allocation problem itself is malformed (shapes, unknown pins, bad widths)."""


@dataclass(frozen=True)
class LayerChoice:
    """One allocatable unit: weight initializers that must share one width.

    ``act_names`` lists activation tensors quantized with this unit's width when activation
    widths are the candidates (empty for weight allocation).
    """

    names: tuple[str, ...]
    params: int
    macs: int
    act_names: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return "+".join(self.names) if self.names else "+".join(self.act_names)


@dataclass(frozen=True)
class ActUnit:
    """One activation quantizer: ``name`` owns the Q/DQ parameters; ``tensors`` are the
    layer inputs read through it; ``readers`` the weighted nodes reading them."""

    name: str
    tensors: tuple[str, ...] = ()
    readers: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return self.name


@dataclass
class AllocationProblem:
    """Everything the ILP needs.

    ``omega[i, k]``: predicted loss increase of layer i at ``candidate_bits[k]``.
    ``pair_costs[(i, j)]`` (i < j): ``[B, B]`` extra loss when i takes column a and j column b.
    ``size_bytes`` defaults to ``params * b / 8``; ``bops`` and ``latency`` are optional and
    only needed for the matching budgets. ``pins`` maps a layer index to required bits.

    With activation widths: ``act_omega[j, m]`` is quantizer j's loss increase at
    ``act_candidate_bits[m]`` (no pairwise terms), ``joint`` the ``[B, C]`` costs per
    (weight unit, activation unit) and metric, added to the ``[L, B]`` table of that metric
    (which then holds only the layers whose activation width is fixed), ``act_pins`` maps an
    activation unit to required bits.
    """

    layers: list[LayerChoice]
    candidate_bits: list[int]
    omega: np.ndarray
    pair_costs: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    size_bytes: np.ndarray | None = None
    bops: np.ndarray | None = None
    latency: np.ndarray | None = None
    pins: dict[int, int] = field(default_factory=dict)
    act_units: list[ActUnit] = field(default_factory=list)
    act_candidate_bits: list[int] = field(default_factory=list)
    act_omega: np.ndarray | None = None
    joint: dict[str, dict[tuple[int, int], np.ndarray]] = field(default_factory=dict)
    act_pins: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.omega = np.asarray(self.omega, dtype=np.float64)
        if self.act_omega is None:
            self.act_omega = np.zeros((len(self.act_units), len(self.act_candidate_bits)))
        self.act_omega = np.asarray(self.act_omega, dtype=np.float64)
        if self.size_bytes is None:
            self.size_bytes = default_size_bytes(self.layers, self.candidate_bits)
        self.validate()

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_bits(self) -> int:
        return len(self.candidate_bits)

    @property
    def n_acts(self) -> int:
        return len(self.act_units)

    @property
    def n_act_bits(self) -> int:
        return len(self.act_candidate_bits)

    @property
    def params(self) -> np.ndarray:
        return np.array([c.params for c in self.layers], dtype=np.float64)

    def table(self, metric: str) -> np.ndarray | None:
        """The ``[L, B]`` cost table behind a budget metric (avg bits -> params * b)."""
        if metric == "avg_weight_bits":
            return self.params[:, None] * np.asarray(self.candidate_bits, dtype=np.float64)
        if metric in ("size_bytes", "bops", "latency"):
            value = getattr(self, metric)
            return None if value is None else np.asarray(value, dtype=np.float64)
        raise AllocationProblemError(f"unknown budget metric '{metric}'")

    def joint_table(self, metric: str) -> dict[tuple[int, int], np.ndarray]:
        """``{(weight unit, act unit): [B, C]}`` costs of a metric (empty: none)."""
        return {key: np.asarray(value, dtype=np.float64)
                for key, value in self.joint.get(metric, {}).items()}

    def validate(self) -> None:
        shape = (self.n_layers, self.n_bits)
        if len(set(self.candidate_bits)) != self.n_bits or self.n_bits == 0:
            raise AllocationProblemError(f"candidate bits must be distinct: {self.candidate_bits}")
        for name in ("omega", "size_bytes", "bops", "latency"):
            value = getattr(self, name)
            if value is not None and np.shape(value) != shape:
                raise AllocationProblemError(
                    f"{name} has shape {np.shape(value)}, expected {shape}")
        for (i, j), cost in self.pair_costs.items():
            if not 0 <= i < j < self.n_layers or np.shape(cost) != (self.n_bits, self.n_bits):
                raise AllocationProblemError(f"bad pair cost entry ({i}, {j})")
        for i, bits in self.pins.items():
            if not 0 <= i < self.n_layers or bits not in self.candidate_bits:
                raise AllocationProblemError(
                    f"pin {i}={bits}: layer index or width not among the candidates")
        self._validate_acts()

    def _validate_acts(self) -> None:
        n_c = self.n_act_bits
        if len(set(self.act_candidate_bits)) != n_c or (self.act_units and n_c == 0):
            raise AllocationProblemError(
                f"activation candidate bits must be distinct: {self.act_candidate_bits}")
        if np.shape(self.act_omega) != (self.n_acts, n_c):
            raise AllocationProblemError(f"act_omega has shape {np.shape(self.act_omega)}, "
                                         f"expected {(self.n_acts, n_c)}")
        for metric, tables in self.joint.items():
            if metric not in ("bops", "latency"):
                raise AllocationProblemError(f"no joint costs for metric '{metric}'")
            for (i, j), cost in tables.items():
                if not (0 <= i < self.n_layers and 0 <= j < self.n_acts) \
                        or np.shape(cost) != (self.n_bits, n_c):
                    raise AllocationProblemError(f"bad joint {metric} entry ({i}, {j})")
        for j, bits in self.act_pins.items():
            if not 0 <= j < self.n_acts or bits not in self.act_candidate_bits:
                raise AllocationProblemError(
                    f"activation pin {j}={bits}: unit index or width not among the candidates")


@dataclass
class Budget:
    """Upper bounds; None leaves a metric unconstrained. ``avg_weight_bits`` is
    parameter-weighted (Σ n_i·b_i / Σ n_i)."""

    avg_weight_bits: float | None = None
    size_bytes: float | None = None
    bops: float | None = None
    latency: float | None = None

    def items(self) -> list[tuple[str, float]]:
        return [(k, v) for k, v in (("avg_weight_bits", self.avg_weight_bits),
                                    ("size_bytes", self.size_bytes), ("bops", self.bops),
                                    ("latency", self.latency)) if v is not None]


@dataclass
class Allocation:
    """One width per layer (``bits[i]`` for ``layers[i]``), one per activation quantizer
    (``act_bits[j]`` for ``act_units[j]``, empty without activation candidates), totals."""

    bits: list[int]
    objective: float
    size_bytes: float
    avg_weight_bits: float
    bops: float | None
    latency: float | None
    status: str
    columns: list[int] = field(default_factory=list)
    act_bits: list[int] = field(default_factory=list)
    act_columns: list[int] = field(default_factory=list)

    @property
    def key(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Weight and activation widths: identifies a configuration."""
        return tuple(self.bits), tuple(self.act_bits)

    def by_act_name(self, problem: AllocationProblem) -> dict[str, int]:
        """Activation quantizer (parameter-owning tensor) -> bits."""
        return {unit.name: b for unit, b in zip(problem.act_units, self.act_bits, strict=True)}

    def by_name(self, problem: AllocationProblem) -> dict[str, int]:
        """Weight initializer name -> bits (expands tied groups)."""
        return {name: b for choice, b in zip(problem.layers, self.bits, strict=True)
                for name in choice.names}


def default_size_bytes(layers: list[LayerChoice], candidate_bits: list[int]) -> np.ndarray:
    """Packed weight bytes ``params * b / 8`` (scales are width independent)."""
    params = np.array([c.params for c in layers], dtype=np.float64)
    return params[:, None] * np.asarray(candidate_bits, dtype=np.float64)[None, :] / 8.0


__all__ = ["ActUnit", "Allocation", "AllocationProblem", "AllocationProblemError", "Budget",
           "InfeasibleBudgetError", "LayerChoice", "default_size_bytes"]
