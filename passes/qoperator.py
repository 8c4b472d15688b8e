"""Rewrite an 8-bit QDQ model into the QOperator format (QLinearConv, QLinearMatMul, QGemm...).

Some runtimes and converters only understand explicit quantized operators, not QDQ groups.
Every group ``DQ(x), DQ(w)[, DQ(b)] -> op [-> Relu/Clip] -> Q`` with 8-bit tensors becomes
one quantized operator reading and writing the integer tensors directly; data-movement ops
between a DQ and a Q of equal parameters (MaxPool, Reshape, Transpose, ...) run on the
integer tensor. The arithmetic is the one onnxruntime uses for the QDQ model, so both
formats give the same outputs. Groups that are not 8-bit (int4/int2/int16 weights, 16-bit
activations) or have no quantized counterpart stay in QDQ form, so the result is always a
valid, runnable model; the report says what was converted.

Ops of the ``com.microsoft`` domain (QGemm, MatMulIntegerToFloat, QLinearAdd, QLinearMul,
QLinearConcat, QLinearGlobalAveragePool) run on onnxruntime; the others are standard ONNX.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from hawq_onnx.model_io import copy_model
from hawq_onnx.passes.base import PassReport
from hawq_onnx.topology import subgraph_outer_inputs

MS_DOMAIN = "com.microsoft"
_EIGHT_BIT = frozenset({TensorProto.INT8, TensorProto.UINT8})
_MOVEMENT = frozenset({"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze",
                       "Identity", "Slice", "Gather", "DepthToSpace", "SpaceToDepth"})
_BINARY = {"Add": "QLinearAdd", "Mul": "QLinearMul"}


@dataclass(frozen=True)
class _Quantized:
    """An integer tensor with the scale/zero-point names that describe it."""

    values: str
    scale: str
    zero_point: str
    elem_type: int


class _Graph:
    """Producer/consumer index over the main graph, kept current while rewriting."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        self.outputs = {o.name for o in self.graph.output}
        self.removed: set[int] = set()
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.graph.node:
            for out in node.output:
                self.producer[out] = node
            for name in [*node.input, *sorted(subgraph_outer_inputs(node))]:
                if name:
                    self.consumers[name].append(node)

    def live_consumers(self, tensor: str) -> list[onnx.NodeProto]:
        return [n for n in self.consumers.get(tensor, []) if id(n) not in self.removed]

    def constant(self, name: str) -> np.ndarray | None:
        tensor = self.inits.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def dequantized(self, tensor: str) -> _Quantized | None:
        """The 8-bit tensor behind ``tensor`` when a DequantizeLinear produces it."""
        node = self.producer.get(tensor)
        if node is None or node.op_type != "DequantizeLinear" or id(node) in self.removed:
            return None
        if len(node.input) < 3 or not node.input[2]:
            return self._int32_bias(node)
        zero_point = self.inits.get(node.input[2])
        if zero_point is None or zero_point.data_type not in _EIGHT_BIT:
            return None
        return _Quantized(node.input[0], node.input[1], node.input[2], zero_point.data_type)

    def _int32_bias(self, node: onnx.NodeProto) -> _Quantized | None:
        values = self.inits.get(node.input[0])
        if values is None or values.data_type != TensorProto.INT32:
            return None
        return _Quantized(node.input[0], node.input[1], "", TensorProto.INT32)

    def requantized(self, tensor: str) -> tuple[onnx.NodeProto, _Quantized] | None:
        """The QuantizeLinear that is ``tensor``'s only reader (8-bit)."""
        if tensor in self.outputs:
            return None
        readers = self.live_consumers(tensor)
        if len(readers) != 1 or readers[0].op_type != "QuantizeLinear":
            return None
        node = readers[0]
        if len(node.input) < 3 or node.input[0] != tensor:
            return None
        zero_point = self.inits.get(node.input[2])
        if zero_point is None or zero_point.data_type not in _EIGHT_BIT:
            return None
        return node, _Quantized(node.output[0], node.input[1], node.input[2],
                                zero_point.data_type)

    def same_params(self, a: _Quantized, b: _Quantized) -> bool:
        if (a.scale, a.zero_point) == (b.scale, b.zero_point):
            return True
        values = [self.constant(n) for n in (a.scale, a.zero_point, b.scale, b.zero_point)]
        if any(v is None for v in values):
            return False
        return bool(np.array_equal(values[0], values[2]) and np.array_equal(values[1], values[3])
                    and a.elem_type == b.elem_type)


def _qmin(elem_type: int) -> int:
    return -128 if elem_type == TensorProto.INT8 else 0


