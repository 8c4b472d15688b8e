"""``hawq-onnx validate``: compare a quantized model with its float original in onnxruntime.

Prints top-1 accuracy (with labels), top-1 agreement, output SQNR and cosine, file sizes and
single-thread latency. ``--max-drop X`` makes it a build gate: exit 1 when top-1 drops by more
than X (a fraction: 0.01 is one point; without labels the drop is 1 - agreement).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from hawq_onnx.commands.argtypes import positive_int
from hawq_onnx.commands.quantize import format_metrics, write_json
from hawq_onnx.errors import GateFailedError
from hawq_onnx.recipe import provenance
from hawq_onnx.validate import evaluate


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "validate", help="accuracy, SQNR, size and latency of a quantized model vs float",
        description=__doc__.splitlines()[0])
    parser.add_argument("float_model", type=Path, metavar="FLOAT.onnx")
    parser.add_argument("quant_model", type=Path, metavar="QUANT.onnx")
    parser.add_argument("--eval", type=Path, required=True, metavar="EVAL.npz",
                        help="evaluation inputs keyed by input name (plus labels)")
    parser.add_argument("--labels-key", default="labels", metavar="KEY",
                        help="labels array in EVAL.npz (default: labels)")
    parser.add_argument("--max-drop", type=_fraction, metavar="X",
                        help="fail (exit 1) when top-1 drops by more than X (0.01 = 1 point)")
    parser.add_argument("--report", type=Path, metavar="r.json", help="write metrics as JSON")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--max-samples", type=positive_int, metavar="N",
                        help="evaluate only the first N samples")
    parser.add_argument("--latency-runs", type=int, default=20, metavar="N",
                        help="interleaved timing runs per model (0: skip latency)")
    parser.set_defaults(func=run)
    return parser


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1], got {text}")
    return value


def run(args: argparse.Namespace) -> int:
    metrics = evaluate(args.float_model, args.quant_model, args.eval,
                       labels_key=args.labels_key, batch_size=args.batch_size,
                       latency_runs=max(0, args.latency_runs), max_samples=args.max_samples)
    payload = metrics.to_dict()
    payload["max_drop"] = args.max_drop
    passed = args.max_drop is None or metrics.drop <= args.max_drop + 1e-12
    payload["passed"] = passed
    payload["build"] = provenance(args)  # recipe, input hashes, tool versions
    args.json_summary = payload
    if args.report is not None:
        write_json(args.report, payload)
    print(f"{metrics.samples} samples; {format_metrics(payload)}; size "
          f"{metrics.bytes_quant} / {metrics.bytes_float} bytes ({metrics.size_ratio:.3f}x)")
    if not passed:
        raise GateFailedError(f"top-1 drop {100 * metrics.drop:.2f} points exceeds --max-drop "
                              f"{100 * args.max_drop:.2f} points")
    return 0
