"""Inter-layer dependency corrections for the allocator (``algorithms.md`` section 3).

Per-layer sensitivities (HAWQ-V2's Ω) assume that the loss increase of a configuration is the
sum of what each layer does alone. Two corrections add what layers do *together*:

* **Hessian cross terms.** For weight errors ``δ = (Q(W_i) − W_i)_i`` the second-order loss
  change is ``½ δᵀHδ = ½ Σ_i δ_iᵀ H_ii δ_i + Σ_(i<j) δ_iᵀ H_ij δ_j``. One HVP ``u = Hδ`` of a
  whole configuration gives each layer's augmented contribution ``½ δ_iᵀ u_i`` (its own
  curvature plus its coupling to every other layer); one HVP per unit j and width b,
  ``u = H δ_j(b)``, gives the couplings ``c_ij(a, b) = δ_i(a)ᵀ u_i`` with every i at once,
  and the exact block quadratic ``δ_j(b)ᵀ H_jj δ_j(b)`` (no isotropic-trace assumption).
  With the Gauss–Newton Hessian (KL/MSE objectives) the same tables come cheaper from one
  forward-mode ``J δ_j(b)`` per unit and width and the loss's output Hessian
  (:meth:`HessianVectorProduct.gram`).
* **Measured interactions.** ``I_ij(a, b) = ΔL(i@a, j@b) − ΔL(i@a) − ΔL(j@b)`` from real
  forward passes (the autograd mirror with weights replaced by their exact quantized values)
  on calibration data, for graph neighbours only (producer → consumer and pairs within k
  hops of the layer graph), so the count stays O(L·k). Higher-order effects the quadratic
  model misses at 2-3 bits are included.

Activation quantizers (when their widths are allocated too) get unary terms only: ``½ Ω_a``
(Hessian) or the measured ``ΔL`` with that one quantizer fake-quantized
(:func:`activation_singles`); the meters apply activation Q/DQ with mirror hooks, so a
configuration's measured ``ΔL`` includes its allocated activation widths.

Both give ``[B, B]`` pair tables that enter the ILP through McCormick linearization
(:mod:`hawq_onnx.mixed.ilp`). Everything here is in loss units (the calibration objective of
the Hessian analysis: KL to the float outputs without labels), so unary and pairwise terms
add up to a predicted ΔL.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import onnx
import torch

from hawq_onnx.graph import GraphView
from hawq_onnx.hessian.blocks import BlockVector
from hawq_onnx.hessian.hvp import HessianVectorProduct
from hawq_onnx.hessian.objective import MicroBatch, Objective
from hawq_onnx.mirror.module import Hook, Mirror
from hawq_onnx.mirror.reuse import DEFAULT_BUDGET_BYTES, CleanPasses
from hawq_onnx.mixed.problem import LayerChoice
from hawq_onnx.mixed.sensitivity import weight_spec_at
from hawq_onnx.quant.activations import ActQParams
from hawq_onnx.quant.plan import WeightSpec
from hawq_onnx.quantize import Quantizer

Pair = tuple[int, int]
#: output tensor -> (channel axis, per-channel shift) removed from that tensor.
Shifts = dict[str, tuple[int, torch.Tensor]]
#: tensor -> the Q/DQ parameters it is fake-quantized with.
ActHooks = Mapping[str, ActQParams]
#: HVPs applied together (one forward/backward shared per micro-batch).
HVP_CHUNK = 8
#: bytes of output tangents per micro-batch the Gram route to the couplings may hold.
GRAM_BUDGET_BYTES = 1 << 30


# ------------------------------------------------------------------------ perturbations
@dataclass
class Perturbations:
    """Exact quantized weights and errors ``δ_i(b) = Q_b(W_i) − W_i`` per unit and width.

    ``blocks[i]``: the mirror block indices (weights) of unit i, in ``hvp.layout`` order.
    ``quantized[i][k]`` / ``deltas[i][k]``: ``{block: tensor}`` for ``candidate_bits[k]``.
    """

    layers: list[LayerChoice]
    candidate_bits: list[int]
    blocks: list[list[int]]
    quantized: list[list[BlockVector]]
    deltas: list[list[BlockVector]]
    shifts: list[list[Shifts]] | None = None

    @classmethod
    def build(cls, quantizer: Quantizer, mirror: Mirror, layers: Sequence[LayerChoice],
              candidate_bits: Sequence[int], base: WeightSpec | None = None,
              params: Mapping[str, ActQParams] | None = None) -> Perturbations:
        """Q_b from the exporter's own quantizer (same scales, rounding, granularity)."""
        base = base or WeightSpec()
        index = {name: b for b, name in enumerate(mirror.weights)}
        weights = list(mirror.weights.values())
        blocks, quantized, deltas = [], [], []
        for choice in layers:
            unit = [index[name] for name in choice.names]
            blocks.append(unit)
            q_row, d_row = [], []
            for bits in candidate_bits:
                spec = weight_spec_at(base, bits, quantizer.opset)
                q_vec: BlockVector = {}
                d_vec: BlockVector = {}
                for name, b in zip(choice.names, unit, strict=True):
                    array = quantizer.quantized_weight(name, spec, params).dequantize()
                    original = weights[b].detach()
                    value = torch.as_tensor(np.asarray(array, dtype=np.float32)).to(original)
                    q_vec[b] = value.reshape(original.shape)
                    d_vec[b] = q_vec[b] - original
                q_row.append(q_vec)
                d_row.append(d_vec)
            quantized.append(q_row)
            deltas.append(d_row)
        return cls(list(layers), list(candidate_bits), blocks, quantized, deltas)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_bits(self) -> int:
        return len(self.candidate_bits)

    def sq_norms(self) -> np.ndarray:
        """[L, B] ``‖δ_i(b)‖²``."""
        return np.array([[sum(float(t.double().square().sum()) for t in d.values())
                          for d in row] for row in self.deltas])

    def vector(self, columns: Sequence[int], units: Iterable[int] | None = None) -> BlockVector:
        """δ of a configuration (column per unit); only ``units`` when given."""
        chosen = range(self.n_layers) if units is None else units
        out: BlockVector = {}
        for i in chosen:
            out.update(self.deltas[i][columns[i]])
        return out

    def substitution(self, columns: Mapping[int, int]) -> BlockVector:
        """Quantized weights of the units in ``columns`` ({unit: column})."""
        out: BlockVector = {}
        for i, k in columns.items():
            out.update(self.quantized[i][k])
        return out

    def output_shifts(self, columns: Mapping[int, int]) -> Shifts:
        """Bias corrections of the units in ``columns`` (empty unless measured)."""
        out: Shifts = {}
        if self.shifts is not None:
            for i, k in columns.items():
                out.update(self.shifts[i][k])
        return out

    def delta(self, meter: LossMeter, columns: Mapping[int, int],
              activations: ActHooks | None = None) -> float:
        """Measured ΔL with the units in ``columns`` quantized (and bias-corrected when
        :func:`measure_output_shifts` filled :attr:`shifts`), plus ``activations``
        fake-quantized."""
        return meter.delta(self.substitution(columns), self.output_shifts(columns), activations)


