"""Peak memory of calibration (``quantize``) and analysis (``analyze``) as the calibration
set grows 10x.

Why: a build step gets whatever calibration set the user has. Memory must grow with the
data at most by a small constant factor (the arrays are held in memory once), never with
anything like samples x activations. Each measurement is a fresh subprocess (so imports,
allocator state and earlier runs do not mix) that runs the real CLI command in-process and
reports its own peak RSS (``resource.getrusage``, no psutil).

    .venv/bin/python bench/bench_memory.py                 # 2,000 vs 20,000 samples
    .venv/bin/python bench/bench_memory.py --samples 500 --factor 10 --json out.json

The model is a wide MLP (``--features`` inputs, 16 hidden units) so the data, not the
compute, dominates: 4,096 float32 features are 16 KiB per sample.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
STAGES = ("calibration", "analysis")


def _child(stage: str, model: str, data: str, out: str) -> None:
    """Run one command in this process, then print its peak RSS in MiB as JSON."""
    sys.path.insert(0, str(REPO))
    from hawq_onnx.cli import main

    argv = {
        "calibration": ["quantize", model, "-o", out, "--calib", data, "--no-bias-correction",
                        "--batch-size", "64"],
        "analysis": ["analyze", model, "--calib", data, "--no-cache", "--min-probes", "2",
                     "--max-probes", "2", "--batch-size", "64"],
    }[stage]
    code = main(argv)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"exit_code": code, "peak_rss_mib": round(peak_kib / 1024, 1)}))


def _write_inputs(folder: Path, samples: int, features: int) -> tuple[Path, Path]:
    import numpy as np
    import onnx

    sys.path.insert(0, str(REPO))
    from tests.tiny_models import mlp_model

    model = folder / "wide.onnx"
    if not model.exists():
        onnx.save(mlp_model(features=features, hidden=16, classes=10), model)
    data = folder / f"calib_{samples}.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.standard_normal((samples, features), dtype=np.float32))
    return model, data


def measure(stage: str, samples: int, features: int, folder: Path) -> dict[str, Any]:
    """Peak RSS of one ``stage`` run on ``samples`` samples, in a fresh interpreter."""
    model, data = _write_inputs(folder, samples, features)
    proc = subprocess.run(
        [sys.executable, __file__, "--child", stage, str(model), str(data),
         str(folder / "out.onnx")], capture_output=True, text=True, cwd=REPO, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{stage} child failed: {proc.stderr.strip()[-500:]}")
    result = json.loads(lines[-1])
    if result["exit_code"] != 0:
        raise RuntimeError(f"{stage} exited {result['exit_code']}: {proc.stderr[-500:]}")
    data.unlink()
    return {"stage": stage, "samples": samples, "data_mib": round(samples * features * 4 / 2**20,
                                                                  1),
            "peak_rss_mib": result["peak_rss_mib"]}


def run(samples: int, factor: int, features: int) -> list[dict[str, Any]]:
    """Both stages at ``samples`` and ``samples * factor``; growth per MiB of extra data."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="hawq-bench-memory-") as folder:
        for stage in STAGES:
            small = measure(stage, samples, features, Path(folder))
            large = measure(stage, samples * factor, features, Path(folder))
            extra_data = large["data_mib"] - small["data_mib"]
            growth = large["peak_rss_mib"] - small["peak_rss_mib"]
            rows.append({"stage": stage, "small": small, "large": large,
                         "rss_growth_mib": round(growth, 1), "data_growth_mib": extra_data,
                         "rss_per_data": round(growth / extra_data, 2) if extra_data else None})
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(*sys.argv[2:6])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--factor", type=int, default=10)
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    rows = run(args.samples, args.factor, args.features)
    print(f"{'stage':<12} {'samples':>9} {'data MiB':>9} {'peak RSS MiB':>13}")
    for row in rows:
        for size in ("small", "large"):
            r = row[size]
            print(f"{row['stage']:<12} {r['samples']:>9,} {r['data_mib']:>9.1f} "
                  f"{r['peak_rss_mib']:>13.1f}")
        print(f"  -> RSS grew {row['rss_growth_mib']} MiB for {row['data_growth_mib']} MiB more "
              f"data ({row['rss_per_data']} MiB per MiB)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
