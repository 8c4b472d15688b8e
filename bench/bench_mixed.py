"""Mixed precision on the zoo: accuracy / SQNR vs model bytes for every allocation strategy.

Per model, on the same calibration data (activations at 8 bits, per-channel weights, bias
correction, the project's exporter for everything but onnxruntime's own quantizer):

* uniform 8 / 4 / 2-bit weights;
* onnxruntime ``quantize_static`` int8 and int4 weights (QDQ, per channel, uint8 activations);
* at each average-weight-bit budget: random allocations (the ILP on random sensitivities
  ``r_i·4^(-b)``, ``r_i`` log-uniform over six decades: random layer priorities that use the
  whole budget; mean of ``--random`` draws), greedy-by-trace (most sensitive ``Tr(H)/n``
  first, each unit the widest width the budget still allows), the ILP on Hessian-only Ω
  (HAWQ-V2/V3), and the ILP with inter-layer corrections (measured single-layer ΔL and
  neighbour interactions plus Hessian cross terms) guarded by the Hessian-only allocation on
  held-out ΔL, as the CLI does by default;
* the Spearman correlation of predicted vs measured held-out ΔL over 50 random
  configurations for every loss model, and the wall time of each phase.

Each point reports the exported file size, top-1 and SQNR on the evaluation file
(onnxruntime), and the measured loss increase on held-out calibration samples.

Run:  .venv/bin/python bench/bench_mixed.py [--models fashion_cnn_op17 ...] [--json out.json]
      [--figures bench/figures] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MODELS = REPO / "models"
ZOO = {"fashion_cnn_op17": "fashion", "digits_resnet_op17": "digits",
       "mobilenet_op21": "fashion", "transformer_op17": "text"}
DEFAULT_MODELS = ("fashion_cnn_op17", "digits_resnet_op17", "transformer_op17")
BUDGETS = (2.5, 3.0, 4.0, 5.0, 6.0)


# ---------------------------------------------------------------------- allocations
def random_allocation(session: Any, budget: float, seed: int) -> Any:
    """ILP on random sensitivities: a random layer priority that fills the budget."""
    from hawq_onnx.mixed.ilp import solve
    from hawq_onnx.mixed.interactions import LossModel

    rng = np.random.default_rng(seed)
    weights = 10.0 ** rng.uniform(-3, 3, len(session.choices))
    unary = weights[:, None] * 4.0 ** (-np.asarray(session.bits, dtype=np.float64))[None, :]
    problem = session.problem(LossModel("random", unary))
    return solve(problem, _budget(session, budget))


def greedy_by_trace(session: Any, budget: float) -> Any:
    """Most sensitive unit (trace per parameter) first, each at the widest width that keeps
    the budget feasible with the remaining units at the narrowest."""
    from hawq_onnx.mixed.ilp import make_allocation, metric_total

    problem = session.problem(session.corrections.models["hessian"])
    table = session.sensitivity
    limit = _budget(session, budget).avg_weight_bits
    density = []
    for choice in session.choices:
        rows = [table.row(n) for n in choice.names]
        density.append(sum(table.trace[r] for r in rows) / max(choice.params, 1))
    columns = [0] * len(session.choices)
    for i, bits in session.pins.items():
        columns[i] = session.bits.index(bits)
    for i in np.argsort(density)[::-1]:
        if i in session.pins:
            continue
        for k in range(len(session.bits) - 1, -1, -1):
            trial = [*columns[:i], k, *columns[i + 1:]]
            if metric_total(problem, "avg_weight_bits", trial) <= limit + 1e-12:
                columns = trial
                break
    return make_allocation(problem, columns, "greedy")


def _budget(session: Any, bits: float) -> Any:
    session.mixed.avg_weight_bits = bits
    return session.budget()


def uniform_allocation(session: Any, bits: int) -> Any:
    from hawq_onnx.mixed.ilp import make_allocation

    problem = session.problem(session.corrections.models["hessian"])
    return make_allocation(problem, [session.bits.index(bits)] * len(session.choices),
                           "uniform")


# ---------------------------------------------------------------------- measurements
def measure(session: Any, allocation: Any, eval_path: Path, folder: Path) -> dict[str, Any]:
    from hawq_onnx.export import finalize
    from hawq_onnx.model_io import save_model
    from hawq_onnx.validate import evaluate

    model = finalize(session.build(allocation).model)
    path = save_model(model, folder / "candidate.onnx")
    metrics = evaluate(session.model_path, path, eval_path, latency_runs=0)
    return {"bits": list(allocation.bits), "avg_weight_bits": round(allocation.avg_weight_bits, 4),
            "bytes": metrics.bytes_quant, "top1": metrics.top1_quant,
            "agreement": metrics.agreement, "sqnr_db": round(metrics.sqnr_db, 3),
            "measured_dl": float(f"{session.measured_delta(allocation):.6g}"),
            "predicted_dl": float(f"{allocation.objective:.6g}")}


def ort_static(model: Path, calib: Path, eval_path: Path, folder: Path, int4: bool
               ) -> dict[str, Any]:
    """onnxruntime's own static quantizer, same calibration data."""
    from bench.ort_baseline import quantize_static_like_hawq
    from hawq_onnx.validate import evaluate

    out = folder / f"ort_{'int4' if int4 else 'int8'}.onnx"
    start = time.perf_counter()
    try:
        quantize_static_like_hawq(model, calib, out, int4=int4)
        metrics = evaluate(model, out, eval_path, latency_runs=0)
    except Exception as exc:  # report what onnxruntime's quantizer could not do
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    return {"bytes": metrics.bytes_quant, "top1": metrics.top1_quant,
            "agreement": metrics.agreement,
            "sqnr_db": round(metrics.sqnr_db, 3), "wall_s": round(time.perf_counter() - start, 2)}