def _dot(a: BlockVector, b: BlockVector, blocks: Iterable[int]) -> float:
    return float(sum((a[x].double() * b[x].double()).sum() for x in blocks if x in a and x in b))


# ------------------------------------------------------------------------ forward passes
class LossMeter:
    """The objective's loss with some weights replaced by their quantized values.

    Forward passes only (no graph kept). ``delta`` is measured against the float weights'
    loss on the same batches, so a KL objective's ΔL is the loss itself and a CE objective's
    is the increase over the float model. The float pass is stored (up to
    ``reuse_budget_bytes`` of activations, :mod:`hawq_onnx.mirror.reuse`) so that a pass with
    a few layers changed recomputes only the nodes downstream of them; the losses are the
    same as with full passes.
    """

    def __init__(self, objective: Objective, reuse_budget_bytes: int = DEFAULT_BUDGET_BYTES
                 ) -> None:
        self.objective = objective
        self.params = list(objective.mirror.weights.values())
        self._names = list(objective.mirror.weights)
        self.clean = CleanPasses(reuse_budget_bytes)
        self.forwards = 0
        self._changed: frozenset[str] = frozenset()
        self.base = self._loss(record=reuse_budget_bytes > 0)

    @contextmanager
    def _applied(self, substitution: BlockVector,
                 hooks: Sequence[tuple[str, Hook]]
                 ) -> Iterator[None]:
        """Weights replaced and hooks installed for the duration; both undone even when the
        forward pass raises, so one measurement never leaks into the next."""
        saved = {b: self.params[b].detach().clone() for b in substitution}
        handles = [self.objective.mirror.add_hook(name, hook) for name, hook in hooks]
        self._changed = frozenset(self._names[b] for b in substitution)
        try:
            with torch.no_grad():
                for b, value in substitution.items():
                    self.params[b].copy_(value)
            yield
        finally:
            self._changed = frozenset()
            for handle in handles:
                handle.remove()
            with torch.no_grad():
                for b, value in saved.items():
                    self.params[b].copy_(value)

    def _forward(self, batch: MicroBatch, record: bool = False) -> tuple[torch.Tensor, ...]:
        """One gradient-free pass of the mirror as it is, reading back the float pass's
        tensors wherever nothing changed reaches."""
        feeds = self.objective.feeds(batch)
        mirror = self.objective.mirror
        if record:
            return mirror.run(feeds, record=self.clean.recorder(batch.index))
        return mirror.run(feeds, reuse=self.clean.reuse(batch.index, self._changed))

    def _loss(self, record: bool = False) -> float:
        total = 0.0
        with torch.no_grad():
            for batch in self.objective.batches:
                outputs = self._forward(batch, record)
                total += self.objective.weight(batch) * float(self.objective.loss(outputs, batch))
        self.forwards += 1
        return total

    def delta(self, substitution: BlockVector, shifts: Shifts | None = None,
              activations: ActHooks | None = None) -> float:
        """ΔL with ``{block: value}`` in place of the float weights, ``shifts`` removed
        from layer outputs and ``activations`` fake-quantized (all undone afterwards)."""
        hooks = [(name, _subtract(axis, shift)) for name, (axis, shift) in (shifts or {}).items()]
        hooks += [(name, fake_quantize_hook(qp)) for name, qp in (activations or {}).items()]
        with self._applied(substitution, hooks):
            return self._loss() - self.base

    def channel_means(self, outputs: Mapping[str, int], substitution: BlockVector | None = None
                      ) -> dict[str, torch.Tensor]:
        """Per-channel means of layer outputs ({tensor: channel axis}) over the data."""
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}

        def capture(name: str, value: torch.Tensor) -> None:
            axis = outputs[name] % value.dim()
            moved = value.detach().double().movedim(axis, 0).reshape(value.shape[axis], -1)
            sums[name] = sums.get(name, 0.0) + moved.sum(dim=1)
            counts[name] = counts.get(name, 0) + moved.shape[1]

        with self._applied(substitution or {}, [(name, capture) for name in outputs]), \
                torch.no_grad():
            for batch in self.objective.batches:
                self._forward(batch)
        self.forwards += 1
        return {name: sums[name] / counts[name] for name in sums}


