"""The quantization plan: which width and granularity each weight and activation gets.

Why a plan object: uniform precision (this CLI's ``--weight-bits 8 --act-bits 8``) and mixed
precision (an allocator choosing widths per layer) differ only in how the plan is filled.
Everything downstream (calibration, QDQ insertion, export, reports) reads the plan, never the
command-line flags, so both paths share one quantizer.

Keys: weights by their initializer name, activations by tensor name. A weight or activation
missing from the plan stays float.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

Granularity = Literal["per_channel", "per_tensor", "group"]
RoundMethod = Literal["rtn", "mse", "gptq"]
ScaleSearch = Literal["rtn", "mse"]
CalibMethod = Literal["minmax", "percentile", "entropy", "mse"]

WEIGHT_BITS = (2, 3, 4, 5, 6, 7, 8, 16)
ACT_BITS = (8, 16)
CALIB_METHODS: tuple[CalibMethod, ...] = ("minmax", "percentile", "entropy", "mse")
#: MSE-optimal ranges: never worse per tensor than min/max, and on the zoo models the most
#: accurate end to end (min/max wastes levels on rare extremes of depthwise/HardSwish nets).
DEFAULT_CALIB_METHOD: CalibMethod = "mse"
#: at or below this width the MSE-optimal scale search and GPTQ rounding are the default
#: (round-to-nearest of the max above: at 5+ bits neither changes the result measurably).
MSE_SEARCH_MAX_BITS = 4


@dataclass(frozen=True)
class WeightSpec:
    """How one weight tensor is quantized (always symmetric, zero point 0).

    ``group_size`` applies to ``granularity == "group"`` only: blocks of that many elements
    along the reduction axis share one scale (MatMul/Gemm); other ops fall back to
    per-channel. ``method`` None means "MSE-searched scales and GPTQ error-feedback rounding
    at <= 4 bits (nearest rounding where no calibration data is given), round-to-nearest of
    the max above"; ``gptq`` asks for error feedback at any width and insists on data (see
    ``quant/gptq.py``).
    """

    bits: int = 8
    granularity: Granularity = "per_channel"
    group_size: int | None = None
    method: RoundMethod | None = None

    def __post_init__(self) -> None:
        if self.bits not in WEIGHT_BITS:
            raise ValueError(f"weight bits must be one of {WEIGHT_BITS}, got {self.bits}")
        if self.granularity not in ("per_channel", "per_tensor", "group"):
            raise ValueError(f"unknown weight granularity '{self.granularity}'")
        if self.granularity == "group" and (self.group_size is None or self.group_size < 2):
            raise ValueError("group-wise quantization needs a group size >= 2")
        if self.method not in (None, "rtn", "mse", "gptq"):
            raise ValueError(f"unknown rounding method '{self.method}'")

    @property
    def rounding(self) -> RoundMethod:
        if self.method is not None:
            return self.method
        return "gptq" if self.bits <= MSE_SEARCH_MAX_BITS else "rtn"

    @property
    def scale_search(self) -> ScaleSearch:
        """How the scale is chosen: ``mse`` search or the max (``rtn``)."""
        if self.method in ("rtn", "mse"):
            return self.method
        return "mse" if self.bits <= MSE_SEARCH_MAX_BITS else "rtn"

    @property
    def error_feedback(self) -> bool:
        """Round with GPTQ error feedback (where the layer's input moments are known)."""
        return self.rounding == "gptq"


@dataclass(frozen=True)
class ActSpec:
    """Per-tensor activation quantization: asymmetric unsigned (default) or symmetric."""

    bits: int = 8
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.bits not in ACT_BITS:
            raise ValueError(f"activation bits must be one of {ACT_BITS}, got {self.bits}")


@dataclass
class QuantPlan:
    """Per-weight and per-activation specs plus the range method for activations.

    ``activations`` maps a tensor name to its spec; tensors whose quantization parameters are
    inherited from another tensor (outputs of MaxPool/Reshape/... that share their input's
    scale so onnxruntime can run them on integers) need no entry: they follow their source.
    """

    weights: dict[str, WeightSpec] = field(default_factory=dict)
    activations: dict[str, ActSpec] = field(default_factory=dict)
    calib_method: CalibMethod = DEFAULT_CALIB_METHOD
    percentile: float = 99.999

    def weight_bits(self, name: str) -> int | None:
        spec = self.weights.get(name)
        return spec.bits if spec is not None else None

    def act_bits(self, name: str) -> int | None:
        spec = self.activations.get(name)
        return spec.bits if spec is not None else None

    def with_weight(self, name: str, spec: WeightSpec) -> QuantPlan:
        """A copy with one weight's spec replaced (what an allocator does per layer)."""
        return replace(self, weights={**self.weights, name: spec},
                       activations=dict(self.activations))

    def to_dict(self) -> dict[str, object]:
        return {
            "calib_method": self.calib_method,
            "weights": {k: _weight_dict(v) for k, v in sorted(self.weights.items())},
            "activations": {k: {"bits": v.bits, "symmetric": v.symmetric}
                            for k, v in sorted(self.activations.items())},
        }


def _weight_dict(spec: WeightSpec) -> dict[str, object]:
    out: dict[str, object] = {"bits": spec.bits, "granularity": spec.granularity,
                              "rounding": spec.rounding}
    if spec.group_size is not None:
        out["group_size"] = spec.group_size
    return out


def uniform_plan(weights: Iterable[str], activations: Iterable[str], *,
                 weight_spec: WeightSpec, act_spec: ActSpec | None,
                 calib_method: CalibMethod = DEFAULT_CALIB_METHOD,
                 overrides: Mapping[str, WeightSpec] | None = None) -> QuantPlan:
    """Every listed weight gets ``weight_spec`` (unless overridden), every listed activation
    ``act_spec`` (none at all for weight-only quantization)."""
    plan_weights = {name: weight_spec for name in weights}
    plan_weights.update(overrides or {})
    plan_acts = {name: act_spec for name in activations} if act_spec is not None else {}
    return QuantPlan(plan_weights, plan_acts, calib_method)


__all__ = ["ACT_BITS", "CALIB_METHODS", "DEFAULT_CALIB_METHOD", "MSE_SEARCH_MAX_BITS",
           "WEIGHT_BITS", "ActSpec", "CalibMethod", "Granularity", "QuantPlan", "RoundMethod",
           "ScaleSearch", "WeightSpec", "uniform_plan"]
