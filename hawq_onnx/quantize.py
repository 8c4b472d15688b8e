"""The ``quantize(...)`` API: float ONNX model + calibration data -> integer-deployable model.

Two levels:

* :class:`Quantizer` holds one float model, its Q/DQ placement and (once calibrated) the
  activation statistics. :meth:`Quantizer.build` turns any :class:`QuantPlan` into a
  quantized model without touching the data again, which is what mixed-precision search
  needs (many plans, one calibration).
* :func:`quantize` is the one-call path the CLI uses: load, plan uniformly, calibrate,
  build, export (atomically), report, and optionally evaluate.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import version_converter

from hawq_onnx.calibration import CalibrationStats, collect_statistics, select_range
from hawq_onnx.calibration.bias_correction import correct_biases
from hawq_onnx.calibration.input_gram import InputGrams, collect_input_grams
from hawq_onnx.calibration.session import make_session, session_options
from hawq_onnx.data import Dataset, load_npz
from hawq_onnx.errors import HawqError, InvalidModelError
from hawq_onnx.graph import GraphView, describe_nested, nested_reason
from hawq_onnx.importer import infer_shapes, load_model
from hawq_onnx.passes.base import PassReport
from hawq_onnx.passes.insert_qdq import InsertQDQ, QDQRecord
from hawq_onnx.passes.qdq_placement import Placement, analyze_placement
from hawq_onnx.passes.upgrade_opset import default_opset
from hawq_onnx.quant.activations import ActQParams, act_qparams
from hawq_onnx.quant.containers import container_bits, int2_fuses_safely, required_opset
from hawq_onnx.quant.plan import (
    DEFAULT_CALIB_METHOD,
    ActSpec,
    CalibMethod,
    QuantPlan,
    WeightSpec,
    uniform_plan,
)
from hawq_onnx.quant.saturation import useful_range
from hawq_onnx.quant.weights import QuantizedWeight

#: the highest opset this project writes (int2/uint2 Q/DQ).
MAX_TARGET_OPSET = 25


def needed_opset(weight_bits: Iterable[int], act_bits: Iterable[int] = (),
                 grouped: bool = False) -> int:
    """The lowest default-domain opset that can hold these widths natively."""
    needed = 13
    for bits in weight_bits:
        needed = max(needed, required_opset(container_bits(bits)))
    for bits in act_bits:
        needed = max(needed, 21 if bits > 8 else 13)
    return max(needed, 21) if grouped else needed


def upgrade_to(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """``model`` converted to ``opset`` (unchanged when already there); the converted model
    must load in onnxruntime, else :class:`InvalidModelError`."""
    current = default_opset(model) or 13
    if current >= opset:
        return model
    try:
        converted = version_converter.convert_version(model, opset)
        converted = infer_shapes(converted)
        make_session(converted, session_options(level="disable"))
    except Exception as exc:  # the converter and onnxruntime raise many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidModelError(f"cannot upgrade the model from opset {current} to {opset}: "
                                f"{first}") from exc
    return converted


@dataclass
class BuildResult:
    """A quantized model plus what was done to it."""

    model: onnx.ModelProto
    record: QDQRecord
    reports: list[PassReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Quantizer:
    """One float model prepared for quantization (placement computed once)."""

    def __init__(self, model: onnx.ModelProto, *, exclude: Sequence[str] = (),
                 asymmetric: bool = True, target_opset: int | None = None) -> None:
        self.notes: list[str] = []
        self.float_model = model
        self.model = self._upgrade(model, target_opset)
        self.opset = default_opset(self.model) or 13
        self.view = GraphView(self.model)
        self.placement: Placement = analyze_placement(self.model, exclude=exclude,
                                                      asymmetric=asymmetric, view=self.view)
        nested = self.view.nested_layers()
        if nested:
            self.notes.append(f"{describe_nested(nested)} stay float: only the main graph "
                              "is quantized")
        self.stats: CalibrationStats | None = None
        self.dataset: Dataset | None = None
        self.batch_size = 32
        #: calibration samples behind the input moments of error-feedback rounding, and the
        #: data they come from (None: the calibration data's first samples).
        self.moment_samples = 256
        self.moment_data: Dataset | None = None
        self._moments: InputGrams | None = None
        self._refined: dict[tuple[str, WeightSpec, bytes], QuantizedWeight | None] = {}

    def _upgrade(self, model: onnx.ModelProto, target: int | None) -> onnx.ModelProto:
        if target is None or (default_opset(model) or 13) >= target:
            return model
        try:
            return upgrade_to(model, target)
        except InvalidModelError as exc:
            self.notes.append(f"{exc}; narrower types are stored in larger containers")
            return model

    # ------------------------------------------------------------------ plans
    def uniform_plan(self, weight: WeightSpec | None, act: ActSpec | None,
                     calib_method: CalibMethod = DEFAULT_CALIB_METHOD) -> QuantPlan:
        """Every placed weight at ``weight`` (none if None), every activation at ``act``."""
        weights = self.placement.weights() if weight is not None else []
        plan = uniform_plan(weights, self.placement.own, weight_spec=weight or WeightSpec(),
                            act_spec=act, calib_method=calib_method)
        return self._fit_opset(plan)

    def _fit_opset(self, plan: QuantPlan) -> QuantPlan:
        """Blocks need opset 21: fall back to per-channel below it (with a note)."""
        if self.opset >= 21:
            return plan
        grouped = [k for k, v in plan.weights.items() if v.granularity == "group"]
        if grouped:
            weights = dict(plan.weights)
            for name in grouped:
                spec = weights[name]
                weights[name] = WeightSpec(spec.bits, "per_channel", None, spec.method)
            plan = replace(plan, weights=weights)
            note = (f"opset {self.opset} has no blocked DequantizeLinear: {len(grouped)} "
                    "weight(s) per-channel instead")
            if note not in self.notes:
                self.notes.append(note)
        if any(a.bits > 8 for a in plan.activations.values()):
            raise HawqError(f"16-bit activations need opset 21; the model is at opset "
                            f"{self.opset} and could not be upgraded")
        return plan

    # ------------------------------------------------------------------ calibration
    def calibrate(self, dataset: Dataset, *, batch_size: int = 32,
                  max_samples: int | None = None, bins: int | None = None
                  ) -> CalibrationStats:
        """Stream the calibration data once; histograms for every tensor that owns
        quantization parameters."""
        max_batches = None
        if max_samples is not None:
            size = dataset.fixed_batch or batch_size
            max_batches = max(1, -(-max_samples // size))
        kwargs: dict[str, Any] = {} if bins is None else {"bins": bins}
        self.stats = collect_statistics(self.model, self.placement.own, dataset,
                                        batch_size=batch_size, max_batches=max_batches,
                                        **kwargs)
        self.dataset, self.batch_size = dataset, batch_size
        return self.stats

    def activation_params(self, plan: QuantPlan) -> dict[str, ActQParams]:
        """Scale and zero point per planned activation from the calibrated histograms."""
        if plan.activations and self.stats is None:
            raise HawqError("activations are planned but the quantizer was not calibrated")
        params: dict[str, ActQParams] = {}
        for tensor, spec in plan.activations.items():
            hist = self.stats.histograms.get(tensor) if self.stats is not None else None
            if hist is None or hist.count == 0:
                continue
            low, high = select_range(hist, plan.calib_method, spec, plan.percentile)
            floor, ceiling = useful_range(self.view, tensor)
            if floor < high and ceiling > low:  # readers are flat outside [floor, ceiling]
                low, high = max(low, floor), min(high, ceiling)
            params[tensor] = act_qparams(low, high, spec)
        return params

    # ------------------------------------------------------------------ weights
    def input_grams(self, plan: QuantPlan) -> dict[str, np.ndarray]:
        """Each layer's input second moments, collected once, if ``plan`` asks for
        error-feedback rounding anywhere (else nothing: plain rounding needs no data)."""
        if not any(spec.error_feedback for spec in plan.weights.values()):
            return {}
        if self.dataset is None:
            if any(spec.method == "gptq" for spec in plan.weights.values()):
                raise HawqError("GPTQ rounding needs calibration data (--calib)")
            note = ("no calibration data: weights at <= 4 bits are rounded to nearest "
                    "(GPTQ rounding needs --calib)")
            if note not in self.notes:
                self.notes.append(note)
            return {}
        if self._moments is None:
            self._moments = collect_input_grams(self.model, self.placement.layers,
                                                self.moment_data or self.dataset,
                                                batch_size=self.batch_size,
                                                max_samples=self.moment_samples)
            if self._moments.skipped:
                reasons = sorted(set(self._moments.skipped.values()))
                self.notes.append(f"GPTQ rounding: {len(self._moments.skipped)} weight(s) "
                                  f"rounded to nearest instead ({'; '.join(reasons)})")
        return self._moments.grams

    def quantized_weight(self, name: str, spec: WeightSpec,
                         params: Mapping[str, ActQParams] | None = None) -> QuantizedWeight:
        """Weight ``name`` exactly as :meth:`build` would store it at ``spec`` (same layout,
        scales and rounding): ``.dequantize()`` is ``Q_b(W)`` for sensitivity tables.
        ``params`` (activation parameters) only matter where an int32 bias would overflow."""
        layers = [layer for layer in self.placement.layers if layer.weight == name]
        if not layers:
            raise KeyError(f"'{name}' is not the weight of a quantizable layer")
        tensor = self.view.initializers[name]
        array = onnx.numpy_helper.to_array(tensor).astype(np.float32)
        plan = QuantPlan({name: spec}, {})
        inserter = InsertQDQ(self.placement, plan, params or {}, max_opset=self.opset,
                             input_grams=self.input_grams(plan), refined=self._refined)
        return inserter.quantize_array(self.view, layers, array, spec, params or {})

    # ------------------------------------------------------------------ build
    def build(self, plan: QuantPlan, *, params: Mapping[str, ActQParams] | None = None,
              bias_correction: bool = False, correction_samples: int = 256) -> BuildResult:
        """The QDQ model for ``plan`` (float model untouched).

        ``bias_correction`` (needs :meth:`calibrate` first) removes the mean per-channel
        output shift of every quantized Conv/Gemm, measured on the calibration data.
        """
        plan = self._fit_opset(plan)
        params = self.activation_params(plan) if params is None else params
        inserter = InsertQDQ(self.placement, plan, params, max_opset=self.opset,
                             input_grams=self.input_grams(plan), refined=self._refined)
        source, notes = self.model, list(self.notes)
        if bias_correction and self.dataset is not None and plan.weights:
            layers = [layer for layer in self.placement.layers if layer.weight in plan.weights]
            source, shifts = correct_biases(
                self.model, layers, lambda m: inserter(m)[0], self.dataset,
                batch_size=self.batch_size, max_samples=correction_samples)
            if shifts:
                notes.append(f"bias correction: {len(shifts)} layer(s), largest shift "
                             f"{max(shifts.values()):.3g}")
        model, report = inserter(source)
        if inserter.record.opset_needed > self.opset:
            raise HawqError(f"the plan needs opset {inserter.record.opset_needed}, the model "
                            f"is at {self.opset}")
        return BuildResult(model, inserter.record, [report], notes)


# ---------------------------------------------------------------------- one-call API


@dataclass
class QuantizeOptions:
    """Everything the ``quantize`` command accepts besides paths."""

    weight_bits: int = 8
    act_bits: int | None = 8
    symmetric_activations: bool = False
    calib_method: CalibMethod = DEFAULT_CALIB_METHOD
    percentile: float = 99.999
    per_tensor: bool = False
    group_size: int | None = None
    rounding: str | None = None
    exclude: Sequence[str] = ()
    format: str = "qdq"
    batch_size: int = 32
    max_calib_samples: int | None = None
    bias_correction: bool = True

    def weight_spec(self) -> WeightSpec:
        granularity = "group" if self.group_size else (
            "per_tensor" if self.per_tensor else "per_channel")
        return WeightSpec(self.weight_bits, granularity, self.group_size,  # type: ignore[arg-type]
                          self.rounding)  # type: ignore[arg-type]

    def act_spec(self) -> ActSpec | None:
        if self.act_bits is None:
            return None
        return ActSpec(self.act_bits, self.symmetric_activations)


@dataclass
class QuantizeResult:
    model: onnx.ModelProto
    report: dict[str, Any]
    path: Path | None = None


def quantize(model_path: str | os.PathLike[str], output_path: str | os.PathLike[str] | None,
             calib_path: str | os.PathLike[str] | None, options: QuantizeOptions | None = None,
             *, eval_path: str | os.PathLike[str] | None = None, labels_key: str = "labels",
             ) -> QuantizeResult:
    """Quantize the model at ``model_path`` uniformly; write ``output_path`` atomically.

    ``calib_path`` may be None only for weight-only quantization (``act_bits=None``).
    The report dict is what ``--report`` writes (see :func:`hawq_onnx.export.build_report`).
    """
    from hawq_onnx.export import build_report, export_model

    options = options or QuantizeOptions()
    timings: dict[str, float] = {}
    start = time.perf_counter()
    imported = load_model(model_path)
    act_spec = options.act_spec()
    if act_spec is not None and calib_path is None:
        raise HawqError("--calib is required unless activations stay float (--act-bits none)")
    storage_bits = options.weight_bits
    if storage_bits == 2 and act_spec is not None and not int2_fuses_safely():
        storage_bits = 4  # int2 would be stored as int4 anyway (see InsertQDQ._container)
    target = needed_opset([storage_bits], [act_spec.bits] if act_spec else [],
                          grouped=bool(options.group_size))
    quantizer = Quantizer(imported.model, exclude=options.exclude,
                          asymmetric=not options.symmetric_activations, target_opset=target)
    plan = quantizer.uniform_plan(options.weight_spec(), act_spec, options.calib_method)
    plan.percentile = options.percentile
    if not plan.weights and not plan.activations:  # the output would be the input, relabelled
        raise HawqError("nothing to quantize: the model has no quantizable weights or "
                        "activations" + nested_reason(quantizer.view))
    timings["load_s"] = time.perf_counter() - start
    if calib_path is not None:
        step = time.perf_counter()
        dataset = load_npz(calib_path, quantizer.model)
        if act_spec is not None:
            quantizer.calibrate(dataset, batch_size=options.batch_size,
                                max_samples=options.max_calib_samples)
        else:  # weight-only: the data still serves bias correction
            quantizer.dataset, quantizer.batch_size = dataset, options.batch_size
        timings["calibrate_s"] = time.perf_counter() - step
    step = time.perf_counter()
    if options.max_calib_samples is not None:
        quantizer.moment_samples = min(quantizer.moment_samples, options.max_calib_samples)
    built = quantizer.build(plan, bias_correction=options.bias_correction,
                            correction_samples=min(256, options.max_calib_samples or 256))
    timings["quantize_s"] = time.perf_counter() - step
    step = time.perf_counter()
    exported = export_model(built.model, output_path, fmt=options.format,
                            source=model_path)
    timings["export_s"] = time.perf_counter() - step
    report = build_report(Path(model_path).stat().st_size, quantizer, plan, built, exported,
                          options)
    if eval_path is not None and output_path is not None:
        from hawq_onnx.validate import evaluate

        step = time.perf_counter()
        report["metrics"] = evaluate(model_path, output_path, eval_path,
                                     labels_key=labels_key).to_dict()
        timings["evaluate_s"] = time.perf_counter() - step
    timings["total_s"] = time.perf_counter() - start
    report["timings"] = {k: round(v, 3) for k, v in timings.items()}
    return QuantizeResult(exported.model, report, exported.path)


__all__ = ["BuildResult", "MAX_TARGET_OPSET", "QuantizeOptions", "QuantizeResult", "Quantizer",
           "needed_opset", "quantize", "upgrade_to"]
