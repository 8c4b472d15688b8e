"""What the inter-layer corrections cost, old route vs new, side by side in one process.

* couplings: one HVP per unit and width vs the output-space Gram of Gauss–Newton tangents
  (:meth:`HessianVectorProduct.gram`); same tables (max relative difference printed);
* measured singles and neighbour pairs: full forward passes vs reading back the stored
  float pass upstream of the changed layers (:mod:`hawq_onnx.mirror.reuse`); same losses
  (max absolute difference printed);
* the ILP at the default budget with every pair term vs the ``--max-ilp-pairs`` cap: solve
  time, status, and the full loss model's value of each answer.

Models: the zoo's CNNs and transformer on their calibration files, and PaddleOCR's text
classifier from the rapidocr wheel in ``.cache/wheels`` (random N(0, 1) calibration data:
only costs are measured), the same settings as BENCHMARKS' unseen-models run.

    .venv/bin/python bench/bench_interactions.py [--models fashion transformer cls]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MODELS = REPO / "models"
CLS_MEMBER = "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"


def _zoo(name: str, calib: str) -> Callable[[Path], tuple[Path, Path, dict[str, int]]]:
    def make(_: Path) -> tuple[Path, Path, dict[str, int]]:
        return MODELS / f"{name}.onnx", MODELS / f"{calib}_calib.npz", {}
    return make


def _cls(folder: Path) -> tuple[Path, Path, dict[str, int]]:
    wheel = next((REPO / ".cache" / "wheels").glob("rapidocr_onnxruntime-*.whl"))
    model = folder / "cls.onnx"
    with zipfile.ZipFile(wheel) as archive:
        model.write_bytes(archive.read(CLS_MEMBER))
    calib = folder / "cls_calib.npz"
    rng = np.random.default_rng(0)
    np.savez(calib, x=rng.standard_normal((96, 3, 48, 192)).astype(np.float32))
    return model, calib, {"analysis_samples": 48, "holdout_samples": 48, "max_probes": 8,
                          "min_probes": 8}


CASES = {"fashion": _zoo("fashion_cnn_op17", "fashion"),
         "digits": _zoo("digits_resnet_op17", "digits"),
         "mobilenet": _zoo("mobilenet_op21", "fashion"),
         "transformer": _zoo("transformer_op17", "text"),
         "cls": _cls}


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def bench(name: str, folder: Path) -> dict[str, Any]:
    from hawq_onnx.mixed import interactions as inter
    from hawq_onnx.mixed.ilp import objective_value, solve
    from hawq_onnx.mixed.pipeline import MixedOptions, MixedSession
    from hawq_onnx.quantize import QuantizeOptions

    model, calib, extra = CASES[name](folder)
    mixed = MixedOptions(avg_weight_bits=4.0, eval_configs=0, use_cache=False, **extra)
    session = MixedSession(model, calib, QuantizeOptions(), mixed)
    session.omega()
    meter, _, pert = session.meters()
    hvp = session._hvp
    assert hvp is not None
    row: dict[str, Any] = {"model": name, "units": pert.n_layers, "hvp_mode": hvp.mode}
    by_hvp, row["couplings_hvp_s"] = _timed(
        lambda: inter.hessian_couplings(hvp, pert, gram_budget_bytes=0))
    by_gram, row["couplings_gram_s"] = _timed(lambda: inter.hessian_couplings(hvp, pert))
    scale = max(float(np.abs(by_hvp.quadratic).max()), 1e-30)
    row["couplings_max_rel_diff"] = max(
        float(np.abs(by_hvp.quadratic - by_gram.quadratic).max()) / scale,
        *(float(np.abs(by_hvp.pairs[p] - by_gram.pairs[p]).max()) / scale
          for p in by_hvp.pairs))
    full_meter = inter.LossMeter(meter.objective, reuse_budget_bytes=0)
    pairs = inter.neighbour_pairs(session.quantizer.view, session.choices, mixed.hops)
    bits = session.measure_bits()

    def measure(m: inter.LossMeter) -> inter.MeasuredTables:
        return inter.measured_interactions(m, pert, pairs, measure_bits=bits)

    full, row["measured_full_s"] = _timed(lambda: measure(full_meter))
    reused, row["measured_reuse_s"] = _timed(lambda: measure(meter))
    row["forwards"] = full.forwards
    row["measured_max_abs_diff"] = max(
        float(np.abs(full.single - reused.single).max()),
        *(float(np.abs(full.pairs[p] - reused.pairs[p]).max()) for p in full.pairs))
    row["stored_mb"] = round(meter.clean.used_bytes / 2**20, 1)
    both = inter.with_measured(reused, by_gram)
    whole = session._problem(both.unary, dict(both.pairs), session.act_unary())
    capped = session.problem(both)
    budget = session.budget()
    for label, problem in (("all", whole), ("capped", capped)):
        allocation, seconds = _timed(lambda p=problem: solve(p, budget))
        row[f"ilp_{label}_pairs"] = len(problem.pair_costs)
        row[f"ilp_{label}_s"] = seconds
        row[f"ilp_{label}_status"] = allocation.status.split(" (")[0]
        row[f"ilp_{label}_objective"] = objective_value(whole, allocation.columns)
    return row


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["fashion", "transformer", "cls"],
                        choices=sorted(CASES))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            row = bench(name, Path(tmp))
            rows.append(row)
            print({k: _fmt(v) for k, v in row.items()}, flush=True)
    print()
    print("| model | units | couplings: HVPs → Gram (s) | ratio | max rel. diff | "
          "measured: full → reuse (s) | ratio | max abs. diff | ILP pairs: all → capped | "
          "ILP s | status | full-model objective |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        gram = r["couplings_hvp_s"] / r["couplings_gram_s"]
        reuse = r["measured_full_s"] / r["measured_reuse_s"]
        print(f"| {r['model']} | {r['units']} | {r['couplings_hvp_s']:.1f} → "
              f"{r['couplings_gram_s']:.1f} | {gram:.1f}× | {r['couplings_max_rel_diff']:.1e} | "
              f"{r['measured_full_s']:.1f} → {r['measured_reuse_s']:.1f} | {reuse:.1f}× | "
              f"{r['measured_max_abs_diff']:.1e} | {r['ilp_all_pairs']} → "
              f"{r['ilp_capped_pairs']} | {r['ilp_all_s']:.1f} → {r['ilp_capped_s']:.1f} | "
              f"{r['ilp_all_status']} → {r['ilp_capped_status']} | "
              f"{r['ilp_all_objective']:.4g} → {r['ilp_capped_objective']:.4g} |")

if __name__ == "__main__":
    main()