# ---------------------------------------------------------------------- one model
def eval_file(name: str, which: str) -> Path:
    """The committed evaluation file, or the whole held-out split (``models.full_eval``)."""
    if which == "full" and ZOO[name] in ("fashion", "text"):
        from models.full_eval import ensure

        return ensure(ZOO[name])
    return MODELS / f"{ZOO[name]}_eval.npz"


def bench_model(name: str, budgets: list[float], draws: int, folder: Path,
                eval_path: Path) -> dict[str, Any]:
    from hawq_onnx.mixed.pipeline import MixedOptions, MixedSession
    from hawq_onnx.quantize import QuantizeOptions

    model = MODELS / f"{name}.onnx"
    calib = MODELS / f"{ZOO[name]}_calib.npz"
    session = MixedSession(model, calib, QuantizeOptions(),
                           MixedOptions(avg_weight_bits=4.0, interactions="both",
                                        use_cache=False))
    session.correct("both")
    evaluation = session.evaluate(50)
    models = session.corrections.models
    row: dict[str, Any] = {"model": name, "units": len(session.choices),
                           "eval_file": eval_path.name, "eval_samples": _samples(eval_path),
                           "params": sum(c.params for c in session.choices),
                           "spearman": evaluation.to_dict()["spearman"],
                           "float": _float_point(model, eval_path)}
    row["uniform"] = {str(b): measure(session, uniform_allocation(session, b), eval_path, folder)
                      for b in (8, 4, 3, 2)}
    row["ort"] = {tag: ort_static(model, calib, eval_path, folder, tag == "int4")
                  for tag in ("int8", "int4")}
    strategies: dict[str, list[dict[str, Any]]] = {
        "random": [], "greedy": [], "ilp_hessian": [], "ilp_corrected": []}
    for budget in budgets:
        start = time.perf_counter()
        draws_out = [measure(session, random_allocation(session, budget, seed), eval_path,
                             folder) for seed in range(draws)]
        strategies["random"].append(_mean(draws_out, budget))
        strategies["greedy"].append({"budget": budget, **measure(
            session, greedy_by_trace(session, budget), eval_path, folder)})
        _budget(session, budget)
        allocation = session.allocate(session.problem(models["hessian"]))
        strategies["ilp_hessian"].append({"budget": budget, **measure(session, allocation,
                                                                      eval_path, folder)})
        _, allocation = session.allocate_guarded()  # what the CLI does by default
        kept = (session.selection or {}).get("kept", "both")
        strategies["ilp_corrected"].append({"budget": budget, "kept": kept, **measure(
            session, allocation, eval_path, folder)})
        print(f"  {name} @ {budget} bits: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    row.update(strategies)
    row["timings"] = dict(session.timings)
    return row


def _samples(path: Path) -> int:
    with np.load(path) as data:
        return int(len(data["labels"]))


def _float_point(model: Path, eval_path: Path) -> dict[str, Any]:
    from hawq_onnx.validate import evaluate

    metrics = evaluate(model, model, eval_path, latency_runs=0)
    return {"bytes": metrics.bytes_float, "top1": metrics.top1_float}


def _mean(points: list[dict[str, Any]], budget: float) -> dict[str, Any]:
    out: dict[str, Any] = {"budget": budget, "draws": len(points)}
    for key in ("bytes", "top1", "agreement", "sqnr_db", "measured_dl", "avg_weight_bits"):
        values = [p[key] for p in points]
        out[key] = float(np.mean(values))
        out[f"{key}_std"] = float(np.std(values))
    out["allocations"] = [p["bits"] for p in points]
    return out


# ---------------------------------------------------------------------- output
LABELS = {"random": "random (mean)", "greedy": "greedy by trace", "ilp_hessian": "ILP Hessian-only",
          "ilp_corrected": "ILP + corrections (CLI default)"}


def figure(row: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "top1", "top-1 (%)"), (axes[1], "sqnr_db", "SQNR (dB)")):
        scale = 100.0 if key == "top1" else 1.0
        for name, style in (("random", "x:"), ("greedy", "d-."), ("ilp_hessian", "o--"),
                            ("ilp_corrected", "s-")):
            points = sorted(row[name], key=lambda p: (p["bytes"], p["budget"]))
            ax.plot([p["bytes"] / 1024 for p in points], [scale * p[key] for p in points],
                    style, label=LABELS[name])
        uniform = row["uniform"]
        ax.plot([uniform[b]["bytes"] / 1024 for b in uniform],
                [scale * uniform[b][key] for b in uniform], "k^", label="uniform 8/4/3/2")
        for tag, marker in (("int8", "gP"), ("int4", "mP")):
            point = row["ort"][tag]
            if "error" not in point:
                ax.plot([point["bytes"] / 1024], [scale * point[key]], marker,
                        label=f"ORT quantize_static {tag}")
        if key == "top1":
            ax.axhline(100 * row["float"]["top1"], color="grey", linewidth=0.8,
                       label="float")
        ax.set_xlabel("model file (KiB)")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    fig.suptitle(row["model"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pct(point: dict[str, Any]) -> str:
    value = point.get("agreement")
    return "-" if value is None else f"{100 * value:.2f}"


def markdown(rows: list[dict[str, Any]], figures: Path | None, command: str) -> str:
    lines: list[str] = []
    for row in rows:
        lines += [f"### {row['model']}", ""]
        if figures is not None:
            png = figures / f"mixed_{row['model']}.png"
            rel = png.relative_to(REPO) if png.is_relative_to(REPO) else png
            lines += [f"![{row['model']}]({rel})", ""]
        lines += [f"Produced by `{command}`. Evaluation file: `{row.get('eval_file', '?')}` "
                  f"({row.get('eval_samples', '?')} samples).", ""]
        lines += ["| strategy | budget (avg bits) | bytes | top-1 % | agrees with float % | "
                  "SQNR dB | held-out ΔL |", "|---|---|---|---|---|---|---|"]
        lines.append(f"| float | - | {row['float']['bytes']} | {100 * row['float']['top1']:.2f}"
                     " | - | - | - |")
        for bits, p in row["uniform"].items():
            lines.append(f"| uniform {bits}-bit | {bits} | {p['bytes']} | {100 * p['top1']:.2f} "
                         f"| {_pct(p)} | {p['sqnr_db']:.2f} | {p['measured_dl']:.4g} |")
        for tag, p in row["ort"].items():
            if "error" in p:
                lines.append(f"| ORT quantize_static {tag} | - | failed: {p['error']} | | | | |")
            else:
                lines.append(f"| ORT quantize_static {tag} | - | {p['bytes']} | "
                             f"{100 * p['top1']:.2f} | {_pct(p)} | {p['sqnr_db']:.2f} | - |")
        for name in ("random", "greedy", "ilp_hessian", "ilp_corrected"):
            for p in row[name]:
                top1 = f"{100 * p['top1']:.2f}"
                if p.get("kept") == "hessian":
                    top1 += " †"
                if name == "random":
                    top1 += f" ± {100 * p['top1_std']:.2f}"
                lines.append(f"| {LABELS[name]} | {p['budget']} | {p['bytes']:.0f} | {top1} | "
                             f"{_pct(p)} | {p['sqnr_db']:.2f} | {p['measured_dl']:.4g} |")
        spearman = ", ".join(f"{k} {v}" for k, v in row["spearman"].items())
        timings = ", ".join(f"{k} {v:.1f} s" for k, v in row["timings"].items())
        lines += ["", "† the guard kept the Hessian-only allocation (lower held-out ΔL than the "
                      "corrected one).", "",
                  f"Spearman (predicted vs held-out ΔL, 50 random configurations): "
                      f"{spearman}.", "", f"Wall time per phase: {timings}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(DEFAULT_MODELS))
    parser.add_argument("--budgets", nargs="*", type=float, default=list(BUDGETS))
    parser.add_argument("--random", type=int, default=5, help="random draws per budget")
    parser.add_argument("--json", type=Path, help="write the raw rows here")
    parser.add_argument("--figures", type=Path, help="write one PNG per model here")
    parser.add_argument("--markdown", type=Path, help="write the tables here")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval", choices=("full", "zoo"), default="full",
                        help="full: the whole held-out split (models/full_eval.py, built once "
                             "under .cache/eval; digits has no more than the zoo file); "
                             "zoo: the committed 2,000-sample files")
    parser.add_argument("--from-json", type=Path, metavar="ROWS.json",
                        help="only render the tables and figures of an earlier --json run")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = json.loads(args.from_json.read_text()) if args.from_json else []
    with tempfile.TemporaryDirectory(prefix="hawq-bench-mixed-") as folder:
        for name in args.models if not args.from_json else []:
            print(f"benchmarking {name} ...", file=sys.stderr, flush=True)
            rows.append(bench_model(name, args.budgets, args.random, Path(folder),
                                    eval_file(name, args.eval)))
            if args.json:
                args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if args.figures:
        args.figures.mkdir(parents=True, exist_ok=True)
        for row in rows:
            figure(row, args.figures / f"mixed_{row['model']}.png")
    command = " ".join([".venv/bin/python", "bench/bench_mixed.py",
                        *(argv if argv is not None else sys.argv[1:])])
    text = markdown(rows, args.figures.resolve() if args.figures else None, command)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
