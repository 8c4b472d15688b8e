"""Turn ``Constant`` nodes of the main graph into initializers.

Many exporters (paddle2onnx, spox, the onnx version converter itself) store weights as
``Constant`` nodes; a quantizer that looks only at ``graph.initializer`` would skip them.

Every tensor-valued Constant is lifted, integer ones included (Reshape shapes, Gather indices,
axes): onnxruntime and onnx shape inference treat an initializer exactly like a Constant's
output, so nothing is lost, and later analysis gets one place to ask "is this tensor constant".
Whether a constant is a weight worth quantizing is decided by its dtype and its consumer, not
by how it was stored. Left alone: Constants inside subgraphs (a subgraph's own initializers
are poorly supported by other tools), ``sparse_value`` Constants, and Constants whose output
is a graph output (an initializer as a graph output is not portable).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from hawq_onnx.model_io import copy_model
from hawq_onnx.passes.base import PassReport

_DEFAULT_DOMAINS = ("", "ai.onnx")


def constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The value of a Constant node as a tensor named after its output (None: sparse)."""
    if not node.attribute:
        return None
    attr = node.attribute[0]
    value: np.ndarray
    if attr.name == "value":
        tensor = onnx.TensorProto()
        tensor.CopyFrom(attr.t)
        tensor.name = node.output[0]
        return tensor
    if attr.name == "value_float":
        value = np.array(attr.f, dtype=np.float32)
    elif attr.name == "value_floats":
        value = np.array(list(attr.floats), dtype=np.float32)
    elif attr.name == "value_int":
        value = np.array(attr.i, dtype=np.int64)
    elif attr.name == "value_ints":
        value = np.array(list(attr.ints), dtype=np.int64)
    elif attr.name == "value_string":
        value = np.array(attr.s, dtype=object)
    elif attr.name == "value_strings":
        value = np.array(list(attr.strings), dtype=object)
    else:  # sparse_value: no dense initializer without densifying it
        return None
    return numpy_helper.from_array(value, node.output[0])


def _is_liftable(node: onnx.NodeProto, graph_outputs: set[str], taken: set[str]) -> bool:
    return (
        node.op_type == "Constant"
        and node.domain in _DEFAULT_DOMAINS
        and len(node.output) == 1
        and bool(node.output[0])
        and node.output[0] not in graph_outputs
        and node.output[0] not in taken
    )


def lift_constants(model: onnx.ModelProto) -> tuple[onnx.ModelProto, PassReport]:
    """Move main-graph Constant nodes into ``graph.initializer`` (names are kept)."""
    report = PassReport("lift_constants")
    graph = model.graph
    graph_outputs = {out.name for out in graph.output}
    taken = {init.name for init in graph.initializer} | {inp.name for inp in graph.input}
    lifted: list[onnx.TensorProto] = []
    keep: list[onnx.NodeProto] = []
    for node in graph.node:
        tensor = (constant_tensor(node)
                  if _is_liftable(node, graph_outputs, taken) else None)
        if tensor is None:
            keep.append(node)
            continue
        lifted.append(tensor)
        report.note(f"lifted Constant '{node.output[0]}' "
                    f"({onnx.TensorProto.DataType.Name(tensor.data_type).lower()}, "
                    f"shape {list(tensor.dims)})")
    if not lifted:
        return model, report
    out = copy_model(model)
    del out.graph.node[:]
    out.graph.node.extend(keep)
    out.graph.initializer.extend(lifted)
    return out, report