def _subtract(axis: int, shift: torch.Tensor) -> Callable[[str, torch.Tensor], torch.Tensor]:
    def hook(_: str, value: torch.Tensor) -> torch.Tensor:
        shape = [1] * value.dim()
        shape[axis % value.dim()] = shift.numel()
        return value - shift.to(value.dtype).reshape(shape)

    return hook


def fake_quantize_hook(qp: ActQParams) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """QuantizeLinear then DequantizeLinear, as onnxruntime computes them (round half to
    even, saturate to the grid)."""
    def hook(_: str, value: torch.Tensor) -> torch.Tensor:
        scale = torch.tensor(qp.scale, dtype=torch.float32).to(value)
        q = torch.clamp(torch.round(value / scale) + qp.zero_point, qp.qmin, qp.qmax)
        return (q - qp.zero_point) * scale

    return hook


def activation_singles(meter: LossMeter, hooks: Sequence[Sequence[ActHooks]]) -> np.ndarray:
    """[A, C] measured ΔL with one activation quantizer at a time fake-quantized
    (``hooks[j][m]``: its tensors at column m), weights float."""
    out = np.zeros((len(hooks), max((len(row) for row in hooks), default=0)))
    for j, row in enumerate(hooks):
        for m, tensors in enumerate(row):
            out[j, m] = meter.delta({}, None, tensors)
    return out


