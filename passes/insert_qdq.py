"""Insert QuantizeLinear/DequantizeLinear pairs and integer weights (QDQ format).

Given a :class:`~hawq_onnx.passes.qdq_placement.Placement`, a
:class:`~hawq_onnx.quant.plan.QuantPlan` and calibrated activation parameters, the pass

* replaces each planned weight initializer by an integer initializer of the smallest ONNX
  type that holds its width, plus a DequantizeLinear (per channel, per tensor or blocked)
  whose output carries the weight's old name, so no consumer changes;
* stores Conv/Gemm biases as int32 with scale ``s_x * s_w`` and zero point 0 when the
  layer's input and weight are quantized (weight scales are raised where a bias would
  otherwise overflow int32);
* gives every quantized activation one Q -> DQ pair right after its producer; the DQ output
  takes the tensor's name (the producer's output is renamed), so all consumers, including
  graph outputs and subgraphs reading it, see the same dequantized values.

Weights whose spec asks for error feedback (GPTQ: the default at <= 4 bits) and whose
layer's input second moments were supplied are re-rounded by
:func:`hawq_onnx.quant.gptq.refine_rounding` (same scales, different integers).

The input model is not modified. :attr:`InsertQDQ.record` describes what was done per weight
and per activation, for reports.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from hawq_onnx.graph import GraphView, QuantizableLayer
from hawq_onnx.model_io import copy_model, iter_graphs
from hawq_onnx.passes.base import PassReport
from hawq_onnx.passes.qdq_placement import Placement
from hawq_onnx.quant.activations import ActQParams
from hawq_onnx.quant.containers import (
    container_bits,
    container_type,
    int2_fuses_safely,
    make_float_tensor,
    make_int_tensor,
    required_opset,
)
from hawq_onnx.quant.gptq import refine_rounding
from hawq_onnx.quant.layout import weight_layout
from hawq_onnx.quant.plan import QuantPlan, WeightSpec
from hawq_onnx.quant.weights import (
    QuantizedWeight,
    WeightLayout,
    bias_min_weight_scale,
    quantize_bias,
    quantize_weight,
)
from hawq_onnx.topology import subgraph_outer_inputs

_BIAS_OPS = frozenset({"Conv", "Gemm"})


@dataclass
class WeightRecord:
    """What happened to one weight initializer."""

    name: str
    layers: list[str]
    op: str
    params: int
    bits: int
    container_bits: int
    granularity: str
    axis: int | None
    group_size: int | None
    bytes_float: int
    bytes_quant: int
    rounding: str = "nearest"  # or error_feedback (GPTQ through the input moments)


@dataclass
class QDQRecord:
    """Per-weight and per-activation results of one insertion."""

    weights: dict[str, WeightRecord] = field(default_factory=dict)
    activations: dict[str, ActQParams] = field(default_factory=dict)
    biases: dict[str, str] = field(default_factory=dict)  # node -> int32 | float (why)
    skipped_weights: dict[str, str] = field(default_factory=dict)
    error_feedback: set[str] = field(default_factory=set)  # weights GPTQ re-rounded
    opset_needed: int = 13


class _Names:
    """Fresh tensor/node names that collide with nothing in the model."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.taken: set[str] = set()
        for graph in iter_graphs(model):
            self.taken.update(t.name for t in graph.initializer)
            self.taken.update(v.name for v in (*graph.input, *graph.output, *graph.value_info))
            for node in graph.node:
                self.taken.update(node.input)
                self.taken.update(node.output)
                self.taken.add(node.name)

    def fresh(self, base: str) -> str:
        name, index = base, 1
        while name in self.taken:
            name, index = f"{base}_{index}", index + 1
        self.taken.add(name)
        return name


def _float_array(tensor: TensorProto) -> np.ndarray:
    return numpy_helper.to_array(tensor).astype(np.float32)


def _layout_for(layers: list[QuantizableLayer], view: GraphView, rank: int) -> WeightLayout:
    """The layers' common layout; per-tensor when layers disagree on the axes."""
    layouts = {weight_layout(layer, view.node(layer.node), rank) for layer in layers}
    if len(layouts) == 1:
        return layouts.pop()
    return WeightLayout()


