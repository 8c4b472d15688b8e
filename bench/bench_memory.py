"""Peak memory of calibration (``quantize``) and analysis (``analyze``) as the calibration
set grows 10x.

Why: a build step gets whatever calibration set the user has. Peak memory must not depend
on the number of samples (up to a fixed bound): the data is checked, hashed and fed batch by
batch from the file, never held whole. Each measurement is a fresh subprocess (so imports,
allocator state and earlier runs do not mix) that runs the real CLI command in-process and
reports its own peak RSS (``resource.getrusage``, no psutil). The launching process stays
small (it never loads the data; see ``_write_inputs``), since Linux starts a child's peak
RSS at its parent's.

    .venv/bin/python bench/bench_memory.py                 # 2,000 vs 20,000 samples
    .venv/bin/python bench/bench_memory.py --compressed    # np.savez_compressed data
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


def _write(folder: str, samples: str, features: str, compressed: str) -> None:
    """Write the model (once) and ``calib_<samples>.npz``; runs in its own process."""
    import numpy as np
    import onnx

    sys.path.insert(0, str(REPO))
    from tests.tiny_models import mlp_model

    model = Path(folder) / "wide.onnx"
    if not model.exists():
        onnx.save(mlp_model(features=int(features), hidden=16, classes=10), model)
    rng = np.random.default_rng(0)
    save = np.savez_compressed if compressed == "1" else np.savez
    save(Path(folder) / f"calib_{samples}.npz",
         x=rng.standard_normal((int(samples), int(features)), dtype=np.float32))


def _write_inputs(folder: Path, samples: int, features: int,
                  compressed: bool = False) -> tuple[Path, Path]:
    """The data is generated in a separate process: on Linux a child's ``ru_maxrss`` starts
    from its parent's peak (the kernel carries the peak across fork and exec), so the process
    that launches the measured commands must never hold the data itself."""
    subprocess.run([sys.executable, __file__, "--write", str(folder), str(samples),
                    str(features), "1" if compressed else "0"], cwd=REPO, check=True)
    return folder / "wide.onnx", folder / f"calib_{samples}.npz"


def measure(stage: str, samples: int, features: int, folder: Path,
            compressed: bool = False) -> dict[str, Any]:
    """Peak RSS of one ``stage`` run on ``samples`` samples, in a fresh interpreter."""
    model, data = _write_inputs(folder, samples, features, compressed)
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


def run(samples: int, factor: int, features: int, compressed: bool = False,
        stages: tuple[str, ...] = STAGES) -> list[dict[str, Any]]:
    """Each stage at ``samples`` and ``samples * factor``; growth per MiB of extra data."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="hawq-bench-memory-") as folder:
        for stage in stages:
            small = measure(stage, samples, features, Path(folder), compressed)
            large = measure(stage, samples * factor, features, Path(folder), compressed)
            extra_data = large["data_mib"] - small["data_mib"]
            growth = large["peak_rss_mib"] - small["peak_rss_mib"]
            rows.append({"stage": stage, "compressed": compressed, "small": small,
                         "large": large,
                         "rss_growth_mib": round(growth, 1), "data_growth_mib": extra_data,
                         "rss_per_data": round(growth / extra_data, 2) if extra_data else None})
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(*sys.argv[2:6])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--write":
        _write(*sys.argv[2:6])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--factor", type=int, default=10)
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--compressed", action="store_true",
                        help="write the data with np.savez_compressed (deflated members)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    rows = run(args.samples, args.factor, args.features, args.compressed, tuple(args.stages))
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
