"""Which tensors of a graph depend on the values of its float inputs.

Why: the mirror runs one branch of an ``If`` per call, chosen from the concrete condition.
That is only faithful when the condition cannot change with the data being fed (the same
graph must differentiate the same ops for every calibration sample). A condition computed
from the *shape* of an input (Shape, Size) or from integer/bool inputs is allowed; one that
reads float input values is refused at construction with a clear error.
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx

from hawq_onnx.errors import HawqError

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                onnx.TensorProto.BFLOAT16}
# Ops whose outputs depend only on their inputs' shapes (and types), never on their values.
_SHAPE_ONLY = {"Shape", "Size", "EyeLike"}


class DataDependentControlFlowError(HawqError):
    """An ``If`` condition depends on input data, so no single branch can be mirrored."""

    def __init__(self, node_label: str):
        self.node_label = node_label
        super().__init__(
            f"If node {node_label!r}: condition depends on input data; only statically "
            "known conditions (constants, shapes, integer inputs) are supported")


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [g for a in node.attribute for g in [*a.graphs, *([a.g] if a.HasField("g") else [])]]


def _outer_reads(graph: onnx.GraphProto) -> set[str]:
    """Every name a subgraph (and its nested subgraphs) reads, local or captured."""
    names: set[str] = set()
    for node in graph.node:
        names.update(n for n in node.input if n)
        for sub in _subgraphs(node):
            names |= _outer_reads(sub)
    return names


def data_dependent_ifs(graph: onnx.GraphProto, tainted: Iterable[str] | None = None
                       ) -> list[str]:
    """Labels of If nodes (also inside subgraphs) whose condition reads float input data.

    ``tainted`` names outer tensors already known to carry input data; by default the
    graph's float inputs that are not initializers. Taint flows through every op except
    the shape-only ones; a node with subgraphs is tainted if anything it reads is.
    """
    initializers = {t.name for t in graph.initializer}
    if tainted is None:
        tainted = {i.name for i in graph.input if i.name not in initializers
                   and i.type.tensor_type.elem_type in _FLOAT_TYPES}
    dirty = set(tainted)
    found: list[str] = []
    for node in _ordered(graph):
        if node.op_type == "If" and node.input and node.input[0] in dirty:
            found.append(node.name or f"If({node.input[0]})")
        subs = _subgraphs(node)
        reads = {n for n in node.input if n}
        for sub in subs:
            reads |= _outer_reads(sub)
        node_dirty = node.op_type not in _SHAPE_ONLY and bool(reads & dirty)
        for sub in subs:
            inner = dirty | ({i.name for i in sub.input} if node_dirty else set())
            found.extend(data_dependent_ifs(sub, inner))
        if node_dirty:
            dirty.update(n for n in node.output if n)
    return found


def _ordered(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Producers before consumers when possible (unsorted exports exist); else as stored."""
    from hawq_onnx.mirror.module import topological_order

    try:
        return topological_order(graph)
    except ValueError:
        return list(graph.node)


def check_static_control_flow(graph: onnx.GraphProto) -> None:
    """Raise :class:`DataDependentControlFlowError` for the first data-dependent If."""
    found = data_dependent_ifs(graph)
    if found:
        raise DataDependentControlFlowError(found[0])