class InsertQDQ:
    """The pass: ``model -> (model, PassReport)``; see the module docstring."""

    def __init__(self, placement: Placement, plan: QuantPlan,
                 act_params: Mapping[str, ActQParams], *, max_opset: int,
                 input_grams: Mapping[str, np.ndarray] | None = None,
                 refined: dict[tuple[str, WeightSpec, bytes], QuantizedWeight | None]
                 | None = None
                 ) -> None:
        self.placement = placement
        self.plan = plan
        self.act_params = dict(act_params)
        self.max_opset = max_opset
        self.input_grams = dict(input_grams or {})
        #: error-feedback results by (weight, spec, scales): the weights do not change
        #: between the many builds of bias correction and mixed-precision search.
        self.refined = refined if refined is not None else {}
        self.record = QDQRecord()

    # ------------------------------------------------------------------ entry
    def __call__(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, PassReport]:
        report = PassReport("insert_qdq")
        out = copy_model(model)
        view = GraphView(out)
        names = _Names(out)
        self.record = QDQRecord()
        params = self._resolve_activations(view, report)
        head: list[onnx.NodeProto] = []
        after: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        quantized = self._quantize_weights(out, view, names, params, head, report)
        self._quantize_biases(out, view, names, params, quantized, head, report)
        self._quantize_activations(out, view, names, params, head, after, report)
        self._name_nodes(view)
        self._rebuild(out, view, head, after)
        self._drop_unused_initializers(out)
        return out, report

    # ------------------------------------------------------------------ activations
    def _resolve_activations(self, view: GraphView, report: PassReport
                             ) -> dict[str, ActQParams]:
        """Parameters per quantized tensor (shared tensors copy their source's)."""
        params: dict[str, ActQParams] = {}
        for tensor in self.placement.quantized_tensors():
            source = self.placement.source(tensor)
            if source is None or source not in self.act_params:
                continue
            if view.elem_type(tensor) != TensorProto.FLOAT:
                report.details.append(f"activation {tensor}: not float32, left float")
                continue
            params[tensor] = self.act_params[source]
        return params

    def _quantize_activations(self, model: onnx.ModelProto, view: GraphView, names: _Names,
                              params: dict[str, ActQParams], head: list[onnx.NodeProto],
                              after: dict[str, list[onnx.NodeProto]],
                              report: PassReport) -> None:
        constants: dict[str, tuple[str, str]] = {}
        graph_inputs = {v.name for v in model.graph.input}
        for tensor, qp in params.items():
            source = self.placement.source(tensor) or tensor
            if source not in constants:
                constants[source] = self._act_constants(model, names, source, qp)
            scale, zero_point = constants[source]
            quantized = names.fresh(f"{tensor}_quantized")
            if tensor in graph_inputs:
                dequantized = names.fresh(f"{tensor}_dequantized")
                self._rewire(model, tensor, dequantized)
                q_input, target = tensor, head
            else:
                producer = view.producer(tensor)
                if producer is None:
                    continue
                q_input = names.fresh(f"{tensor}_float")
                producer.output[list(producer.output).index(tensor)] = q_input
                dequantized = tensor
                target = after[view.node_name(producer)]
            target.append(helper.make_node("QuantizeLinear", [q_input, scale, zero_point],
                                           [quantized], name=names.fresh(f"{tensor}_Q")))
            target.append(helper.make_node("DequantizeLinear", [quantized, scale, zero_point],
                                           [dequantized], name=names.fresh(f"{tensor}_DQ")))
            self.record.activations[tensor] = qp
            report.changed += 1
            if qp.bits > 8:
                self.record.opset_needed = max(self.record.opset_needed, 21)

    def _act_constants(self, model: onnx.ModelProto, names: _Names, source: str,
                       qp: ActQParams) -> tuple[str, str]:
        scale = names.fresh(f"{source}_scale")
        zero_point = names.fresh(f"{source}_zero_point")
        elem = container_type(qp.bits, qp.signed)
        model.graph.initializer.extend([
            make_float_tensor(scale, np.asarray(qp.scale, dtype=np.float32)),
            make_int_tensor(zero_point, np.asarray(qp.zero_point, dtype=np.int64), elem),
        ])
        return scale, zero_point

    @staticmethod
    def _rewire(model: onnx.ModelProto, old: str, new: str) -> None:
        """Main-graph nodes reading ``old`` read ``new`` instead."""
        for node in model.graph.node:
            for index, name in enumerate(node.input):
                if name == old:
                    node.input[index] = new

    # ------------------------------------------------------------------ weights
    def _weight_layers(self) -> dict[str, list[QuantizableLayer]]:
        layers: dict[str, list[QuantizableLayer]] = defaultdict(list)
        for layer in self.placement.layers:
            if layer.weight is not None and layer.weight in self.plan.weights:
                layers[layer.weight].append(layer)
        return layers

    def _bias_floor(self, view: GraphView, layers: list[QuantizableLayer], layout: WeightLayout,
                    params: Mapping[str, ActQParams], channels: int) -> np.ndarray | None:
        """The smallest weight scale per channel that keeps every user's bias in int32."""
        floor: np.ndarray | None = None
        for layer in layers:
            bias = self._bias_array(view, layer, layout, channels)
            qp = params.get(layer.inputs[0]) if layer.inputs else None
            if bias is None or qp is None:
                continue
            need = bias_min_weight_scale(bias, qp.scale)
            floor = need if floor is None else np.maximum(floor, need)
        return floor

    @staticmethod
    def _bias_array(view: GraphView, layer: QuantizableLayer, layout: WeightLayout,
                    channels: int) -> np.ndarray | None:
        node = view.node(layer.node)
        if layer.op not in _BIAS_OPS or len(node.input) < 3 or not node.input[2]:
            return None
        if not layout.channel_axes or layer.weight not in node.input:
            return None
        if any(a.name == "beta" and a.f != 1.0 for a in node.attribute):
            return None
        tensor = view.initializers.get(node.input[2])
        if tensor is None or tensor.data_type != TensorProto.FLOAT:
            return None
        array = _float_array(tensor)
        if array.ndim != 1 or array.shape[0] != channels:
            return None
        return array

    def _quantize_weights(self, model: onnx.ModelProto, view: GraphView, names: _Names,
                          params: Mapping[str, ActQParams], head: list[onnx.NodeProto],
                          report: PassReport) -> dict[str, QuantizedWeight]:
        done: dict[str, QuantizedWeight] = {}
        inits = {t.name: t for t in model.graph.initializer}
        captured = _subgraph_captures(model)  # once: per weight it made big graphs quadratic
        replaced: set[str] = set()
        for weight, layers in self._weight_layers().items():
            tensor = inits.get(weight)
            spec = self.plan.weights[weight]
            if tensor is None or tensor.data_type != TensorProto.FLOAT:
                why = "not a float32 initializer"
                self.record.skipped_weights[weight] = why
                report.details.append(f"weight {weight}: {why}, left float")
                continue
            array = _float_array(tensor)
            qw = self.quantize_array(view, layers, array, spec, params)
            width = self._container(spec.bits, layers, params, report)
            if self._emit_weight(model, view, names, weight, qw, width, head, captured):
                replaced.add(weight)
            done[weight] = qw
            self._record_weight(weight, layers, array, qw, width)
            report.changed += 1
        _remove_initializers(model, replaced)
        return done

    def quantize_array(self, view: GraphView, layers: list[QuantizableLayer], array: np.ndarray,
                       spec: WeightSpec, params: Mapping[str, ActQParams]) -> QuantizedWeight:
        """One weight as the exported model stores it: the layers' common layout, scales
        raised where a bias would overflow int32 (the ``Q_b`` of sensitivity tables)."""
        layout = _layout_for(layers, view, array.ndim)
        channels = array.shape[layout.channel_axes[0]] if layout.channel_axes else 0
        floor = self._bias_floor(view, layers, WeightLayout(layout.channel_axes[:1]), params,
                                 channels) if channels else None
        quantized = quantize_weight(array, spec, layout, floor)
        gram = self.input_grams.get(layers[0].weight or "") if spec.error_feedback else None
        out_axis = layers[0].weight_axis_out
        if gram is None or out_axis is None or len(layers) != 1:
            return quantized
        key = (layers[0].weight or "", spec, np.asarray(quantized.scale).tobytes())
        if key not in self.refined:
            refined = refine_rounding(array, quantized, out_axis, gram)
            self.refined[key] = refined if refined is not quantized else None
        if self.refined[key] is None:  # error feedback did not help this weight
            return quantized
        self.record.error_feedback.add(layers[0].weight or "")
        return self.refined[key]

    def _container(self, bits: int, layers: list[QuantizableLayer],
                   params: Mapping[str, ActQParams], report: PassReport) -> int:
        """Storage width; int2 moves to int4 where onnxruntime would mis-fuse it."""
        width = container_bits(bits, self.max_opset)
        fused = any(layer.kind != "embedding" and any(t in params for t in layer.inputs)
                    for layer in layers)
        if width == 2 and fused and not int2_fuses_safely():
            report.details.append(
                f"weight {layers[0].weight}: 2-bit values stored as int4 (this onnxruntime "
                "cannot load int2 weights next to quantized activations)")
            return container_bits(4, self.max_opset)
        return width

    def _emit_weight(self, model: onnx.ModelProto, view: GraphView, names: _Names, weight: str,
                     qw: QuantizedWeight, width: int, head: list[onnx.NodeProto],
                     captured: set[str]) -> bool:
        """Add the weight's integer tensors and DQ node; True when the DQ output takes the
        float initializer's name (the caller removes those initializers in one pass)."""
        elem = container_type(width, True)
        self.record.opset_needed = max(self.record.opset_needed, required_opset(width),
                                       21 if qw.block_size else 13)
        q_name = names.fresh(f"{weight}_quantized")
        scale_name = names.fresh(f"{weight}_scale")
        zp_name = names.fresh(f"{weight}_zero_point")
        model.graph.initializer.extend([
            make_int_tensor(q_name, qw.values, elem),
            make_float_tensor(scale_name, qw.scale),
            make_int_tensor(zp_name, np.zeros(np.shape(qw.scale), dtype=np.int64), elem),
        ])
        attrs: dict[str, int] = {}
        if qw.axis is not None:
            attrs["axis"] = qw.axis
        if qw.block_size is not None:
            attrs["block_size"] = qw.block_size
        output = self._weight_output(model, view, names, weight, captured)
        head.append(helper.make_node("DequantizeLinear", [q_name, scale_name, zp_name],
                                     [output], name=names.fresh(f"{weight}_DQ"), **attrs))
        return output == weight  # the DQ now produces that name: the float tensor must go

    def _weight_output(self, model: onnx.ModelProto, view: GraphView, names: _Names,
                       weight: str, captured: set[str]) -> str:
        """The DQ output name: the weight's own name when every reader may see the
        quantized values, else a new name wired only into the readers that may."""
        floats = set(self.placement.float_nodes)
        readers = [view.node_name(n) for n in view.consumers(weight)]
        if not any(r in floats for r in readers) and weight not in captured:
            return weight
        output = names.fresh(f"{weight}_dequantized")
        for node in model.graph.node:
            if view.node_name(node) in floats:
                continue
            for index, name in enumerate(node.input):
                if name == weight:
                    node.input[index] = output
        return output

    def _record_weight(self, weight: str, layers: list[QuantizableLayer], array: np.ndarray,
                       qw: QuantizedWeight, width: int) -> None:
        scale_count = int(np.size(qw.scale))
        self.record.weights[weight] = WeightRecord(
            name=weight, layers=[layer.node for layer in layers], op=layers[0].op,
            params=int(array.size), bits=qw.bits, container_bits=width,
            granularity=qw.granularity, axis=qw.axis, group_size=qw.block_size,
            bytes_float=int(array.size) * 4,
            rounding="error_feedback" if weight in self.record.error_feedback else "nearest",
            bytes_quant=-(-int(array.size) * width // 8) + scale_count * 4
            + -(-scale_count * width // 8))

    # ------------------------------------------------------------------ biases
    def _quantize_biases(self, model: onnx.ModelProto, view: GraphView, names: _Names,
                         params: Mapping[str, ActQParams], weights: Mapping[str, QuantizedWeight],
                         head: list[onnx.NodeProto], report: PassReport) -> None:
        for layer in self.placement.layers:
            node = view.node(layer.node)
            if layer.op not in _BIAS_OPS or len(node.input) < 3 or not node.input[2]:
                continue
            reason = self._bias_refusal(view, layer, params, weights)
            if reason:
                self.record.biases[layer.node] = f"float ({reason})"
                continue
            qw = weights[layer.weight or ""]
            qp = params[layer.inputs[0]]
            bias = _float_array(view.initializers[node.input[2]])
            values, scale = quantize_bias(bias, qp.scale, qw.channel_scale())
            base = node.input[2]
            q_name, s_name = names.fresh(f"{base}_quantized"), names.fresh(f"{base}_scale")
            out = names.fresh(f"{base}_dequantized")
            model.graph.initializer.extend([
                make_int_tensor(q_name, values, TensorProto.INT32),
                make_float_tensor(s_name, scale),
            ])
            head.append(helper.make_node("DequantizeLinear", [q_name, s_name], [out],
                                         name=names.fresh(f"{base}_DQ"), axis=0))
            node.input[2] = out
            self.record.biases[layer.node] = "int32"
            report.changed += 1

    def _bias_refusal(self, view: GraphView, layer: QuantizableLayer,
                      params: Mapping[str, ActQParams],
                      weights: Mapping[str, QuantizedWeight]) -> str | None:
        qw = weights.get(layer.weight or "")
        if qw is None:
            return "weight not quantized"
        if qw.block_size is not None:
            return "group-wise weight scales"
        if not layer.inputs or layer.inputs[0] not in params:
            return "input activation not quantized"
        node = view.node(layer.node)
        if layer.weight not in node.input:
            return "weight reaches the node through other ops"
        channels = qw.values.shape[qw.axis] if qw.axis is not None else None
        if channels is None:
            layout = weight_layout(layer, node, qw.values.ndim)
            channels = qw.values.shape[layout.channel_axes[0]] if layout.channel_axes else -1
        tensor = view.initializers.get(node.input[2])
        if tensor is None:
            return "bias is not an initializer"
        if tensor.data_type != TensorProto.FLOAT:
            return "bias is not float32"
        if any(a.name == "beta" and a.f != 1.0 for a in node.attribute):
            return "Gemm beta != 1"
        if tuple(tensor.dims) != (channels,):
            return "bias is not one value per output channel"
        if qw.axis is not None and layer.weight_axis_out is not None \
                and qw.axis != _expected_axis(layer):
            return "weight scales are not per output channel"
        if qw.axis is None and np.size(qw.scale) != 1:
            return "weight scale layout"
        return None

    # ------------------------------------------------------------------ graph assembly
    @staticmethod
    def _name_nodes(view: GraphView) -> None:
        """Give every original node the unique name reports use for it (exporters leave
        names empty or repeat them)."""
        for name, node in view.nodes():
            node.name = name

    @staticmethod
    def _rebuild(model: onnx.ModelProto, view: GraphView, head: list[onnx.NodeProto],
                 after: Mapping[str, list[onnx.NodeProto]]) -> None:
        nodes = list(head)
        for node in model.graph.node:
            nodes.append(node)
            nodes.extend(after.get(view.node_name(node), []))
        del model.graph.node[:]
        model.graph.node.extend(nodes)

    @staticmethod
    def _drop_unused_initializers(model: onnx.ModelProto) -> None:
        used: set[str] = {o.name for o in model.graph.output}
        for node in model.graph.node:
            used.update(node.input)
            used.update(subgraph_outer_inputs(node))
        kept = [t for t in model.graph.initializer if t.name in used]
        if len(kept) == len(model.graph.initializer):
            return
        removed = {t.name for t in model.graph.initializer} - {t.name for t in kept}
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
        inputs = [v for v in model.graph.input if v.name not in removed]
        del model.graph.input[:]
        model.graph.input.extend(inputs)


def _expected_axis(layer: QuantizableLayer) -> int:
    """The weight's output-channel axis for a bias-carrying layer (Conv 0, Gemm by transB)."""
    return layer.weight_axis_out if layer.weight_axis_out is not None else 0


def _remove_initializers(model: onnx.ModelProto, names: set[str]) -> None:
    """Drop these initializers (and graph inputs of the same names) in one pass."""
    if not names:
        return
    kept = [t for t in model.graph.initializer if t.name not in names]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    inputs = [v for v in model.graph.input if v.name not in names]
    del model.graph.input[:]
    model.graph.input.extend(inputs)


def _subgraph_captures(model: onnx.ModelProto) -> set[str]:
    """Every outer-scope name the main graph's If/Loop/Scan bodies read."""
    return {name for node in model.graph.node for name in subgraph_outer_inputs(node)}


def weights_in(placement: Placement, plan: QuantPlan) -> Iterable[str]:
    """Weights the pass will quantize (planned and used by a placed layer)."""
    return [w for w in placement.weights() if w in plan.weights]


__all__ = ["InsertQDQ", "QDQRecord", "WeightRecord", "weights_in"]
