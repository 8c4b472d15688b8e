"""A read-only view of an ONNX graph: who produces and consumes what, and which nodes matter.

Why: every later stage (sensitivity analysis, bit allocation, QDQ insertion) asks the same
questions of a model: which nodes carry quantizable weights and how expensive they are, which
tensors belong to shape arithmetic (never quantized, never differentiated), and where control
flow sits. Answering them once, from the graph plus ONNX shape inference, keeps those stages
small.

The graph is a :class:`networkx.MultiDiGraph` (``GraphView.nx``) over two kinds of vertices,
``("op", node_name)`` and ``("tensor", tensor_name)``; edges run tensor -> op (key ``in<i>``,
or ``capture`` for a tensor an If/Loop/Scan body reads from the outer scope) and op -> tensor
(key ``out<i>``). A multigraph because one node may read the same tensor twice (``Mul(x, x)``).
Only the main graph is indexed; nodes inside subgraphs belong to their control-flow node.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property

import networkx as nx
import onnx
from onnx import TensorProto

from hawq_onnx.topology import subgraph_outer_inputs, topological_order

CONTROL_FLOW_OPS = frozenset({"If", "Loop", "Scan", "LSTM", "GRU", "RNN"})
FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16,
                         TensorProto.BFLOAT16})
INDEX_TYPES = frozenset({TensorProto.INT32, TensorProto.INT64})
# Ops a weight may pass through between its constant and the layer that uses it.
_WEIGHT_PASS_THROUGH = frozenset({"Identity", "Transpose"})
_SHAPE_SOURCES = frozenset({"Shape", "Size"})
_WEIGHT_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Gather"})
_RECURRENT_OPS = frozenset({"LSTM", "GRU", "RNN"})

Dim = int | str | None
Shape = tuple[Dim, ...]


@dataclass(frozen=True)
class QuantizableLayer:
    """A node whose matrix/convolution arithmetic quantization targets.

    ``weight`` is the constant behind the weight operand (an initializer, or a Constant
    node's output in a model that has not been through the importer), found through any
    Identity/Transpose in between; None for a MatMul of two activations. ``weight_axis_out``
    is the axis *of that constant* that indexes output channels (the per-channel
    quantization axis), None where there is none (activation MatMul, embedding tables,
    1-D MatMul operands). ``macs`` counts multiply-accumulates for one sample: every
    symbolic or unknown dimension counts as 1 (so a symbolic batch is batch 1, and a
    symbolic sequence length is also taken as 1 — a lower bound), and it is 0 when the
    shapes needed are unknown and for embeddings (a lookup, not arithmetic).
    """

    node: str
    op: str
    kind: str  # conv | conv_transpose | gemm | matmul | matmul_activations | embedding
    weight: str | None
    params: int
    macs: int
    inputs: tuple[str, ...]
    output: str
    weight_axis_out: int | None = None


@dataclass(frozen=True)
class _WeightSource:
    """A constant reached from a layer operand, and the axis permutation on the way."""

    name: str
    dims: tuple[int, ...]
    perms: tuple[tuple[int, ...] | None, ...]  # Transposes from the operand towards the source

    def source_axis(self, axis: int) -> int:
        """The constant's axis that becomes ``axis`` of the operand the layer reads."""
        rank = len(self.dims)
        axis %= rank
        for perm in self.perms:
            axis = (perm if perm is not None else tuple(reversed(range(rank))))[axis]
        return axis

    def operand_dims(self) -> tuple[int, ...]:
        dims = self.dims
        for perm in reversed(self.perms):
            order = perm if perm is not None else tuple(reversed(range(len(dims))))
            dims = tuple(dims[i] for i in order)
        return dims


def unique_node_names(nodes: Iterable[onnx.NodeProto]) -> list[str]:
    """A unique, stable name per node: its own when unique, else ``<OpType>_<index>``.

    Exporters leave names empty or repeat them; later stages address nodes by name, so
    explicit names are reserved first and generated ones never collide with them.
    """
    nodes = list(nodes)
    counts = Counter(n.name for n in nodes if n.name)
    taken = {name for name, count in counts.items() if count == 1}
    names: list[str] = []
    for index, node in enumerate(nodes):
        if node.name and counts[node.name] == 1:
            names.append(node.name)
            continue
        base = node.name or f"{node.op_type}_{index}"
        name, suffix = base, 1
        while name in taken:
            name, suffix = f"{base}_{suffix}", suffix + 1
        taken.add(name)
        names.append(name)
    return names


def _numel(dims: Iterable[Dim]) -> int:
    """Element count with symbolic/unknown dimensions (also -1 and 0, which some exporters
    write for "dynamic") taken as 1."""
    return math.prod(d if isinstance(d, int) and d > 0 else 1 for d in dims)


def _shape_of(value: onnx.ValueInfoProto) -> tuple[int, Shape | None]:
    """(elem_type, dims) of a value info; dims is None when the rank is unknown."""
    if not value.type.HasField("tensor_type"):
        return 0, None
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return tensor_type.elem_type, None
    dims: list[Dim] = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(int(dim.dim_value))
        else:
            dims.append(dim.dim_param or None)
    return tensor_type.elem_type, tuple(dims)


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference, or the model unchanged when inference is impossible (unknown
    custom ops are skipped by non-strict inference; models > 2 GB cannot be inferred)."""
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # inference is an optimisation of what we know, never a requirement
        return model


def _constant_tensor(node: onnx.NodeProto) -> TensorProto | None:
    """The tensor of a Constant node's ``value`` attribute (other forms are scalars/lists)."""
    for attr in node.attribute:
        if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
            return attr.t
    return None


def _perm_attr(node: onnx.NodeProto) -> tuple[int, ...] | None:
    for attr in node.attribute:
        if attr.name == "perm":
            return tuple(int(p) for p in attr.ints)
    return None


def _int_attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(attr.i)
    return default


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The bodies a node carries (If branches, Loop/Scan bodies)."""
    return [g for attr in node.attribute
            for g in list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])]


def describe_nested(nested: Mapping[str, Mapping[str, int]]) -> str:
    """"12 layers inside control-flow bodies (If_0: 8 Conv, 4 LSTM)" for messages."""
    total = sum(sum(c.values()) for c in nested.values())
    where = "; ".join(f"{name}: " + ", ".join(f"{n} {op}" for op, n in sorted(c.items()))
                      for name, c in nested.items())
    return f"{total} layer(s) inside control-flow bodies ({where})"


def nested_reason(view: GraphView) -> str:
    """What to append to "no quantizable weights" when layers exist but sit in bodies."""
    nested = view.nested_layers()
    if not nested:
        return ""
    return f" in its main graph; {describe_nested(nested)} are not quantized"


class GraphView:
    """Producer/consumer lookups, quantizable layers, shape subgraphs and control flow."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        names = unique_node_names(self.graph.node)
        self._nodes: dict[str, onnx.NodeProto] = dict(zip(names, self.graph.node, strict=True))
        self._name_by_id = {id(node): name for name, node in self._nodes.items()}
        self.initializers: dict[str, TensorProto] = {t.name: t for t in self.graph.initializer}
        self._constants: dict[str, TensorProto] = dict(self.initializers)
        for node in self.graph.node:
            tensor = _constant_tensor(node) if node.op_type == "Constant" else None
            if tensor is not None and node.output:
                self._constants[node.output[0]] = tensor
        self._types: dict[str, int] = {}
        self._shapes: dict[str, Shape | None] = {}
        self._collect_types(_infer(model).graph)
        self.nx = self._build_nx()

    # ------------------------------------------------------------------ construction
    def _collect_types(self, graph: onnx.GraphProto) -> None:
        for value in [*graph.input, *graph.value_info, *graph.output]:
            elem_type, dims = _shape_of(value)
            if elem_type:
                self._types[value.name] = elem_type
            if dims is not None or value.name not in self._shapes:
                self._shapes[value.name] = dims
        for name, tensor in self._constants.items():
            self._types[name] = tensor.data_type
            self._shapes[name] = tuple(int(d) for d in tensor.dims)

    def _build_nx(self) -> nx.MultiDiGraph:
        graph = nx.MultiDiGraph()
        for value in self.graph.input:
            kind = "initializer" if value.name in self.initializers else "input"
            graph.add_node(("tensor", value.name), kind=kind)
        for name in self.initializers:
            graph.add_node(("tensor", name), kind="initializer")
        for index, (name, node) in enumerate(self._nodes.items()):
            graph.add_node(("op", name), op_type=node.op_type, index=index)
            for i, tensor in enumerate(node.input):
                if tensor:
                    graph.add_edge(("tensor", tensor), ("op", name), key=f"in{i}")
            for tensor in sorted(subgraph_outer_inputs(node)):
                graph.add_edge(("tensor", tensor), ("op", name), key="capture")
            for i, tensor in enumerate(node.output):
                if tensor:
                    graph.add_edge(("op", name), ("tensor", tensor), key=f"out{i}")
        for value in self.graph.output:
            graph.add_node(("tensor", value.name))
            graph.nodes[("tensor", value.name)]["graph_output"] = True
        for vertex, data in graph.nodes(data=True):
            if vertex[0] == "tensor":
                data.setdefault("kind", "value")
        return graph

    # ------------------------------------------------------------------ lookups
    def node(self, name: str) -> onnx.NodeProto:
        return self._nodes[name]

    def node_name(self, node: onnx.NodeProto) -> str:
        """The unique name this view gives ``node`` (a NodeProto of this model's graph)."""
        return self._name_by_id[id(node)]

    def nodes(self) -> Iterator[tuple[str, onnx.NodeProto]]:
        return iter(self._nodes.items())

    def producer(self, tensor: str) -> onnx.NodeProto | None:
        """The node that outputs ``tensor``; None for graph inputs, initializers, unknowns."""
        vertex = ("tensor", tensor)
        if vertex not in self.nx:
            return None
        for pred in self.nx.predecessors(vertex):
            return self._nodes[pred[1]]
        return None

    def consumers(self, tensor: str) -> list[onnx.NodeProto]:
        """Nodes reading ``tensor`` (directly or from a subgraph), in graph order, once each."""
        vertex = ("tensor", tensor)
        if vertex not in self.nx:
            return []
        names = sorted(set(self.nx.successors(vertex)), key=lambda v: self.nx.nodes[v]["index"])
        return [self._nodes[v[1]] for v in names]

    def elem_type(self, tensor: str) -> int:
        """The ONNX element type (TensorProto.FLOAT, ...), 0 when unknown."""
        return self._types.get(tensor, 0)

    def shape(self, tensor: str) -> Shape | None:
        """Dims (int, symbolic name, or None) from shape inference; None if rank unknown."""
        return self._shapes.get(tensor)

    def is_constant(self, tensor: str) -> bool:
        """An initializer or a Constant node's output."""
        return tensor in self._constants or tensor in self._constant_outputs

    def graph_inputs(self) -> list[onnx.ValueInfoProto]:
        """Inputs a caller feeds (old IRs also list initializers as inputs; those are not)."""
        return [v for v in self.graph.input if v.name not in self.initializers]

    def op_histogram(self) -> Counter[str]:
        """Op types over the whole model, nodes inside If/Loop/Scan bodies included."""
        counts: Counter[str] = Counter()

        def visit(graph: onnx.GraphProto) -> None:
            for node in graph.node:
                counts[node.op_type] += 1
                for sub in _subgraphs(node):
                    visit(sub)

        visit(self.graph)
        return counts

    @cached_property
    def _order(self) -> list[onnx.NodeProto]:
        try:
            return topological_order(self.graph)
        except ValueError:  # a broken graph: graph order is the best we have
            return list(self.graph.node)

    @cached_property
    def _constant_outputs(self) -> frozenset[str]:
        """Tensors computable from constants alone (what the mirror folds at construction)."""
        constant = set(self._constants)
        for node in self._order:
            reads = [n for n in node.input if n] + sorted(subgraph_outer_inputs(node))
            if node.op_type == "Constant" or (reads and all(r in constant for r in reads)):
                constant.update(o for o in node.output if o)
        return frozenset(constant)

    # ------------------------------------------------------------------ shape subgraphs
    def shape_tensors(self) -> frozenset[str]:
        """Tensors that are never quantized nor differentiated: integer/bool typed ones,
        and anything computed only from Shape/Size outputs and constants (e.g. Shape ->
        Cast(float) -> Mul -> Cast(int64) -> Reshape's shape input)."""
        return self._shape_tensors

    def is_shape_node(self, node: onnx.NodeProto | str) -> bool:
        """True when every output of the node is a shape tensor."""
        proto = self._nodes[node] if isinstance(node, str) else node
        outputs = [o for o in proto.output if o]
        return bool(outputs) and all(o in self._shape_tensors for o in outputs)

    @cached_property
    def _shape_tensors(self) -> frozenset[str]:
        typed = {name for name, t in self._types.items() if t and t not in FLOAT_TYPES}
        return frozenset(typed | self._shape_derived)

    @cached_property
    def _shape_derived(self) -> frozenset[str]:
        """Outputs of Shape/Size and of nodes fed only by those and constants. Integer graph
        inputs (token ids) do not seed this: they are data. A node that reads a weight
        (a position-embedding Gather indexed by Range(Shape(x))) is not shape arithmetic:
        its weight needs gradients."""
        derived: set[str] = set()
        constant = self._constant_outputs
        for node in self._order:
            reads = [n for n in node.input if n] + sorted(subgraph_outer_inputs(node))
            from_shapes = (bool(reads) and all(r in derived or r in constant for r in reads)
                           and any(r in derived for r in reads))
            if node.op_type in _SHAPE_SOURCES or (from_shapes and not self._reads_weight(node)):
                derived.update(o for o in node.output if o)
        return frozenset(derived)

    def _reads_weight(self, node: onnx.NodeProto) -> bool:
        operands = {"Gather": 1}.get(node.op_type, 2 if node.op_type in _WEIGHT_OPS else 0)
        return any(self._weight_source(t) is not None for t in node.input[:operands] if t)

    # ------------------------------------------------------------------ control flow
    def control_flow_nodes(self) -> list[str]:
        """Names of If/Loop/Scan/LSTM/GRU/RNN nodes: kept in float, quantized around."""
        return [name for name, node in self._nodes.items() if node.op_type in CONTROL_FLOW_OPS]

    def nested_layers(self) -> dict[str, Counter[str]]:
        """Per If/Loop/Scan node of the main graph, the weight-bearing ops inside its bodies
        (nested bodies included).

        Why: only the main graph is quantized; a model whose layers all sit in branches
        (silero-vad picks its 8 kHz or 16 kHz network with an ``If``) would otherwise come out
        "quantized" with nothing changed and no word of why."""
        found: dict[str, Counter[str]] = {}

        def visit(graph: onnx.GraphProto, counts: Counter[str]) -> None:
            for node in graph.node:
                if node.op_type in _WEIGHT_OPS - {"Gather"} or node.op_type in _RECURRENT_OPS:
                    counts[node.op_type] += 1
                for sub in _subgraphs(node):
                    visit(sub, counts)

        for name, node in self._nodes.items():
            counts: Counter[str] = Counter()
            for sub in _subgraphs(node):
                visit(sub, counts)
            if counts:
                found[name] = counts
        return found

    # ------------------------------------------------------------------ quantizable layers
    def quantizable_layers(self) -> list[QuantizableLayer]:
        """Layers in graph order; a weight shared by two layers appears in both."""
        return self._layers

    @cached_property
    def _layers(self) -> list[QuantizableLayer]:
        layers = []
        for name, node in self._nodes.items():
            layer = self._classify(name, node)
            if layer is not None:
                layers.append(layer)
        return layers

    def _weight_source(self, tensor: str) -> _WeightSource | None:
        """The float constant behind ``tensor``, looking through Identity/Transpose."""
        perms: list[tuple[int, ...] | None] = []
        name = tensor
        for _ in range(32):  # a chain longer than this is not a weight path
            if name in self._constants:
                const = self._constants[name]
                if const.data_type not in FLOAT_TYPES:
                    return None
                return _WeightSource(name, tuple(int(d) for d in const.dims), tuple(perms))
            node = self.producer(name)
            if node is None or node.op_type not in _WEIGHT_PASS_THROUGH or not node.input:
                return None
            if node.op_type == "Transpose":
                perms.append(_perm_attr(node))
            name = node.input[0]
        return None

    def _classify(self, name: str, node: onnx.NodeProto) -> QuantizableLayer | None:
        op = node.op_type
        if node.domain not in ("", "ai.onnx") or len(node.input) < 2 or not node.output:
            return None
        if op in ("Conv", "ConvTranspose"):
            return self._conv_layer(name, node)
        if op in ("Gemm", "MatMul"):
            return self._matmul_layer(name, node)
        if op == "Gather":
            return self._embedding_layer(name, node)
        return None

    def _layer(self, name: str, node: onnx.NodeProto, kind: str, source: _WeightSource | None,
               macs: int, inputs: Iterable[str], axis: int | None) -> QuantizableLayer:
        weight_axis = source.source_axis(axis) if source is not None and axis is not None \
            and source.dims else None
        return QuantizableLayer(
            node=name, op=node.op_type, kind=kind,
            weight=source.name if source is not None else None,
            params=math.prod(source.dims) if source is not None else 0,
            macs=int(macs), inputs=tuple(inputs), output=node.output[0],
            weight_axis_out=weight_axis,
        )

    def _conv_layer(self, name: str, node: onnx.NodeProto) -> QuantizableLayer | None:
        source = self._weight_source(node.input[1])
        if source is None or len(source.dims) < 2 or self.is_constant(node.input[0]):
            return None
        per_output = math.prod(source.operand_dims()[1:])  # (C_in/group) * kernel
        if node.op_type == "Conv":
            out = self.shape(node.output[0])
            macs = _numel(out) * per_output if out is not None else 0
            return self._layer(name, node, "conv", source, macs, [node.input[0]], 0)
        # ConvTranspose: every input element meets (C_out/group) * kernel weights.
        inp = self.shape(node.input[0])
        macs = _numel(inp) * per_output if inp is not None else 0
        return self._layer(name, node, "conv_transpose", source, macs, [node.input[0]], 1)

    def _matmul_layer(self, name: str, node: onnx.NodeProto) -> QuantizableLayer | None:
        a, b = node.input[0], node.input[1]
        if self.is_constant(a) and self.is_constant(b):
            return None  # folded at load time, nothing runs
        if any(self.elem_type(t) not in FLOAT_TYPES | {0} for t in (a, b)):
            return None  # integer arithmetic
        k = self._contraction_size(node)
        out = self._matmul_out_shape(node)
        macs = _numel(out) * k if out is not None and k is not None else 0
        source_b = self._weight_source(b)
        if node.op_type == "Gemm":
            kind = "gemm" if source_b is not None else "matmul_activations"
            axis = 0 if _int_attr(node, "transB", 0) else 1
            inputs = [a] if source_b is not None else [a, b]
            return self._layer(name, node, kind, source_b, macs, inputs, axis)
        if source_b is not None:
            rank = len(source_b.dims)
            return self._layer(name, node, "matmul", source_b, macs, [a],
                               rank - 1 if rank >= 2 else None)
        source_a = self._weight_source(a)
        if source_a is not None:  # weight on the left (some TF exports)
            rank = len(source_a.dims)
            return self._layer(name, node, "matmul", source_a, macs, [b],
                               rank - 2 if rank >= 2 else None)
        if a in self._shape_derived and b in self._shape_derived:
            return None  # arithmetic on shapes (e.g. a Resize scale computation)
        return self._layer(name, node, "matmul_activations", None, macs, [a, b], None)

    def _operand_shape(self, tensor: str) -> Shape | None:
        shape = self.shape(tensor)
        if shape is None:
            source = self._weight_source(tensor)
            shape = source.operand_dims() if source is not None else None
        return shape

    def _contraction_size(self, node: onnx.NodeProto) -> int | None:
        """K of an (M, K) x (K, N) product, from whichever operand has it fixed."""
        a, b = self._operand_shape(node.input[0]), self._operand_shape(node.input[1])
        candidates: list[Dim] = []
        if node.op_type == "Gemm":
            if a is not None and len(a) == 2:
                candidates.append(a[0] if _int_attr(node, "transA", 0) else a[1])
            if b is not None and len(b) == 2:
                candidates.append(b[1] if _int_attr(node, "transB", 0) else b[0])
        else:
            if a is not None and a:
                candidates.append(a[-1])
            if b is not None and b:
                candidates.append(b[-2] if len(b) >= 2 else b[0])
        fixed = [d for d in candidates if isinstance(d, int)]
        if fixed:
            return fixed[0]
        return 1 if candidates else None

    def _matmul_out_shape(self, node: onnx.NodeProto) -> Shape | None:
        """The output shape from inference, else from numpy matmul rules on the operands."""
        out = self.shape(node.output[0])
        if out is not None:
            return out
        a, b = self._operand_shape(node.input[0]), self._operand_shape(node.input[1])
        if a is None or b is None or not a or not b:
            return None
        if node.op_type == "Gemm":
            if len(a) != 2 or len(b) != 2:
                return None
            m = a[1] if _int_attr(node, "transA", 0) else a[0]
            n = b[0] if _int_attr(node, "transB", 0) else b[1]
            return (m, n)
        rows = a[-2:-1] if len(a) >= 2 else ()
        cols = b[-1:] if len(b) >= 2 else ()
        batch_a, batch_b = a[:-2], b[:-2]
        width = max(len(batch_a), len(batch_b))
        batch_a = (1,) * (width - len(batch_a)) + tuple(batch_a)
        batch_b = (1,) * (width - len(batch_b)) + tuple(batch_b)
        batch = tuple(y if x == 1 else x for x, y in zip(batch_a, batch_b, strict=True))
        return batch + tuple(rows) + tuple(cols)

    def _embedding_layer(self, name: str, node: onnx.NodeProto) -> QuantizableLayer | None:
        source = self._weight_source(node.input[0])
        indices = node.input[1]
        if source is None or self.is_constant(indices):
            return None
        index_type = self.elem_type(indices)
        if index_type and index_type not in INDEX_TYPES:
            return None
        return self._layer(name, node, "embedding", source, 0, [indices], None)


__all__ = ["CONTROL_FLOW_OPS", "GraphView", "QuantizableLayer", "describe_nested",
           "nested_reason", "unique_node_names"]
