"""Typed analysis results and their JSON form.

Why typed: later stages (bit allocation, reports, the cache) read the same numbers; a
dataclass per concept keeps field names in one place, and ``to_dict``/``from_dict`` round-
trip exactly so a cached result is indistinguishable from a fresh one. JSON has no infinity
or NaN, so non-finite numbers (an SE from a single probe) are written as ``null``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1


@dataclass
class DensityResult:
    """SLQ spectral density of one operator ("global" or a weight's diagonal block)."""

    scope: str
    dim: int
    nodes: list[list[float]]
    weights: list[list[float]]
    trace: float
    trace_se: float | None
    frobenius_sq: float


@dataclass
class ActivationResult:
    """Hessian trace w.r.t. one activation tensor (mean per-sample trace)."""

    tensor: str
    layers: list[str]  # node names of the quantizable layers reading it
    trace: float
    trace_se: float | None
    converged: bool


@dataclass
class LayerResult:
    """Curvature of one quantizable weight (``name`` is the initializer's name)."""

    name: str
    node: str
    op: str
    params: int
    trace: float
    trace_se: float | None
    converged: bool
    top_eigenvalue: float | None = None
    eigenvalues: list[float] | None = None
    eigen_converged: bool | None = None
    activation: str | None = None
    activation_trace: float | None = None
    activation_trace_se: float | None = None

    @property
    def average_eigenvalue(self) -> float:
        """trace / params: the normalized sensitivity HAWQ-V2 ranks layers by."""
        return self.trace / self.params if self.params else 0.0


@dataclass
class AnalysisResult:
    """Everything ``analyze`` measured, plus what it was measured on and how."""

    model_sha256: str
    data_sha256: str
    settings: dict[str, Any]
    losses: list[dict[str, str]]
    samples: int
    probes: int
    converged: bool
    hvp_mode: str
    layers: list[LayerResult]
    total_trace: float
    total_trace_se: float | None
    eigenvalues: list[float] | None = None
    eigen_converged: bool | None = None
    density: list[DensityResult] = field(default_factory=list)
    activations: list[ActivationResult] = field(default_factory=list)
    activation_probes: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    model: str = ""
    # the batch size the mirror was fed (bigger than a declared fixed batch once verified,
    # see hawq_onnx.mirror.batching) and why a declared batch was kept, if it was
    mirror_batch: int | None = None
    mirror_batch_reason: str | None = None
    schema: int = SCHEMA_VERSION
    cached: bool = False  # set when read from the cache; not part of the JSON

    def layer(self, name: str) -> LayerResult:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("cached")
        for entry, layer in zip(data["layers"], self.layers, strict=True):
            entry["average_eigenvalue"] = layer.average_eigenvalue
        return _finite(data)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AnalysisResult:
        values = _known(cls, data)
        values["layers"] = [LayerResult(**_known(LayerResult, e)) for e in data["layers"]]
        values["density"] = [DensityResult(**_known(DensityResult, e))
                             for e in data.get("density", [])]
        values["activations"] = [ActivationResult(**_known(ActivationResult, e))
                                 for e in data.get("activations", [])]
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> AnalysisResult:
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, path: str | Path) -> AnalysisResult:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
