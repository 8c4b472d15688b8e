"""``hawq-onnx quantize``: a float ONNX model -> an integer-deployable quantized model.

Uniform precision: every quantizable weight at ``--weight-bits``, every activation at
``--act-bits``. The output is written atomically (nothing is left behind on failure), and
``--report`` writes the per-layer JSON report. With ``--eval`` the quantized model is also
validated against the float one (accuracy, SQNR, size, latency).

Mixed precision: a budget (``--avg-weight-bits``, ``--size-budget``, ``--bops-budget``,
``--latency-budget``) or an accuracy target (``--max-drop X --eval EVAL.npz``) chooses each
layer's weight width from ``--candidate-bits`` (see :mod:`hawq_onnx.mixed.pipeline`), and with
``--candidate-act-bits 8,16`` each activation quantizer's width too; exit 1 when the target
cannot be met, with the best model still written.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from hawq_onnx.commands.argtypes import non_negative_int, positive_int
from hawq_onnx.mixed.pair_pruning import MAX_ILP_PAIRS
from hawq_onnx.model_io import write_atomic
from hawq_onnx.quant.plan import ACT_BITS, CALIB_METHODS, DEFAULT_CALIB_METHOD, WEIGHT_BITS
from hawq_onnx.quantize import QuantizeOptions, quantize
from hawq_onnx.recipe import provenance
from hawq_onnx.report_html import write_html


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
    parser.add_argument("--report-html", type=Path, metavar="report.html",
                        help="write a self-contained HTML report (charts, metrics) here")
    add_mixed_arguments(parser)
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
    parser.add_argument("--rounding", choices=("rtn", "mse", "gptq"),
                        help="rtn: max scale, nearest rounding; mse: searched scale, nearest "
                             "rounding; gptq: searched scale at <= 4 bits, integers rounded "
                             "with error feedback through each layer's input moments (needs "
                             "--calib). Default: gptq at <= 4 bits (mse without --calib), "
                             "rtn above")
    parser.add_argument("--format", choices=("qdq", "qoperator"), default="qdq",
                        help="qdq (default) or qoperator (QLinearConv/QGemm/...; int8 groups)")
    parser.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                        help="keep matching nodes float: node name, op type, weight name or "
                             "a regex over node names (repeatable)")
    parser.add_argument("--no-bias-correction", dest="bias_correction", action="store_false",
                        help="keep the float biases (default: remove the mean per-channel "
                             "output shift of each quantized Conv/Gemm, measured on the "
                             "calibration data)")
    parser.add_argument("--batch-size", type=positive_int, default=32,
                        help="calibration batch size (a batch size the model fixes wins)")
    parser.add_argument("--max-calib-samples", type=positive_int, metavar="N",
                        help="use only the first N calibration samples")


def _act_bits(text: str) -> int | None:
    if text.lower() in ("none", "0", "float"):
        return None
    if text not in ("8", "16"):
        raise argparse.ArgumentTypeError(f"must be 8, 16 or none, got {text}")
    return int(text)




def _group_size(text: str) -> int:
    value = positive_int(text)
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
    """Atomic JSON write with ordinary file permissions (``model_io.write_atomic``)."""
    write_atomic(path, json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")


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
        rule = metrics.get("decision")
        by = f" ({rule})" if rule and rule != "argmax" else ""
        parts.append(f"agreement {100 * metrics['agreement']:.2f}%{by}")
    parts.append(f"SQNR {metrics['sqnr_db']} dB, cosine {metrics['cosine']}")
    if metrics.get("latency_float_ms") is not None:
        parts.append(f"latency {metrics['latency_float_ms']:.3f} -> "
                     f"{metrics['latency_quant_ms']:.3f} ms (1 thread)")
    return "; ".join(parts)


def run(args: argparse.Namespace) -> int:
    if mixed_requested(args):
        return run_mixed(args)
    result = quantize(args.model, args.output, args.calib, options_from_args(args),
                      eval_path=args.eval, labels_key=args.labels_key)
    result.report["build"] = provenance(args)  # recipe, input hashes, tool versions
    args.json_summary = result.report
    if args.report is not None:
        write_json(args.report, result.report)
    if args.report_html is not None:
        write_html(args.report_html, result.report)
    for line in summary_lines(result.report, args.output):
        print(line)
    for note in result.report.get("notes", [])[:10]:
        print(f"note: {note}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------- mixed precision
#: binary multiples, as the allocator's messages print them (1 KB = 1024 B).
_SIZE_UNITS = {"": 1, "b": 1, "kb": 1024, "kib": 1024, "k": 1024, "mb": 1024**2,
               "mib": 1024**2, "m": 1024**2, "gb": 1024**3, "gib": 1024**3, "g": 1024**3}
_COUNT_UNITS = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_TIME_UNITS = {"": 1e-3, "ms": 1e-3, "s": 1.0, "us": 1e-6, "µs": 1e-6}
_NUMBER = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Zµ]*)\s*")
MIXED_BUDGETS = ("avg_weight_bits", "size_budget", "bops_budget", "latency_budget", "max_drop")
_MINIMIZE = {"size": "size_bytes", "avg-bits": "avg_weight_bits", "bops": "bops",
             "latency": "latency"}


def _with_unit(text: str, units: dict[str, float], what: str) -> float:
    match = _NUMBER.fullmatch(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in units or float(match.group(1)) <= 0:
        known = ", ".join(sorted(u for u in units if u)) or "none"
        raise argparse.ArgumentTypeError(f"expected a positive {what} (units: {known}), "
                                         f"got '{text}'")
    return float(match.group(1)) * units[unit]


def _size(text: str) -> float:
    return _with_unit(text, _SIZE_UNITS, "size like 1.5MB")


def _bops(text: str) -> float:
    return _with_unit(text, _COUNT_UNITS, "BOPs count like 2.5G")


def _latency(text: str) -> float:
    return _with_unit(text, _TIME_UNITS, "latency like 0.8ms")


def _avg_bits(text: str) -> float:
    return _with_unit(text, {"": 1.0}, "number of bits")


def _drop(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1] (0.01 = one "
                                         f"point), got '{text}'")
    return value


def _bits_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        values = ()
    if not values or any(v not in WEIGHT_BITS for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated widths from {WEIGHT_BITS}, "
                                         f"got '{text}'")
    return values


def _act_bits_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        values = ()
    if not values or any(v not in ACT_BITS for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated activation widths from "
                                         f"{ACT_BITS}, got '{text}'")
    return values


def _pin(text: str) -> tuple[str, int]:
    name, sep, bits = text.rpartition("=")
    if not sep or not name or not bits.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME=BITS, got '{text}'")
    return name, int(bits)


def add_mixed_arguments(parser: argparse.ArgumentParser) -> None:
    """Mixed precision: one budget (or an accuracy target) turns it on."""
    group = parser.add_argument_group(
        "mixed precision", "per-layer weight widths chosen by an exact ILP over Hessian "
        "sensitivities (plus inter-layer corrections); give one budget or --max-drop")
    group.add_argument("--candidate-bits", type=_bits_list, metavar="B,B,...",
                       help="widths a layer may take (default 2,3,4,6,8)")
    group.add_argument("--candidate-act-bits", type=_act_bits_list, metavar="B,B",
                       help="also allocate activation widths, e.g. 8,16: one per activation "
                            "quantizer feeding a weighted layer, jointly with the weights "
                            "(BOPs/latency priced per pair; 16 bits needs opset 21). Default: "
                            "activations stay at --act-bits")
    group.add_argument("--avg-weight-bits", type=_avg_bits, metavar="BITS",
                       help="parameter-weighted average weight width (float weights count 32)")
    group.add_argument("--size-budget", type=_size, metavar="SIZE",
                       help="model file size, e.g. 1.5MB (B, KB, MB; 1 KB = 1024 B)")
    group.add_argument("--bops-budget", type=_bops, metavar="BOPS",
                       help="bit operations MACs*b_w*b_a per sample, e.g. 2.5G (K, M, G, T)")
    group.add_argument("--latency-budget", type=_latency, metavar="TIME",
                       help="summed per-layer onnxruntime latency, e.g. 0.8ms (s, ms, us; "
                            "measured once per machine and cached)")
    group.add_argument("--max-drop", type=_drop, metavar="X",
                       help="accuracy target: the smallest model whose measured drop on "
                            "--eval is <= X (exit 1, model still written, when none is)")
    group.add_argument("--minimize", choices=tuple(_MINIMIZE), default="size",
                       help="what --max-drop makes smallest (default size)")
    group.add_argument("--no-interactions", dest="interactions", action="store_const",
                       const="none", default="both",
                       help="Hessian traces only (HAWQ-V2), no inter-layer corrections")
    group.add_argument("--interactions", dest="interactions",
                       choices=("hessian", "measured", "both"), default="both",
                       help="corrections: Hessian cross terms, measured neighbour "
                            "interactions, or both (default)")
    group.add_argument("--hops", type=positive_int, default=1, metavar="K",
                       help="measure interactions of layers within K hops (default 1)")
    group.add_argument("--max-ilp-pairs", type=non_negative_int, default=MAX_ILP_PAIRS, metavar="N",
                       help="pairwise loss terms the ILP takes: every measured one, then the "
                            f"largest others up to N (default {MAX_ILP_PAIRS}); the report "
                            "bounds what the rest could change")
    group.add_argument("--pin", action="append", type=_pin, default=[], metavar="NAME=BITS",
                       help="fix a weight's (or layer node's) width (repeatable)")
    group.add_argument("--pin-act", action="append", type=_pin, default=[],
                       metavar="TENSOR=BITS",
                       help="fix an activation quantizer's width, named by its tensor or a "
                            "layer input it quantizes (repeatable; needs --candidate-act-bits)")
    group.add_argument("--pin-first-last", type=int, metavar="BITS",
                       help="fix the first and last weighted layers' width (HAWQ-V3: 8)")
    group.add_argument("--analysis-samples", type=positive_int, default=256, metavar="N",
                       help="calibration samples for the Hessian and interactions (default "
                            "256); the next --holdout-samples judge the predictions")
    group.add_argument("--holdout-samples", type=positive_int, default=256, metavar="N",
                       help="held-out calibration samples (default 256)")
    group.add_argument("--max-probes", type=positive_int, default=64, metavar="N",
                       help="Hutchinson probes at most (default 64)")
    group.add_argument("--eval-configs", type=int, default=50, metavar="N",
                       help="random configurations for the Spearman check (default 50; 0 "
                            "skips it)")
    group.add_argument("--pareto-plot", type=Path, metavar="FILE.png",
                       help="plot the predicted and measured Pareto front (needs matplotlib)")
    group.add_argument("--cache-dir", type=Path, metavar="DIR",
                       help="analysis and latency cache (default: $HAWQ_ONNX_CACHE_DIR or "
                            "~/.cache/hawq-onnx)")
    group.add_argument("--no-cache", action="store_true",
                       help="neither read nor write the analysis/latency cache")


def mixed_requested(args: argparse.Namespace) -> bool:
    """Mixed precision runs when a budget or an accuracy target is given; its other options
    alone are a usage error (they would be silently ignored)."""
    if any(getattr(args, name, None) is not None for name in MIXED_BUDGETS):
        return True
    alone = [flag for flag, given in (
        ("--candidate-bits", args.candidate_bits is not None), ("--pin", bool(args.pin)),
        ("--candidate-act-bits", args.candidate_act_bits is not None),
        ("--pin-act", bool(args.pin_act)),
        ("--pin-first-last", args.pin_first_last is not None),
        ("--pareto-plot", args.pareto_plot is not None),
        ("--interactions", args.interactions != "both")) if given]
    if alone:
        from hawq_onnx.errors import HawqError

        raise HawqError(f"{alone[0]} needs a mixed-precision budget (--avg-weight-bits, "
                        "--size-budget, --bops-budget, --latency-budget) or --max-drop")
    return False


def mixed_options_from_args(args: argparse.Namespace) -> Any:
    from hawq_onnx.mixed.pipeline import MixedOptions

    return MixedOptions(
        candidate_bits=args.candidate_bits or (2, 3, 4, 6, 8),
        candidate_act_bits=args.candidate_act_bits, act_pins=tuple(args.pin_act),
        avg_weight_bits=args.avg_weight_bits, size_budget=args.size_budget,
        bops_budget=args.bops_budget, latency_budget=args.latency_budget,
        max_drop=args.max_drop, minimize=_MINIMIZE[args.minimize],
        interactions=args.interactions, hops=args.hops, max_ilp_pairs=args.max_ilp_pairs,
        pins=tuple(args.pin),
        pin_first_last=args.pin_first_last, analysis_samples=args.analysis_samples,
        holdout_samples=args.holdout_samples, max_probes=args.max_probes,
        min_probes=min(16, args.max_probes), eval_configs=args.eval_configs,
        use_cache=not args.no_cache,
        cache_dir=None if args.cache_dir is None else str(args.cache_dir))


def mixed_summary_lines(mixed: dict[str, Any]) -> list[str]:
    totals = mixed["totals"]
    widths = " ".join(str(u["bits"]) for u in mixed["units"])
    lines = [f"mixed precision ({mixed['loss_model']} loss model): widths {widths}; "
             f"average weight bits {totals['avg_weight_bits']}; predicted dL "
             f"{totals['predicted_dl']}, measured dL {totals['measured_dl']} (held out)"]
    if mixed.get("activations"):
        acts = " ".join(str(a["bits"]) for a in mixed["activations"])
        lines.append(f"activation widths {acts} ({len(mixed['activations'])} quantizers "
                     f"feeding weighted layers); BOPs {totals['bops']}")
    spearman = mixed.get("spearman")
    if spearman:
        parts = ", ".join(f"{k} {v}" for k, v in spearman["spearman"].items())
        lines.append(f"Spearman predicted vs measured dL over {spearman['configs']} random "
                     f"configurations: {parts}")
    target = mixed.get("target")
    if target:
        verdict = "met" if target["met"] else "MISSED"
        lines.append(f"accuracy target: drop {target['drop']:.4f} vs max {target['max_drop']} "
                     f"{verdict} ({target['evaluations']} of {target['frontier_points']} "
                     "frontier points measured)")
    return lines


def run_mixed(args: argparse.Namespace) -> int:
    """Mixed-precision quantization; 1 when an accuracy target is missed (model written)."""
    from hawq_onnx.errors import GateFailedError, HawqError
    from hawq_onnx.mixed.pipeline import quantize_mixed
    from hawq_onnx.mixed.report import write_pareto_plot

    if args.calib is None:
        raise HawqError("mixed precision needs --calib (the Hessian analysis runs on it)")
    if args.pareto_plot is not None:
        from hawq_onnx.hessian.plots import require_matplotlib

        require_matplotlib()  # fail before the slow part, not after it
    say = (lambda message: print(f"... {message}", file=sys.stderr)) if args.verbose else None
    result = quantize_mixed(args.model, args.output, args.calib, options_from_args(args),
                            mixed_options_from_args(args), eval_path=args.eval,
                            labels_key=args.labels_key, progress=say)
    result.report["build"] = provenance(args)
    args.json_summary = result.report
    if args.report is not None:
        write_json(args.report, result.report)
    if args.report_html is not None:
        write_html(args.report_html, result.report)
    if args.pareto_plot is not None:
        write_pareto_plot(args.pareto_plot, result.report["mixed"])
    for line in summary_lines(result.report, args.output) + mixed_summary_lines(
            result.report["mixed"]):
        print(line)
    for note in result.report.get("notes", [])[:10]:
        print(f"note: {note}", file=sys.stderr)
    if result.target_met is False:
        raise GateFailedError(
            f"accuracy target missed: even the most precise candidate drops "
            f"{result.report['mixed']['target']['drop']:.4f} > {args.max_drop}; the best "
            f"model found was written to {args.output}")
    return 0
