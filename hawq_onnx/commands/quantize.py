"""``hawq-onnx quantize``: a float ONNX model -> an integer-deployable quantized model.

Uniform precision: every quantizable weight at ``--weight-bits``, every activation at
``--act-bits``. The output is written atomically (nothing is left behind on failure), and
``--report`` writes the per-layer JSON report. With ``--eval`` the quantized model is also
validated against the float one (accuracy, SQNR, size, latency).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from hawq_onnx.quant.plan import CALIB_METHODS, DEFAULT_CALIB_METHOD, WEIGHT_BITS
from hawq_onnx.quantize import QuantizeOptions, quantize


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "quantize", help="quantize a float model (QDQ or QOperator) with calibration data",
        description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, metavar="MODEL.onnx")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.onnx")
    parser.add_argument("--calib", type=Path, metavar="CALIB.npz",
                        help="calibration inputs keyed by input name (needed unless "
                             "--act-bits none)")
    add_quantization_arguments(parser)
    parser.add_argument("--eval", type=Path, metavar="EVAL.npz",
                        help="validate the result on this data (metrics go to the report)")
    parser.add_argument("--labels-key", default="labels", metavar="KEY",
                        help="labels array in EVAL.npz (default: labels)")
    parser.add_argument("--report", type=Path, metavar="report.json",
                        help="write the JSON report here")
    parser.set_defaults(func=run)
    return parser


def add_quantization_arguments(parser: argparse.ArgumentParser) -> None:
    """The options shared by every quantization mode."""
    parser.add_argument("--weight-bits", type=int, choices=WEIGHT_BITS, default=8,
                        help="weight width (2-8 or 16; default 8)")
    parser.add_argument("--act-bits", type=_act_bits, default=8, metavar="{8,16,none}",
                        help="activation width, or none for weight-only (default 8)")
    parser.add_argument("--symmetric-activations", action="store_true",
                        help="signed symmetric activations (default: unsigned asymmetric)")
    parser.add_argument("--calib-method", choices=CALIB_METHODS, default=DEFAULT_CALIB_METHOD,
                        help=f"activation range method (default {DEFAULT_CALIB_METHOD})")
    parser.add_argument("--percentile", type=float, default=99.999,
                        help="for --calib-method percentile (default 99.999)")
    parser.add_argument("--per-tensor", action="store_true",
                        help="one scale per weight tensor (default: per output channel)")
    parser.add_argument("--group-size", type=_group_size, metavar="N",
                        help="group-wise weight scales, N elements along the reduction axis "
                             "(MatMul/Gemm; others per channel)")
    parser.add_argument("--rounding", choices=("rtn", "mse"),
                        help="weight scale: rtn (max) or mse search (default: mse at <= 4 "
                             "bits, rtn above)")
    parser.add_argument("--format", choices=("qdq", "qoperator"), default="qdq",
                        help="qdq (default) or qoperator (QLinearConv/QGemm/...; int8 groups)")
    parser.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                        help="keep matching nodes float: node name, op type, weight name or "
                             "a regex over node names (repeatable)")
    parser.add_argument("--no-bias-correction", dest="bias_correction", action="store_false",
                        help="keep the float biases (default: remove the mean per-channel "
                             "output shift of each quantized Conv/Gemm, measured on the "
                             "calibration data)")
    parser.add_argument("--batch-size", type=_positive_int, default=32,
                        help="calibration batch size (a batch size the model fixes wins)")
    parser.add_argument("--max-calib-samples", type=_positive_int, metavar="N",
                        help="use only the first N calibration samples")


def _act_bits(text: str) -> int | None:
    if text.lower() in ("none", "0", "float"):
        return None
    if text not in ("8", "16"):
        raise argparse.ArgumentTypeError(f"must be 8, 16 or none, got {text}")
    return int(text)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _group_size(text: str) -> int:
    value = _positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"a group needs at least 2 elements, got {text}")
    return value


def options_from_args(args: argparse.Namespace) -> QuantizeOptions:
    return QuantizeOptions(
        weight_bits=args.weight_bits, act_bits=args.act_bits,
        symmetric_activations=args.symmetric_activations, calib_method=args.calib_method,
        percentile=args.percentile, per_tensor=args.per_tensor, group_size=args.group_size,
        rounding=args.rounding, exclude=tuple(args.exclude), format=args.format,
        batch_size=args.batch_size, max_calib_samples=args.max_calib_samples,
        bias_correction=args.bias_correction)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Atomic JSON write (a temporary file renamed into place)."""
    text = json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n"
    fd, temp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".",
                                prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def summary_lines(report: dict[str, Any], output: Path) -> list[str]:
    kernels = report["kernels"]
    quantized = sum(1 for row in report["layers"] if row["weight_bits"] < 32)
    lines = [
        f"wrote {output} ({report['format']}, opset {report['opset']}, IR "
        f"{report['ir_version']}): {report['bytes_quant']} bytes, "
        f"{report['size_ratio']:.3f}x of {report['bytes_float']}",
        f"layers: {quantized}/{len(report['layers'])} quantized, average weight bits "
        f"{report['avg_weight_bits']:.2f}; activations quantized: "
        f"{report['activations']['quantized']}",
        f"onnxruntime integer kernels: {len(kernels['integer_compute'])} of "
        f"{len(kernels['integer_compute']) + len(kernels['float_compute'])} Conv/Gemm/MatMul "
        f"nodes ({100 * kernels['integer_fraction']:.0f}%), "
        f"{len(kernels['integer_other'])} other integer nodes",
    ]
    floats = report.get("float_nodes") or {}
    if floats:
        shown = ", ".join(f"{k} ({v})" for k, v in list(floats.items())[:5])
        more = f" and {len(floats) - 5} more" if len(floats) > 5 else ""
        lines.append(f"left float: {shown}{more}")
    metrics = report.get("metrics")
    if metrics:
        lines.append(format_metrics(metrics))
    return lines


def format_metrics(metrics: dict[str, Any]) -> str:
    parts = []
    if metrics.get("top1_float") is not None:
        parts.append(f"top-1 {100 * metrics['top1_float']:.2f}% -> "
                     f"{100 * metrics['top1_quant']:.2f}%")
    if metrics.get("agreement") is not None:
        parts.append(f"agreement {100 * metrics['agreement']:.2f}%")
    parts.append(f"SQNR {metrics['sqnr_db']} dB, cosine {metrics['cosine']}")
    if metrics.get("latency_float_ms") is not None:
        parts.append(f"latency {metrics['latency_float_ms']:.3f} -> "
                     f"{metrics['latency_quant_ms']:.3f} ms (1 thread)")
    return "; ".join(parts)


def run(args: argparse.Namespace) -> int:
    result = quantize(args.model, args.output, args.calib, options_from_args(args),
                      eval_path=args.eval, labels_key=args.labels_key)
    if args.report is not None:
        write_json(args.report, result.report)
    for line in summary_lines(result.report, args.output):
        print(line)
    for note in result.report.get("notes", [])[:10]:
        print(f"note: {note}", file=sys.stderr)
    return 0