# ------------------------------------------------------------------------ bias correction
def correctable_outputs(view: GraphView, layers: Sequence[LayerChoice]) -> list[dict[str, int]]:
    """Per unit, the outputs bias correction adjusts ({tensor: channel axis}): Conv (axis 1)
    and Gemm with a known output-channel axis and unit alpha/beta (last axis), like
    :func:`hawq_onnx.calibration.bias_correction.correct_biases`."""
    unit_of = {name: i for i, choice in enumerate(layers) for name in choice.names}
    out: list[dict[str, int]] = [{} for _ in layers]
    for layer in view.quantizable_layers():
        unit = unit_of.get(layer.weight or "")
        if unit is None:
            continue
        node = view.node(layer.node)
        scaled = any(a.name in ("alpha", "beta") and a.f != 1.0 for a in node.attribute)
        if layer.kind == "conv":
            out[unit][layer.output] = 1
        elif layer.kind == "gemm" and layer.weight_axis_out is not None and not scaled:
            out[unit][layer.output] = -1
    return out


def measure_output_shifts(meter: LossMeter, perturbations: Perturbations,
                          outputs: Sequence[Mapping[str, int]]) -> int:
    """Fill ``perturbations.shifts``: for each unit and width, the mean per-channel output
    shift its quantization causes with float inputs, which the exporter's empirical bias
    correction removes. Returns the forward passes spent."""
    start = meter.forwards
    wanted = {name: axis for unit in outputs for name, axis in unit.items()}
    reference = meter.channel_means(wanted) if wanted else {}
    table: list[list[Shifts]] = []
    for i, unit in enumerate(outputs):
        row: list[Shifts] = []
        for k in range(perturbations.n_bits):
            means = meter.channel_means(unit, perturbations.substitution({i: k})) if unit else {}
            row.append({name: (axis, (means[name] - reference[name]).float())
                        for name, axis in unit.items() if name in means})
        table.append(row)
    perturbations.shifts = table
    return meter.forwards - start


# ------------------------------------------------------------------------ layer graph
def _unit_nodes(view: GraphView, layers: Sequence[LayerChoice]) -> dict[str, int]:
    """Node name -> unit index for every weighted node."""
    unit_of_weight = {name: i for i, choice in enumerate(layers) for name in choice.names}
    return {layer.node: unit_of_weight[layer.weight] for layer in view.quantizable_layers()
            if layer.weight in unit_of_weight}


def layer_graph(view: GraphView, layers: Sequence[LayerChoice]) -> nx.DiGraph:
    """Units as vertices; ``i → j`` when data flows from a layer of unit i to a layer of
    unit j without passing through another weighted layer (shape arithmetic ignored)."""
    owner = _unit_nodes(view, layers)
    shapes = view.shape_tensors()
    graph = nx.DiGraph()
    graph.add_nodes_from(range(len(layers)))
    for node, unit in owner.items():
        seen: set[tuple[str, str]] = set()
        frontier = [v for v in view.nx.successors(("op", node))]
        while frontier:
            vertex = frontier.pop()
            if vertex in seen or (vertex[0] == "tensor" and vertex[1] in shapes):
                continue
            seen.add(vertex)
            if vertex[0] == "op" and vertex[1] in owner:
                if owner[vertex[1]] != unit:
                    graph.add_edge(unit, owner[vertex[1]])
                continue
            frontier.extend(view.nx.successors(vertex))
    return graph


def neighbour_pairs(view: GraphView, layers: Sequence[LayerChoice], hops: int = 1) -> list[Pair]:
    """Pairs ``(i, j)``, i < j, within ``hops`` edges of the undirected layer graph
    (``hops=1``: producer → consumer)."""
    if hops < 1:
        return []
    graph = layer_graph(view, layers).to_undirected()
    pairs: set[Pair] = set()
    for source, lengths in nx.all_pairs_shortest_path_length(graph, cutoff=hops):
        for target, distance in lengths.items():
            if 0 < distance <= hops:
                pairs.add((min(source, target), max(source, target)))
    return sorted(pairs)


