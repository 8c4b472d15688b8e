"""Accuracy-target search: bisection along the frontier, boundary re-check, infeasible targets,
and the end-to-end CLI path (model meets X; exit 1 with the artifact written when it cannot)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest

from hawq_onnx.cli import main
from hawq_onnx.mixed.problem import Allocation
from hawq_onnx.mixed.target import accuracy_target
from hawq_onnx.validate import evaluate
from tests.conftest import MODELS

FASHION = MODELS / "fashion_cnn_op17.onnx"
CALIB = MODELS / "fashion_calib.npz"
EVAL = MODELS / "fashion_eval.npz"


def _frontier(n: int) -> list[Allocation]:
    """n points, index i at size i (least precise first)."""
    return [Allocation(bits=[i], objective=float(n - i), size_bytes=float(i),
                       avg_weight_bits=float(i), bops=None, latency=None, status="optimal")
            for i in range(n)]


class _Counting:
    def __init__(self, drops: list[float]) -> None:
        self.drops, self.calls = drops, []

    def __call__(self, allocation: Allocation) -> float:
        self.calls.append(allocation.bits[0])
        return self.drops[allocation.bits[0]]


def test_monotone_frontier_finds_first_passing_point_in_log_steps() -> None:
    drops = [0.30, 0.20, 0.11, 0.06, 0.04, 0.03, 0.021, 0.019, 0.01, 0.005, 0.004, 0.0, 0.0,
             0.0, 0.0, 0.0]
    for max_drop, expected in ((0.02, 7), (0.05, 4), (0.5, 0), (0.0, 11)):
        measure = _Counting(drops)
        result = accuracy_target(_frontier(len(drops)), measure, max_drop, recheck=0)
        assert result.met and result.chosen == expected
        assert result.drop == drops[expected] <= max_drop
        assert measure.calls[0] == len(drops) - 1  # the most precise point first
        assert len(measure.calls) <= math.ceil(math.log2(len(drops))) + 1
        assert len(set(measure.calls)) == len(measure.calls)  # cached, never re-measured


def test_recheck_moves_the_boundary_below_a_non_monotone_dip() -> None:
    # bisection on 8 points visits 7, 3 (fail), 5 (pass), 4 (fail) -> boundary 5;
    # point 2 passes although 3 and 4 do not: the re-check below the boundary finds it
    # only when it looks far enough down.
    drops = [0.5, 0.4, 0.009, 0.2, 0.15, 0.008, 0.005, 0.0]
    narrow = accuracy_target(_frontier(8), _Counting(drops), 0.01, recheck=1)
    assert narrow.chosen == 5 and narrow.met
    measure = _Counting(drops)
    wide = accuracy_target(_frontier(8), measure, 0.01, recheck=3)
    assert wide.chosen == 2 and wide.drop == 0.009
    steps = {p.index: p.step for p in wide.probes}
    assert steps[7] == "most_precise" and steps[2] == "recheck"
    assert sorted(measure.calls) == sorted(set(measure.calls))
    for probe in wide.probes:  # every measured cheaper point failed
        if probe.index < wide.chosen:
            assert not probe.passed


def test_infeasible_target_returns_most_precise_and_flags_it() -> None:
    drops = [0.5, 0.3, 0.2, 0.08]
    measure = _Counting(drops)
    result = accuracy_target(_frontier(4), measure, 0.05)
    assert not result.met and result.chosen == 3 and result.drop == 0.08
    assert measure.calls == [3]
    data = result.to_dict()
    assert data["met"] is False and data["evaluations"] == 1
    assert data["probes"][0]["bits"] == [3]


def test_empty_frontier_is_an_error() -> None:
    with pytest.raises(ValueError):
        accuracy_target([], lambda a: 0.0, 0.01)


# ---------------------------------------------------------------------- end to end


def _subset(src: Path, dest: Path, n: int) -> Path:
    with np.load(src) as data:
        np.savez(dest, **{k: data[k][:n] for k in data.files})
    return dest


FAST = ["--analysis-samples", "96", "--holdout-samples", "64", "--max-probes", "16",
        "--eval-configs", "0", "--no-interactions", "--max-calib-samples", "160"]


def test_feasible_target_is_met_by_the_written_model(tmp_path: Path) -> None:
    calib = _subset(CALIB, tmp_path / "calib.npz", 160)
    evals = _subset(EVAL, tmp_path / "eval.npz", 400)
    out, report_path = tmp_path / "q.onnx", tmp_path / "r.json"
    max_drop = 0.004
    code = main(["quantize", str(FASHION), "-o", str(out), "--calib", str(calib),
                 "--candidate-bits", "2,4,8", "--max-drop", str(max_drop), "--eval", str(evals),
                 "--minimize", "avg-bits", "--report", str(report_path),
                 "--cache-dir", str(tmp_path / "cache"), *FAST])
    assert code == 0
    report = json.loads(report_path.read_text())
    target = report["mixed"]["target"]
    assert target["met"] is True and target["drop"] <= max_drop
    # the written file, measured independently, meets the target with the same number
    metrics = evaluate(FASHION, out, evals, latency_runs=0)
    assert metrics.drop == pytest.approx(target["drop"], abs=1e-9)
    assert metrics.drop <= max_drop
    # the chosen point is smaller than the most precise one, and every cheaper point that
    # was measured missed the target
    chosen = target["chosen"]
    assert chosen < target["frontier_points"] - 1
    assert all(not p["passed"] for p in target["probes"] if p["index"] < chosen)
    assert report["avg_weight_bits"] < 8
    onnx.checker.check_model(onnx.load(out), full_check=True)


def test_infeasible_target_exits_1_and_still_writes_the_best_model(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    calib = _subset(CALIB, tmp_path / "calib.npz", 160)
    evals = _subset(EVAL, tmp_path / "eval.npz", 400)
    out, report_path = tmp_path / "q.onnx", tmp_path / "r.json"
    code = main(["quantize", str(FASHION), "-o", str(out), "--calib", str(calib),
                 "--candidate-bits", "2", "--max-drop", "0.001", "--eval", str(evals),
                 "--report", str(report_path), "--cache-dir", str(tmp_path / "cache"), *FAST])
    assert code == 1
    err = capsys.readouterr().err
    assert "accuracy target missed" in err and str(out) in err
    assert out.is_file() and report_path.is_file()
    report = json.loads(report_path.read_text())
    target = report["mixed"]["target"]
    assert target["met"] is False and target["drop"] > 0.001
    assert all(row["weight_bits"] == 2 for row in report["layers"])
    metrics = evaluate(FASHION, out, evals, latency_runs=0)
    assert metrics.drop == pytest.approx(target["drop"], abs=1e-9)
