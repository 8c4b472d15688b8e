"""Fold inference-mode BatchNormalization into the Conv / ConvTranspose / Gemm before it.

``BN(y) = s * (y - mean) + beta`` with ``s = gamma / sqrt(var + eps)`` per output channel.
When ``y`` comes straight from a linear op with a constant weight, scaling the weight's
output channels by ``s`` and rewriting the bias gives the same function with one node less,
and, more importantly, the quantizer then sees the weight that really multiplies the data.

A fold happens only when it is exact: the producer's output feeds nothing but this BN and is
not a graph output, weight and BN parameters are initializers (not overridable graph inputs),
and BN runs in inference mode. Anything in between (Relu, Add, ...) blocks the fold. Only the
main graph is rewritten. Arithmetic is done in float64 and cast back to the weight's dtype.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from hawq_onnx.model_io import copy_model, iter_graphs
from hawq_onnx.passes.base import PassReport

_DEFAULT_DOMAINS = ("", "ai.onnx")
_FOLDABLE = ("Conv", "ConvTranspose", "Gemm")
_FLOAT_TYPES = (np.float16, np.float32, np.float64)


@dataclass
class _Graph:
    """Look-ups over the main graph that decide whether a fold is safe."""

    model: onnx.ModelProto
    inits: dict[str, onnx.TensorProto]
    inputs: set[str]
    outputs: set[str]
    uses: Counter[str]
    producers: dict[str, onnx.NodeProto]
    names: set[str]

    @classmethod
    def of(cls, model: onnx.ModelProto) -> _Graph:
        graph = model.graph
        uses: Counter[str] = Counter()
        names: set[str] = set()
        for sub in iter_graphs(model):  # subgraphs may read main-graph names implicitly
            for node in sub.node:
                uses.update(name for name in node.input if name)
                names.update(node.output)
            names.update(info.name for info in (*sub.input, *sub.output, *sub.value_info))
            names.update(init.name for init in sub.initializer)
        return cls(
            model=model,
            inits={init.name: init for init in graph.initializer},
            inputs={inp.name for inp in graph.input},
            outputs={out.name for out in graph.output},
            uses=uses,
            producers={out: node for node in graph.node for out in node.output if out},
            names=names,
        )

    def constant(self, name: str) -> np.ndarray | None:
        """The value of a true constant (initializer that is not also a graph input)."""
        if not name or name not in self.inits or name in self.inputs:
            return None
        return numpy_helper.to_array(self.inits[name])

    def fresh_name(self, base: str) -> str:
        name, suffix = base, 0
        while name in self.names:
            suffix += 1
            name = f"{base}_{suffix}"
        self.names.add(name)
        return name

    def set_constant(self, node: onnx.NodeProto, index: int, value: np.ndarray, base: str) -> None:
        """Make ``node.input[index]`` hold ``value``: in place when only this node reads the old
        initializer (names stay stable), otherwise as a new initializer."""
        old = node.input[index] if index < len(node.input) else ""
        if old and old in self.inits and self.uses[old] == 1 and old not in self.outputs:
            self.inits[old].CopyFrom(numpy_helper.from_array(value, old))
            return
        name = self.fresh_name(base)
        tensor = numpy_helper.from_array(value, name)
        self.model.graph.initializer.append(tensor)
        self.inits[name] = tensor
        while len(node.input) <= index:
            node.input.append("")
        if old:
            self.uses[old] -= 1
        node.input[index] = name
        self.uses[name] += 1


@dataclass
class _BatchNorm:
    scale: np.ndarray  # gamma / sqrt(var + eps), float64
    shift: np.ndarray  # beta - mean * scale, float64


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _batchnorm_params(g: _Graph, bn: onnx.NodeProto) -> _BatchNorm | None:
    """The per-channel affine map of an inference-mode BN, None when it is not foldable."""
    if _attr(bn, "training_mode", 0) or _attr(bn, "spatial", 1) != 1:
        return None
    if len(bn.input) != 5 or any(out for out in bn.output[1:]):
        return None
    params = [g.constant(name) for name in bn.input[1:]]
    if any(p is None or p.ndim != 1 for p in params):
        return None
    gamma, beta, mean, var = (np.asarray(p, dtype=np.float64) for p in params)
    if len({gamma.size, beta.size, mean.size, var.size}) != 1:
        return None
    scale = gamma / np.sqrt(var + float(_attr(bn, "epsilon", 1e-5)))
    return _BatchNorm(scale=scale, shift=beta - mean * scale)


def _fold_conv(g: _Graph, conv: onnx.NodeProto, bn: _BatchNorm, weight: np.ndarray,
               tag: str) -> bool:
    """Conv weight [M, C/g, k...]: output channels are axis 0."""
    if weight.shape[0] != bn.scale.size:
        return False
    channel = (-1,) + (1,) * (weight.ndim - 1)
    new_weight = weight.astype(np.float64) * bn.scale.reshape(channel)
    return _write_weight_and_bias(g, conv, bn, weight, new_weight, 2, tag)


def _fold_conv_transpose(g: _Graph, node: onnx.NodeProto, bn: _BatchNorm, weight: np.ndarray,
                         tag: str) -> bool:
    """ConvTranspose weight [C, M/g, k...]: output channel ``gi*(M/g) + j`` is weight column
    ``j`` of the input channels in group ``gi``."""
    group = int(_attr(node, "group", 1))
    channels_in, per_group = weight.shape[0], weight.shape[1]
    if channels_in % group or per_group * group != bn.scale.size:
        return False
    kernel = weight.shape[2:]
    grouped = weight.astype(np.float64).reshape(group, channels_in // group, per_group, *kernel)
    scale = bn.scale.reshape(group, 1, per_group, *(1,) * len(kernel))
    new_weight = (grouped * scale).reshape(weight.shape)
    return _write_weight_and_bias(g, node, bn, weight, new_weight, 2, tag)


def _write_weight_and_bias(g: _Graph, node: onnx.NodeProto, bn: _BatchNorm,
                           weight: np.ndarray, new_weight: np.ndarray, bias_index: int,
                           tag: str) -> bool:
    bias_name = node.input[bias_index] if len(node.input) > bias_index else ""
    bias = g.constant(bias_name) if bias_name else np.zeros(bn.scale.size)
    if bias is None or bias.shape != (bn.scale.size,):
        return False
    new_bias = bias.astype(np.float64) * bn.scale + bn.shift
    g.set_constant(node, 1, new_weight.astype(weight.dtype), f"{tag}_weight")
    g.set_constant(node, bias_index, new_bias.astype(weight.dtype), f"{tag}_bias")
    return True


def _fold_gemm(g: _Graph, gemm: onnx.NodeProto, bn: _BatchNorm, weight: np.ndarray,
               tag: str) -> bool:
    """Y = alpha*A'B' + beta*C; BN scales Y's columns: scale B's output axis (1, or 0 when
    transB), and fold everything additive into a new C with beta = 1."""
    trans_b = int(_attr(gemm, "transB", 0))
    if weight.ndim != 2 or weight.shape[0 if trans_b else 1] != bn.scale.size:
        return False
    axis_scale = bn.scale[:, None] if trans_b else bn.scale[None, :]
    new_weight = weight.astype(np.float64) * axis_scale
    c_name = gemm.input[2] if len(gemm.input) > 2 else ""
    beta = float(_attr(gemm, "beta", 1.0))
    c_value = g.constant(c_name) if c_name else np.zeros(bn.scale.size)
    if c_value is None:
        return False
    new_c = (beta if c_name else 0.0) * c_value.astype(np.float64) * bn.scale + bn.shift
    g.set_constant(gemm, 1, new_weight.astype(weight.dtype), f"{tag}_weight")
    g.set_constant(gemm, 2, new_c.astype(weight.dtype), f"{tag}_bias")
    for attr in list(gemm.attribute):
        if attr.name == "beta":
            gemm.attribute.remove(attr)
    gemm.attribute.append(helper.make_attribute("beta", 1.0))
    return True


_FOLDERS = {"Conv": _fold_conv, "ConvTranspose": _fold_conv_transpose, "Gemm": _fold_gemm}


def _foldable_producer(g: _Graph, bn: onnx.NodeProto) -> onnx.NodeProto | None:
    """The Conv/ConvTranspose/Gemm whose only consumer is ``bn``, if there is one."""
    producer = g.producers.get(bn.input[0]) if bn.input else None
    if producer is None or producer.op_type not in _FOLDABLE:
        return None
    if producer.domain not in _DEFAULT_DOMAINS or len(producer.input) < 2:
        return None
    out = bn.input[0]
    if out in g.outputs or g.uses[out] != 1 or producer.output[0] != out:
        return None
    return producer


def _try_fold(g: _Graph, bn: onnx.NodeProto) -> onnx.NodeProto | None:
    """Fold ``bn`` into its producer in place; returns the producer when it was folded."""
    producer = _foldable_producer(g, bn)
    if producer is None:
        return None
    weight = g.constant(producer.input[1])
    params = _batchnorm_params(g, bn)
    if weight is None or params is None or weight.dtype not in _FLOAT_TYPES:
        return None
    tag = producer.name or bn.output[0]
    if not _FOLDERS[producer.op_type](g, producer, params, weight, tag):
        return None
    producer.output[0] = bn.output[0]
    return producer


def _drop_unused(model: onnx.ModelProto, g: _Graph, dead_values: set[str]) -> None:
    graph = model.graph
    kept = [init for init in graph.initializer
            if g.uses[init.name] > 0 or init.name in g.outputs or init.name in g.inputs]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    infos = [info for info in graph.value_info if info.name not in dead_values]
    del graph.value_info[:]
    graph.value_info.extend(infos)


def fold_batchnorm(model: onnx.ModelProto) -> tuple[onnx.ModelProto, PassReport]:
    """Fold every exactly-foldable BN of the main graph; the input model is not changed."""
    report = PassReport("fold_batchnorm")
    if not any(n.op_type == "BatchNormalization" for n in model.graph.node):
        return model, report
    out = copy_model(model)
    g = _Graph.of(out)
    removed: list[onnx.NodeProto] = []
    dead_values: set[str] = set()
    for bn in list(out.graph.node):
        if bn.op_type != "BatchNormalization" or bn.domain not in _DEFAULT_DOMAINS:
            continue
        old_value = bn.input[0]
        producer = _try_fold(g, bn)
        if producer is None:
            continue
        removed.append(bn)
        dead_values.add(old_value)
        for name in bn.input:
            g.uses[name] -= 1
        report.note(f"folded BatchNormalization '{bn.name or bn.output[0]}' into "
                    f"{producer.op_type} '{producer.name or producer.output[0]}'")
    if not removed:
        return model, report
    for bn in removed:
        out.graph.node.remove(bn)
    _drop_unused(out, g, dead_values)
    return out, report
