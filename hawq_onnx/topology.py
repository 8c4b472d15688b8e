"""Graph topology helpers shared by the mirror, the graph view and the passes.

Kept free of torch so that commands which only rewrite graphs (quantize, validate) start fast.
"""

from __future__ import annotations

import onnx


def subgraph_outer_inputs(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs (If/Loop/Scan bodies) read from the enclosing scope."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
        for graph in graphs:
            local = {i.name for i in graph.input} | {t.name for t in graph.initializer}
            for inner in graph.node:
                local.update(inner.output)
            for inner in graph.node:
                reads = set(inner.input) | subgraph_outer_inputs(inner)
                names.update(n for n in reads if n and n not in local)
    return names


def node_reads(node: onnx.NodeProto) -> list[str]:
    """Every tensor a node needs: its inputs plus what its subgraphs capture."""
    return [n for n in node.input if n] + sorted(subgraph_outer_inputs(node))


def topological_order(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Nodes in an order where every producer precedes its consumers (exporters do not
    always emit sorted graphs); raises ValueError on a cycle or a dangling input."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        ready = [n for n in pending if all(r in available for r in node_reads(n))]
        if not ready:
            missing = sorted({r for n in pending for r in node_reads(n) if r not in available
                              and not any(r in p.output for p in pending)})
            detail = f"tensors produced by nothing: {missing}" if missing else "a cycle"
            raise ValueError(f"graph cannot be ordered: {detail}")
        ready_ids = {id(n) for n in ready}
        ordered.extend(ready)
        for node in ready:
            available.update(node.output)
        pending = [n for n in pending if id(n) not in ready_ids]
    return ordered