def all_pairs(n_layers: int) -> list[Pair]:
    return list(itertools.combinations(range(n_layers), 2))


# ------------------------------------------------------------------------ Hessian terms
@dataclass
class CouplingTables:
    """Second-order tables from HVPs, in loss units.

    ``quadratic[i, k] = ½ δ_i(b_k)ᵀ H_ii δ_i(b_k)`` (the exact block term Ω approximates
    with ``Tr(H_ii)/n_i·‖δ‖²``); ``pairs[(i, j)][a, b] = δ_i(a)ᵀ H_ij δ_j(b)``.
    """

    quadratic: np.ndarray
    pairs: dict[Pair, np.ndarray]
    hvps: int


def hessian_couplings(hvp: HessianVectorProduct, perturbations: Perturbations,
                      pairs: Sequence[Pair] | None = None,
                      progress: Callable[[int, int], None] | None = None,
                      gram_budget_bytes: int = GRAM_BUDGET_BYTES) -> CouplingTables:
    """The block quadratics and the couplings of ``pairs`` (default: all).

    With the Gauss–Newton Hessian (the KL/MSE objectives) all of them come from one output
    tangent per unit and width (:meth:`HessianVectorProduct.gram`) when those fit
    ``gram_budget_bytes`` per micro-batch; otherwise one HVP per unit and width.
    """
    n_l, n_b = perturbations.n_layers, perturbations.n_bits
    wanted = all_pairs(n_l) if pairs is None else sorted({(min(p), max(p)) for p in pairs})
    jobs = [(j, k) for j in range(n_l) for k in range(n_b)]
    if hvp.mode == "gauss_newton" and hvp.gram_bytes(len(jobs)) <= gram_budget_bytes:
        gram = hvp.gram([perturbations.deltas[j][k] for j, k in jobs], progress).numpy()
        quadratic = 0.5 * np.diag(gram).reshape(n_l, n_b).copy()
        tables = {(i, j): gram[i * n_b:(i + 1) * n_b, j * n_b:(j + 1) * n_b].copy()
                  for i, j in wanted}
        return CouplingTables(quadratic, tables, len(jobs))
    return _couplings_by_hvp(hvp, perturbations, wanted, jobs, progress)


def _couplings_by_hvp(hvp: HessianVectorProduct, perturbations: Perturbations,
                      wanted: list[Pair], jobs: list[tuple[int, int]],
                      progress: Callable[[int, int], None] | None) -> CouplingTables:
    """One HVP per unit and width, contracted with the partners' errors."""
    n_l, n_b = perturbations.n_layers, perturbations.n_bits
    partners: dict[int, list[int]] = {j: [] for j in range(n_l)}
    for i, j in wanted:
        partners[j].append(i)
    quadratic = np.zeros((n_l, n_b))
    tables = {p: np.zeros((n_b, n_b)) for p in wanted}
    done = 0
    for start in range(0, len(jobs), HVP_CHUNK):
        chunk = jobs[start:start + HVP_CHUNK]
        vectors = [perturbations.deltas[j][k] for j, k in chunk]
        outputs = [sorted({b for u in [j, *partners[j]] for b in perturbations.blocks[u]})
                   for j, _ in chunk]
        products = hvp.apply(vectors, outputs=outputs)
        for (j, k), vector, product in zip(chunk, vectors, products, strict=True):
            quadratic[j, k] = 0.5 * _dot(vector, product, perturbations.blocks[j])
            for i in partners[j]:
                for a in range(n_b):
                    tables[(i, j)][a, k] = _dot(perturbations.deltas[i][a], product,
                                                perturbations.blocks[i])
        done += len(chunk)
        if progress is not None:
            progress(done, len(jobs))
    return CouplingTables(quadratic, tables, len(jobs))


@dataclass
class SecondOrder:
    """``½ δᵀHδ`` of one configuration and each unit's augmented share ``½ δ_iᵀ(Hδ)_i``."""

    total: float
    contributions: np.ndarray


