"""Exporting quantized models: format, checks, atomic write, and what onnxruntime made of it.

The QDQ model built by :class:`~hawq_onnx.passes.insert_qdq.InsertQDQ` already stores weights
as integer initializers of their true ONNX type. Export then

1. optionally rewrites it to the QOperator format (``--format qoperator``: QLinearConv,
   QLinearMatMul, QGemm, ... with int8 tensors between them);
2. sets the lowest IR version the opsets and element types need (``save_model`` refuses what
   the installed onnxruntime cannot read), keeps metadata, doc string and producer fields;
3. runs ``onnx.checker`` with ``full_check`` and loads the model in onnxruntime;
4. writes it atomically (temporary file + rename; nothing is left behind on failure) with
   deterministic bytes;
5. reports which nodes of the onnxruntime-optimized graph run integer kernels and which
   compute nodes remain float, read from the optimized model onnxruntime saves.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from hawq_onnx.calibration.session import make_session, session_options
from hawq_onnx.errors import HawqError
from hawq_onnx.model_io import copy_model, is_too_big_for_protobuf, save_model, target_ir_version
from hawq_onnx.passes.upgrade_opset import default_opset

if TYPE_CHECKING:
    from hawq_onnx.quant.plan import QuantPlan
    from hawq_onnx.quantize import BuildResult, QuantizeOptions, Quantizer

#: onnxruntime kernels that compute on integers (after its QDQ fusions).
INTEGER_COMPUTE_KERNELS = frozenset({
    "QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "QGemm", "MatMulNBits",
    "ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul", "QLinearConvTranspose",
    "QAttention", "MatMulBnb4", "GatherBlockQuantized"})
INTEGER_OTHER_KERNELS = frozenset({
    "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearGlobalAveragePool",
    "QLinearAveragePool", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax",
    "QLinearWhere", "QLinearReduceMean", "QEmbedLayerNormalization"})
#: float kernels of the matrix/convolution ops quantization targets.
FLOAT_COMPUTE_KERNELS = frozenset({
    "Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul",
    "NhwcConv", "NhwcFusedConv", "TransposeMatMul"})


@dataclass
class KernelReport:
    """Node counts of onnxruntime's optimized graph (CPU, extended optimizations)."""

    op_counts: dict[str, int] = field(default_factory=dict)
    integer_compute: list[str] = field(default_factory=list)  # "OpType:name"
    integer_other: list[str] = field(default_factory=list)
    float_compute: list[str] = field(default_factory=list)
    quantize_nodes: int = 0
    dequantize_nodes: int = 0

    @property
    def integer_fraction(self) -> float:
        """Share of Conv/Gemm/MatMul-like nodes that run integer kernels."""
        total = len(self.integer_compute) + len(self.float_compute)
        return len(self.integer_compute) / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["integer_fraction"] = round(self.integer_fraction, 4)
        return out


def _label(node: onnx.NodeProto) -> str:
    return f"{node.op_type}:{node.name}"


def kernel_report(model: onnx.ModelProto | str | os.PathLike[str], *,
                  what: str | None = None) -> KernelReport:
    """Load the model in onnxruntime, save its optimized graph, and classify the nodes.
    ``what`` names the model in the error when onnxruntime refuses it."""
    with tempfile.TemporaryDirectory(prefix="hawq-kernels-") as folder:
        optimized = Path(folder) / "optimized.onnx"
        options = session_options(level="extended", optimized_path=optimized, threads=1)
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", "optimized.data")
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        make_session(model if isinstance(model, onnx.ModelProto) else Path(model), options,
                     what=what)
        graph = onnx.load(str(optimized), load_external_data=False).graph
    report = KernelReport()
    counts: Counter[str] = Counter(node.op_type for node in graph.node)
    report.op_counts = dict(sorted(counts.items()))
    for node in graph.node:
        if node.op_type in INTEGER_COMPUTE_KERNELS:
            report.integer_compute.append(_label(node))
        elif node.op_type in INTEGER_OTHER_KERNELS:
            report.integer_other.append(_label(node))
        elif node.op_type in FLOAT_COMPUTE_KERNELS:
            report.float_compute.append(_label(node))
    report.quantize_nodes = counts.get("QuantizeLinear", 0)
    report.dequantize_nodes = counts.get("DequantizeLinear", 0)
    return report


@dataclass
class ExportResult:
    model: onnx.ModelProto
    path: Path | None
    format: str
    opset: int
    ir_version: int
    file_bytes: int
    kernels: KernelReport
    notes: list[str] = field(default_factory=list)


