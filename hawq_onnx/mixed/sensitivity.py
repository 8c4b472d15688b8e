"""Sensitivity tables: the predicted loss increase of each layer at each candidate width.

HAWQ-V2: ``Ω_i(b) = Tr(H_i)/n_i · ‖Q_b(W_i) − W_i‖²``. Two choices make the numbers mean
what the exported model does:

* ``Q_b`` is :meth:`hawq_onnx.quantize.Quantizer.quantized_weight`, the exporter's own
  quantizer: same layout (per channel / per tensor / blocks, and the same opset fallback),
  same scale search and rounding, same int32-bias scale floor. A table built with a coarser
  stand-in (max-scaled round-to-nearest) would misprice exactly the low widths where the
  allocator's decisions matter.
* ``Tr(H_i)`` comes from :func:`hawq_onnx.analysis.analyze` (Hutchinson, with its standard
  error). :meth:`SensitivityTable.omega_at` re-prices with traces at mean ± k·SE, so callers
  can flag layers whose width flips within the estimate's uncertainty.

Activations (when activation widths are candidates, e.g. 8 vs 16): the analysis gives the
mean per-sample trace of the Hessian w.r.t. each layer-input tensor; the error term is the
expected per-sample ``‖Q_b(a) − a‖²`` measured on calibration data with the quantization
parameters the exporter would use at that width (the calibrated range of the tensor whose
Q/DQ parameters this tensor uses). Rows are keyed by that parameter-owning tensor, the unit
an activation width is chosen for.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from hawq_onnx.calibration.session import make_session
from hawq_onnx.data import Dataset
from hawq_onnx.errors import HawqError
from hawq_onnx.hessian.result import AnalysisResult
from hawq_onnx.mixed.problem import LayerChoice
from hawq_onnx.model_io import copy_model
from hawq_onnx.quant.activations import ActQParams
from hawq_onnx.quant.plan import DEFAULT_CALIB_METHOD, ActSpec, CalibMethod, QuantPlan, WeightSpec
from hawq_onnx.quantize import Quantizer


@dataclass
class SensitivityTable:
    """Ω per row and candidate width, with the pieces it is made of.

    ``names``: weight initializers (kind "weight") or layer-input tensors (kind
    "activation"); ``keys``: the unit each row belongs to (the weight itself, or the tensor
    that owns the activation's Q/DQ parameters). ``numel``: weight elements, or activation
    elements per sample. ``sq_error[r, k]``: ‖Q_b − x‖² (per sample for activations).
    """

    kind: str
    names: list[str]
    keys: list[str]
    candidate_bits: list[int]
    trace: np.ndarray
    trace_se: np.ndarray
    numel: np.ndarray
    sq_error: np.ndarray
    notes: list[str] = field(default_factory=list)

    @property
    def omega(self) -> np.ndarray:
        """[rows, B] predicted loss increase."""
        return self.omega_at(0.0)

    def omega_at(self, k_se: float) -> np.ndarray:
        """Ω with every trace moved by ``k_se`` standard errors (clipped at zero)."""
        se = np.nan_to_num(self.trace_se, nan=0.0, posinf=0.0)
        trace = np.maximum(self.trace + k_se * se, 0.0)
        return (trace / np.maximum(self.numel, 1))[:, None] * self.sq_error

    def row(self, name: str) -> int:
        return self.names.index(name)

    def for_choices(self, choices: Sequence[LayerChoice], k_se: float = 0.0) -> np.ndarray:
        """[L, B]: Ω summed over the rows each unit covers (its weights, or its activation
        quantizers); units without rows get zeros."""
        omega = self.omega_at(k_se)
        out = np.zeros((len(choices), len(self.candidate_bits)))
        for i, choice in enumerate(choices):
            keys = set(choice.names if self.kind == "weight" else choice.act_names)
            rows = [r for r, key in enumerate(self.keys) if key in keys]
            if rows:
                out[i] = omega[rows].sum(axis=0)
        return out

    def for_keys(self, keys: Sequence[str], k_se: float = 0.0) -> np.ndarray:
        """[len(keys), B]: Ω summed over the rows of each key (an activation unit's
        quantizer); keys without rows get zeros."""
        omega = self.omega_at(k_se)
        out = np.zeros((len(keys), len(self.candidate_bits)))
        for i, key in enumerate(keys):
            rows = [r for r, owner in enumerate(self.keys) if owner == key]
            if rows:
                out[i] = omega[rows].sum(axis=0)
        return out

    def to_dict(self) -> dict[str, object]:
        omega = self.omega
        return {"kind": self.kind, "candidate_bits": list(self.candidate_bits),
                "rows": [{"name": n, "key": k, "trace": float(t), "trace_se": _finite(se),
                          "numel": int(c), "omega": [float(v) for v in omega[r]],
                          "sq_error": [float(v) for v in self.sq_error[r]]}
                         for r, (n, k, t, se, c) in enumerate(zip(
                             self.names, self.keys, self.trace, self.trace_se, self.numel,
                             strict=True))]}


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


# ---------------------------------------------------------------------------- weights
def weight_spec_at(base: WeightSpec, bits: int, opset: int) -> WeightSpec:
    """``base`` at another width, with the exporter's opset fallback (blocks need 21)."""
    granularity, group = base.granularity, base.group_size
    if granularity == "group" and opset < 21:
        granularity, group = "per_channel", None
    return WeightSpec(bits, granularity, group, base.method)


def weight_sq_errors(quantizer: Quantizer, names: Sequence[str], candidate_bits: Sequence[int],
                     base: WeightSpec | None = None,
                     params: Mapping[str, ActQParams] | None = None) -> np.ndarray:
    """[N, B] ``‖Q_b(W) − W‖²`` with the exporter's quantizer (float64 accumulation).

    ``params``: the activation parameters of the plan the model will be built with; they
    only matter where an int32 bias forces a larger weight scale.
    """
    base = base or WeightSpec()
    out = np.zeros((len(names), len(candidate_bits)))
    for r, name in enumerate(names):
        weight = onnx.numpy_helper.to_array(quantizer.view.initializers[name]).astype(np.float64)
        for k, bits in enumerate(candidate_bits):
            spec = weight_spec_at(base, bits, quantizer.opset)
            restored = quantizer.quantized_weight(name, spec, params).dequantize()
            out[r, k] = float(np.square(restored.astype(np.float64) - weight).sum())
    return out


def weight_sensitivity(analysis: AnalysisResult, quantizer: Quantizer,
                       candidate_bits: Sequence[int], *, base: WeightSpec | None = None,
                       params: Mapping[str, ActQParams] | None = None,
                       names: Iterable[str] | None = None) -> SensitivityTable:
    """Ω for every placed weight (or ``names``) from the analysis traces."""
    traced = {layer.name: layer for layer in analysis.layers}
    wanted = list(names) if names is not None else quantizer.placement.weights()
    missing = [n for n in wanted if n not in traced]
    if missing:
        raise HawqError(f"the Hessian analysis has no trace for weight(s) {missing[:5]}: "
                        "was it run on the same model?")
    layers = [traced[n] for n in wanted]
    return SensitivityTable(
        kind="weight", names=list(wanted), keys=list(wanted),
        candidate_bits=list(candidate_bits),
        trace=np.array([layer.trace for layer in layers], dtype=np.float64),
        trace_se=np.array([np.nan if layer.trace_se is None else layer.trace_se
                           for layer in layers], dtype=np.float64),
        numel=np.array([layer.params for layer in layers], dtype=np.float64),
        sq_error=weight_sq_errors(quantizer, wanted, candidate_bits, base, params))


# ------------------------------------------------------------------------ activations
def activation_params_at(quantizer: Quantizer, tensors: Sequence[str], bits: int,
                         symmetric: bool = False,
                         calib_method: CalibMethod = DEFAULT_CALIB_METHOD,
                         percentile: float = 99.999) -> dict[str, ActQParams]:
    """The exporter's parameters for these parameter-owning tensors at one width."""
    plan = QuantPlan({}, {t: ActSpec(bits, symmetric) for t in tensors}, calib_method,
                     percentile)
    return quantizer.activation_params(plan)


def _with_outputs(model: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    out = copy_model(model)
    present = {o.name for o in out.graph.output}
    for name in tensors:
        if name not in present:
            out.graph.output.append(helper.make_tensor_value_info(
                name, onnx.TensorProto.FLOAT, None))
    return out


def activation_sq_errors(quantizer: Quantizer, dataset: Dataset, tensors: Mapping[str, str],
                         candidate_bits: Sequence[int], *, symmetric: bool = False,
                         calib_method: CalibMethod = DEFAULT_CALIB_METHOD,
                         batch_size: int = 32, max_samples: int = 256,
                         percentile: float = 99.999) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample ``E‖Q_b(a) − a‖²`` ([N, B]) and elements per sample ([N]).

    ``tensors`` maps each measured tensor to the tensor owning its Q/DQ parameters.
    """
    names = list(tensors)
    owners = sorted(set(tensors.values()))
    params = {b: activation_params_at(quantizer, owners, b, symmetric, calib_method,
                                      percentile)
              for b in candidate_bits}
    session = make_session(_with_outputs(quantizer.model, names))
    totals = np.zeros((len(names), len(candidate_bits)))
    numel = np.zeros(len(names))
    seen = 0
    for batch in dataset.head(max_samples).batches(batch_size):
        values = dict(zip(names, session.run(names, batch), strict=True))
        count = next((len(v) for v in batch.values() if np.ndim(v) > 0), 1)
        for r, name in enumerate(names):
            value = np.asarray(values[name], dtype=np.float32)
            numel[r] = value.size / max(count, 1)
            for k, bits in enumerate(candidate_bits):
                qp = params[bits].get(tensors[name])
                if qp is not None:
                    diff = qp.fake_quantize(value).astype(np.float64) - value
                    totals[r, k] += float(np.square(diff).sum())
        seen += count
    return totals / max(seen, 1), numel


def activation_sensitivity(analysis: AnalysisResult, quantizer: Quantizer, dataset: Dataset,
                           candidate_bits: Sequence[int] = (8, 16), *,
                           symmetric: bool = False,
                           calib_method: CalibMethod = DEFAULT_CALIB_METHOD,
                           batch_size: int = 32, max_samples: int = 256,
                           percentile: float = 99.999) -> SensitivityTable:
    """Ω for every analysed layer-input activation that the placement quantizes.

    Needs ``analysis`` run with ``activations=True`` and a calibrated ``quantizer``.
    """
    if not analysis.activations:
        raise HawqError("activation sensitivity needs the analysis run with activations=True")
    if quantizer.stats is None:
        raise HawqError("activation sensitivity needs a calibrated quantizer")
    owners: dict[str, str] = {}
    notes = []
    for act in analysis.activations:
        owner = quantizer.placement.source(act.tensor)
        if owner is None:
            notes.append(f"{act.tensor}: not quantized by the placement, no row")
            continue
        owners[act.tensor] = owner
    rows = [a for a in analysis.activations if a.tensor in owners]
    errors, numel = activation_sq_errors(quantizer, dataset, owners, candidate_bits,
                                         symmetric=symmetric, calib_method=calib_method,
                                         batch_size=batch_size, max_samples=max_samples,
                                         percentile=percentile)
    return SensitivityTable(
        kind="activation", names=[a.tensor for a in rows],
        keys=[owners[a.tensor] for a in rows], candidate_bits=list(candidate_bits),
        trace=np.array([a.trace for a in rows], dtype=np.float64),
        trace_se=np.array([np.nan if a.trace_se is None else a.trace_se for a in rows]),
        numel=numel, sq_error=errors, notes=notes)


__all__ = ["SensitivityTable", "activation_params_at", "activation_sensitivity",
           "activation_sq_errors", "weight_sensitivity", "weight_spec_at", "weight_sq_errors"]
