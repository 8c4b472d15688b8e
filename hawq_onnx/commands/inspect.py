"""``hawq-onnx inspect``: what is in a model, what would be quantized, does the mirror agree.

Inspection itself never needs the mirror, so a model with ops the mirror lacks still gets a
full report (listing them). ``--check DATA.npz`` runs the parity check (mirror vs
onnxruntime on the data) and exits 1 when an output differs by more than 1e-4 relative.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto

from hawq_onnx.commands.argtypes import positive_int
from hawq_onnx.data import Dataset, load_npz
from hawq_onnx.errors import UnsupportedOpError
from hawq_onnx.graph import GraphView, describe_nested
from hawq_onnx.importer import ImportedModel, load_model
from hawq_onnx.mirror import unsupported_op_types
from hawq_onnx.model_io import model_files_sha256
from hawq_onnx.parity import DEFAULT_TOLERANCE, ParityReport, check_parity


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "inspect", help="summarize a model; optionally check the mirror against onnxruntime",
        description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, metavar="MODEL.onnx")
    parser.add_argument("--check", type=Path, metavar="DATA.npz",
                        help="run mirror-vs-onnxruntime parity on this data")
    parser.add_argument("--batch-size", type=positive_int, default=32, metavar="N",
                        help="batch size for --check (a batch size the model fixes wins)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.set_defaults(func=run)
    return parser




def run(args: argparse.Namespace) -> int:
    imported = load_model(args.model)
    model = imported.model
    view = GraphView(model)
    summary = summarize(model, view, str(args.model))
    summary["import"] = _import_summary(imported)
    summary["notes"].extend(imported.notes)
    dataset: Dataset | None = None
    if args.check is not None:
        if summary["unsupported_ops"]:
            raise UnsupportedOpError(summary["unsupported_ops"])
        dataset = load_npz(args.check, model)
        summary["notes"].extend(dataset.notes)
    if not args.json:
        print(render_summary(summary))
        for note in summary["notes"]:
            print(f"note: {note}", file=sys.stderr)
    report: ParityReport | None = None
    if dataset is not None:
        report = check_parity(model, dataset, batch_size=args.batch_size,
                              tolerance=DEFAULT_TOLERANCE)
        summary["parity"] = report.to_dict()
        if not args.json:
            print(render_parity(report))
    if args.json:
        print(json.dumps(_json_safe(summary), indent=2, allow_nan=False))
    if report is not None and not report.ok:
        bad = [o for o in report.outputs if not o.ok]
        detail = ", ".join(f"{o.name} ({o.problem or f'max relative error {o.max_rel:.2e}'})"
                           for o in bad)
        print(f"hawq-onnx: parity check failed (tolerance {report.tolerance:g}): {detail}",
              file=sys.stderr)
        return 1
    return 0


def _json_safe(value: Any) -> Any:
    """Infinite/NaN errors (a shape mismatch) as strings: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


# ---------------------------------------------------------------------- summary
def _import_summary(imported: ImportedModel) -> dict[str, Any]:
    """What loading changed (opset upgrade, lifted constants, folded BatchNorms). The digest
    is the one build reports record for the model (external data files included)."""
    digest = model_files_sha256(imported.path) if imported.external_data else imported.sha256
    return {"original_opset": imported.original_opset,
            "original_ir_version": int(imported.original_ir_version),
            "sha256": digest,
            "passes": [r.to_dict() for r in imported.reports if r.changed]}


def _type_name(elem_type: int) -> str:
    if not elem_type:
        return "?"
    return TensorProto.DataType.Name(elem_type).lower()


def _value(view: GraphView, value: onnx.ValueInfoProto) -> dict[str, Any]:
    shape = view.shape(value.name)
    return {"name": value.name, "dtype": _type_name(view.elem_type(value.name)),
            "shape": None if shape is None else list(shape)}