def second_order(hvp: HessianVectorProduct, perturbations: Perturbations,
                 columns: Sequence[int]) -> SecondOrder:
    """One HVP of the configuration's whole weight perturbation."""
    vector = perturbations.vector(columns)
    product = hvp.apply([vector])[0]
    shares = np.array([0.5 * _dot(vector, product, blocks)
                       for blocks in perturbations.blocks])
    return SecondOrder(float(shares.sum()), shares)


# ------------------------------------------------------------------------ measured terms
@dataclass
class MeasuredTables:
    """Measured ``ΔL`` of each unit alone and pairwise interactions ``I_ij`` (loss units).

    ``measured_bits``: widths at which pairs were actually run; other widths are
    extrapolated bilinearly in ``‖δ‖`` from the nearest measured one (the cross term of a
    quadratic model scales as ``‖δ_i‖·‖δ_j‖``).
    """

    single: np.ndarray
    pairs: dict[Pair, np.ndarray]
    measured_bits: list[int]
    forwards: int


def single_losses(meter: LossMeter, perturbations: Perturbations) -> np.ndarray:
    """[L, B] ΔL with one unit quantized at a time."""
    out = np.zeros((perturbations.n_layers, perturbations.n_bits))
    for i in range(perturbations.n_layers):
        for k in range(perturbations.n_bits):
            out[i, k] = perturbations.delta(meter, {i: k})
    return out


def measured_interactions(meter: LossMeter, perturbations: Perturbations,
                          pairs: Sequence[Pair], *, measure_bits: Sequence[int] | None = None,
                          single: np.ndarray | None = None,
                          progress: Callable[[int, int], None] | None = None
                          ) -> MeasuredTables:
    """``I_ij`` for each pair at ``measure_bits`` (default: every candidate) by forward passes,
    extrapolated to the other candidate widths."""
    bits = perturbations.candidate_bits
    measured = sorted(set(measure_bits if measure_bits is not None else bits) & set(bits))
    if not measured:
        raise ValueError("measure_bits shares no width with the candidates")
    start = meter.forwards
    single = single_losses(meter, perturbations) if single is None else single
    cols = [bits.index(b) for b in measured]
    nearest = [cols[int(np.argmin([abs(bits[c] - b) for c in cols]))] for b in bits]
    norms = np.sqrt(perturbations.sq_norms())
    tables: dict[Pair, np.ndarray] = {}
    for n, (i, j) in enumerate(pairs):
        run = np.zeros((len(bits), len(bits)))
        for a, b in itertools.product(cols, cols):
            both = perturbations.delta(meter, {i: a, j: b})
            run[a, b] = both - single[i, a] - single[j, b]
        table = np.zeros_like(run)
        for a, b in itertools.product(range(len(bits)), range(len(bits))):
            ra, rb = nearest[a], nearest[b]
            table[a, b] = run[ra, rb] * _ratio(norms[i, a], norms[i, ra]) * \
                _ratio(norms[j, b], norms[j, rb])
        tables[(i, j)] = table
        if progress is not None:
            progress(n + 1, len(pairs))
    return MeasuredTables(single, tables, measured, meter.forwards - start)


def _ratio(value: float, reference: float) -> float:
    return value / reference if reference > 0 else 0.0


# ------------------------------------------------------------------------ the combined model
@dataclass
class LossModel:
    """A predicted ΔL that is unary per unit plus pairwise terms: what the ILP minimizes.

    ``predict(columns) = Σ_i unary[i, c_i] + Σ_(i,j) pairs[(i, j)][c_i, c_j]``.
    """

    name: str
    unary: np.ndarray
    pairs: dict[Pair, np.ndarray] = field(default_factory=dict)

    def predict(self, columns: Sequence[int]) -> float:
        total = float(self.unary[np.arange(len(columns)), list(columns)].sum())
        for (i, j), table in self.pairs.items():
            total += float(table[columns[i], columns[j]])
        return total

    def per_unit(self, columns: Sequence[int]) -> np.ndarray:
        """Each unit's share: its unary term plus half of each pair term it is part of."""
        shares = self.unary[np.arange(len(columns)), list(columns)].astype(np.float64)
        for (i, j), table in self.pairs.items():
            half = 0.5 * float(table[columns[i], columns[j]])
            shares[i] += half
            shares[j] += half
        return shares


