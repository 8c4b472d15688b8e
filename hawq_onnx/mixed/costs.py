"""Cost tables for the allocator: packed bytes, BOPs and measured latency per unit and width.

**Bytes.** ``nominal``: ``params · b / 8`` (the HAWQ convention; what "average bits"
means). ``container``: what the exported file stores, ``ceil(params · c(b) / 8)`` with c(b)
the ONNX integer type holding b bits (3 -> int4, 5..7 -> int8; 2 -> int2 only where the
opset and onnxruntime allow it). Scales and zero points do not depend on the width, so
they are left out (they shift every allocation equally).

**BOPs.** ``MACs · b_w · b_a`` per unit, with the other operand's width fixed (activation
bits when weight widths are allocated, and vice versa). When both widths are allocated
(:func:`joint_bops`), each layer adds ``MACs · b_w · b_a`` to the ``[B, C]`` table of its
(weight unit, activation unit) pair, which the ILP linearizes exactly.

**Latency (measured, never assumed).** onnxruntime fuses only 8-bit Q/DQ groups into
integer kernels; other widths run as DequantizeLinear -> float op, int4 helps only blockwise
MatMul, 16-bit activations are not fused at all. So for every weighted layer of a unit:

1. cut the layer out as a one-node model (its weight path of constant Transpose/Identity
   nodes kept), with concrete input shapes (symbolic batch -> ``batch``, other dims by
   shape inference from the model's inputs, and where inference cannot follow, as one
   onnxruntime run of the whole model produces them) and random inputs;
2. build each variant with the project's own :class:`~hawq_onnx.quantize.Quantizer` (so the
   Q/DQ pattern, containers and opset are exactly the exporter's): the float layer, the
   layer with Q/DQ at each candidate width, and an ``Identity`` model on the same input
   that measures the fixed cost of one ``session.run`` (binding, output allocation);
3. time all variants of the layer *interleaved* (round-robin, the order rotated every
   round) so drift and frequency scaling hit all of them alike: single-threaded sessions
   (``intra_op_num_threads=1``, sequential), full graph optimization (the fusions a user
   gets), a few warm-up runs, then ``repeats`` rounds in which each variant runs enough
   times to last ``min_run_s``; the statistic is the median per-run time over rounds;
4. the table entry is ``median(variant) − median(Identity)``, clipped at 0, summed over the
   unit's layers: the layer's in-graph cost, so per-layer entries add up to a model total.

Joint allocation (:func:`joint_latency_table`): each layer is timed at every (weight width,
activation width) pair, with the one-layer model's activations (its input, and its output
where the exporter quantizes it) at that activation width; entries go to the same
``[B, C]`` tables as BOPs. The output's real width is that of the next layer's input
quantizer: one-layer timing cannot see that, and prices it with the input's width.

One-layer timing ignores cross-layer effects (cache reuse, Q/DQ pairs removed between two
integer kernels); it ranks widths of one layer correctly, which is what the allocator needs.
Results are cached on disk as one JSON file per (onnxruntime version, execution provider,
CPU model, threads, layer signature, variant); the layer signature is the op, attributes,
input/weight shapes and dtypes and opset, not the weight values, so equal layers of other
models hit the cache too. Default directory: ``<user cache>/hawq-onnx/latency``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from hawq_onnx.data import Dataset, input_specs
from hawq_onnx.graph import GraphView, QuantizableLayer
from hawq_onnx.hessian.cache import default_cache_dir
from hawq_onnx.mixed.problem import LayerChoice
from hawq_onnx.mixed.sensitivity import weight_spec_at
from hawq_onnx.mixed.ties import LayerLink
from hawq_onnx.model_io import required_ir_version, write_atomic
from hawq_onnx.quant.containers import container_bits, int2_fuses_safely
from hawq_onnx.quant.plan import ActSpec, WeightSpec
from hawq_onnx.quantize import Quantizer, needed_opset


# ------------------------------------------------------------------------------- bytes
def packed_bytes(choices: Sequence[LayerChoice], candidate_bits: Sequence[int], *,
                 storage: str = "nominal", max_opset: int | None = None,
                 int2_allowed: bool | None = None) -> np.ndarray:
    """[L, B] weight bytes: ``nominal`` (params·b/8) or ``container`` (file payload)."""
    params = np.array([c.params for c in choices], dtype=np.float64)
    if storage == "nominal":
        return params[:, None] * np.asarray(candidate_bits, dtype=np.float64)[None, :] / 8.0
    if storage != "container":
        raise ValueError(f"storage must be nominal or container, got '{storage}'")
    allowed = int2_fuses_safely() if int2_allowed is None else int2_allowed
    widths = []
    for bits in candidate_bits:
        width = container_bits(bits, max_opset)
        widths.append(container_bits(4, max_opset) if width == 2 and not allowed else width)
    return np.ceil(params[:, None] * np.asarray(widths, dtype=np.float64)[None, :] / 8.0)


def bops_table(choices: Sequence[LayerChoice], candidate_bits: Sequence[int],
               other_bits: float | Sequence[float] = 8) -> np.ndarray:
    """[L, B] ``MACs · b · b_other`` (``other_bits`` per unit or one value for all)."""
    macs = np.array([c.macs for c in choices], dtype=np.float64)
    other = np.broadcast_to(np.asarray(other_bits, dtype=np.float64), macs.shape)
    return (macs * other)[:, None] * np.asarray(candidate_bits, dtype=np.float64)[None, :]


JointTables = dict[tuple[int, int], np.ndarray]


def joint_bops(links: Sequence[LayerLink], n_units: int, candidate_bits: Sequence[int],
               act_bits: Sequence[int], fixed_act_bits: float = 8
               ) -> tuple[np.ndarray, JointTables]:
    """BOPs when weight and activation widths are both allocated: ``[L, B]`` for layers whose
    activation width is fixed (``fixed_act_bits``), and ``{(unit, act unit): [B, C]}``
    ``Σ MACs · b_w · b_a`` for the others."""
    w = np.asarray(candidate_bits, dtype=np.float64)
    a = np.asarray(act_bits, dtype=np.float64)
    unary = np.zeros((n_units, len(w)))
    joint: JointTables = {}
    for link in links:
        if link.act is None:
            unary[link.unit] += link.macs * fixed_act_bits * w
            continue
        key = (link.unit, link.act)
        joint[key] = joint.get(key, np.zeros((len(w), len(a)))) + link.macs * np.outer(w, a)
    return unary, joint


# ----------------------------------------------------------------------------- latency
@dataclass(frozen=True)
class LatencySettings:
    """How latency is measured (the fields that change numbers are part of the cache key).

    ``allocate``: "weight" (columns are weight widths, activations at ``act_bits``, None =
    weight-only) or "activation" (columns are activation widths, weights at
    ``weight_bits``).
    """

    allocate: str = "weight"
    act_bits: int | None = 8
    weight_bits: int = 8
    symmetric: bool = False
    base: WeightSpec = field(default_factory=WeightSpec)
    batch: int = 1
    threads: int = 1
    repeats: int = 15
    warmup: int = 3
    min_run_s: float = 2e-3
    provider: str = "CPUExecutionProvider"
    target_opset: int | None = None
    seed: int = 0

    def variant(self, bits: int) -> tuple[int | None, int | None]:
        """(weight bits, activation bits) of one column; None = float."""
        if self.allocate == "weight":
            return bits, self.act_bits
        if self.allocate == "activation":
            return self.weight_bits, bits
        raise ValueError(f"allocate must be weight or activation, got '{self.allocate}'")


@dataclass
class LatencyTable:
    """[L, B] seconds per unit and width, plus the float time and cache bookkeeping."""

    labels: list[str]
    candidate_bits: list[int]
    seconds: np.ndarray
    float_seconds: np.ndarray
    environment: dict[str, str]
    measured: int = 0
    cached: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"candidate_bits": self.candidate_bits, "environment": self.environment,
                "units": [{"unit": label, "float_s": float(f),
                           "seconds": [float(v) for v in row]}
                          for label, f, row in zip(self.labels, self.float_seconds,
                                                   self.seconds, strict=True)],
                "measured": self.measured, "cached": self.cached}


def cpu_model() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def environment(settings: LatencySettings) -> dict[str, str]:
    return {"onnxruntime": ort.__version__, "provider": settings.provider,
            "cpu": cpu_model(), "threads": str(settings.threads)}


class LatencyCache:
    """One JSON file per measurement under ``<dir>/latency`` (atomic writes)."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        root = Path(directory) if directory is not None else default_cache_dir()
        self.directory = root / "latency"

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            return json.loads((self.directory / f"{key}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def put(self, key: str, entry: Mapping[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        write_atomic(self.directory / f"{key}.json", json.dumps(entry, sort_keys=True))


# ------------------------------------------------------------------- one-layer models
def concrete_model(model: onnx.ModelProto, batch: int,
                   input_shapes: Mapping[str, Sequence[int]] | None = None) -> onnx.ModelProto:
    """A copy whose graph inputs have numeric dims (``input_shapes`` wins; else the batch
    axis -> ``batch`` and other symbolic dims -> 1), so shape inference is concrete."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    specs = {s.name: s for s in input_specs(model)}
    for value in out.graph.input:
        spec = specs.get(value.name)
        if spec is None or not value.type.HasField("tensor_type"):
            continue
        dims = value.type.tensor_type.shape.dim
        given = (input_shapes or {}).get(value.name)
        for axis, dim in enumerate(dims):
            if given is not None:
                number = int(given[axis])
                number = batch if axis == spec.batch_axis else number
            elif dim.HasField("dim_value") and dim.dim_value > 0:
                continue
            else:
                number = batch if axis == spec.batch_axis else 1
            dim.Clear()
            dim.dim_value = number
    return out


def _constant_chain(view: GraphView, tensor: str, nodes: list[onnx.NodeProto],
                    inits: dict[str, onnx.TensorProto]) -> bool:
    """Collect the constant subgraph producing ``tensor``; False if it reads activations."""
    if tensor in view.initializers:
        inits[tensor] = view.initializers[tensor]
        return True
    node = view.producer(tensor)
    if node is None or node.op_type not in ("Constant", "Identity", "Transpose", "Reshape",
                                            "Cast", "Unsqueeze", "Squeeze"):
        return False
    found: list[onnx.NodeProto] = []
    if not all(_constant_chain(view, t, found, inits) for t in node.input if t):
        return False
    for item in [*found, node]:
        if all(item is not n for n in nodes):
            nodes.append(item)
    return True


def _activation_inputs(view: GraphView, layer: QuantizableLayer) -> list[str]:
    node = view.node(layer.node)
    return [t for t in node.input if t and not _constant_chain(view, t, [], {})]


def _is_concrete(shape: Sequence[Any] | None) -> bool:
    return shape is not None and all(isinstance(d, int) and d > 0 for d in shape)


def observed_shapes(model: onnx.ModelProto, tensors: Sequence[str], seed: int = 0,
                    types: Mapping[str, int] | None = None
                    ) -> dict[str, tuple[tuple[int, ...], int]]:
    """(shape, ONNX element type) of tensors as one run of ``model`` produces them: the
    fallback where shape inference cannot follow (computed Reshape targets and the like)."""
    if not tensors:
        return {}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(
        helper.make_tensor_value_info(t, (types or {}).get(t) or onnx.TensorProto.FLOAT, None)
        for t in tensors if t not in present)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    values = session.run(list(tensors), _random_feeds(model, 1, seed))
    return {t: (tuple(int(d) for d in v.shape), helper.np_dtype_to_tensor_dtype(v.dtype))
            for t, v in zip(tensors, values, strict=True)}


def one_layer_model(view: GraphView, layer: QuantizableLayer, opsets: Sequence[Any],
                    shapes: Mapping[str, tuple[tuple[int, ...], int]] | None = None
                    ) -> onnx.ModelProto:
    """The layer's node alone: activations as inputs (concrete shapes, ``shapes`` where
    inference has none), constants kept."""
    node = view.node(layer.node)
    nodes: list[onnx.NodeProto] = []
    inits: dict[str, onnx.TensorProto] = {}
    inputs = []
    for tensor in node.input:
        if not tensor or _constant_chain(view, tensor, nodes, inits):
            continue
        inferred = view.shape(tensor)
        if shapes and tensor in shapes and not _is_concrete(inferred):
            shape, elem = list(shapes[tensor][0]), shapes[tensor][1]
        else:
            shape = [d if isinstance(d, int) and d > 0 else 1 for d in (inferred or ())]
            elem = view.elem_type(tensor)
        inputs.append(helper.make_tensor_value_info(tensor, elem, shape))
    outputs = [helper.make_tensor_value_info(t, view.elem_type(t) or onnx.TensorProto.FLOAT,
                                             None) for t in node.output if t]
    graph = helper.make_graph([*nodes, node], f"layer_{layer.node}", inputs, outputs,
                              list(inits.values()))
    model = helper.make_model(graph, opset_imports=list(opsets))
    model.ir_version = required_ir_version(model)
    return model


def identity_model(float_layer: onnx.ModelProto) -> onnx.ModelProto:
    """``Identity`` on the layer's first input: the fixed cost of one run."""
    first = float_layer.graph.input[0]
    out = helper.make_tensor_value_info("y", first.type.tensor_type.elem_type, None)
    graph = helper.make_graph([helper.make_node("Identity", [first.name], ["y"])],
                              "overhead", [first], [out])
    model = helper.make_model(graph, opset_imports=list(float_layer.opset_import))
    model.ir_version = required_ir_version(model)
    return model


def layer_signature(model: onnx.ModelProto) -> dict[str, Any]:
    """What a one-layer model's speed depends on (not its weight values)."""
    graph = model.graph
    return {
        "nodes": [[n.op_type, n.domain, [a.SerializeToString().hex() for a in n.attribute]]
                  for n in graph.node],
        "inputs": [[v.type.tensor_type.elem_type,
                    [d.dim_value for d in v.type.tensor_type.shape.dim]] for v in graph.input],
        "constants": [[t.data_type, list(t.dims)] for t in graph.initializer],
        "opsets": sorted([o.domain, o.version] for o in model.opset_import),
    }


def _random_feeds(model: onnx.ModelProto, count: int, seed: int) -> dict[str, np.ndarray]:
    """Inputs for a one-layer model, ``count`` batches stacked along each batch axis.

    Integer inputs (indices) are zeros: always in range, and a lookup's speed does not
    depend on which row it reads."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in input_specs(model):
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in (spec.dims or ())]
        if spec.batch_axis is not None and shape:
            shape[spec.batch_axis] *= count
        if np.issubdtype(spec.dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        else:
            feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
    return feeds


# -------------------------------------------------------------------------- timing
def _session(model: onnx.ModelProto, settings: LatencySettings) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = settings.threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=[settings.provider])


def time_interleaved(models: Mapping[str, onnx.ModelProto], feeds: Mapping[str, np.ndarray],
                     settings: LatencySettings) -> dict[str, dict[str, float]]:
    """Median per-run seconds of each model, measured round-robin (see module docstring)."""
    runs = {}
    for key, model in models.items():
        session = _session(model, settings)
        names = {v.name for v in session.get_inputs()}
        runs[key] = (session, {k: v for k, v in feeds.items() if k in names})
    inner = {}
    for key, (session, feed) in runs.items():
        start = time.perf_counter()
        for _ in range(max(settings.warmup, 1)):
            session.run(None, feed)
        single = (time.perf_counter() - start) / max(settings.warmup, 1)
        inner[key] = max(1, math.ceil(settings.min_run_s / max(single, 1e-7)))
    samples: dict[str, list[float]] = {key: [] for key in runs}
    keys = list(runs)
    for round_index in range(settings.repeats):
        shift = round_index % len(keys)
        for key in keys[shift:] + keys[:shift]:
            session, feed = runs[key]
            start = time.perf_counter()
            for _ in range(inner[key]):
                session.run(None, feed)
            samples[key].append((time.perf_counter() - start) / inner[key])
    return {key: {"median_s": float(np.median(v)), "min_s": float(np.min(v)),
                  "runs_per_round": inner[key], "rounds": len(v)}
            for key, v in samples.items()}


def _variant_key(env: Mapping[str, str], signature: Mapping[str, Any], variant: str,
                 settings: LatencySettings) -> str:
    payload = json.dumps({"env": dict(env), "signature": signature, "variant": variant,
                          "batch": settings.batch, "symmetric": settings.symmetric,
                          "base": asdict(settings.base), "schema": 1},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def _variant_name(w_bits: int | None, a_bits: int | None) -> str:
    return f"w{w_bits or 'f'}a{a_bits or 'f'}"


def _quantized_variants(float_layer: onnx.ModelProto, layer_weight: str,
                        variants: Sequence[tuple[int | None, int | None]],
                        settings: LatencySettings, target_opset: int
                        ) -> dict[str, onnx.ModelProto]:
    """The exporter's QDQ model of the one-layer model for each (w_bits, a_bits)."""
    quantizer = Quantizer(float_layer, target_opset=target_opset,
                          asymmetric=not settings.symmetric)
    if any(a is not None for _, a in variants):
        specs = input_specs(quantizer.model)
        arrays = _random_feeds(quantizer.model, 4, settings.seed)
        quantizer.calibrate(Dataset(Path("<latency>"), specs, arrays))
    out = {}
    for w_bits, a_bits in variants:
        weight = (weight_spec_at(settings.base, w_bits, quantizer.opset)
                  if w_bits is not None else None)
        act = ActSpec(a_bits, settings.symmetric) if a_bits is not None else None
        plan = quantizer.uniform_plan(weight, act)
        plan.weights = {k: v for k, v in plan.weights.items() if k == layer_weight}
        out[_variant_name(w_bits, a_bits)] = quantizer.build(plan).model
    return out


def default_target_opset(candidate_bits: Sequence[int], settings: LatencySettings) -> int:
    """The opset the mixed model will need (int2 stored as int4 where it cannot fuse)."""
    columns = [settings.variant(b) for b in candidate_bits]
    weights = [w for w, _ in columns if w is not None]
    acts = [a for _, a in columns if a is not None]
    if acts and 2 in weights and not int2_fuses_safely():
        weights = [4 if w == 2 else w for w in weights]
    return needed_opset(weights, acts, grouped=settings.base.granularity == "group")


def measure_layer(view: GraphView, layer: QuantizableLayer, candidate_bits: Sequence[int],
                  settings: LatencySettings, cache: LatencyCache | None,
                  opsets: Sequence[Any], target_opset: int,
                  shapes: Mapping[str, tuple[tuple[int, ...], int]] | None = None,
                  variants: Sequence[tuple[int | None, int | None]] | None = None
                  ) -> tuple[dict[str, float], int, int]:
    """Seconds per variant name for one layer (``float``, ``overhead`` and each column, or
    each explicit (weight bits, activation bits) of ``variants``); returns (times, measured
    count, cached count)."""
    float_layer = one_layer_model(view, layer, opsets, shapes)
    env = environment(settings)
    signature = layer_signature(float_layer)
    pairs = variants if variants is not None else [settings.variant(b) for b in candidate_bits]
    columns = {_variant_name(*pair): pair for pair in pairs}
    wanted = ["float", "overhead", *columns]
    keys = {name: _variant_key(env, {**signature, "target_opset": target_opset}, name,
                               settings) for name in wanted}
    times: dict[str, float] = {}
    for name in wanted:
        entry = cache.get(keys[name]) if cache is not None else None
        if entry is not None:
            times[name] = float(entry["median_s"])
    missing = [name for name in wanted if name not in times]
    if not missing:
        return times, 0, len(wanted)
    models: dict[str, onnx.ModelProto] = {"float": float_layer,
                                          "overhead": identity_model(float_layer)}
    quantized = [columns[n] for n in missing if n in columns]
    if quantized:
        models.update(_quantized_variants(float_layer, layer.weight or "", quantized, settings,
                                          target_opset))
    measured = time_interleaved({n: models[n] for n in missing if n in models},
                                _random_feeds(float_layer, 1, settings.seed), settings)
    for name, entry in measured.items():
        times[name] = entry["median_s"]
        if cache is not None:
            cache.put(keys[name], {**entry, "variant": name, "layer": layer.node, **env})
    return times, len(measured), len(wanted) - len(missing)


@dataclass
class _Prepared:
    """The concrete model, its view, observed shapes and weighted layers by weight."""

    concrete: onnx.ModelProto
    view: GraphView
    shapes: dict[str, tuple[tuple[int, ...], int]]
    by_weight: dict[str, list[QuantizableLayer]]


def _prepare(model: onnx.ModelProto, settings: LatencySettings,
             input_shapes: Mapping[str, Sequence[int]] | None) -> _Prepared:
    concrete = concrete_model(model, settings.batch, input_shapes)
    view = GraphView(concrete)
    by_weight: dict[str, list[QuantizableLayer]] = {}
    for layer in view.quantizable_layers():
        if layer.weight:
            by_weight.setdefault(layer.weight, []).append(layer)
    unknown = sorted({t for layers in by_weight.values() for layer in layers
                      for t in _activation_inputs(view, layer)
                      if not _is_concrete(view.shape(t))})
    shapes = observed_shapes(concrete, unknown, settings.seed,
                             {t: view.elem_type(t) for t in unknown})
    return _Prepared(concrete, view, shapes, by_weight)


def latency_table(model: onnx.ModelProto, choices: Sequence[LayerChoice],
                  candidate_bits: Sequence[int], *, settings: LatencySettings | None = None,
                  input_shapes: Mapping[str, Sequence[int]] | None = None,
                  cache_dir: str | os.PathLike[str] | None = None, use_cache: bool = True
                  ) -> LatencyTable:
    """Measured [L, B] latency (seconds) of each unit at each width (see module docstring).

    ``model`` is the float model the choices were made from; ``input_shapes`` fixes
    symbolic input dims (e.g. a sequence length) to the deployment's values.
    """
    settings = settings or LatencySettings()
    target = settings.target_opset or default_target_opset(candidate_bits, settings)
    prepared = _prepare(model, settings, input_shapes)
    cache = LatencyCache(cache_dir) if use_cache else None
    seconds = np.zeros((len(choices), len(candidate_bits)))
    floats = np.zeros(len(choices))
    measured = cached = 0
    for i, choice in enumerate(choices):
        for name in choice.names:
            for layer in prepared.by_weight.get(name, []):
                times, fresh, hits = measure_layer(prepared.view, layer, candidate_bits,
                                                   settings, cache,
                                                   prepared.concrete.opset_import, target,
                                                   prepared.shapes)
                measured, cached = measured + fresh, cached + hits
                overhead = times["overhead"]
                floats[i] += max(times["float"] - overhead, 0.0)
                for k, bits in enumerate(candidate_bits):
                    name_k = _variant_name(*settings.variant(bits))
                    seconds[i, k] += max(times[name_k] - overhead, 0.0)
    return LatencyTable([c.label for c in choices], list(candidate_bits), seconds, floats,
                        environment(settings), measured, cached)


@dataclass
class JointLatency:
    """Latency when weight and activation widths are both allocated (seconds): ``unary``
    [L, B] for layers whose activation width is fixed (at ``settings.act_bits``), ``joint``
    ``{(unit, act unit): [B, C]}`` for the others."""

    unary: np.ndarray
    joint: JointTables
    measured: int = 0
    cached: int = 0


def joint_latency_table(model: onnx.ModelProto, links: Sequence[LayerLink], n_units: int,
                        candidate_bits: Sequence[int], act_bits: Sequence[int], *,
                        settings: LatencySettings | None = None,
                        input_shapes: Mapping[str, Sequence[int]] | None = None,
                        cache_dir: str | os.PathLike[str] | None = None, use_cache: bool = True
                        ) -> JointLatency:
    """Each linked layer timed at every (b_w, b_a) pair (see the module docstring); the
    layers are found by node name in ``model`` (the float model the links come from)."""
    settings = settings or LatencySettings()
    fixed = settings.act_bits
    target = settings.target_opset or needed_opset(
        candidate_bits, [*act_bits, *([fixed] if fixed else [])],
        grouped=settings.base.granularity == "group")
    prepared = _prepare(model, settings, input_shapes)
    by_node = {layer.node: layer for layers in prepared.by_weight.values() for layer in layers}
    cache = LatencyCache(cache_dir) if use_cache else None
    out = JointLatency(np.zeros((n_units, len(candidate_bits))), {})
    for link in links:
        layer = by_node.get(link.node)
        if layer is None:
            continue
        widths = [fixed] if link.act is None else list(act_bits)
        variants = [(w, a) for w in candidate_bits for a in widths]
        times, fresh, hits = measure_layer(prepared.view, layer, candidate_bits, settings,
                                           cache, prepared.concrete.opset_import, target,
                                           prepared.shapes, variants)
        out.measured, out.cached = out.measured + fresh, out.cached + hits
        table = np.array([[max(times[_variant_name(w, a)] - times["overhead"], 0.0)
                           for a in widths] for w in candidate_bits])
        if link.act is None:
            out.unary[link.unit] += table[:, 0]
        else:
            key = (link.unit, link.act)
            out.joint[key] = out.joint.get(key, np.zeros_like(table)) + table
    return out


__all__ = ["JointLatency", "LatencyCache", "LatencySettings", "LatencyTable", "bops_table",
           "concrete_model", "cpu_model", "default_target_opset", "identity_model",
           "joint_bops", "joint_latency_table", "latency_table",
           "layer_signature", "measure_layer", "observed_shapes", "one_layer_model", "packed_bytes",
           "time_interleaved"]
