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

Activation widths (``candidate_act_bits``, e.g. 8 and 16): every activation quantizer that
feeds a weighted layer also gets a width, jointly with the weights (see
:mod:`hawq_onnx.mixed.ilp`). Its term in the loss model is ``½ Ω_a`` (HAWQ-V2's activation
sensitivity: the Hessian trace w.r.t. the layer inputs it quantizes times the measured
``E‖Q_b(a) − a‖²``) for the ``none``/``hessian`` loss models, and its measured ΔL (that one
quantizer fake-quantized in the mirror) for ``measured``/``both``; there are no pairwise
activation terms. BOPs and latency are priced per (weight width, activation width) of each
layer; size and average bits count weights only. Quantizers feeding no weighted layer keep
the base ``--act-bits``. Measured ΔL of a configuration (report, Pareto points) includes its
allocated activation widths; the Spearman check covers weight configurations only. 16-bit
Q/DQ needs opset 21: the model is upgraded, or the request refused.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from hawq_onnx import predictions
from hawq_onnx.analysis import AnalysisSettings, analyze
from hawq_onnx.data import Dataset, load_npz
from hawq_onnx.errors import HawqError
from hawq_onnx.graph import nested_reason
from hawq_onnx.hessian.hvp import HessianVectorProduct
from hawq_onnx.hessian.objective import Objective
from hawq_onnx.hessian.result import AnalysisResult
from hawq_onnx.importer import load_model
from hawq_onnx.mirror.batching import describe, relaxation_note, relaxed_batch_size
from hawq_onnx.mirror.module import Mirror
from hawq_onnx.mixed import interactions as inter
from hawq_onnx.mixed.costs import (
    JointTables,
    LatencySettings,
    bops_table,
    joint_bops,
    joint_latency_table,
    latency_table,
    packed_bytes,
)
from hawq_onnx.mixed.evaluate import Evaluation, evaluate_models, random_configurations
from hawq_onnx.mixed.ilp import pareto_front, smallest_achievable, solve
from hawq_onnx.mixed.pair_pruning import MAX_ILP_PAIRS, IlpPairs, ilp_pairs
from hawq_onnx.mixed.problem import (
    ActUnit,
    Allocation,
    AllocationProblem,
    Budget,
    InfeasibleBudgetError,
    LayerChoice,
)
from hawq_onnx.mixed.report import FLOAT_BITS, annotate_layers, mixed_report, rounded
from hawq_onnx.mixed.sensitivity import (
    SensitivityTable,
    activation_sensitivity,
    weight_sensitivity,
    weight_spec_at,
)
from hawq_onnx.mixed.target import TargetResult, accuracy_target
from hawq_onnx.mixed.ties import (
    LayerLink,
    activation_units,
    first_last_pins,
    layer_choices,
    merge_pins,
    resolve_act_pins,
    resolve_pins,
)
from hawq_onnx.quant.activations import ActQParams
from hawq_onnx.quant.containers import int2_fuses_safely
from hawq_onnx.quant.plan import ACT_BITS, ActSpec, QuantPlan
from hawq_onnx.quantize import BuildResult, QuantizeOptions, Quantizer, QuantizeResult, needed_opset

INTERACTION_MODES = ("none", "hessian", "measured", "both")
MINIMIZE_METRICS = ("size_bytes", "avg_weight_bits", "bops", "latency")
#: bytes of protobuf framing that may differ between two builds of one model per weight
#: (varint lengths of the integer tensors): kept free under a file-size budget.
_SIZE_MARGIN_PER_WEIGHT = 8


