"""hawq-onnx quantize vs onnxruntime.quantization.quantize_static on the zoo models.

Same float model, same calibration data, W8A8 (per-channel int8 weights, uint8 activations,
QDQ). Per model: top-1 and output SQNR on the evaluation data, quantize wall time, peak
resident memory of the whole quantize run as the calibration set grows 1x/4x/16x (each run
in a fresh process), and single-thread latency of both quantized models and the float one,
interleaved.

Run:  .venv/bin/python bench/bench_quantize.py [--models fashion_cnn_op17 ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MODELS = REPO / "models"
ZOO = {
    "fashion_cnn_op17": "fashion", "fashion_cnn_op13": "fashion",
    "digits_resnet_op17": "digits", "mobilenet_op21": "fashion",
    "transformer_op17": "text", "transformer_decomposed_ln_op17": "text",
    "transformer_constants_op13": "text",
}
SCALES = (1, 4, 16)


def _tiled(calib: Path, factor: int, folder: Path) -> Path:
    """The calibration set repeated ``factor`` times (more samples, same statistics)."""
    with np.load(calib) as data:
        arrays = {k: np.concatenate([data[k]] * factor) if data[k].ndim else data[k]
                  for k in data.files}
    path = folder / f"calib_x{factor}.npz"
    np.savez(path, **arrays)
    return path


# ---------------------------------------------------------------------- one run per process


def _run_ours(model: Path, calib: Path, out: Path) -> None:
    from hawq_onnx.quantize import QuantizeOptions, quantize

    quantize(model, out, calib, QuantizeOptions(batch_size=32))


def _run_ort(model: Path, calib: Path, out: Path) -> None:
    from bench.ort_baseline import quantize_static_like_hawq

    quantize_static_like_hawq(model, calib, out)


def one_run(tool: str, model: Path, calib: Path, out: Path) -> dict[str, float]:
    start = time.perf_counter()
    (_run_ours if tool == "ours" else _run_ort)(model, calib, out)
    wall = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"wall_s": wall, "peak_mib": peak_kib / 1024}


def _subprocess(tool: str, model: Path, calib: Path, out: Path) -> dict[str, float]:
    command = [sys.executable, str(Path(__file__).resolve()), "--one", tool, str(model),
               str(calib), str(out)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=False)
    if result.returncode:
        raise RuntimeError(f"{tool} failed on {model.name}: {result.stderr.strip()[-500:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------- measurements


def _latency(paths: list[Path], feeds: dict[str, np.ndarray], runs: int = 50) -> list[float]:
    from hawq_onnx.calibration.session import make_session, session_options

    sessions = [make_session(p, session_options(threads=1)) for p in paths]
    for session in sessions:
        for _ in range(5):
            session.run(None, feeds)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for index, session in enumerate(sessions):
            start = time.perf_counter()
            session.run(None, feeds)
            times[index].append((time.perf_counter() - start) * 1000)
    return [statistics.median(t) for t in times]


def bench_model(name: str, folder: Path) -> dict[str, object]:
    from hawq_onnx.data import load_npz
    from hawq_onnx.importer import load_model
    from hawq_onnx.validate import evaluate

    model, data = MODELS / f"{name}.onnx", ZOO[name]
    calib, evals = MODELS / f"{data}_calib.npz", MODELS / f"{data}_eval.npz"
    row: dict[str, object] = {"model": name}
    outs = {tool: folder / f"{name}_{tool}.onnx" for tool in ("ours", "ort")}
    for factor in SCALES:
        tiled = _tiled(calib, factor, folder)
        for tool in ("ours", "ort"):
            try:
                stats = _subprocess(tool, model, tiled, outs[tool])
            except RuntimeError as exc:
                row[f"{tool}_error"] = str(exc)
                continue
            row[f"{tool}_peak_mib_x{factor}"] = round(stats["peak_mib"], 1)
            row[f"{tool}_wall_s_x{factor}"] = round(stats["wall_s"], 2)
        tiled.unlink()
    for tool in ("ours", "ort"):
        if outs[tool].exists():
            metrics = evaluate(model, outs[tool], evals, latency_runs=0)
            row[f"{tool}_top1"] = metrics.top1_quant
            row[f"{tool}_sqnr_db"] = round(metrics.sqnr_db, 2)
            row[f"{tool}_bytes"] = metrics.bytes_quant
            row["float_top1"] = metrics.top1_float
    feeds = next(load_npz(evals, load_model(model).model).batches(32))
    paths = [model] + [outs[t] for t in ("ours", "ort") if outs[t].exists()]
    for label, value in zip(["float", "ours", "ort"], _latency(paths, feeds), strict=False):
        row[f"{label}_latency_ms"] = round(value, 3)
    return row


def _table(rows: list[dict[str, object]]) -> str:
    head = ("| model | float top-1 | ours top-1 / SQNR | ORT top-1 / SQNR | quantize s (ours/ORT)"
            " | peak MiB ours 1x/4x/16x | peak MiB ORT 1x/4x/16x | latency ms float/ours/ORT |")
    lines = [head, "|" + "---|" * 8]

    def pct(value: object) -> str:
        return f"{100 * value:.2f}" if isinstance(value, float) else "-"

    for r in rows:
        peaks = {t: "/".join(str(r.get(f"{t}_peak_mib_x{f}", "-")) for f in SCALES)
                 for t in ("ours", "ort")}
        lines.append(
            f"| {r['model']} | {pct(r.get('float_top1'))} | {pct(r.get('ours_top1'))} / "
            f"{r.get('ours_sqnr_db', '-')} | {pct(r.get('ort_top1'))} / {r.get('ort_sqnr_db', '-')}"
            f" | {r.get('ours_wall_s_x1', '-')}/{r.get('ort_wall_s_x1', '-')} | {peaks['ours']} |"
            f" {peaks['ort']} | {r.get('float_latency_ms', '-')}/{r.get('ours_latency_ms', '-')}"
            f"/{r.get('ort_latency_ms', '-')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=[m for m in ZOO
                                                        if (MODELS / f"{m}.onnx").exists()])
    parser.add_argument("--json", type=Path, help="also write the raw rows as JSON")
    parser.add_argument("--one", nargs=4, metavar=("TOOL", "MODEL", "CALIB", "OUT"),
                        help=argparse.SUPPRESS)  # one quantize run, in its own process
    args = parser.parse_args(argv)
    if args.one:
        tool, model, calib, out = args.one
        print(json.dumps(one_run(tool, Path(model), Path(calib), Path(out))))
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="hawq-bench-") as folder:
        for name in args.models:
            print(f"benchmarking {name} ...", file=sys.stderr, flush=True)
            rows.append(bench_model(name, Path(folder)))
    print(_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
