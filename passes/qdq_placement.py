"""Where Quantize/DequantizeLinear pairs go so that onnxruntime runs integer kernels.

onnxruntime fuses a node into an integer kernel when every float input arrives through a
DequantizeLinear and (for most ops) its only consumer is a QuantizeLinear; it drops Q/DQ
pairs around data-movement ops (MaxPool, Reshape, Transpose, ...) when both sides share one
scale and zero point; it removes a ReLU/Clip standing between an op and a Q whose zero point
is the grid minimum. This module decides, from the graph alone, which tensors get a Q/DQ pair
and whose parameters each one uses, following those rules:

* **compute** nodes (Conv, ConvTranspose, Gemm, MatMul, and Add/Mul/Concat/pooling between
  activations) get their float activation inputs quantized; their outputs get their own
  parameters so the output Q fuses. Gemm/MatMul outputs stay float where nothing downstream
  wants integers (onnxruntime then emits a float-output integer kernel, with no rounding);
* a ReLU/Clip(0, x) fed only by a compute node takes the output parameters instead (removed
  by onnxruntime, exact with an unsigned grid); with symmetric (signed) activations ReLU/Clip
  instead share their input's parameters, like data movement;
* **propagating** nodes (MaxPool, Reshape, Flatten, Transpose, ...) whose output is wanted
  quantized pull their input into the quantized domain and share its parameters;
* nothing on shape/integer tensors, inside If/Loop/Scan bodies, on RNNs, on decomposed
  normalization/GELU arithmetic, on excluded nodes, or on constants.

One tensor gets at most one Q/DQ pair, whatever its fan-out: every consumer reads the same
DequantizeLinear output.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import onnx

from hawq_onnx.graph import CONTROL_FLOW_OPS, FLOAT_TYPES, GraphView, QuantizableLayer
from hawq_onnx.topology import topological_order

WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
#: compute ops between activations that onnxruntime has integer kernels for.
ACTIVATION_COMPUTE_OPS = frozenset({"Add", "Mul", "Concat", "AveragePool",
                                    "GlobalAveragePool"})
#: ops onnxruntime runs on 8-bit data when Q/DQ with equal parameters surround them.
PROPAGATING_OPS = frozenset({"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze",
                             "Unsqueeze", "Identity", "Slice", "Gather", "Resize", "Split",
                             "DepthToSpace", "SpaceToDepth"})
#: activations folded into the preceding integer kernel when their output Q starts at 0.
REMOVABLE_ACTIVATIONS = frozenset({"Relu", "Clip"})
#: ops of normalization / softmax / GELU decompositions: Add/Mul next to them stay float.
ARITHMETIC_NEIGHBOURS = frozenset({
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceMax", "ReduceMin",
    "Sub", "Pow", "Sqrt", "Div", "Reciprocal", "Erf", "Tanh", "Exp", "Log", "Softmax",
    "LogSoftmax", "LayerNormalization", "InstanceNormalization", "GroupNormalization",
    "BatchNormalization", "Neg", "Abs", "Cast"})
_OUTPUT_FUSED_ONLY_WHEN_WANTED = frozenset({"Gemm", "MatMul"})


@dataclass(frozen=True)
class Exclusions:
    """``--exclude`` patterns: a node name, an op type, a weight name, or a regex matched
    against the whole node name."""

    patterns: tuple[str, ...] = ()

    def matches(self, name: str, node: onnx.NodeProto, weight: str | None = None) -> bool:
        for pattern in self.patterns:
            if pattern in (name, node.op_type) or (weight is not None and pattern == weight):
                return True
            try:
                if re.fullmatch(pattern, name):
                    return True
            except re.error:
                continue
        return False


@dataclass
class Placement:
    """The decisions: which tensors carry Q/DQ and where their parameters come from."""

    own: list[str] = field(default_factory=list)  # calibrated, own scale/zero point
    shared: dict[str, str] = field(default_factory=dict)  # tensor -> tensor it copies
    compute_nodes: list[str] = field(default_factory=list)  # nodes meant to run on integers
    layers: list[QuantizableLayer] = field(default_factory=list)  # weights to quantize
    float_nodes: dict[str, str] = field(default_factory=dict)  # node -> why it stays float

    def source(self, tensor: str) -> str | None:
        """The tensor whose parameters ``tensor`` uses (itself when it owns them)."""
        seen = set()
        while tensor in self.shared and tensor not in seen:
            seen.add(tensor)
            tensor = self.shared[tensor]
        return tensor if tensor in self.own else None

    def quantized_tensors(self) -> list[str]:
        return [*self.own, *self.shared]

    def weights(self) -> list[str]:
        return list(dict.fromkeys(layer.weight for layer in self.layers if layer.weight))


class _Analysis:
    """One placement computation over a :class:`GraphView`."""

    def __init__(self, view: GraphView, exclusions: Exclusions, asymmetric: bool,
                 quantize_weights_of: Iterable[str] | None = None) -> None:
        self.view = view
        self.exclusions = exclusions
        self.asymmetric = asymmetric
        self.shape_tensors = view.shape_tensors()
        self.order = topological_order(view.graph)
        self.names = {id(node): view.node_name(node) for node in view.graph.node}
        self.layers = {layer.node: layer for layer in view.quantizable_layers()}
        self.weight_filter = set(quantize_weights_of) if quantize_weights_of is not None \
            else None
        self.graph_outputs = {o.name for o in view.graph.output}
        self.placement = Placement()
        self.roles: dict[str, str] = {}

    # ------------------------------------------------------------------ predicates
    def name(self, node: onnx.NodeProto) -> str:
        return self.names[id(node)]

    def is_activation(self, tensor: str) -> bool:
        """A float tensor computed at run time (not a constant, not shape arithmetic)."""
        return bool(tensor) and not self.view.is_constant(tensor) \
            and tensor not in self.shape_tensors and self.view.elem_type(tensor) in FLOAT_TYPES

    def _arithmetic_neighbourhood(self, node: onnx.NodeProto) -> bool:
        """Add/Mul inside a decomposed normalization, softmax or GELU."""
        for tensor in node.input:
            producer = self.view.producer(tensor)
            if producer is not None and (producer.op_type in ARITHMETIC_NEIGHBOURS or (
                    producer.op_type in ("Add", "Mul")
                    and any(self.view.is_constant(t) for t in producer.input))):
                return True
        return any(c.op_type in ARITHMETIC_NEIGHBOURS
                   for out in node.output for c in self.view.consumers(out))

    def role(self, node: onnx.NodeProto) -> str:
        """compute | propagate | activation | float (with a reason recorded)."""
        name = self.name(node)
        layer = self.layers.get(name)
        reason = self._float_reason(name, node, layer)
        if reason:
            if node.op_type in WEIGHTED_OPS | ACTIVATION_COMPUTE_OPS | CONTROL_FLOW_OPS \
                    or layer is not None:
                self.placement.float_nodes[name] = reason
            return "float"
        if node.op_type in WEIGHTED_OPS:
            return "compute" if layer is not None else self._unclassified(name)
        if node.op_type in ("Add", "Mul"):
            if len(node.input) == 2 and all(self.is_activation(t) for t in node.input):
                if not self._arithmetic_neighbourhood(node):
                    return "compute"
                self.placement.float_nodes[name] = "normalization/GELU arithmetic"
            return "float"
        if node.op_type in ACTIVATION_COMPUTE_OPS:
            inputs = [t for t in node.input if t]
            if inputs and all(self.is_activation(t) for t in inputs):
                return "compute"
            return "float"
        if node.op_type in PROPAGATING_OPS and node.input and self.is_activation(node.input[0]):
            return "propagate"
        if node.op_type in REMOVABLE_ACTIVATIONS and not self.asymmetric and node.input \
                and self.is_activation(node.input[0]):
            return "propagate"  # a signed grid with zero point 0 holds ReLU/Clip's output
        if node.op_type in REMOVABLE_ACTIVATIONS and self._removable(node):
            return "activation"
        return "float"

    def _float_reason(self, name: str, node: onnx.NodeProto,
                      layer: QuantizableLayer | None) -> str | None:
        weight = layer.weight if layer is not None else None
        if self.exclusions.matches(name, node, weight):
            return "excluded"
        if node.domain not in ("", "ai.onnx"):
            return f"custom domain '{node.domain}'"
        if node.op_type in CONTROL_FLOW_OPS:
            return "control flow / recurrent"
        if self.view.is_shape_node(node):
            return "shape arithmetic"
        return None

    def _unclassified(self, name: str) -> str:
        self.placement.float_nodes[name] = "no constant weight or unknown types"
        return "float"

    def _removable(self, node: onnx.NodeProto) -> bool:
        """ReLU, or Clip with a lower bound of 0: absorbed by an unsigned output grid."""
        if not self.asymmetric or not node.input or not self.is_activation(node.input[0]):
            return False
        if node.op_type == "Relu":
            return True
        low = node.input[1] if len(node.input) > 1 else ""
        if not low:
            return any(a.name == "min" and a.f == 0.0 for a in node.attribute)
        value = self.view.initializers.get(low)
        if value is None:
            return False
        array = onnx.numpy_helper.to_array(value)
        return array.size == 1 and float(array.reshape(-1)[0]) == 0.0

    def activation_inputs(self, node: onnx.NodeProto) -> list[str]:
        """Inputs that carry activations into an integer kernel."""
        layer = self.layers.get(self.name(node))
        if layer is not None:
            return [t for t in layer.inputs if self.is_activation(t)]
        return [t for t in node.input if self.is_activation(t)]

    # ------------------------------------------------------------------ decision
    def run(self) -> Placement:
        roles = {self.name(n): self.role(n) for n in self.order}
        self.roles = roles
        wanted = self._wanted(roles)
        own: dict[str, None] = {}
        shared: dict[str, str] = {}
        for node in self.order:
            name, role = self.name(node), roles[self.name(node)]
            if role == "compute":
                self._place_compute(node, wanted, own)
            elif role == "activation" and self._fed_by_compute(node, roles):
                own.setdefault(node.output[0], None)
            elif role == "propagate":
                self._place_propagate(node, wanted, shared)
            layer = self.layers.get(name)
            if role == "compute":
                self.placement.compute_nodes.append(name)
            if layer is not None and layer.weight and self._quantize_weight(layer) and (
                    role == "compute" or (layer.kind == "embedding" and name not in
                                          self.placement.float_nodes)):
                self.placement.layers.append(layer)
        for tensor in wanted:
            if tensor not in shared:
                own.setdefault(tensor, None)
        self.placement.own = [t for t in own if t not in shared]
        self.placement.shared = shared
        return self.placement

    def _quantize_weight(self, layer: QuantizableLayer) -> bool:
        return self.weight_filter is None or layer.weight in self.weight_filter

    def _wanted(self, roles: dict[str, str]) -> dict[str, None]:
        """Tensors that must arrive quantized: compute inputs, pulled back through
        propagating nodes whose outputs are wanted."""
        wanted: dict[str, None] = {}
        for node in self.order:
            if roles[self.name(node)] == "compute":
                for tensor in self.activation_inputs(node):
                    wanted.setdefault(tensor, None)
        for node in reversed(self.order):
            if roles[self.name(node)] == "propagate" and any(o in wanted for o in node.output):
                wanted.setdefault(node.input[0], None)
        return wanted

    def _fed_by_compute(self, node: onnx.NodeProto, roles: dict[str, str]) -> bool:
        producer = self.view.producer(node.input[0])
        return producer is not None and roles.get(self.name(producer)) == "compute" \
            and self._only_consumer_is_activation(producer, roles)

    def _only_consumer_is_activation(self, node: onnx.NodeProto, roles: dict[str, str]
                                     ) -> bool:
        output = node.output[0]
        consumers = self.view.consumers(output)
        return len(consumers) == 1 and roles.get(self.name(consumers[0])) == "activation" \
            and output not in self.graph_outputs

    def _place_compute(self, node: onnx.NodeProto, wanted: dict[str, None],
                       own: dict[str, None]) -> None:
        output = node.output[0]
        if not self.is_activation(output):
            return
        if self._only_consumer_is_activation(node, self.roles):
            return  # the ReLU/Clip output carries the parameters
        if node.op_type in _OUTPUT_FUSED_ONLY_WHEN_WANTED and output not in wanted:
            return
        own.setdefault(output, None)

    def _place_propagate(self, node: onnx.NodeProto, wanted: dict[str, None],
                         shared: dict[str, str]) -> None:
        for output in node.output:
            if output in wanted and self.is_activation(output):
                shared[output] = node.input[0]


def analyze_placement(model: onnx.ModelProto, *, exclude: Sequence[str] = (),
                      asymmetric: bool = True, view: GraphView | None = None,
                      weights: Iterable[str] | None = None) -> Placement:
    """Decide Q/DQ placement for ``model`` (see the module docstring).

    ``asymmetric``: activations use an unsigned grid (ReLU/Clip can be absorbed).
    ``weights``: restrict weight quantization to these initializer names (None: all).
    """
    view = view or GraphView(model)
    return _Analysis(view, Exclusions(tuple(exclude)), asymmetric, weights).run()


__all__ = ["ACTIVATION_COMPUTE_OPS", "ARITHMETIC_NEIGHBOURS", "Exclusions", "PROPAGATING_OPS",
           "Placement", "REMOVABLE_ACTIVATIONS", "WEIGHTED_OPS", "analyze_placement"]
