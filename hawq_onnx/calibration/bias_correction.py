"""Empirical bias correction: remove the mean shift quantization adds to each layer's output.

Rounding errors are not zero-mean when the data is not spread out: a background pixel value
shared by most of an image, a ReLU spike, a per-channel constant all round the same way every
time, so a Conv's output drifts by a constant per channel, and those drifts add up through
the network. The fix (empirical variant of Nagel et al., "Data-Free Quantization", 2019):
run the float and the quantized model on calibration data, average each Conv/Gemm output per
channel, and subtract the difference from that layer's bias. Upstream corrections change the
downstream shifts, so layers are corrected front to back, each measured with the corrections
before it in place.

Memory stays bounded: per-channel sums are accumulated batch by batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from hawq_onnx.calibration.collector import _with_outputs
from hawq_onnx.calibration.session import make_session, session_options
from hawq_onnx.data import Dataset
from hawq_onnx.graph import QuantizableLayer, unique_node_names
from hawq_onnx.model_io import copy_model
from hawq_onnx.topology import topological_order

_CORRECTABLE = frozenset({"conv", "gemm"})


@dataclass(frozen=True)
class _Target:
    """A layer whose bias can absorb a per-channel correction."""

    node: str
    output: str
    channel_axis: int  # of the layer output
    channels: int


def _channel_means(session: ort.InferenceSession, tensors: dict[str, int], dataset: Dataset,
                   batch_size: int, max_batches: int,
                   extra: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Per-channel mean of each tensor (tensor -> channel axis) over the data."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    names = list(tensors)
    for index, feeds in enumerate(dataset.batches(batch_size)):
        if index >= max_batches:
            break
        for name, value in zip(names, session.run(names, {**feeds, **(extra or {})}),
                               strict=True):
            axis = tensors[name] % value.ndim
            moved = np.moveaxis(value.astype(np.float64), axis, 0).reshape(value.shape[axis], -1)
            sums[name] = sums.get(name, 0.0) + moved.sum(axis=1)
            counts[name] = counts.get(name, 0) + moved.shape[1]
    return {name: sums[name] / counts[name] for name in sums}


def _targets(model: onnx.ModelProto, layers: Sequence[QuantizableLayer]) -> list[_Target]:
    nodes = dict(zip(unique_node_names(model.graph.node), model.graph.node, strict=True))
    inits = {t.name: t for t in model.graph.initializer}
    found = []
    for layer in layers:
        node = nodes.get(layer.node)
        if layer.kind not in _CORRECTABLE or node is None or layer.weight not in inits:
            continue
        if any(a.name in ("beta", "alpha") and a.f != 1.0 for a in node.attribute):
            continue
        dims = list(inits[layer.weight].dims)
        if layer.kind == "conv":
            found.append(_Target(layer.node, node.output[0], 1, dims[0]))
        elif layer.weight_axis_out is not None:
            found.append(_Target(layer.node, node.output[0], -1, dims[layer.weight_axis_out]))
    return found


def _with_bias(model: onnx.ModelProto, targets: Sequence[_Target],
               deltas: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy whose target layers' biases are lowered by ``deltas`` (a bias is added where a
    layer has none)."""
    out = copy_model(model)
    inits = {t.name: t for t in out.graph.initializer}
    nodes = dict(zip(unique_node_names(out.graph.node), out.graph.node, strict=True))
    users: dict[str, int] = {}
    for node in out.graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    for target in targets:
        delta = deltas.get(target.node)
        if delta is None:
            continue
        node = nodes[target.node]
        bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else ""
        if bias_name and (bias_name not in inits or users.get(bias_name, 0) > 1):
            continue  # a computed or shared bias: leave it alone
        bias = numpy_helper.to_array(inits[bias_name]).astype(np.float64) if bias_name \
            else np.zeros(target.channels)
        if bias.shape != (target.channels,):
            continue
        name = bias_name or f"{target.node}_corrected_bias"
        tensor = numpy_helper.from_array((bias - delta).astype(np.float32), name)
        if bias_name:
            inits[bias_name].CopyFrom(tensor)
        else:
            out.graph.initializer.append(tensor)
            while len(node.input) < 2:
                node.input.append("")
            node.input.append(name)
    return out


def _levels(model: onnx.ModelProto, targets: Sequence[_Target]) -> list[list[_Target]]:
    """Targets grouped so that no target depends on another of its own group or a later one:
    a group's shifts can be measured together once all earlier groups are corrected."""
    order = topological_order(model.graph)
    by_output = {t.output: t for t in targets}
    depth: dict[str, int] = {}  # tensor -> number of targets upstream (inclusive)
    for node in order:
        reads = [name for name in node.input if name]
        level = max((depth.get(name, 0) for name in reads), default=0)
        for out in node.output:
            depth[out] = level + (1 if out in by_output else 0)
    groups: dict[int, list[_Target]] = {}
    for target in targets:
        groups.setdefault(depth.get(target.output, 1), []).append(target)
    return [groups[key] for key in sorted(groups)]