def _check(model: onnx.ModelProto) -> None:
    """``onnx.checker`` with ``full_check``; models beyond protobuf's 2 GiB cannot be passed
    to it in memory and are checked by onnxruntime loading them (the kernel report)."""
    if is_too_big_for_protobuf(model):
        return
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # a bug in a pass, surfaced with its reason
        raise HawqError(f"the quantized model fails the ONNX checker: "
                        f"{str(exc).strip().splitlines()[0]}") from exc


def finalize(model: onnx.ModelProto, fmt: str = "qdq") -> onnx.ModelProto:
    """The exported form: format conversion, IR version, checker (a new model)."""
    if fmt not in ("qdq", "qoperator"):
        raise HawqError(f"unknown format '{fmt}' (qdq or qoperator)")
    out = copy_model(model)
    if fmt == "qoperator":
        from hawq_onnx.passes.qoperator import to_qoperator

        out, _ = to_qoperator(out)
    out.ir_version = target_ir_version(out)
    _check(out)
    return out


def export_model(model: onnx.ModelProto, path: str | os.PathLike[str] | None, *,
                 fmt: str = "qdq", source: str | os.PathLike[str] | None = None
                 ) -> ExportResult:
    """Finalize, check in onnxruntime (kernel report), then write atomically to ``path``."""
    out = finalize(model, fmt)
    kernels = kernel_report(out, what="the quantized model")  # refused: never write the file
    written: Path | None = None
    size = out.ByteSize()
    if path is not None:
        written = save_model(out, path, source=source)
        size = written.stat().st_size
    return ExportResult(out, written, fmt, default_opset(out) or 0, out.ir_version, size,
                        kernels)


# ---------------------------------------------------------------------- report


def _layer_rows(quantizer: Quantizer, plan: QuantPlan, built: BuildResult
                ) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    placed = {layer.node for layer in quantizer.placement.layers}
    for layer in quantizer.view.quantizable_layers():
        if layer.weight is None or layer.weight in seen:
            continue
        seen.add(layer.weight)
        record = built.record.weights.get(layer.weight)
        source = quantizer.placement.source(layer.inputs[0]) if layer.inputs else None
        act = built.record.activations.get(layer.inputs[0]) if layer.inputs else None
        row: dict[str, Any] = {
            "name": layer.weight, "node": layer.node, "op": layer.op, "kind": layer.kind,
            "params": layer.params, "macs": layer.macs,
            "weight_bits": record.bits if record else 32,
            "act_bits": act.bits if act else (plan.act_bits(source) if source else None),
        }
        if record is not None:
            row.update(container_bits=record.container_bits, granularity=record.granularity,
                       axis=record.axis, group_size=record.group_size,
                       rounding=record.rounding, bias=built.record.biases.get(layer.node))
        else:
            row["float_reason"] = quantizer.placement.float_nodes.get(layer.node) or (
                built.record.skipped_weights.get(layer.weight)
                or ("not planned" if layer.node in placed else "not placed"))
        rows.append(row)
    return rows


def build_report(float_bytes: int, quantizer: Quantizer, plan: QuantPlan, built: BuildResult,
                 exported: ExportResult, options: QuantizeOptions) -> dict[str, Any]:
    """The ``--report`` JSON (layers, parameter-weighted bits, bytes, kernels, notes).

    ``avg_weight_bits`` weighs every quantizable weight by its parameter count; weights left
    float count as 32 bits. ``bytes_float`` is the input model file's size.
    """
    layers = _layer_rows(quantizer, plan, built)
    params = sum(row["params"] for row in layers)
    avg = sum(row["params"] * row["weight_bits"] for row in layers) / params if params else 0.0
    acts = built.record.activations
    return {
        "format": exported.format,
        "opset": exported.opset,
        "ir_version": exported.ir_version,
        "options": {k: (list(v) if isinstance(v, tuple) else v)
                    for k, v in asdict(options).items()},
        "layers": layers,
        "avg_weight_bits": round(avg, 4),
        "bytes_float": float_bytes,
        "bytes_quant": exported.file_bytes,
        "size_ratio": round(exported.file_bytes / float_bytes, 4) if float_bytes else None,
        "activations": {"quantized": len(acts),
                        "bits": sorted({qp.bits for qp in acts.values()})},
        "float_nodes": dict(sorted(quantizer.placement.float_nodes.items())),
        "biases": built.record.biases,
        "kernels": exported.kernels.to_dict(),
        "notes": [*built.notes, *[d for r in built.reports for d in r.details]],
    }


__all__ = ["ExportResult", "KernelReport", "build_report", "export_model", "finalize",
           "kernel_report"]
