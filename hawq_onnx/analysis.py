"""``analyze``: the Hessian sensitivity of every quantizable layer of an ONNX model.

The public entry point behind ``hawq-onnx analyze``: it loads the model and calibration data,
builds the autograd mirror with the quantizable weights as parameters, and runs the
estimators of :mod:`hawq_onnx.hessian` (Hutchinson traces always; top eigenvalues, spectral
densities and activation traces on request). Results are cached on disk by (model hash,
data hash, settings), so a second identical run returns at once.
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
import torch

from hawq_onnx.data import LABELS_KEY, Dataset, input_specs, load_npz
from hawq_onnx.errors import HawqError, InvalidDataError
from hawq_onnx.graph import GraphView, QuantizableLayer, nested_reason
from hawq_onnx.hessian.activations import activation_sampler, reached_tensors
from hawq_onnx.hessian.cache import ResultCache, cache_key, dataset_sha256
from hawq_onnx.hessian.density import spectral_density
from hawq_onnx.hessian.eigen import EIGEN_METHODS, top_eigenvalues
from hawq_onnx.hessian.hutchinson import (
    StoppingRule,
    TraceEstimate,
    global_probe_sampler,
    per_layer_sampler,
    run_hutchinson,
)
from hawq_onnx.hessian.hvp import DEFAULT_MODE, HVP_MODES, HessianVectorProduct
from hawq_onnx.hessian.losses import LOSS_KINDS
from hawq_onnx.hessian.objective import Objective
from hawq_onnx.hessian.result import (
    ActivationResult,
    AnalysisResult,
    DensityResult,
    LayerResult,
)
from hawq_onnx.importer import NORMALIZATION_PASSES, ImportedModel, load_model
from hawq_onnx.mirror.batching import relaxed_batch_size
from hawq_onnx.mirror.module import Mirror
from hawq_onnx.model_io import model_sha256
from hawq_onnx.parity import check_reference_runs
from hawq_onnx.passes.base import run_passes

#: ``progress(stage, advance, total)``: ``advance`` more units of ``total`` done in ``stage``.
ProgressFn = Callable[[str, int, int], None]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_DENSITY_SCOPES = ("global", "layers")


@dataclass(frozen=True)
class AnalysisSettings:
    """Every knob that changes the numbers (and therefore the cache key)."""

    loss: str = "auto"
    outputs: tuple[str, ...] | None = None
    labels_key: str | None = None
    temperature: float = 1.0
    rel_tol: float = 0.05
    min_probes: int = 16
    max_probes: int = 256
    chunk: int = 8
    per_layer: bool = False  # diagnostic: one HVP per layer and probe
    eigs: int = 0
    eig_method: str = "lanczos"
    eig_tol: float = 1e-3
    eig_max_iter: int = 100
    density: str | None = None  # "global" or "layers"
    density_steps: int = 64
    density_runs: int = 4
    activations: bool = False
    hvp_mode: str = DEFAULT_MODE
    batch_size: int = 32
    max_samples: int | None = None
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        checks = [
            (self.loss in LOSS_KINDS, f"loss must be one of {LOSS_KINDS}"),
            (self.hvp_mode in ("auto", *HVP_MODES), f"hvp_mode must be auto or one of "
                                                     f"{HVP_MODES}"),
            (self.eig_method in EIGEN_METHODS, f"eig_method must be one of {EIGEN_METHODS}"),
            (self.density in (None, *_DENSITY_SCOPES), "density must be global or layers"),
            (self.dtype in _DTYPES, f"dtype must be one of {tuple(_DTYPES)}"),
            (0 < self.rel_tol, "rel_tol must be positive"),
            (1 <= self.min_probes <= self.max_probes, "need 1 <= min_probes <= max_probes"),
            (self.chunk >= 1 and self.batch_size >= 1, "chunk and batch size must be >= 1"),
            (self.eigs >= 0, "eigs must be >= 0"),
            (self.max_samples is None or self.max_samples >= 1, "max_samples must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise HawqError(message)

    def key_fields(self) -> dict[str, Any]:
        data = asdict(self)
        data["outputs"] = list(self.outputs) if self.outputs else None
        return data


@dataclass
class _Inputs:
    """A loaded model and the calibration data the analysis runs on."""

    model: onnx.ModelProto
    name: str
    dataset: Dataset  # batched for the mirror once it is built and checked (see _run)
    labels: np.ndarray | None
    data_sha256: str
    layers: list[QuantizableLayer] = field(default_factory=list)


def analyze(
    model: str | os.PathLike[str] | onnx.ModelProto | ImportedModel,
    data: str | os.PathLike[str] | Dataset | Mapping[str, np.ndarray],
    settings: AnalysisSettings | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    progress: ProgressFn | None = None,
    **overrides: Any,
) -> AnalysisResult:
    """Measure the Hessian sensitivity of ``model``'s quantizable weights on ``data``.

    ``data`` is an .npz path, a :class:`Dataset`, or arrays keyed by input name (labels
    under ``settings.labels_key``). Keyword overrides replace fields of ``settings``.
    """
    settings = replace(settings or AnalysisSettings(), **overrides)
    inputs = _load_inputs(model, data, settings)
    cache = ResultCache(cache_dir) if use_cache else None
    model_hash = model_sha256(inputs.model)
    key = cache_key(model_hash, inputs.data_sha256, _key_fields(settings, inputs.dataset))
    if cache is not None:
        hit = cache.get(key)
        if hit is not None:
            hit.model = inputs.name  # the key is content only: the entry may name a copy
            return hit
    result = _run(inputs, settings, progress)
    result.model_sha256 = model_hash
    if cache is not None:
        cache.put(key, result)
    return result


# ---------------------------------------------------------------------- inputs
def _load_inputs(model: Any, data: Any, settings: AnalysisSettings) -> _Inputs:
    if isinstance(model, ImportedModel):
        proto, name = model.model, str(model.path)
    elif isinstance(model, onnx.ModelProto):  # normalize like a file (lift constants, ...)
        proto, name = run_passes(model, NORMALIZATION_PASSES)[0], model.graph.name
    else:
        imported = load_model(model)
        proto, name = imported.model, str(model)
    dataset, labels = _dataset(data, proto, settings)
    if settings.max_samples is not None:  # the first samples: whole batches, the last cut
        dataset = dataset.head(settings.max_samples)
        labels = labels[:len(dataset)] if labels is not None else None
    first = next(dataset.batches(settings.batch_size), None)  # onnxruntime: declared batch
    if first is not None:  # bad input fails here in one line, not deep inside the mirror
        check_reference_runs(proto, first, str(dataset.source))
    layers = GraphView(proto).quantizable_layers()
    return _Inputs(proto, name, dataset, labels, dataset_sha256(dataset, labels), layers)


def _key_fields(settings: AnalysisSettings, dataset: Dataset) -> dict[str, Any]:
    """The settings part of the cache key. The mirror's batch size is a function of what
    the key already holds (model, data, ``batch_size``, dtype, device), so it needs no field;
    a model with a fixed batch gets a marker so that entries computed before batches were
    relaxed for the mirror (at the declared batch) are not served."""
    fields = settings.key_fields()
    if dataset.fixed_batch is not None:
        fields["mirror_batching"] = "verified-relaxation"
    return fields


def _dataset(data: Any, model: onnx.ModelProto,
             settings: AnalysisSettings) -> tuple[Dataset, np.ndarray | None]:
    """The inputs (read from disk batch by batch when ``data`` is a file) and, when a CE
    loss needs them, the labels."""
    labels_key = settings.labels_key or (LABELS_KEY if settings.loss == "ce" else None)
    labels: np.ndarray | None = None
    if isinstance(data, Mapping):
        arrays = {k: np.asarray(v) for k, v in data.items()}
        dataset = _dataset_from(arrays, model)
        labels = arrays.get(labels_key) if labels_key is not None else None
    else:
        dataset = data if isinstance(data, Dataset) else load_npz(data, model)
        labels = dataset.labels_for(labels_key) if labels_key is not None else None
    if labels_key is not None and labels is None:
        raise InvalidDataError(f"no labels array {labels_key!r} in the calibration data")
    return dataset, labels


def _dataset_from(arrays: dict[str, np.ndarray], model: onnx.ModelProto) -> Dataset:
    specs = input_specs(model)
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        raise InvalidDataError(f"calibration data lacks model input(s) {missing}")
    return Dataset(Path("<arrays>"), specs, {s.name: arrays[s.name] for s in specs})


# ---------------------------------------------------------------------- the run
def _weight_layers(inputs: _Inputs) -> list[QuantizableLayer]:
    """One layer per distinct weight initializer (a shared weight is one block)."""
    initializers = {t.name for t in inputs.model.graph.initializer}
    seen: dict[str, QuantizableLayer] = {}
    for layer in inputs.layers:
        if layer.weight is not None and layer.weight in initializers and layer.params > 0:
            seen.setdefault(layer.weight, layer)
    return list(seen.values())


def _generator(seed: int, stage: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, stage]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = round(time.perf_counter() - start, 4)


def _run(inputs: _Inputs, settings: AnalysisSettings,
         progress: ProgressFn | None) -> AnalysisResult:
    timings: dict[str, float] = {}
    layers = _weight_layers(inputs)
    if not layers:
        raise HawqError("the model has no quantizable weights to analyze"
                        + nested_reason(GraphView(inputs.model)))
    device = _device(settings.device)
    mirror = Mirror(inputs.model, weight_names=[layer.weight for layer in layers],
                    dtype=_DTYPES[settings.dtype], device=device)
    batch, reason = relaxed_batch_size(mirror, inputs.dataset, settings.batch_size)
    objective = Objective(mirror, inputs.dataset.batched(batch, relax_fixed=True),
                          inputs.labels, settings.loss, settings.outputs, settings.temperature)
    hvp = HessianVectorProduct(objective, settings.hvp_mode)
    report = _progress(progress)
    with _timed(timings, "traces"):
        traces = _traces(hvp, settings, report)
    result_layers = [
        LayerResult(name=layer.weight or "", node=layer.node, op=layer.op,
                    params=int(layer.params), trace=float(traces.mean[i]),
                    trace_se=float(traces.se[i]), converged=bool(traces.converged[i]))
        for i, layer in enumerate(layers)]
    result = AnalysisResult(
        model_sha256="", data_sha256=inputs.data_sha256, settings=settings.key_fields(),
        losses=[{"output": s.name, "kind": s.kind} for s in objective.losses],
        samples=objective.total, probes=traces.probes,
        converged=bool(traces.converged.all()), hvp_mode=hvp.mode,
        layers=result_layers, total_trace=traces.total_mean, total_trace_se=traces.total_se,
        model=inputs.name, timings=timings, mirror_batch=batch, mirror_batch_reason=reason)
    if settings.eigs:
        with _timed(timings, "eigenvalues"):
            _eigenvalues(hvp, settings, result, report)
    if settings.density:
        with _timed(timings, "density"):
            _density(hvp, settings, result, report)
    if settings.activations:
        with _timed(timings, "activations"):
            _activations(inputs, objective, settings, result, report)
    return result


def _device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HawqError("--device cuda requested but CUDA is not available")
    return device


def _progress(progress: ProgressFn | None) -> Callable[[str, int, int], None]:
    return progress if progress is not None else (lambda stage, advance, total: None)


def _traces(hvp: HessianVectorProduct, settings: AnalysisSettings,
            report: ProgressFn) -> TraceEstimate:
    rule = StoppingRule(settings.rel_tol, settings.min_probes, settings.max_probes,
                        settings.chunk)
    generator = _generator(settings.seed, 0)
    sampler = (per_layer_sampler if settings.per_layer else global_probe_sampler)(hvp, generator)
    return run_hutchinson(sampler, len(hvp.layout), rule,
                          lambda k: report("traces", k, settings.max_probes))


def _eigenvalues(hvp: HessianVectorProduct, settings: AnalysisSettings,
                 result: AnalysisResult, report: ProgressFn) -> None:
    blocks = list(range(len(hvp.layout)))
    groups = [[b] for b in blocks] + [blocks]
    total = settings.eig_max_iter * (settings.eigs if settings.eig_method == "power" else 1)
    estimates = top_eigenvalues(hvp, groups, settings.eigs, _generator(settings.seed, 1),
                                settings.eig_method, settings.eig_tol, settings.eig_max_iter,
                                lambda n: report("eigenvalues", n, total))
    for layer, estimate in zip(result.layers, estimates, strict=False):
        layer.eigenvalues = estimate.values
        layer.top_eigenvalue = estimate.values[0] if estimate.values else None
        layer.eigen_converged = estimate.converged
    result.eigenvalues = estimates[-1].values
    result.eigen_converged = estimates[-1].converged


def _density(hvp: HessianVectorProduct, settings: AnalysisSettings,
             result: AnalysisResult, report: ProgressFn) -> None:
    blocks = list(range(len(hvp.layout)))
    per_layer = settings.density == "layers"
    groups: Sequence[list[int]] = [[b] for b in blocks] if per_layer else [blocks]
    scopes = [hvp.layout.names[b] for b in blocks] if per_layer else ["global"]
    densities = spectral_density(hvp, groups, _generator(settings.seed, 2),
                                 settings.density_steps, settings.density_runs,
                                 lambda n: report("density", n, settings.density_steps))
    result.density = [
        DensityResult(scope, d.dim, d.nodes, d.weights, d.trace, d.trace_se, d.frobenius_sq)
        for scope, d in zip(scopes, densities, strict=True)]


def _activations(inputs: _Inputs, objective: Objective, settings: AnalysisSettings,
                 result: AnalysisResult, report: ProgressFn) -> None:
    readers: dict[str, list[str]] = {}
    for layer in inputs.layers:
        for tensor in layer.inputs:
            readers.setdefault(tensor, [])
            if layer.node not in readers[tensor]:
                readers[tensor].append(layer.node)
    tensors = reached_tensors(objective, list(readers))
    if not tensors:
        return
    rule = StoppingRule(settings.rel_tol, settings.min_probes, settings.max_probes,
                        settings.chunk)
    sampler = activation_sampler(objective, tensors, _generator(settings.seed, 3))
    estimate = run_hutchinson(sampler, len(tensors), rule,
                              lambda k: report("activations", k, settings.max_probes))
    result.activation_probes = estimate.probes
    result.activations = [
        ActivationResult(t, readers[t], float(estimate.mean[i]), float(estimate.se[i]),
                         bool(estimate.converged[i]))
        for i, t in enumerate(tensors)]
    by_tensor = {a.tensor: a for a in result.activations}
    by_node = {layer.node: layer for layer in inputs.layers}
    for layer in result.layers:
        source = by_node.get(layer.node)
        for tensor in source.inputs if source is not None else ():
            if tensor in by_tensor:
                layer.activation = tensor
                layer.activation_trace = by_tensor[tensor].trace
                layer.activation_trace_se = by_tensor[tensor].trace_se
                break


__all__ = ["AnalysisSettings", "AnalysisResult", "analyze"]