@dataclass
class MixedOptions:
    """What the mixed-precision mode adds to :class:`QuantizeOptions`.

    Exactly one of the budgets, or ``max_drop`` (with an evaluation file), is normally set;
    budgets given together with ``max_drop`` bound every point of the searched frontier.
    ``latency_budget`` is in seconds, ``size_budget`` in bytes of the model file.
    """

    candidate_bits: tuple[int, ...] = (2, 3, 4, 6, 8)
    candidate_act_bits: tuple[int, ...] | None = None
    avg_weight_bits: float | None = None
    size_budget: float | None = None
    bops_budget: float | None = None
    latency_budget: float | None = None
    max_drop: float | None = None
    minimize: str = "size_bytes"
    interactions: str = "both"
    hops: int = 1
    max_ilp_pairs: int = MAX_ILP_PAIRS
    measure_bits: tuple[int, ...] | None = None
    pins: tuple[tuple[str, int], ...] = ()
    pin_first_last: int | None = None
    act_pins: tuple[tuple[str, int], ...] = ()
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
        if self.max_ilp_pairs < 0:
            raise HawqError(f"max_ilp_pairs must be >= 0, got {self.max_ilp_pairs}")
        if self.candidate_act_bits is not None:
            wrong = [b for b in self.candidate_act_bits if b not in ACT_BITS]
            if not self.candidate_act_bits or wrong:
                raise HawqError(f"candidate activation widths must be among {ACT_BITS}, got "
                                f"{list(self.candidate_act_bits)}")
        if self.act_pins and self.candidate_act_bits is None:
            raise HawqError("--pin-act needs --candidate-act-bits")

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
#: fewest samples worth a separate slice for GPTQ's input moments.
MIN_MOMENT_SAMPLES = 64