def _shift_name(target: _Target) -> str:
    return f"{target.node}__bias_shift"


def _measuring_model(quantized: onnx.ModelProto, targets: Sequence[_Target],
                     ranks: dict[str, int]) -> tuple[onnx.ModelProto, dict[str, str]]:
    """``quantized`` with ``out = raw - shift`` after every target, ``shift`` a graph input
    (so corrections are tried without rebuilding the session) and ``raw`` an output.
    Returns the model and target node -> raw tensor name."""
    out = copy_model(quantized)
    nodes = {node.name: node for node in out.graph.node if node.name}
    raw: dict[str, str] = {}
    extra: list[onnx.NodeProto] = []
    for target in targets:
        node = nodes.get(target.node)
        if node is None or target.node not in ranks:
            continue
        result = node.output[0]
        raw[target.node] = node.output[0] = f"{result}__uncorrected"
        extra.append(helper.make_node("Sub", [raw[target.node], _shift_name(target)], [result],
                                      name=f"{target.node}__bias_correction"))
        shape = [target.channels] + [1] * (ranks[target.node] - 2 if target.channel_axis == 1
                                           else 0)
        out.graph.input.append(helper.make_tensor_value_info(
            _shift_name(target), onnx.TensorProto.FLOAT, shape))
    out.graph.node.extend(extra)
    ordered = topological_order(out.graph)
    del out.graph.node[:]
    out.graph.node.extend(ordered)
    return _with_outputs(out, list(raw.values())), raw


def _shift_feed(target: _Target, rank: int, shift: np.ndarray) -> np.ndarray:
    shape = [target.channels] + [1] * (rank - 2 if target.channel_axis == 1 else 0)
    return shift.astype(np.float32).reshape(shape)


def correct_biases(float_model: onnx.ModelProto, layers: Sequence[QuantizableLayer],
                   build: Callable[[onnx.ModelProto], onnx.ModelProto], dataset: Dataset, *,
                   batch_size: int = 32, max_samples: int = 256
                   ) -> tuple[onnx.ModelProto, dict[str, float]]:
    """The float model with corrected biases, and the largest correction per layer.

    Layers are corrected front to back (all layers at one depth together), each measured
    with every upstream correction in place, so a shift is removed where it first appears
    and not again downstream. The quantized model is built once; corrections are fed to it
    as inputs, so each depth costs one pass over ``max_samples`` samples and no rebuild.
    ``build`` turns a float model into its quantized form, in which every node carries the
    unique name :func:`unique_node_names` gives it in the float model.
    """
    targets = _targets(float_model, layers)
    if not targets:
        return float_model, {}
    max_batches = max(1, -(-max_samples // (dataset.fixed_batch or batch_size)))
    float_session = make_session(
        _with_outputs(float_model, [t.output for t in targets]), session_options())
    reference = _channel_means(float_session, {t.output: t.channel_axis for t in targets},
                               dataset, batch_size, max_batches)
    ranks = {t.node: _rank(float_model, t) for t in targets}
    ranks = {k: v for k, v in ranks.items() if v is not None}
    measuring, raw = _measuring_model(build(float_model), targets, ranks)
    session = make_session(measuring, session_options())
    shifts = {t.node: np.zeros(t.channels) for t in targets if t.node in raw}
    for group in _levels(float_model, [t for t in targets if t.node in raw]):
        feeds = {_shift_name(t): _shift_feed(t, ranks[t.node], shifts[t.node])
                 for t in targets if t.node in raw}
        tensors = {raw[t.node]: t.channel_axis for t in group}
        means = _channel_means(session, tensors, dataset, batch_size, max_batches, feeds)
        for target in group:
            have, want = means.get(raw[target.node]), reference.get(target.output)
            if have is not None and want is not None and have.shape == want.shape:
                shifts[target.node] = have - want
    corrected = _with_bias(float_model, targets, shifts)
    return corrected, {node: float(np.max(np.abs(d))) for node, d in shifts.items()}


def _rank(model: onnx.ModelProto, target: _Target) -> int | None:
    """Rank of a target's output: a Conv's is its weight's, a Gemm's is 2."""
    if target.channel_axis != 1:
        return 2
    nodes = dict(zip(unique_node_names(model.graph.node), model.graph.node, strict=True))
    inits = {t.name: t for t in model.graph.initializer}
    weight = inits.get(nodes[target.node].input[1])
    return len(weight.dims) if weight is not None else None


__all__ = ["correct_biases"]
