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
    always emit sorted graphs); raises ValueError on a cycle or a dangling input.

    The order is by waves: wave k holds, in graph order, the nodes whose reads are all
    available once waves < k have run. Computed with per-tensor waiting lists (Kahn's
    algorithm), so it is linear in the graph size: a 20,000-node chain must not take
    20,000 scans of the pending nodes.
    """
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    nodes = list(graph.node)
    missing_reads = [{r for r in node_reads(node) if r not in available} for node in nodes]
    waiting: dict[str, list[int]] = {}
    for index, reads in enumerate(missing_reads):
        for name in reads:
            waiting.setdefault(name, []).append(index)
    unmet = [len(reads) for reads in missing_reads]
    wave = [index for index, count in enumerate(unmet) if count == 0]
    ordered: list[int] = []
    while wave:
        ordered.extend(wave)
        following: list[int] = []
        for index in wave:
            for name in nodes[index].output:
                for reader in waiting.pop(name, ()):  # pop: a second producer changes nothing
                    unmet[reader] -= 1
                    if unmet[reader] == 0:
                        following.append(reader)
        wave = sorted(following)
    if len(ordered) < len(nodes):
        raise ValueError(f"graph cannot be ordered: {_unorderable(nodes, ordered, waiting)}")
    return [nodes[index] for index in ordered]


def _unorderable(nodes: list[onnx.NodeProto], ordered: list[int],
                 waiting: dict[str, list[int]]) -> str:
    """Why some nodes never became ready: dangling inputs, else a cycle."""
    done = set(ordered)
    pending_outputs = {name for i, node in enumerate(nodes) if i not in done
                       for name in node.output}
    missing = sorted(name for name in waiting if name not in pending_outputs)
    return f"tensors produced by nothing: {missing}" if missing else "a cycle"