def summarize(model: onnx.ModelProto, view: GraphView, path: str) -> dict[str, Any]:
    """Everything ``inspect`` reports, as JSON-ready data."""
    layers = view.quantizable_layers()
    histogram = view.op_histogram()
    return {
        "model": path,
        "ir_version": int(model.ir_version),
        "opsets": {(e.domain or "ai.onnx"): int(e.version) for e in model.opset_import},
        "producer": {"name": model.producer_name, "version": model.producer_version},
        "inputs": [_value(view, v) for v in view.graph_inputs()],
        "outputs": [_value(view, v) for v in model.graph.output],
        "nodes": sum(histogram.values()),
        "op_histogram": dict(sorted(histogram.items(), key=lambda kv: (-kv[1], kv[0]))),
        "quantizable_layers": [
            {"node": layer.node, "op": layer.op, "kind": layer.kind, "weight": layer.weight,
             "params": layer.params, "macs": layer.macs} for layer in layers],
        "totals": {"layers": len(layers),
                   "params": sum(p for _, p in {(lay.weight, lay.params) for lay in layers}),
                   "macs": sum(layer.macs for layer in layers)},
        "control_flow_nodes": [{"node": name, "op": view.node(name).op_type}
                               for name in view.control_flow_nodes()],
        "nested_layers": {name: dict(sorted(counts.items()))
                          for name, counts in view.nested_layers().items()},
        "unsupported_ops": unsupported_op_types(model),
        "notes": [],
    }


# ---------------------------------------------------------------------- text
def table(headers: Sequence[str], rows: Sequence[Sequence[object]],
          right: Sequence[int] = ()) -> list[str]:
    """Rows aligned under headers; columns in ``right`` (numbers) right-aligned."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  " + "  ".join(parts).rstrip())
    return lines


def _shape_text(shape: list[Any] | None) -> str:
    if shape is None:
        return "(unknown rank)"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def render_summary(summary: dict[str, Any]) -> str:
    opsets = ", ".join(f"{d} {v}" for d, v in summary["opsets"].items())
    producer = " ".join(p for p in summary["producer"].values() if p) or "unknown"
    lines = [f"model: {summary['model']}",
             f"  IR version {summary['ir_version']}; opsets: {opsets}; producer: {producer}"]
    imported = summary.get("import") or {}
    changes = [f"{p['name']} ({p['changed']})" for p in imported.get("passes", [])]
    if changes:
        lines.append(f"  as loaded (from IR {imported['original_ir_version']}, opset "
                     f"{imported['original_opset']}): {', '.join(changes)}")
    for key in ("inputs", "outputs"):
        lines.append(f"{key}:")
        lines += table(["name", "dtype", "shape"],
                       [[v["name"], v["dtype"], _shape_text(v["shape"])] for v in summary[key]])
    ops = ", ".join(f"{op} {n}" for op, n in summary["op_histogram"].items())
    lines.append(f"ops ({summary['nodes']} nodes): {ops or 'none'}")
    totals = summary["totals"]
    lines.append(f"quantizable layers: {totals['layers']} ({totals['params']:,} weight params, "
                 f"{totals['macs']:,} MACs per sample)")
    if summary["quantizable_layers"]:
        rows = [[q["node"], q["op"], q["kind"], q["weight"] or "-", f"{q['params']:,}",
                 f"{q['macs']:,}"] for q in summary["quantizable_layers"]]
        lines += table(["node", "op", "kind", "weight", "params", "MACs"], rows, right=(4, 5))
    flow = ", ".join(f"{c['node']} ({c['op']})" for c in summary["control_flow_nodes"])
    lines.append(f"control flow: {flow or 'none'}")
    if summary["nested_layers"]:
        lines.append(f"kept float: {describe_nested(summary['nested_layers'])}; only the main "
                     "graph is quantized")
    lines.append(f"unsupported ops: {', '.join(summary['unsupported_ops']) or 'none'}")
    return "\n".join(lines)


def render_parity(report: ParityReport) -> str:
    lines = [f"parity (mirror vs onnxruntime, {report.samples} samples in {report.batches} "
             f"batches, tolerance {report.tolerance:g} relative):"]
    rows = [[o.name, f"{o.max_abs:.3e}", f"{o.max_rel:.3e}",
             "ok" if o.ok else f"FAIL{': ' + o.problem if o.problem else ''}"]
            for o in report.outputs]
    lines += table(["output", "max abs", "max rel", "status"], rows, right=(1, 2))
    return "\n".join(lines)