def _slice(dataset: Dataset, start: int, stop: int) -> Dataset:
    """Samples ``[start, stop)`` of a dataset, as a view that reads nothing until used."""
    return dataset.slice(start, stop)


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
        self.act_bits: list[int] = sorted(set(self.mixed.candidate_act_bits or ()))
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
        self.kept_model: inter.LossModel | None = None  # set by allocate_guarded
        self.selection: dict[str, Any] | None = None  # report entry of allocate_guarded
        self._cost_tables: dict[str, np.ndarray] | None = None
        self._joint_tables: dict[str, JointTables] = {}
        self._overhead: float | None = None
        self.act_sensitivity: SensitivityTable | None = None
        self._act_measured: np.ndarray | None = None
        self.mirror_batch: dict[str, Any] | None = None  # report entry, set with the meters
        #: loss model name -> the pair terms its last ILP took (:mod:`.pair_pruning`).
        self.ilp_pairs: dict[str, IlpPairs] = {}

    # ------------------------------------------------------------------ set-up
    def _load(self) -> None:
        imported = load_model(self.model_path)
        act = self.options.act_spec()
        if self.act_bits and act is None:
            raise HawqError("--candidate-act-bits needs quantized activations (not "
                            "--act-bits none)")
        storage = [4 if b == 2 and act is not None and not int2_fuses_safely() else b
                   for b in self.bits]
        acts = ([act.bits] if act else []) + self.act_bits
        target = needed_opset(storage, acts, grouped=bool(self.options.group_size))
        self.quantizer = Quantizer(imported.model, exclude=self.options.exclude,
                                   asymmetric=not self.options.symmetric_activations,
                                   target_opset=target)
        if self.act_bits and max(acts) > 8 and self.quantizer.opset < 21:
            raise HawqError(f"16-bit activation candidates need opset 21 (uint16/int16 "
                            f"QuantizeLinear); the model is at opset {self.quantizer.opset} "
                            f"and could not be upgraded: {'; '.join(self.quantizer.notes)}")
        self.base_spec = self.options.weight_spec()
        self.choices: list[LayerChoice] = layer_choices(
            self.quantizer.view, self.quantizer.placement, ties=self.mixed.ties)
        if not self.choices:
            raise HawqError("the model has no quantizable weights to allocate widths to"
                            + nested_reason(self.quantizer.view))
        self.act_units: list[ActUnit] = []
        self.links: list[LayerLink] = []
        if self.act_bits:
            self.act_units, self.links = activation_units(
                self.quantizer.view, self.quantizer.placement, self.choices)
            if not self.act_units:
                self.notes.append("--candidate-act-bits: no quantized activation feeds a "
                                  "weighted layer; only weight widths are allocated")
            priced = {"bops", "latency"}
            if self.mixed.bops_budget is None and self.mixed.latency_budget is None and not (
                    self.mixed.max_drop is not None and self.mixed.minimize in priced):
                self.notes.append("activation widths cost only BOPs and latency: with neither "
                                  "budget, every activation quantizer is free to take the "
                                  "widest candidate")
        self.plan0 = self._uniform_plan(max(self.bits))
        self.pins = self._pins()
        self.act_pins = resolve_act_pins(self.act_units, self.mixed.act_pins, self.act_bits)

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
        if any(weight_spec_at(self.base_spec, b, self.quantizer.opset).error_feedback
               for b in self.bits):
            self._split_moments(dataset)
        self.act_params: dict[str, ActQParams] = self.quantizer.activation_params(self.plan0)
        self.act_params_at: dict[int, dict[str, ActQParams]] = {
            bits: self._act_params_at(bits) for bits in self.act_bits}

    def _split_moments(self, dataset: Dataset) -> None:
        """Give GPTQ rounding samples that no loss is measured on, where the file has them.

        Error feedback fits the samples its input moments come from: on the zoo transformer
        the last MLP layer's measured 2-4-bit ΔL was 2-4x larger on unseen samples than on
        the fitted ones (1.4-1.8x with nearest rounding). The moments therefore come from
        the samples after the analysis and held-out parts when there are at least
        ``MIN_MOMENT_SAMPLES`` of them; otherwise from the analysis part, with a note.
        (Halving the analysis part instead was tried: the noisier measurements ranked
        configurations no better.)
        """
        used = len(self.analysis_data) + (len(self.holdout_data)
                                          if self.holdout_data is not self.analysis_data else 0)
        if len(dataset) - used >= MIN_MOMENT_SAMPLES:
            self.quantizer.moment_data = dataset.slice(used, len(dataset))
            return
        self.notes.append(f"GPTQ rounding fits its input moments on the {len(self.analysis_data)} "
                          "analysis samples, where the measured losses of <= 4-bit widths "
                          "are then slightly optimistic; a calibration file with at least "
                          f"{used + MIN_MOMENT_SAMPLES} samples keeps them apart")

    def _act_params_at(self, bits: int) -> dict[str, ActQParams]:
        """Every quantizer's parameters at one width (the exporter's range selection)."""
        plan = self.quantizer.uniform_plan(
            None, ActSpec(bits, self.options.symmetric_activations), self.options.calib_method)
        plan.percentile = self.options.percentile
        return self.quantizer.activation_params(plan)

    def act_hooks(self, unit: int, column: int) -> dict[str, ActQParams]:
        """The tensors activation unit ``unit`` quantizes, with its parameters at
        ``act_bits[column]`` (what the exporter's Q/DQ pairs of that quantizer compute)."""
        owner = self.act_units[unit].name
        params = self.act_params_at[self.act_bits[column]].get(owner)
        if params is None:
            return {}
        placement, view = self.quantizer.placement, self.quantizer.view
        return {t: params for t in placement.quantized_tensors()
                if placement.source(t) == owner and view.elem_type(t) == onnx.TensorProto.FLOAT}

    def allocation_hooks(self, act_columns: Sequence[int]) -> dict[str, ActQParams]:
        """All allocated activation quantizers of a configuration, as mirror hooks."""
        hooks: dict[str, ActQParams] = {}
        for j, m in enumerate(act_columns):
            hooks.update(self.act_hooks(j, m))
        return hooks

    # ------------------------------------------------------------------ Hessian and Ω
    def analyse(self) -> AnalysisResult:
        """Hutchinson traces on the analysis split (cached on disk by the analysis)."""
        if self.analysis is None:
            with timed(self.timings, "analysis"):
                settings = AnalysisSettings(
                    min_probes=self.mixed.min_probes, max_probes=self.mixed.max_probes,
                    rel_tol=self.mixed.rel_tol, batch_size=self.options.batch_size,
                    seed=self.mixed.seed, activations=bool(self.act_units))
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

    def act_omega(self) -> np.ndarray:
        """[A, C] Ω per activation quantizer (HAWQ-V2's activation sensitivity)."""
        if not self.act_units:
            return np.zeros((0, len(self.act_bits)))
        if self.act_sensitivity is None:
            analysis = self.analyse()
            with timed(self.timings, "act_sensitivity"):
                self.act_sensitivity = activation_sensitivity(
                    analysis, self.quantizer, self.analysis_data, self.act_bits,
                    symmetric=self.options.symmetric_activations,
                    calib_method=self.options.calib_method, batch_size=self.options.batch_size,
                    max_samples=self.mixed.analysis_samples, percentile=self.options.percentile)
            self.notes.extend(self.act_sensitivity.notes)
            self._pin_untraced()
        return self.act_sensitivity.for_keys([u.name for u in self.act_units])

    def _pin_untraced(self) -> None:
        """Quantizers without a traced row have no Ω: they keep the base width."""
        assert self.act_sensitivity is not None
        act = self.options.act_spec()
        base = act.bits if act is not None and act.bits in self.act_bits else self.act_bits[0]
        for j, unit in enumerate(self.act_units):
            if unit.name not in self.act_sensitivity.keys and j not in self.act_pins:
                self.act_pins[j] = base
                self.notes.append(f"activation {unit.name}: no Hessian trace, kept at {base} "
                                  "bits")

    def act_unary(self) -> np.ndarray:
        """[A, C] the activation units' terms of the loss model: ``½ Ω_a`` for the
        none/hessian models, measured ΔL of each quantizer alone for measured/both."""
        omega = self.act_omega()
        if self.mixed.interactions in ("none", "hessian") or not self.act_units:
            return 0.5 * omega
        if self._act_measured is None:
            meter, _, _ = self.meters()
            hooks = [[self.act_hooks(j, m) for m in range(len(self.act_bits))]
                     for j in range(len(self.act_units))]
            with timed(self.timings, "interactions"):
                self._act_measured = inter.activation_singles(meter, hooks)
        return self._act_measured

    # ------------------------------------------------------------------ corrections
    def meters(self) -> tuple[inter.LossMeter, inter.LossMeter, inter.Perturbations]:
        """Loss meters on the analysis and held-out splits, and the weight errors."""
        if self._meter is None:
            names = inter.model_weights(self.quantizer.model, self.choices)
            mirror = Mirror(self.quantizer.model, weight_names=names)
            size = self._mirror_batch_size(mirror)
            objective = Objective(mirror, self.analysis_data.batched(size, relax_fixed=True))
            self._meter = inter.LossMeter(objective)
            self._holdout_meter = inter.LossMeter(Objective(
                objective.mirror, self.holdout_data.batched(size, relax_fixed=True)))
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

    def _mirror_batch_size(self, mirror: Mirror) -> int:
        """The batch size the meters feed the mirror: ``--batch-size`` even for a model that
        declares a fixed batch, once the mirror is verified to compute the same on it (one
        check on the analysis split, before any hook; the held-out split uses the same)."""
        size, reason = relaxed_batch_size(mirror, self.analysis_data, self.options.batch_size)
        self.mirror_batch = describe(size, self.analysis_data.fixed_batch, reason)
        note = relaxation_note(self.mirror_batch)
        if note is not None:
            self.notes.append(note)
        return size

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
                corrections.couplings = inter.hessian_couplings(
                    self._coupling_engine(inter.GRAM_BUDGET_BYTES), perturbations)
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

    def _coupling_engine(self, budget_bytes: int) -> HessianVectorProduct:
        """The engine for the Hessian couplings: the meters' one, or the same objective over
        smaller micro-batches when the output-space Gram (all pairs from one forward-mode
        tangent per unit and width) would not fit ``budget_bytes`` at the meters' batch size.

        Why: the Gram holds every tangent of one micro-batch at once, so on dense outputs
        (an OCR recognizer's [N, T, 6625] probabilities) it exceeded the budget and the
        couplings fell back to one HVP per unit and width, several times slower. The Gram
        sums over micro-batches, so fewer samples per micro-batch give the same tables."""
        assert self._hvp is not None
        hvp = self._hvp
        jobs = len(self.choices) * len(self.bits)
        need = hvp.gram_bytes(jobs)
        if hvp.mode != "gauss_newton" or need <= budget_bytes:
            return hvp
        size = hvp.objective.batches.first().size
        smaller = size * budget_bytes // need
        declared = self.analysis_data.fixed_batch
        if smaller < (declared or 1) or size == declared:
            return hvp  # one sample (or the declared batch) is already too much: HVPs
        objective = Objective(hvp.objective.mirror,
                              self.analysis_data.batched(smaller, relax_fixed=True))
        engine = HessianVectorProduct(objective, hvp.mode)
        return engine if engine.gram_bytes(jobs) <= budget_bytes else hvp

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
            self._costs()
        measured = self.corrections.measured if self.corrections is not None else None
        kept = ilp_pairs(model.pairs, set(measured.pairs) if measured is not None else set(),
                         self.mixed.max_ilp_pairs)
        self.ilp_pairs[model.name] = kept
        if kept.dropped:
            self._note_once(
                f"ILP ({model.name} loss model): the {kept.dropped} smallest of "
                f"{len(model.pairs)} pairwise loss terms left out (--max-ilp-pairs "
                f"{self.mixed.max_ilp_pairs}); they move any configuration's predicted ΔL by "
                f"at most {kept.dropped_bound:.3g}")
        return self._problem(model.unary, kept.pairs, self.act_unary())

    def _note_once(self, note: str) -> None:
        if note not in self.notes:
            self.notes.append(note)

    def _problem(self, unary: np.ndarray, pairs: dict[tuple[int, int], np.ndarray],
                 act_unary: np.ndarray) -> AllocationProblem:
        """An ILP over this session's units, costs and pins with the given loss terms."""
        costs = self._costs()
        extra: dict[str, Any] = {}
        if self.act_units:
            extra = {"act_units": self.act_units, "act_candidate_bits": self.act_bits,
                     "act_omega": act_unary, "joint": dict(self._joint_tables),
                     "act_pins": dict(self.act_pins)}
        return AllocationProblem(self.choices, self.bits, unary, pairs,
                                 size_bytes=costs["size_bytes"], bops=costs["bops"],
                                 latency=costs.get("latency"), pins=dict(self.pins), **extra)

    def _costs(self) -> dict[str, np.ndarray]:
        if self._cost_tables is None:
            act = self.options.act_spec()
            allowed = int2_fuses_safely() or act is None
            tables: dict[str, np.ndarray] = {
                "size_bytes": packed_bytes(self.choices, self.bits, storage="container",
                                           max_opset=self.quantizer.opset,
                                           int2_allowed=allowed),
                "bops": bops_table(self.choices, self.bits, act.bits if act else FLOAT_BITS)}
            if self.act_units:
                assert act is not None
                tables["bops"], self._joint_tables["bops"] = joint_bops(
                    self.links, len(self.choices), self.bits, self.act_bits, act.bits)
            if self.mixed.latency_budget is not None or self.mixed.minimize == "latency":
                if self.act_units:
                    joint = self._joint_latency()
                    tables["latency"], self._joint_tables["latency"] = joint.unary, joint.joint
                else:
                    tables["latency"] = self._latency().seconds
            self._cost_tables = tables
        return self._cost_tables

    def _joint_latency(self) -> Any:
        act = self.options.act_spec()
        settings = LatencySettings(act_bits=act.bits if act else None,
                                   symmetric=self.options.symmetric_activations,
                                   base=self.base_spec, target_opset=self.quantizer.opset)
        with timed(self.timings, "latency_table"):
            return joint_latency_table(self.quantizer.model, self.links, len(self.choices),
                                       self.bits, self.act_bits, settings=settings,
                                       cache_dir=self.mixed.cache_dir,
                                       use_cache=self.mixed.use_cache)

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
            widest_acts = [len(self.act_bits) - 1] * len(self.act_units)
            model = self._build_columns(widest, bias_correction=False,
                                        act_columns=widest_acts).model
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
        probe = self._problem(np.zeros((len(self.choices), len(self.bits))), {},
                              np.zeros((len(self.act_units), len(self.act_bits))))
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
                    f"is {unit.format(low)}"
                    f"{' (pins included)' if self.pins or self.act_pins else ''}")

    # ------------------------------------------------------------------ allocation
    def allocate(self, problem: AllocationProblem) -> Allocation:
        with timed(self.timings, "allocate"):
            return solve(problem, self.budget())

    def allocate_guarded(self) -> tuple[AllocationProblem, Allocation]:
        """The ILP under the chosen loss model, guarded by the Hessian-only one: when the two
        allocations differ, both are measured on the held-out samples and the lower ΔL is
        kept. Why: the corrections are fitted at widths ≤ 4 on the analysis samples and can
        extrapolate badly when most layers are forced to 2 bits (MobileNet at 2.5 average
        bits: held-out ΔL 0.335 corrected vs 0.272 Hessian-only, top-1 82.5 vs 87.2 %); one
        more ILP solve and two held-out passes make the default never worse than HAWQ-V2/V3 on
        held-out loss. The kept allocation's reported held-out ΔL is thus a selected value."""
        chosen = self.chosen_model()
        problem = self.problem(chosen)
        allocation = self.allocate(problem)
        self.kept_model, self.selection = chosen, None
        hessian = (self.corrections or self.correct()).models["hessian"]
        if chosen.name == hessian.name:
            return problem, allocation
        guard_problem = self.problem(hessian)
        guard = self.allocate(guard_problem)
        if (self._columns(guard), self._act_columns(guard)) == (
                self._columns(allocation), self._act_columns(allocation)):
            self.selection = {"kept": chosen.name, "same_allocation": True}
            return problem, allocation
        with timed(self.timings, "guard"):
            mine, theirs = self.measured_delta(allocation), self.measured_delta(guard)
        keep_guard = theirs < mine
        self.selection = {"kept": hessian.name if keep_guard else chosen.name,
                          "same_allocation": False,
                          "held_out_dl": {chosen.name: rounded(mine),
                                          hessian.name: rounded(theirs)}}
        if keep_guard:
            self.kept_model = hessian
            self.notes.append(f"the Hessian-only allocation had the lower held-out loss increase "
                              f"({theirs:.4g} vs {mine:.4g} with {chosen.name} corrections) "
                              "and was kept")
            return guard_problem, guard
        return problem, allocation

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
    def plan_for(self, columns: Sequence[int], act_columns: Sequence[int] = ()) -> QuantPlan:
        plan = self.plan0
        for choice, k in zip(self.choices, columns, strict=True):
            spec = weight_spec_at(self.base_spec, self.bits[k], self.quantizer.opset)
            for name in choice.names:
                plan = plan.with_weight(name, spec)
        if act_columns:
            symmetric = self.options.symmetric_activations
            acts = dict(plan.activations)
            for unit, m in zip(self.act_units, act_columns, strict=True):
                if unit.name in acts:
                    acts[unit.name] = ActSpec(self.act_bits[m], symmetric)
            plan = replace(plan, weights=dict(plan.weights), activations=acts)
        return plan

    def params_for(self, act_columns: Sequence[int]) -> dict[str, ActQParams]:
        """Activation parameters of a configuration: the allocated quantizers at their
        widths, the others at the base width."""
        params = dict(self.act_params)
        for unit, m in zip(self.act_units, act_columns, strict=True):
            chosen = self.act_params_at[self.act_bits[m]].get(unit.name)
            if chosen is not None and unit.name in params:
                params[unit.name] = chosen
        return params

    def _build_columns(self, columns: Sequence[int], bias_correction: bool | None = None,
                       act_columns: Sequence[int] = ()) -> BuildResult:
        correct = self.options.bias_correction if bias_correction is None else bias_correction
        key = (*columns, int(correct), *act_columns)
        if key not in self._builds:
            with timed(self.timings, "build"):
                self._builds[key] = self.quantizer.build(
                    self.plan_for(columns, act_columns), params=self.params_for(act_columns),
                    bias_correction=correct,
                    correction_samples=min(256, self.options.max_calib_samples or 256))
        return self._builds[key]

    def build(self, allocation: Allocation) -> BuildResult:
        return self._build_columns(self._columns(allocation),
                                   act_columns=self._act_columns(allocation))

    def _columns(self, allocation: Allocation) -> list[int]:
        return allocation.columns or [self.bits.index(b) for b in allocation.bits]

    def _act_columns(self, allocation: Allocation) -> list[int]:
        return allocation.act_columns or [self.act_bits.index(b) for b in allocation.act_bits]

    def measured_delta(self, allocation: Allocation) -> float:
        """Held-out ΔL of an allocation (mirror forward pass, exact quantized weights, the
        allocated activation quantizers fake-quantized)."""
        _, holdout, perturbations = self.meters()
        columns = self._columns(allocation)
        hooks = self.allocation_hooks(self._act_columns(allocation))
        return perturbations.delta(holdout, dict(enumerate(columns)), hooks or None)

    def note_implausible_prediction(self, allocation: Allocation) -> None:
        """Say so when the loss model predicts a loss *decrease* for the allocation it chose.

        Why: a KL or MSE objective cannot fall below the float model's, so a negative
        prediction means the pairwise terms over-compensate (on deep models, measured
        neighbour interactions next to rescaled couplings of far-apart layers can sum to more
        than the singles) and the ILP steered into that region. The held-out measurement is
        then the number to trust."""
        model = self.kept_model or self.chosen_model()
        predicted = model.predict(self._columns(allocation))
        if predicted < 0:
            self._note_once(
                f"the {model.name} loss model predicts a loss decrease ({predicted:.3g}) for "
                f"the chosen allocation: its pair terms over-compensate on this model; the "
                f"held-out measurement (totals.measured_dl, "
                f"{self.measured_delta(allocation):.3g}) is the one to trust")

    def act_deltas(self, allocation: Allocation) -> list[float]:
        """Held-out ΔL of each activation quantizer alone at its allocated width."""
        _, holdout, _ = self.meters()
        return [holdout.delta({}, None, self.act_hooks(j, m))
                for j, m in enumerate(self._act_columns(allocation))]

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
        self.batches = dataset.batched(batch_size)  # re-read per evaluation
        #: the score threshold when the first output is one score per sample (as validate)
        self.threshold: float | None = None
        self.reference = self._reference(make_session(float_model))
        self.fmt = fmt
        self.evaluations = 0

    def _reference(self, session: Any) -> np.ndarray:
        """The float model's classes, setting :attr:`threshold` for single-score outputs.
        Only single scores are kept whole until the threshold is known (one number per
        sample); other outputs become classes batch by batch."""
        kept: list[np.ndarray] = []
        single: bool | None = None
        for batch in self.batches:
            first = session.run(None, dict(batch))[0]
            if single is None:
                single = predictions.single_score(first)
            kept.append(predictions.scores(first) if single else self._classes(first))
        if single:
            self.threshold = predictions.threshold_for(kept)
            kept = [self._classes(k) for k in kept]
        return np.concatenate(kept)

    def _classes(self, output: np.ndarray) -> np.ndarray:
        return predictions.classes(output, self.threshold).reshape(-1)

    def _predict(self, session: Any, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        return self._classes(session.run(None, dict(feeds))[0])

    def top1(self, predicted: np.ndarray) -> float | None:
        if self.labels is None:
            return None
        return float(np.mean(predicted == self.labels.reshape(predicted.shape)))

    def __call__(self, model: onnx.ModelProto) -> dict[str, Any]:
        from hawq_onnx.calibration.session import make_session
        from hawq_onnx.export import finalize

        session = make_session(finalize(model, self.fmt))
        predicted = np.concatenate([self._predict(session, b) for b in self.batches])
        self.evaluations += 1
        agreement = float(np.mean(predicted == self.reference))
        top_f, top_q = self.top1(self.reference), self.top1(predicted)
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
    session.act_omega()
    say(f"corrections ({mixed.interactions})")
    session.correct()
    if mixed.eval_configs > 0:
        say(f"Spearman evaluation on {mixed.eval_configs} configurations")
        session.evaluate()
    problem = session.problem()
    target: TargetResult | None = None
    drops: dict[Any, dict[str, Any]] = {}
    if mixed.max_drop is not None:
        assert eval_path is not None
        say("accuracy-target search")
        frontier = session.frontier(problem, mixed.minimize, bounded=True)
        target = _search(session, frontier, eval_path, labels_key, drops)
        allocation = target.allocation
    else:
        say("ILP")
        problem, allocation = session.allocate_guarded()
        frontier = session.frontier(problem)
    session.note_implausible_prediction(allocation)
    built = session.build(allocation)
    with timed(session.timings, "export"):
        exported = export_model(built.model, output_path, fmt=options.format,
                                source=model_path)
    report = build_report(Path(model_path).stat().st_size, session.quantizer,
                          session.plan_for(session._columns(allocation),
                                           session._act_columns(allocation)), built, exported,
                          options)
    if eval_path is not None and output_path is not None:
        from hawq_onnx.validate import evaluate

        with timed(session.timings, "validate"):
            report["metrics"] = evaluate(model_path, output_path, eval_path,
                                         labels_key=labels_key).to_dict()
    report["mixed"] = mixed_report(session, problem, allocation, frontier, target, drops)
    annotate_layers(report, session, allocation)
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
            drops: dict[Any, dict[str, Any]]) -> TargetResult:
    meter = DropMeter(session.quantizer.float_model, eval_path, labels_key=labels_key,
                      max_samples=session.mixed.eval_max_samples, fmt=session.options.format)

    def measure(allocation: Allocation) -> float:
        key = allocation.key
        if key not in drops:
            drops[key] = meter(session.build(allocation).model)
        return float(drops[key]["drop"])

    with timed(session.timings, "target_search"):
        return accuracy_target(frontier, measure, float(session.mixed.max_drop or 0.0),
                               recheck=session.mixed.recheck)


__all__ = ["DropMeter", "INTERACTION_MODES", "MINIMIZE_METRICS", "MixedOptions", "MixedResult",
           "MixedSession", "quantize_mixed", "split_calibration"]