def _absorbed_activation(g: _Graph, tensor: str) -> tuple[list[onnx.NodeProto], str] | None:
    """A ReLU/Clip between an op and its Q that the Q's grid makes redundant:
    ``([the activation], its output)``, or ``([], tensor)`` when there is none."""
    if g.requantized(tensor) is not None:
        return [], tensor
    readers = g.live_consumers(tensor)
    if tensor in g.outputs or len(readers) != 1 or readers[0].op_type not in ("Relu", "Clip"):
        return None
    act = readers[0]
    found = g.requantized(act.output[0])
    if found is None:
        return None
    _, q = found
    zero_point = g.constant(q.zero_point)
    scale = g.constant(q.scale)
    if zero_point is None or scale is None or int(zero_point.reshape(-1)[0]) != _qmin(q.elem_type):
        return None
    if act.op_type == "Clip":
        low = g.constant(act.input[1]) if len(act.input) > 1 and act.input[1] else None
        high = g.constant(act.input[2]) if len(act.input) > 2 and act.input[2] else None
        top = (255 if q.elem_type == TensorProto.UINT8 else 127) - int(zero_point.reshape(-1)[0])
        if low is None or float(low) != 0.0:
            return None
        if high is not None and float(high) < top * float(scale.reshape(-1)[0]):
            return None
    return [act], act.output[0]


class _Converter:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.g = _Graph(model)
        self.replacements: dict[int, onnx.NodeProto] = {}
        self.counts: Counter[str] = Counter()
        self.kept: Counter[str] = Counter()

    def _finish(self, node: onnx.NodeProto, new: onnx.NodeProto,
                absorbed: list[onnx.NodeProto], q_node: onnx.NodeProto | None) -> None:
        self.replacements[id(node)] = new
        for dead in [*absorbed, *([q_node] if q_node is not None else [])]:
            self.g.removed.add(id(dead))
        if new.output:
            self.g.producer[new.output[0]] = new
        for name in new.input:
            if name:
                self.g.consumers[name].append(new)
        self.counts[new.op_type] += 1

    def _output(self, node: onnx.NodeProto) -> tuple[list[onnx.NodeProto], onnx.NodeProto,
                                                      _Quantized] | None:
        found = _absorbed_activation(self.g, node.output[0])
        if found is None:
            return None
        absorbed, tensor = found
        requant = self.g.requantized(tensor)
        if requant is None:
            return None
        q_node, q = requant
        return absorbed, q_node, q

    def convert(self, node: onnx.NodeProto) -> None:
        op = node.op_type
        handler = {"Conv": self._conv, "MatMul": self._matmul, "Gemm": self._gemm,
                   "GlobalAveragePool": self._pool, "Concat": self._concat}.get(op)
        if op in _BINARY:
            handler = self._binary
        elif op in _MOVEMENT:
            handler = self._movement
        if handler is None:
            return
        if not handler(node) and op in {"Conv", "MatMul", "Gemm"}:
            self.kept[op] += 1

    def _conv(self, node: onnx.NodeProto) -> bool:
        x, w = self.g.dequantized(node.input[0]), self.g.dequantized(node.input[1])
        bias = self.g.dequantized(node.input[2]) if len(node.input) > 2 and node.input[2] \
            else None
        out = self._output(node)
        if x is None or w is None or out is None or w.elem_type != TensorProto.INT8 or (
                len(node.input) > 2 and node.input[2] and bias is None):
            return False
        absorbed, q_node, y = out
        inputs = [x.values, x.scale, x.zero_point, w.values, w.scale, w.zero_point,
                  y.scale, y.zero_point] + ([bias.values] if bias is not None else [])
        new = helper.make_node("QLinearConv", inputs, [y.values], name=node.name)
        new.attribute.extend(node.attribute)
        self._finish(node, new, absorbed, q_node)
        return True

    def _matmul(self, node: onnx.NodeProto) -> bool:
        a, b = self.g.dequantized(node.input[0]), self.g.dequantized(node.input[1])
        if a is None or b is None or not self._per_column(b):
            return False
        out = self._output(node)
        if out is None:  # float output: the integer product, scaled (no requantization)
            new = helper.make_node("MatMulIntegerToFloat",
                                   [a.values, b.values, a.scale, b.scale, a.zero_point,
                                    b.zero_point], [node.output[0]], name=node.name,
                                   domain=MS_DOMAIN)
            self._finish(node, new, [], None)
            return True
        absorbed, q_node, y = out
        new = helper.make_node("QLinearMatMul", [a.values, a.scale, a.zero_point, b.values,
                                                 b.scale, b.zero_point, y.scale, y.zero_point],
                               [y.values], name=node.name)
        self._finish(node, new, absorbed, q_node)
        return True

    def _per_column(self, b: _Quantized) -> bool:
        """QLinearMatMul takes a per-tensor or per-column (last axis of a 2-D b) scale."""
        scale = self.g.constant(b.scale)
        values = self.g.inits.get(b.values)
        if scale is None:
            return False
        if scale.size == 1:
            return True
        return values is not None and len(values.dims) == 2 and scale.ndim == 1 \
            and scale.size == values.dims[1]

    def _gemm(self, node: onnx.NodeProto) -> bool:
        a, b = self.g.dequantized(node.input[0]), self.g.dequantized(node.input[1])
        has_c = len(node.input) > 2 and bool(node.input[2])
        c = self.g.dequantized(node.input[2]) if has_c else None
        if a is None or b is None or b.elem_type != TensorProto.INT8 or (has_c and c is None):
            return False
        if any(attr.name == "beta" and attr.f != 1.0 for attr in node.attribute):
            return False
        out = self._output(node)
        inputs = [a.values, a.scale, a.zero_point, b.values, b.scale, b.zero_point,
                  c.values if c is not None else ""]
        attrs = [attr for attr in node.attribute if attr.name in ("alpha", "transA", "transB")]
        if out is not None:
            absorbed, q_node, y = out
            new = helper.make_node("QGemm", [*inputs, y.scale, y.zero_point], [y.values],
                                   name=node.name, domain=MS_DOMAIN)
        else:  # float output: no requantization, exactly what onnxruntime fuses to
            absorbed, q_node = [], None
            new = helper.make_node("QGemm", inputs, [node.output[0]], name=node.name,
                                   domain=MS_DOMAIN)
        new.attribute.extend(attrs)
        self._finish(node, new, absorbed, q_node)
        return True

    def _binary(self, node: onnx.NodeProto) -> bool:
        a, b = self.g.dequantized(node.input[0]), self.g.dequantized(node.input[1])
        out = self._output(node)
        if a is None or b is None or out is None or a.elem_type != b.elem_type:
            return False
        absorbed, q_node, y = out
        new = helper.make_node(_BINARY[node.op_type],
                               [a.values, a.scale, a.zero_point, b.values, b.scale,
                                b.zero_point, y.scale, y.zero_point], [y.values],
                               name=node.name, domain=MS_DOMAIN)
        self._finish(node, new, absorbed, q_node)
        return True

    def _pool(self, node: onnx.NodeProto) -> bool:
        x = self.g.dequantized(node.input[0])
        out = self._output(node)
        if x is None or out is None or out[0]:
            return False
        _, q_node, y = out
        new = helper.make_node("QLinearGlobalAveragePool",
                               [x.values, x.scale, x.zero_point, y.scale, y.zero_point],
                               [y.values], name=node.name, domain=MS_DOMAIN, channels_last=0)
        self._finish(node, new, [], q_node)
        return True

    def _concat(self, node: onnx.NodeProto) -> bool:
        parts = [self.g.dequantized(t) for t in node.input]
        out = self._output(node)
        if out is None or out[0] or any(p is None for p in parts):
            return False
        _, q_node, y = out
        inputs = [y.scale, y.zero_point]
        for part in parts:
            assert part is not None
            inputs += [part.values, part.scale, part.zero_point]
        new = helper.make_node("QLinearConcat", inputs, [y.values], name=node.name,
                               domain=MS_DOMAIN)
        new.attribute.extend(node.attribute)
        self._finish(node, new, [], q_node)
        return True

    def _movement(self, node: onnx.NodeProto) -> bool:
        """DQ -> op -> Q with one grid: the op runs on the integers themselves."""
        if len(node.output) != 1 or not node.input:
            return False
        x = self.g.dequantized(node.input[0])
        requant = self.g.requantized(node.output[0])
        if x is None or requant is None or not self.g.same_params(x, requant[1]):
            return False
        q_node, y = requant
        new = onnx.NodeProto()
        new.CopyFrom(node)
        new.input[0] = x.values
        new.output[0] = y.values
        self._finish(node, new, [], q_node)
        return True


