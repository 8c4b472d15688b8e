"""``hawq-onnx analyze``: per-layer Hessian sensitivity of a model on calibration data.

Prints a table (layer, op, params, trace ± SE, trace/params, top eigenvalue), and on request
writes the full result as JSON (``--report``) and a figure (``--plot``). Results are cached
by (model, data, settings); ``--no-cache`` forces a fresh run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from hawq_onnx.analysis import AnalysisSettings, analyze
from hawq_onnx.commands.argtypes import non_negative_int, positive_float, positive_int
from hawq_onnx.hessian.hvp import DEFAULT_MODE, HVP_MODES
from hawq_onnx.hessian.result import AnalysisResult
from hawq_onnx.model_io import write_atomic
from hawq_onnx.recipe import provenance


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "analyze", help="measure per-layer Hessian sensitivity (traces, eigenvalues, density)",
        description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, metavar="MODEL.onnx")
    parser.add_argument("--calib", type=Path, required=True, metavar="CALIB.npz",
                        help="calibration inputs, keyed by model input name")
    parser.add_argument("--labels-key", metavar="KEY",
                        help="array of labels in CALIB.npz (makes the default loss ce)")
    parser.add_argument("--loss", choices=("auto", "kl", "ce", "mse"), default="auto",
                        help="auto: ce with labels, else kl for class scores (and per "
                             "position for [N, steps, classes] probabilities), mse otherwise")
    parser.add_argument("--outputs", type=_names, metavar="NAME,...",
                        help="model outputs the loss uses (default: every float output)")
    parser.add_argument("--rel-tol", type=positive_float, default=0.05,
                        help="stop when SE <= rel_tol * |trace| for every layer")
    parser.add_argument("--min-probes", type=positive_int, default=16)
    parser.add_argument("--max-probes", type=positive_int, default=256)
    parser.add_argument("--eigs", type=non_negative_int, default=0, metavar="K",
                        help="top-K eigenvalues per layer and for the whole model")
    parser.add_argument("--density", nargs="?", const="global", choices=("global", "layers"),
                        help="spectral density by SLQ (global, or per layer)")
    parser.add_argument("--activations", action="store_true",
                        help="Hessian traces w.r.t. each quantizable layer's input")
    parser.add_argument("--per-layer-loop", action="store_true",
                        help="diagnostic: one HVP per layer and probe instead of one global")
    parser.add_argument("--hvp", choices=("auto", *HVP_MODES), default=DEFAULT_MODE,
                        help="how Hessian-vector products are computed (auto: gauss_newton "
                             "where it is exact, i.e. kl/mse, else double_backprop)")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--max-samples", type=positive_int, metavar="N",
                        help="use only the first N calibration samples")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", type=Path, metavar="analysis.json",
                        help="write the full result as JSON")
    parser.add_argument("--report-html", type=Path, metavar="report.html",
                        help="write a self-contained HTML report (trace chart) here")
    parser.add_argument("--plot", type=Path, metavar="spectra.png",
                        help="plot per-layer normalized traces (and the density); "
                             "needs matplotlib")
    parser.add_argument("--cache-dir", type=Path, metavar="DIR",
                        help="result cache (default: $HAWQ_ONNX_CACHE_DIR or the user cache)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write it")
    parser.set_defaults(func=run)
    return parser


def _names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected NAME[,NAME...]")
    return names


def run(args: argparse.Namespace) -> int:
    if args.plot is not None:
        from hawq_onnx.hessian.plots import require_matplotlib

        require_matplotlib()  # fail before the slow part, not after it
    settings = AnalysisSettings(
        loss=args.loss, outputs=args.outputs, labels_key=args.labels_key,
        rel_tol=args.rel_tol, min_probes=min(args.min_probes, args.max_probes),
        max_probes=args.max_probes, per_layer=args.per_layer_loop, eigs=args.eigs,
        density=args.density, activations=args.activations, hvp_mode=args.hvp,
        batch_size=args.batch_size, max_samples=args.max_samples, seed=args.seed,
        device=args.device)
    start = time.perf_counter()
    with _ProgressBars() as bars:
        result = analyze(args.model, args.calib, settings, cache_dir=args.cache_dir,
                         use_cache=not args.no_cache, progress=bars.update)
    elapsed = time.perf_counter() - start
    # what --json prints and --report-html shows (see hawq_onnx.cli)
    args.json_summary = {**result.to_dict(), "build": provenance(args)}
    print(render_table(result))
    print(render_summary(result, elapsed))
    if args.report is not None:
        write_atomic(args.report, result.to_json() + "\n")
        print(f"report: {args.report}")
    if args.report_html is not None:
        from hawq_onnx.report_html import write_html

        write_html(args.report_html, args.json_summary)
        print(f"html report: {args.report_html}")
    if args.plot is not None:
        from hawq_onnx.hessian.plots import plot_analysis

        plot_analysis(result, args.plot)
        print(f"plot: {args.plot}")
    return 0


# ---------------------------------------------------------------------- output
def render_table(result: AnalysisResult) -> str:
    """One row per quantizable weight, widest names first trimmed to fit."""
    with_eigs = any(layer.top_eigenvalue is not None for layer in result.layers)
    with_acts = any(layer.activation_trace is not None for layer in result.layers)
    header = ["layer", "op", "params", "trace ± SE", "trace/params"]
    header += ["top eig"] if with_eigs else []
    header += ["act trace ± SE"] if with_acts else []
    rows = [header]
    for layer in result.layers:
        row = [_trim(layer.name, 48), layer.op, f"{layer.params:,}",
               _pm(layer.trace, layer.trace_se) + ("" if layer.converged else " *"),
               f"{layer.average_eigenvalue:.4g}"]
        if with_eigs:
            top = layer.top_eigenvalue
            mark = "" if layer.eigen_converged in (None, True) else " *"
            row.append("-" if top is None else f"{top:.4g}{mark}")
        if with_acts:
            row.append("-" if layer.activation_trace is None
                       else _pm(layer.activation_trace, layer.activation_trace_se))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    right = {2, 3, 4, 5, 6}
    lines = ["  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_summary(result: AnalysisResult, elapsed: float) -> str:
    losses = ", ".join(f"{loss['kind']}({loss['output']})" for loss in result.losses)
    state = "converged" if result.converged else \
        f"NOT converged at rel_tol {result.settings['rel_tol']} (rows marked *)"
    lines = [f"total trace {_pm(result.total_trace, result.total_trace_se)}; "
             f"{result.probes} probes, {state}; loss {losses}; {result.samples} samples; "
             f"{elapsed:.1f}s{' (cached)' if result.cached else ''}"]
    if result.eigenvalues is not None:
        values = ", ".join(f"{v:.4g}" for v in result.eigenvalues)
        flag = "" if result.eigen_converged else " (not converged)"
        lines.append(f"top eigenvalues (whole model): {values}{flag}")
    for density in result.density:
        lines.append(f"density {density.scope}: SLQ trace {_pm(density.trace, density.trace_se)}"
                     f", ‖H‖_F² ≈ {density.frobenius_sq:.4g} ({len(density.nodes)} runs)")
    return "\n".join(lines)


def _pm(value: float, se: float | None) -> str:
    return f"{value:.4g} ± {se:.2g}" if se is not None else f"{value:.4g}"


def _trim(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


class _ProgressBars:
    """One tqdm bar per stage, shown only when stderr is a terminal."""

    def __init__(self) -> None:
        self._bars: dict[str, Any] = {}
        try:
            self._enabled = sys.stderr.isatty()
        except (AttributeError, ValueError):
            self._enabled = False

    def update(self, stage: str, advance: int, total: int) -> None:
        if not self._enabled:
            return
        if stage not in self._bars:
            from tqdm import tqdm

            self._bars[stage] = tqdm(total=total, desc=stage, file=sys.stderr, leave=False)
        self._bars[stage].update(advance)

    def __enter__(self) -> _ProgressBars:
        return self

    def __exit__(self, *exc: object) -> None:
        for bar in self._bars.values():
            bar.close()
