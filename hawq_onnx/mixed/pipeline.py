"""``quantize_mixed(...)``: Hessian analysis → Ω → costs → corrections → ILP / accuracy
target → build → export → validate, with the wall time of every phase.

Data. The calibration file is split once, in sample order: the first ``analysis_samples``
feed the Hessian traces, the Hessian cross terms and the measured interactions; the next
``holdout_samples`` are *held out* for everything that judges a prediction (the Spearman
evaluation, the measured ΔL of each layer and of each Pareto point). Activation ranges are
calibrated on the whole file. The loss is the analysis objective (KL to the float model's
outputs, label-free) throughout, so every ΔL in the report is in the same unit.

Loss models the ILP can minimize (``interactions``):

* ``none``: HAWQ-V2, ``½ Ω_i(b)`` per unit;
* ``hessian``: exact block quadratics ``½ δ_iᵀH_iiδ_i`` plus Hessian couplings of all pairs
  (``L·B`` HVPs);
* ``measured``: measured single-unit ΔL plus measured interactions of graph neighbours;
* ``both`` (default): ``measured``, with Hessian couplings for the pairs that are not
  neighbours.

Budgets are translated so that what the report shows never exceeds the request: the average
weight width counts float-left weights at 32 bits, as the report does; ``size_budget`` is the
model *file* size (the ILP bounds the packed integer weights by the budget minus the fixed
part of the file, measured from a build).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from hawq_onnx.analysis import AnalysisSettings, analyze
from hawq_onnx.data import Dataset, load_npz
from hawq_onnx.errors import HawqError
from hawq_onnx.hessian.hvp import HessianVectorProduct
from hawq_onnx.hessian.objective import Objective
from hawq_onnx.hessian.result import AnalysisResult
from hawq_onnx.importer import load_model
from hawq_onnx.mirror.module import Mirror
from hawq_onnx.mixed import interactions as inter
from hawq_onnx.mixed.costs import LatencySettings, bops_table, latency_table, packed_bytes
from hawq_onnx.mixed.evaluate import Evaluation, evaluate_models, random_configurations
from hawq_onnx.mixed.ilp import pareto_front, smallest_achievable, solve
from hawq_onnx.mixed.problem import (
    Allocation,
    AllocationProblem,
    Budget,
    InfeasibleBudgetError,
    LayerChoice,
)
from hawq_onnx.mixed.sensitivity import SensitivityTable, weight_sensitivity, weight_spec_at
from hawq_onnx.mixed.target import TargetResult, accuracy_target
from hawq_onnx.mixed.ties import first_last_pins, layer_choices, merge_pins, resolve_pins
from hawq_onnx.quant.activations import ActQParams
from hawq_onnx.quant.containers import int2_fuses_safely
from hawq_onnx.quant.plan import QuantPlan
from hawq_onnx.quantize import BuildResult, QuantizeOptions, Quantizer, QuantizeResult, needed_opset

INTERACTION_MODES = ("none", "hessian", "measured", "both")
MINIMIZE_METRICS = ("size_bytes", "avg_weight_bits", "bops", "latency")
#: bytes of protobuf framing that may differ between two builds of one model per weight
#: (varint lengths of the integer tensors): kept free under a file-size budget.
_SIZE_MARGIN_PER_WEIGHT = 8
FLOAT_BITS = 32


@dataclass
class MixedOptions:
    """What the mixed-precision mode adds to :class:`QuantizeOptions`.

    Exactly one of the budgets, or ``max_drop`` (with an evaluation file), is normally set;
    budgets given together with ``max_drop`` bound every point of the searched frontier.
    ``latency_budget`` is in seconds, ``size_budget`` in bytes of the model file.
    """

    candidate_bits: tuple[int, ...] = (2, 3, 4, 6, 8)
    avg_weight_bits: float | None = None
    size_budget: float | None = None
    bops_budget: float | None = None
    latency_budget: float | None = None
    max_drop: float | None = None
    minimize: str = "size_bytes"
    interactions: str = "both"
    hops: int = 1
    measure_bits: tuple[int, ...] | None = None
    pins: tuple[tuple[str, int], ...] = ()
    pin_first_last: int | None = None
    ties: tuple[tuple[str, ...], ...] = ()
    analysis_samples: int = 256
    holdout_samples: int = 256
    min_probes: int = 16
    max_probes: int = 64
    rel_tol: float = 0.05
    eval_configs: int = 50
    pareto_points: int = 12
    recheck: int = 2
    eval_max_samples: int | None = None
    seed: int = 0
    use_cache: bool = True
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.interactions not in INTERACTION_MODES:
            raise HawqError(f"interactions must be one of {INTERACTION_MODES}")
        if self.minimize not in MINIMIZE_METRICS:
            raise HawqError(f"minimize must be one of {MINIMIZE_METRICS}")
        if len(set(self.candidate_bits)) < 1:
            raise HawqError("at least one candidate width is needed")

    def budget_given(self) -> bool:
        return any(v is not None for v in (self.avg_weight_bits, self.size_budget,
                                           self.bops_budget, self.latency_budget))

    def primary_metric(self) -> str:
        """The metric the Pareto frontier is swept along."""
        if self.max_drop is not None:
            return self.minimize
        for metric, value in (("avg_weight_bits", self.avg_weight_bits),
                              ("size_bytes", self.size_budget), ("bops", self.bops_budget),
                              ("latency", self.latency_budget)):
            if value is not None:
                return metric
        return self.minimize


# ---------------------------------------------------------------------- data split
def _slice(dataset: Dataset, start: int, stop: int) -> Dataset:
    """Samples ``[start, stop)`` of a dataset (scalar inputs fed whole)."""
    part = slice(start, min(stop, len(dataset)))
    arrays = {}
    for spec in dataset.specs:
        array = dataset.arrays[spec.name]
        if spec.batch_axis is None:
            arrays[spec.name] = array
            continue
        index = [slice(None)] * array.ndim
        index[spec.batch_axis] = part
        arrays[spec.name] = np.ascontiguousarray(array[tuple(index)])
    labels = None if dataset.labels is None else dataset.labels[part]
    return Dataset(dataset.source, dataset.specs, arrays, labels, list(dataset.notes))


def split_calibration(dataset: Dataset, analysis: int, holdout: int) -> tuple[Dataset, Dataset,
                                                                                 list[str]]:
    """(analysis part, held-out part, notes); too little data: held-out = analysis part."""
    total = len(dataset)
    take = min(analysis, total)
    if total - take >= 1 and holdout > 0:
        return _slice(dataset, 0, take), _slice(dataset, take, take + holdout), []
    if total >= 2:
        half = total // 2
        return (_slice(dataset, 0, half), _slice(dataset, half, total),
                [f"calibration data has {total} samples: analysis on {half}, held out "
                 f"{total - half}"])
    return dataset, dataset, ["a single calibration sample: nothing could be held out"]


# ---------------------------------------------------------------------- timing
@contextmanager
def timed(timings: dict[str, float], phase: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[phase] = round(timings.get(phase, 0.0) + time.perf_counter() - start, 4)


# ---------------------------------------------------------------------- the session
@dataclass
class Corrections:
    """The loss models built from the tables (``hessian`` always; others when computed)."""

    models: dict[str, inter.LossModel]
    couplings: inter.CouplingTables | None = None
    measured: inter.MeasuredTables | None = None
    pairs: list[tuple[int, int]] = field(default_factory=list)


class MixedSession:
    """One float model prepared for mixed-precision allocation.

    Phases are methods so that the CLI, the bench and the tests share them; each records its
    wall time in :attr:`timings`.
    """

    def __init__(self, model_path: str | os.PathLike[str], calib_path: str | os.PathLike[str],
                 options: QuantizeOptions | None = None, mixed: MixedOptions | None = None,
                 ) -> None:
        self.options = options or QuantizeOptions()
        self.mixed = mixed or MixedOptions()
        self.model_path = Path(model_path)
        self.timings: dict[str, float] = {}
        self.notes: list[str] = []
        self.bits = sorted(set(self.mixed.candidate_bits))
        with timed(self.timings, "load"):
            self._load()
        with timed(self.timings, "calibrate"):
            self._calibrate(calib_path)
        self._builds: dict[tuple[int, ...], BuildResult] = {}
        self.analysis: AnalysisResult | None = None
        self.sensitivity: SensitivityTable | None = None
        self.corrections: Corrections | None = None
        self._hvp: HessianVectorProduct | None = None
        self._meter: inter.LossMeter | None = None
        self._holdout_meter: inter.LossMeter | None = None
        self._perturbations: inter.Perturbations | None = None
        self.evaluation: Evaluation | None = None
        self._cost_tables: dict[str, np.ndarray] | None = None
        self._overhead: float | None = None

    # ------------------------------------------------------------------ set-up
    def _load(self) -> None:
        imported = load_model(self.model_path)
        act = self.options.act_spec()
        storage = [4 if b == 2 and act is not None and not int2_fuses_safely() else b
                   for b in self.bits]
        target = needed_opset(storage, [act.bits] if act else [],
                              grouped=bool(self.options.group_size))
        self.quantizer = Quantizer(imported.model, exclude=self.options.exclude,
                                   asymmetric=not self.options.symmetric_activations,
                                   target_opset=target)
        self.base_spec = self.options.weight_spec()
        self.choices: list[LayerChoice] = layer_choices(
            self.quantizer.view, self.quantizer.placement, ties=self.mixed.ties)
        if not self.choices:
            raise HawqError("the model has no quantizable weights to allocate widths to")
        self.plan0 = self._uniform_plan(max(self.bits))
        self.pins = self._pins()

    def _uniform_plan(self, bits: int) -> QuantPlan:
        spec = weight_spec_at(self.base_spec, bits, self.quantizer.opset)
        plan = self.quantizer.uniform_plan(spec, self.options.act_spec(),
                                           self.options.calib_method)
        plan.percentile = self.options.percentile
        return plan

    def _pins(self) -> dict[int, int]:
        view, placement = self.quantizer.view, self.quantizer.placement
        first_last = (first_last_pins(self.choices, view, self.mixed.pin_first_last, placement)
                      if self.mixed.pin_first_last is not None else {})
        items = merge_pins(first_last, dict(self.mixed.pins))
        return resolve_pins(self.choices, view, items, self.bits, placement)

    def _calibrate(self, calib_path: str | os.PathLike[str]) -> None:
        dataset = load_npz(calib_path, self.quantizer.model)
        self.notes.extend(dataset.notes)
        if self.options.act_spec() is not None:
            self.quantizer.calibrate(dataset, batch_size=self.options.batch_size,
                                     max_samples=self.options.max_calib_samples)
        else:
            self.quantizer.dataset, self.quantizer.batch_size = dataset, self.options.batch_size
        self.analysis_data, self.holdout_data, notes = split_calibration(
            dataset, self.mixed.analysis_samples, self.mixed.holdout_samples)
        self.notes.extend(notes)
        self.act_params: dict[str, ActQParams] = self.quantizer.activation_params(self.plan0)

    # ------------------------------------------------------------------ Hessian and Ω
    def analyse(self) -> AnalysisResult:
        """Hutchinson traces on the analysis split (cached on disk by the analysis)."""
        if self.analysis is None:
            with timed(self.timings, "analysis"):
                settings = AnalysisSettings(
                    min_probes=self.mixed.min_probes, max_probes=self.mixed.max_probes,
                    rel_tol=self.mixed.rel_tol, batch_size=self.options.batch_size,
                    seed=self.mixed.seed)
                self.analysis = analyze(self.quantizer.model, self.analysis_data, settings,
                                        cache_dir=self.mixed.cache_dir,
                                        use_cache=self.mixed.use_cache)
        return self.analysis

    def omega(self) -> np.ndarray:
        """[L, B] Ω per unit (HAWQ-V2, the exporter's quantizer)."""
        if self.sensitivity is None:
            analysis = self.analyse()
            with timed(self.timings, "sensitivity"):
                self.sensitivity = weight_sensitivity(
                    analysis, self.quantizer, self.bits, base=self.base_spec,
                    params=self.act_params,
                    names=[n for c in self.choices for n in c.names])
        return self.sensitivity.for_choices(self.choices)

    # ------------------------------------------------------------------ corrections
    def meters(self) -> tuple[inter.LossMeter, inter.LossMeter, inter.Perturbations]:
        """Loss meters on the analysis and held-out splits, and the weight errors."""
        if self._meter is None:
            names = inter.model_weights(self.quantizer.model, self.choices)
            mirror = Mirror(self.quantizer.model, weight_names=names)
            objective = Objective(mirror, list(self.analysis_data.batches(self.options.batch_size)))
            self._meter = inter.LossMeter(objective)
            self._holdout_meter = inter.LossMeter(Objective(
                objective.mirror, list(self.holdout_data.batches(self.options.batch_size))))
            self._perturbations = inter.Perturbations.build(
                self.quantizer, objective.mirror, self.choices, self.bits, self.base_spec,
                self.act_params)
            if self.options.bias_correction:  # measure what the exporter will ship
                with timed(self.timings, "bias_shifts"):
                    inter.measure_output_shifts(
                        self._meter, self._perturbations,
                        inter.correctable_outputs(self.quantizer.view, self.choices))
            self._hvp = HessianVectorProduct(objective)
        assert self._holdout_meter is not None and self._perturbations is not None
        return self._meter, self._holdout_meter, self._perturbations

    def measure_bits(self) -> list[int]:
        if self.mixed.measure_bits is not None:
            return sorted(set(self.mixed.measure_bits) & set(self.bits)) or self.bits
        low = [b for b in self.bits if b <= 4]
        return low if len(low) >= 2 else self.bits

    def correct(self, mode: str | None = None) -> Corrections:
        """Build the loss models ``mode`` needs (default: the options' mode)."""
        mode = mode or self.mixed.interactions
        omega = self.omega()
        models = {"hessian": inter.hessian_only(omega)}
        corrections = Corrections(models)
        if mode == "none":
            self.corrections = corrections
            return corrections
        meter, _, perturbations = self.meters()
        view = self.quantizer.view
        corrections.pairs = inter.neighbour_pairs(view, self.choices, self.mixed.hops)
        with timed(self.timings, "interactions"):
            if mode in ("hessian", "both"):
                assert self._hvp is not None
                corrections.couplings = inter.hessian_couplings(self._hvp, perturbations)
                models["cross_terms"] = inter.with_cross_terms(corrections.couplings)
            if mode in ("measured", "both"):
                corrections.measured = inter.measured_interactions(
                    meter, perturbations, corrections.pairs, measure_bits=self.measure_bits())
                models["measured"] = inter.with_measured(corrections.measured)
            if mode == "both":
                assert corrections.measured is not None
                both = inter.with_measured(corrections.measured, corrections.couplings)
                models["both"] = replace(both, name="both")
        self.corrections = corrections
        return corrections

    def chosen_model(self) -> inter.LossModel:
        corrections = self.corrections or self.correct()
        mode = self.mixed.interactions
        key = {"none": "hessian", "hessian": "cross_terms"}.get(mode, mode)
        return corrections.models[key]

    def evaluate(self, count: int | None = None) -> Evaluation:
        """Spearman of every built loss model against held-out ΔL of random configurations."""
        corrections = self.corrections or self.correct()
        _, holdout, perturbations = self.meters()
        count = self.mixed.eval_configs if count is None else count
        pins = {i: self.bits.index(b) for i, b in self.pins.items()}
        configs = random_configurations(len(self.choices), len(self.bits), count,
                                        self.mixed.seed, pins)
        with timed(self.timings, "evaluate"):
            self.evaluation = evaluate_models(list(corrections.models.values()), holdout,
                                              perturbations, configs)
        return self.evaluation

    # ------------------------------------------------------------------ costs and budgets
    def problem(self, model: inter.LossModel | None = None) -> AllocationProblem:
        """The ILP for a loss model (default: the options' corrected one)."""
        model = model or self.chosen_model()
        with timed(self.timings, "costs"):
            costs = self._costs()
        return AllocationProblem(self.choices, self.bits, model.unary, dict(model.pairs),
                                 size_bytes=costs["size_bytes"], bops=costs["bops"],
                                 latency=costs.get("latency"), pins=dict(self.pins))

    def _costs(self) -> dict[str, np.ndarray]:
        if self._cost_tables is None:
            act = self.options.act_spec()
            allowed = int2_fuses_safely() or act is None
            tables: dict[str, np.ndarray] = {
                "size_bytes": packed_bytes(self.choices, self.bits, storage="container",
                                           max_opset=self.quantizer.opset,
                                           int2_allowed=allowed),
                "bops": bops_table(self.choices, self.bits, act.bits if act else FLOAT_BITS)}
            if self.mixed.latency_budget is not None or self.mixed.minimize == "latency":
                tables["latency"] = self._latency().seconds
            self._cost_tables = tables
        return self._cost_tables

    def _latency(self) -> Any:
        act = self.options.act_spec()
        settings = LatencySettings(act_bits=act.bits if act else None,
                                   symmetric=self.options.symmetric_activations,
                                   base=self.base_spec, target_opset=self.quantizer.opset)
        with timed(self.timings, "latency_table"):
            return latency_table(self.quantizer.model, self.choices, self.bits,
                                 settings=settings, cache_dir=self.mixed.cache_dir,
                                 use_cache=self.mixed.use_cache)

    def float_params(self) -> int:
        """Parameters of quantizable weights that stay float (32 bits in the report)."""
        allocated = {n for c in self.choices for n in c.names}
        seen: set[str] = set()
        total = 0
        for layer in self.quantizer.view.quantizable_layers():
            if layer.weight and layer.weight not in allocated and layer.weight not in seen:
                seen.add(layer.weight)
                total += int(layer.params)
        return total

    def file_overhead(self) -> float:
        """File bytes that do not depend on the widths (graph, scales, biases, float parts):
        a build at the widest candidate minus its packed integer weights."""
        if self._overhead is None:
            from hawq_onnx.export import finalize

            widest = [len(self.bits) - 1] * len(self.choices)
            model = self._build_columns(widest, bias_correction=False).model
            size = finalize(model, self.options.format).ByteSize()
            packed = float(self._costs()["size_bytes"][:, -1].sum())
            self._overhead = size - packed + _SIZE_MARGIN_PER_WEIGHT * len(self.choices)
        return self._overhead

    def budget(self) -> Budget:
        """The options' budgets in the ILP's terms (see the module docstring)."""
        mixed = self.mixed
        budget = Budget(bops=mixed.bops_budget, latency=mixed.latency_budget)
        if mixed.avg_weight_bits is not None:
            params = sum(c.params for c in self.choices)
            floats = self.float_params()
            budget.avg_weight_bits = (mixed.avg_weight_bits * (params + floats)
                                      - FLOAT_BITS * floats) / params
        if mixed.size_budget is not None:
            budget.size_bytes = mixed.size_budget - self.file_overhead()
        return budget

    def check_budget(self) -> None:
        """Fail fast, in the user's terms, on a budget no allocation can meet (before the
        Hessian analysis, which is the slow part)."""
        probe = AllocationProblem(self.choices, self.bits, np.zeros((len(self.choices),
                                                                     len(self.bits))),
                                  size_bytes=self._costs()["size_bytes"],
                                  bops=self._costs()["bops"],
                                  latency=self._costs().get("latency"), pins=dict(self.pins))
        mixed = self.mixed
        params, floats = sum(c.params for c in self.choices), self.float_params()
        checks = [
            ("--avg-weight-bits", mixed.avg_weight_bits, "avg_weight_bits",
             lambda v: (v * params + FLOAT_BITS * floats) / (params + floats), "{:.4f} bits"),
            ("--size-budget", mixed.size_budget, "size_bytes",
             lambda v: v + self.file_overhead(), "{:.0f} bytes"),
            ("--bops-budget", mixed.bops_budget, "bops", lambda v: v, "{:.4g} BOPs"),
            ("--latency-budget", mixed.latency_budget, "latency", lambda v: v * 1e3,
             "{:.4f} ms")]
        for flag, value, metric, to_user, unit in checks:
            if value is None:
                continue
            low = to_user(smallest_achievable(probe, metric))
            requested = value * 1e3 if metric == "latency" else value
            if low > requested * (1 + 1e-9):
                raise InfeasibleBudgetError(
                    f"{flag} {unit.format(requested)} is infeasible: the smallest achievable "
                    f"is {unit.format(low)}{' (pins included)' if self.pins else ''}")

    # ------------------------------------------------------------------ allocation
    def allocate(self, problem: AllocationProblem) -> Allocation:
        with timed(self.timings, "allocate"):
            return solve(problem, self.budget())

    def frontier(self, problem: AllocationProblem, metric: str | None = None,
                 points: int | None = None, bounded: bool = False) -> list[Allocation]:
        """The Pareto frontier along ``metric``; ``bounded``: every other budget applies."""
        metric = metric or self.mixed.primary_metric()
        base = Budget()
        if bounded:
            limits = {k: v for k, v in self.budget().items() if k != metric}
            base = Budget(**limits)
        with timed(self.timings, "pareto"):
            return pareto_front(problem, metric, points or self.mixed.pareto_points, base)

    # ------------------------------------------------------------------ building
    def plan_for(self, columns: Sequence[int]) -> QuantPlan:
        plan = self.plan0
        for choice, k in zip(self.choices, columns, strict=True):
            spec = weight_spec_at(self.base_spec, self.bits[k], self.quantizer.opset)
            for name in choice.names:
                plan = plan.with_weight(name, spec)
        return plan

    def _build_columns(self, columns: Sequence[int], bias_correction: bool | None = None
                       ) -> BuildResult:
        correct = self.options.bias_correction if bias_correction is None else bias_correction
        key = (*columns, int(correct))
        if key not in self._builds:
            with timed(self.timings, "build"):
                self._builds[key] = self.quantizer.build(
                    self.plan_for(columns), params=self.act_params, bias_correction=correct,
                    correction_samples=min(256, self.options.max_calib_samples or 256))
        return self._builds[key]

    def build(self, allocation: Allocation) -> BuildResult:
        return self._build_columns(self._columns(allocation))

    def _columns(self, allocation: Allocation) -> list[int]:
        return allocation.columns or [self.bits.index(b) for b in allocation.bits]

    def measured_delta(self, allocation: Allocation) -> float:
        """Held-out ΔL of an allocation (mirror forward pass, exact quantized weights)."""
        _, holdout, perturbations = self.meters()
        columns = self._columns(allocation)
        return perturbations.delta(holdout, dict(enumerate(columns)))

    def layer_deltas(self, allocation: Allocation) -> list[float]:
        """Held-out ΔL of each unit alone at its allocated width."""
        _, holdout, perturbations = self.meters()
        return [perturbations.delta(holdout, {i: k})
                for i, k in enumerate(self._columns(allocation))]


# ---------------------------------------------------------------------- accuracy drops
class DropMeter:
    """onnxruntime-measured accuracy drop of quantized models on one evaluation set.

    The float model's predictions are computed once. With labels, drop = top-1(float) −
    top-1(quantized); without, 1 − agreement (the same definitions as ``validate``).
    """

    def __init__(self, float_model: onnx.ModelProto, eval_path: str | os.PathLike[str], *,
                 labels_key: str = "labels", batch_size: int = 64,
                 max_samples: int | None = None, fmt: str = "qdq") -> None:
        from hawq_onnx.calibration.session import make_session
        from hawq_onnx.validate import _labels

        dataset = load_npz(eval_path, float_model)
        if max_samples is not None:
            dataset = dataset.head(max_samples)
        self.labels = _labels(Path(eval_path), dataset, labels_key)
        if self.labels is not None:
            self.labels = np.asarray(self.labels)[:len(dataset)]
        self.batches = list(dataset.batches(batch_size))
        session = make_session(float_model)
        self.reference = np.concatenate([self._predict(session, b) for b in self.batches])
        self.fmt = fmt
        self.evaluations = 0

    @staticmethod
    def _predict(session: Any, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        from hawq_onnx.validate import _top1

        return _top1(session.run(None, dict(feeds))[0]).reshape(-1)

    def top1(self, predictions: np.ndarray) -> float | None:
        if self.labels is None:
            return None
        return float(np.mean(predictions == self.labels.reshape(predictions.shape)))

    def __call__(self, model: onnx.ModelProto) -> dict[str, Any]:
        from hawq_onnx.calibration.session import make_session
        from hawq_onnx.export import finalize

        session = make_session(finalize(model, self.fmt))
        predictions = np.concatenate([self._predict(session, b) for b in self.batches])
        self.evaluations += 1
        agreement = float(np.mean(predictions == self.reference))
        top_f, top_q = self.top1(self.reference), self.top1(predictions)
        drop = top_f - top_q if top_f is not None and top_q is not None else 1.0 - agreement
        return {"drop": drop, "agreement": agreement, "top1_float": top_f, "top1_quant": top_q}


# ---------------------------------------------------------------------- one call
@dataclass
class MixedResult(QuantizeResult):
    """The quantize result plus whether an accuracy target was met (None: no target)."""

    target_met: bool | None = None


def quantize_mixed(model_path: str | os.PathLike[str], output_path: str | os.PathLike[str] | None,
                   calib_path: str | os.PathLike[str], options: QuantizeOptions | None = None,
                   mixed: MixedOptions | None = None, *,
                   eval_path: str | os.PathLike[str] | None = None, labels_key: str = "labels",
                   progress: Callable[[str], None] | None = None) -> MixedResult:
    """Allocate per-layer weight widths and write the quantized model (see module doc)."""
    from hawq_onnx.export import build_report, export_model

    options = options or QuantizeOptions()
    mixed = mixed or MixedOptions()
    _check_request(mixed, eval_path)
    say = progress or (lambda message: None)
    start = time.perf_counter()
    session = MixedSession(model_path, calib_path, options, mixed)
    session.check_budget()
    say("Hessian analysis")
    session.omega()
    say(f"corrections ({mixed.interactions})")
    session.correct()
    if mixed.eval_configs > 0:
        say(f"Spearman evaluation on {mixed.eval_configs} configurations")
        session.evaluate()
    problem = session.problem()
    target: TargetResult | None = None
    drops: dict[tuple[int, ...], dict[str, Any]] = {}
    if mixed.max_drop is not None:
        assert eval_path is not None
        say("accuracy-target search")
        frontier = session.frontier(problem, mixed.minimize, bounded=True)
        target = _search(session, frontier, eval_path, labels_key, drops)
        allocation = target.allocation
    else:
        say("ILP")
        allocation = session.allocate(problem)
        frontier = session.frontier(problem)
    built = session.build(allocation)
    with timed(session.timings, "export"):
        exported = export_model(built.model, output_path, fmt=options.format,
                                source=model_path)
    report = build_report(Path(model_path).stat().st_size, session.quantizer,
                          session.plan_for(session._columns(allocation)), built, exported,
                          options)
    if eval_path is not None and output_path is not None:
        from hawq_onnx.validate import evaluate

        with timed(session.timings, "validate"):
            report["metrics"] = evaluate(model_path, output_path, eval_path,
                                         labels_key=labels_key).to_dict()
    report["mixed"] = mixed_report(session, problem, allocation, frontier, target, drops)
    _annotate_layers(report, session, allocation)
    session.timings["total"] = round(time.perf_counter() - start, 4)
    report["timings"] = dict(session.timings)
    report["notes"] = [*session.notes, *report.get("notes", [])]
    return MixedResult(exported.model, report, exported.path,
                       None if target is None else target.met)


def _check_request(mixed: MixedOptions, eval_path: Any) -> None:
    if mixed.max_drop is not None and eval_path is None:
        raise HawqError("--max-drop needs --eval EVAL.npz to measure the accuracy drop")
    if mixed.max_drop is None and not mixed.budget_given():
        raise HawqError("mixed precision needs a budget (--avg-weight-bits, --size-budget, "
                        "--bops-budget, --latency-budget) or --max-drop")
    if mixed.max_drop is not None and not 0 <= mixed.max_drop <= 1:
        raise HawqError(f"--max-drop must be between 0 and 1, got {mixed.max_drop}")


def _search(session: MixedSession, frontier: list[Allocation], eval_path: Any, labels_key: str,
            drops: dict[tuple[int, ...], dict[str, Any]]) -> TargetResult:
    meter = DropMeter(session.quantizer.float_model, eval_path, labels_key=labels_key,
                      max_samples=session.mixed.eval_max_samples, fmt=session.options.format)

    def measure(allocation: Allocation) -> float:
        key = tuple(allocation.bits)
        if key not in drops:
            drops[key] = meter(session.build(allocation).model)
        return float(drops[key]["drop"])

    with timed(session.timings, "target_search"):
        return accuracy_target(frontier, measure, float(session.mixed.max_drop or 0.0),
                               recheck=session.mixed.recheck)


# ---------------------------------------------------------------------- report
def _round(value: float | None, digits: int = 6) -> float | None:
    if value is None or not np.isfinite(value):
        return None
    return float(f"{value:.{digits}g}")


def _allocation_row(session: MixedSession, allocation: Allocation, predicted: float,
                    drops: Mapping[tuple[int, ...], Mapping[str, Any]]) -> dict[str, Any]:
    row = {"bits": list(allocation.bits), "avg_weight_bits": _round(allocation.avg_weight_bits),
           "size_bytes": _round(allocation.size_bytes), "bops": _round(allocation.bops),
           "latency_s": _round(allocation.latency), "predicted_dl": _round(predicted),
           "measured_dl": _round(session.measured_delta(allocation))}
    measured = drops.get(tuple(allocation.bits))
    if measured is not None:
        row["drop"] = _round(measured["drop"])
    return row


def mixed_report(session: MixedSession, problem: AllocationProblem, allocation: Allocation,
                 frontier: Sequence[Allocation], target: TargetResult | None,
                 drops: Mapping[tuple[int, ...], Mapping[str, Any]]) -> dict[str, Any]:
    """The report's ``mixed`` section."""
    mixed = session.mixed
    model = session.chosen_model()
    columns = session._columns(allocation)
    float_params = session.float_params()
    params = sum(c.params for c in session.choices)
    out: dict[str, Any] = {
        "candidate_bits": session.bits,
        "interactions": mixed.interactions,
        "loss_model": model.name,
        "request": {k: v for k, v in asdict(mixed).items()
                    if k in ("avg_weight_bits", "size_budget", "bops_budget", "latency_budget",
                             "max_drop", "minimize", "hops", "pin_first_last")},
        "budget_ilp": dict(session.budget().items()),
        "pins": {session.choices[i].label: b for i, b in session.pins.items()},
        "status": allocation.status,
        "totals": {
            "weight_bytes": _round(allocation.size_bytes),
            "avg_weight_bits": _round((allocation.avg_weight_bits * params
                                       + FLOAT_BITS * float_params) / (params + float_params)),
            "bops": _round(allocation.bops), "latency_s": _round(allocation.latency),
            "predicted_dl": _round(model.predict(columns)),
            "measured_dl": _round(session.measured_delta(allocation)),
        },
        "units": [{"names": list(c.names), "params": c.params, "macs": c.macs,
                   "bits": b} for c, b in zip(session.choices, allocation.bits, strict=True)],
        "pareto": {"metric": mixed.primary_metric(),
                   "points": [_allocation_row(session, a, a.objective, drops)
                              for a in frontier]},
        "pairs": {"neighbours": len(session.corrections.pairs) if session.corrections else 0,
                  "in_ilp": len(problem.pair_costs)},
    }
    if session.evaluation is not None:
        out["spearman"] = session.evaluation.to_dict()
    if target is not None:
        out["target"] = target.to_dict()
    return out


def _annotate_layers(report: dict[str, Any], session: MixedSession,
                     allocation: Allocation) -> None:
    """Per layer row: trace, trace_se, Ω per candidate, predicted and measured ΔL."""
    table = session.sensitivity
    model = session.chosen_model()
    columns = session._columns(allocation)
    shares = model.per_unit(columns)
    measured = session.layer_deltas(allocation)
    unit_of = {name: i for i, c in enumerate(session.choices) for name in c.names}
    for row in report["layers"]:
        unit = unit_of.get(row["name"])
        if unit is None or table is None:
            continue
        r = table.row(row["name"])
        row["trace"] = _round(float(table.trace[r]))
        row["trace_se"] = _round(float(table.trace_se[r]))
        row["omega"] = {str(b): _round(float(v)) for b, v in zip(session.bits,
                                                                 table.omega[r], strict=True)}
        row["unit"] = unit
        row["predicted_dl"] = _round(float(shares[unit]))
        row["measured_dl"] = _round(measured[unit])


# ---------------------------------------------------------------------- figure
_METRIC_LABELS = {"size_bytes": "packed weight bytes", "avg_weight_bits": "average weight bits",
                  "bops": "BOPs", "latency": "latency (s)"}


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise HawqError("--pareto-plot needs matplotlib: pip install 'hawq-onnx[plot]'") from exc
    return plt


def write_pareto_plot(path: str | os.PathLike[str], mixed: Mapping[str, Any]) -> Path:
    """Predicted and measured (held-out) ΔL along the frontier, the chosen point marked;
    a second panel with the measured accuracy drops when a target search ran."""
    plt = _pyplot()
    pareto = mixed["pareto"]
    metric = pareto["metric"]
    key = "latency_s" if metric == "latency" else metric
    points = [p for p in pareto["points"] if p.get(key) is not None]
    drops = [p for p in points if p.get("drop") is not None]
    fig, axes = plt.subplots(2 if drops else 1, 1, figsize=(6.4, 7.0 if drops else 4.0),
                             squeeze=False)
    ax = axes[0][0]
    x = [p[key] for p in points]
    for field_name, style, label in (("predicted_dl", "o-", "predicted ΔL"),
                                     ("measured_dl", "s--", "measured ΔL (held out)")):
        ax.plot(x, [max(p[field_name] or 0.0, 1e-12) for p in points], style, label=label)
    totals = mixed["totals"]
    chosen = totals.get("weight_bytes" if metric == "size_bytes" else key)
    if chosen is not None and totals.get("measured_dl") is not None:
        ax.plot([chosen], [max(totals["measured_dl"], 1e-12)], "r*", markersize=14,
                label="chosen")
    ax.set_yscale("log")
    ax.set_xlabel(_METRIC_LABELS.get(metric, metric))
    ax.set_ylabel("loss increase")
    ax.set_title(f"Pareto front ({mixed['loss_model']} loss model)")
    ax.legend()
    if drops:
        low = axes[1][0]
        low.plot([p[key] for p in drops], [100 * p["drop"] for p in drops], "o", label="measured")
        target = mixed.get("target", {}).get("max_drop")
        if target is not None:
            low.axhline(100 * target, color="r", linestyle=":", label="max drop")
        low.set_xlabel(_METRIC_LABELS.get(metric, metric))
        low.set_ylabel("accuracy drop (points)")
        low.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["DropMeter", "INTERACTION_MODES", "MINIMIZE_METRICS", "MixedOptions", "MixedResult",
           "MixedSession", "quantize_mixed", "split_calibration", "write_pareto_plot"]