def hessian_only(omega: np.ndarray) -> LossModel:
    """HAWQ-V2: ``½ Ω`` per unit (Ω estimates ``δᵀH_iiδ``; the loss change is half)."""
    return LossModel("hessian", 0.5 * np.asarray(omega, dtype=np.float64))


def with_cross_terms(couplings: CouplingTables) -> LossModel:
    """The second-order model from HVPs: exact block quadratics plus couplings."""
    return LossModel("cross_terms", couplings.quadratic.copy(), dict(couplings.pairs))


def with_measured(measured: MeasuredTables, couplings: CouplingTables | None = None
                  ) -> LossModel:
    """Measured single-unit ΔL plus measured neighbour interactions; with ``couplings``, the
    pairs that were not measured get their Hessian coupling rescaled to the measured
    singles (:func:`rescaled_coupling`)."""
    pairs: dict[Pair, np.ndarray] = {}
    if couplings is not None:
        for (i, j), table in couplings.pairs.items():
            if (i, j) not in measured.pairs:
                pairs[(i, j)] = rescaled_coupling(table, couplings.quadratic[i],
                                                  couplings.quadratic[j], measured.single[i],
                                                  measured.single[j])
    pairs.update(measured.pairs)
    return LossModel("measured", measured.single.copy(), pairs)


def rescaled_coupling(table: np.ndarray, quad_i: np.ndarray, quad_j: np.ndarray,
                      single_i: np.ndarray, single_j: np.ndarray) -> np.ndarray:
    """A Hessian coupling expressed on the scale of measured single-unit losses.

    With a positive semi-definite H (Gauss–Newton at the float weights), Cauchy–Schwarz gives
    ``|δ_iᵀH_ijδ_j| ≤ 2·sqrt(q_i·q_j)`` for the block quadratics ``q = ½δᵀH_iiδ``: the
    coupling is a correlation ``ρ ∈ [-1, 1]`` times that bound. Keeping ρ and replacing the
    quadratics by the measured singles ``s`` gives ``2ρ·sqrt(s_i·s_j)``, so that
    ``s_i + s_j + pair ≥ (sqrt(s_i) − sqrt(s_j))² ≥ 0``. Adding the raw coupling to measured
    singles instead mixes two scales (the quadratic model is far off at 2-3 bits), and the
    ILP exploits the resulting negative predictions.
    """
    bound = 2.0 * np.sqrt(np.maximum(quad_i, 0.0)[:, None] * np.maximum(quad_j, 0.0)[None, :])
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = np.where(bound > 0, np.clip(table / bound, -1.0, 1.0), 0.0)
    scale = 2.0 * np.sqrt(np.maximum(single_i, 0.0)[:, None] * np.maximum(single_j, 0.0)[None, :])
    return rho * scale


def make_objective(quantizer: Quantizer, batches: Sequence[Mapping[str, np.ndarray]],
                   names: Sequence[str], *, labels: np.ndarray | None = None,
                   loss: str = "auto", temperature: float = 1.0,
                   dtype: torch.dtype = torch.float32) -> Objective:
    """The analysis objective on ``batches`` over a mirror of the quantizer's model."""
    mirror = Mirror(quantizer.model, weight_names=list(names), dtype=dtype)
    return Objective(mirror, batches, labels, loss, None, temperature)


def model_weights(model: onnx.ModelProto, layers: Sequence[LayerChoice]) -> list[str]:
    """The weight names of the units, in unit order (the mirror's parameters)."""
    initializers = {t.name for t in model.graph.initializer}
    return [name for choice in layers for name in choice.names if name in initializers]


__all__ = ["ActHooks", "CouplingTables", "LossMeter", "LossModel", "MeasuredTables",
           "Perturbations", "SecondOrder", "Shifts", "activation_singles", "all_pairs",
           "correctable_outputs", "fake_quantize_hook", "hessian_couplings", "hessian_only",
           "layer_graph", "make_objective", "measure_output_shifts", "measured_interactions",
           "model_weights", "neighbour_pairs", "rescaled_coupling", "second_order",
           "single_losses", "with_cross_terms", "with_measured"]