def _eliminate_dead(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """Drop nodes (only Q/DQ, which have no side effects) whose outputs nobody reads."""
    needed = {o.name for o in model.graph.output}
    kept: list[onnx.NodeProto] = []
    for node in reversed(nodes):
        removable = node.op_type in ("QuantizeLinear", "DequantizeLinear")
        if removable and not any(o in needed for o in node.output):
            continue
        kept.append(node)
        needed.update(n for n in node.input if n)
        needed.update(subgraph_outer_inputs(node))
    return list(reversed(kept))


def to_qoperator(model: onnx.ModelProto) -> tuple[onnx.ModelProto, PassReport]:
    """The pass: ``model -> (model, PassReport)``; see the module docstring."""
    report = PassReport("to_qoperator")
    out = copy_model(model)
    converter = _Converter(out)
    for node in list(out.graph.node):
        if id(node) not in converter.g.removed:
            converter.convert(node)
    nodes = [converter.replacements.get(id(n), n) for n in out.graph.node
             if id(n) not in converter.g.removed]
    nodes = _eliminate_dead(out, nodes)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    _drop_unused(out)
    if any(n.domain == MS_DOMAIN for n in nodes) and not any(
            o.domain == MS_DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    for op, count in sorted(converter.counts.items()):
        report.changed += count
        report.details.append(f"{op} x{count}")
    for op, count in sorted(converter.kept.items()):
        report.details.append(f"{op} x{count} kept in QDQ form (not an 8-bit group)")
    return out, report


def _drop_unused(model: onnx.ModelProto) -> None:
    """Initializers and value infos that no node or output refers to any more."""
    used = {o.name for o in model.graph.output}
    produced: set[str] = set()
    for node in model.graph.node:
        used.update(node.input)
        used.update(subgraph_outer_inputs(node))
        produced.update(node.output)
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    infos = [v for v in model.graph.value_info if v.name in produced]
    del model.graph.value_info[:]
    model.graph.value_info.extend(infos)


__all__ = ["to_qoperator"]
