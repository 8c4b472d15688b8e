"""`hawq-onnx quantize` in mixed-precision mode: budgets, units, pins, the report, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from hawq_onnx.cli import main
from hawq_onnx.commands.quantize import _bops, _latency, _size
from tests.conftest import MODELS, write_head

FASHION = MODELS / "fashion_cnn_op17.onnx"
CALIB = MODELS / "fashion_calib.npz"
EVAL = MODELS / "fashion_eval.npz"
PARAMS = {"onnx::Conv_40": 144, "onnx::Conv_43": 4608, "onnx::Conv_46": 18432,
          "classifier.1.weight": 73728, "classifier.3.weight": 1280}
BITS = ("2", "3", "4", "6", "8")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("mixed_cli")
    return {"calib": write_head(CALIB, folder / "calib.npz", 160),
            "eval": write_head(EVAL, folder / "eval.npz", 300), "cache": folder / "cache"}


def _run(data: dict[str, Path], out: Path, *args: str, fast: bool = True) -> int:
    small = ["--analysis-samples", "96", "--holdout-samples", "64", "--max-probes", "16"]
    if fast:
        small += ["--no-interactions", "--eval-configs", "0"]
    return main(["quantize", str(FASHION), "-o", str(out), "--calib", str(data["calib"]),
                 "--cache-dir", str(data["cache"]), *small, *args])


def _report(path: Path) -> dict:
    return json.loads(path.read_text())


def _avg(report: dict) -> float:
    rows = report["layers"]
    return sum(r["params"] * r["weight_bits"] for r in rows) / sum(r["params"] for r in rows)


def test_budget_units() -> None:
    assert _size("1.5MB") == 1.5 * 1024**2
    assert _size("300KB") == _size("300 kb") == 300 * 1024
    assert _size("2048") == _size("2048B") == 2048
    assert _bops("2.5G") == 2.5e9 and _bops("1e9") == 1e9 and _bops("40M") == 4e7
    assert _latency("0.8ms") == pytest.approx(8e-4) and _latency("500us") == pytest.approx(5e-4)
    assert _latency("2") == pytest.approx(2e-3)  # bare numbers are milliseconds
    assert _latency("1s") == 1.0


@pytest.mark.parametrize(("args", "flag"), [
    (["--size-budget", "1.5XB"], "--size-budget"),
    (["--size-budget", "-3MB"], "--size-budget"),
    (["--size-budget", "MB"], "--size-budget"),
    (["--bops-budget", "lots"], "--bops-budget"),
    (["--latency-budget", "5 parsecs"], "--latency-budget"),
    (["--avg-weight-bits", "four"], "--avg-weight-bits"),
    (["--avg-weight-bits", "4MB"], "--avg-weight-bits"),
    (["--max-drop", "2"], "--max-drop"),
    (["--candidate-bits", "2,9"], "--candidate-bits"),
    (["--candidate-bits", "two"], "--candidate-bits"),
    (["--pin", "conv"], "--pin"),
])
def test_bad_budget_strings_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                 args: list[str], flag: str) -> None:
    out = tmp_path / "q.onnx"
    with pytest.raises(SystemExit) as exc:
        main(["quantize", str(FASHION), "-o", str(out), "--calib", str(CALIB), *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0] and "error" in err[0]
    assert not out.exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--candidate-bits", "2,4"], "--candidate-bits needs a mixed-precision budget"),
    (["--pin-first-last", "8"], "--pin-first-last needs a mixed-precision budget"),
    (["--avg-weight-bits", "1"], "infeasible"),
    (["--avg-weight-bits", "4", "--pin", "nothing=8"], "no quantizable weight"),
    (["--avg-weight-bits", "4", "--pin", "classifier.1.weight=5"], "not among the candidate"),
    (["--max-drop", "0.01"], "--max-drop needs --eval"),
    (["--size-budget", "10KB"], "infeasible"),
])
def test_impossible_requests_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture,
                                    data: dict[str, Path], args: list[str], message: str) -> None:
    out = tmp_path / "q.onnx"
    assert _run(data, out, *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not out.exists()


def test_average_bits_budget_full_report(tmp_path: Path, data: dict[str, Path],
                                         capsys: pytest.CaptureFixture) -> None:
    out, report_path, plot = tmp_path / "q.onnx", tmp_path / "r.json", tmp_path / "front.png"
    code = _run(data, out, "--avg-weight-bits", "4", "--report", str(report_path),
                "--pareto-plot", str(plot), "--eval", str(data["eval"]), fast=False)
    assert code == 0
    stdout = capsys.readouterr().out
    assert "mixed precision (both loss model)" in stdout and "Spearman" in stdout
    report = _report(report_path)
    assert report["avg_weight_bits"] <= 4.0
    assert report["avg_weight_bits"] == pytest.approx(_avg(report), abs=1e-4)
    assert report["bytes_quant"] == out.stat().st_size
    for row in report["layers"]:
        assert row["params"] == PARAMS[row["name"]]
        assert str(row["weight_bits"]) in BITS
        assert row["trace"] > 0 and row["trace_se"] >= 0
        assert list(row["omega"]) == list(BITS)
        omega = [row["omega"][b] for b in BITS]
        assert omega[0] > omega[-1] > 0  # 2 bits costs more than 8 bits
        assert row["measured_dl"] is not None and row["predicted_dl"] is not None
    mixed = report["mixed"]
    assert mixed["loss_model"] == "both" and mixed["request"]["avg_weight_bits"] == 4.0
    totals = mixed["totals"]
    assert totals["avg_weight_bits"] == pytest.approx(report["avg_weight_bits"], abs=1e-4)
    units = {u["names"][0]: u["bits"] for u in mixed["units"]}
    assert units == {r["name"]: r["weight_bits"] for r in report["layers"]}
    macs = {r["name"]: r["macs"] for r in report["layers"]}
    assert totals["bops"] == pytest.approx(sum(macs[n] * b * 8 for n, b in units.items()),
                                           rel=1e-5)
    points = mixed["pareto"]["points"]
    assert mixed["pareto"]["metric"] == "avg_weight_bits" and len(points) >= 3
    assert [p["avg_weight_bits"] for p in points] == sorted(p["avg_weight_bits"] for p in points)
    assert all(p["predicted_dl"] is not None and p["measured_dl"] is not None for p in points)
    spearman = mixed["spearman"]
    assert spearman["configs"] == 50 and spearman["samples"] == 64
    assert set(spearman["spearman"]) == {"hessian", "cross_terms", "measured", "both"}
    assert mixed["pairs"]["neighbours"] == 4
    for phase in ("load", "calibrate", "analysis", "sensitivity", "interactions", "evaluate",
                  "allocate", "build", "export", "validate", "total"):
        assert phase in report["timings"]
    assert report["metrics"]["samples"] == 300
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    onnx.checker.check_model(onnx.load(out), full_check=True)


def test_float_layers_count_32_bits_in_the_average(tmp_path: Path, data: dict[str, Path]) -> None:
    report_path = tmp_path / "r.json"
    assert _run(data, tmp_path / "q.onnx", "--avg-weight-bits", "4", "--exclude",
                "/classifier/classifier.3/Gemm", "--report", str(report_path)) == 0
    report = _report(report_path)
    rows = {r["name"]: r for r in report["layers"]}
    assert rows["classifier.3.weight"]["weight_bits"] == 32
    assert report["avg_weight_bits"] <= 4.0
    assert report["avg_weight_bits"] == pytest.approx(_avg(report), abs=1e-4)
    # the other layers had to average below 4 to make room for the float one
    quantized = [r for r in rows.values() if r["weight_bits"] < 32]
    assert sum(r["params"] * r["weight_bits"] for r in quantized) / sum(
        r["params"] for r in quantized) < 4.0


def test_size_budget_bounds_the_file(tmp_path: Path, data: dict[str, Path]) -> None:
    out, report_path = tmp_path / "q.onnx", tmp_path / "r.json"
    budget = 70 * 1024
    assert _run(data, out, "--size-budget", "70KB", "--report", str(report_path)) == 0
    report = _report(report_path)
    assert report["bytes_quant"] == out.stat().st_size <= budget
    bits = [r["weight_bits"] for r in report["layers"]]
    assert max(bits) > 4  # the budget leaves room for some 8-bit layers
    assert report["mixed"]["pareto"]["metric"] == "size_bytes"


def test_bops_budget_and_pins(tmp_path: Path, data: dict[str, Path]) -> None:
    report_path = tmp_path / "r.json"
    budget = 60e6
    assert _run(data, tmp_path / "q.onnx", "--bops-budget", "60M", "--pin",
                "classifier.1.weight=8", "--pin-first-last", "6", "--report",
                str(report_path)) == 0
    report = _report(report_path)
    rows = {r["name"]: r for r in report["layers"]}
    assert rows["classifier.1.weight"]["weight_bits"] == 8
    assert rows["onnx::Conv_40"]["weight_bits"] == 6
    assert rows["classifier.3.weight"]["weight_bits"] == 6
    bops = sum(r["macs"] * r["weight_bits"] * 8 for r in rows.values())
    assert bops <= budget and report["mixed"]["totals"]["bops"] == pytest.approx(bops, rel=1e-5)
    assert report["mixed"]["pins"] == {"onnx::Conv_40": 6, "classifier.3.weight": 6,
                                       "classifier.1.weight": 8}


def test_uniform_mode_is_unchanged(tmp_path: Path, data: dict[str, Path]) -> None:
    report_path = tmp_path / "r.json"
    assert main(["quantize", str(FASHION), "-o", str(tmp_path / "q.onnx"), "--calib",
                 str(data["calib"]), "--weight-bits", "4", "--report", str(report_path)]) == 0
    report = _report(report_path)
    assert "mixed" not in report and report["avg_weight_bits"] == 4.0


def test_latency_budget_uses_the_measured_table(tmp_path: Path, data: dict[str, Path],
                                                capsys: pytest.CaptureFixture) -> None:
    report_path = tmp_path / "r.json"
    assert _run(data, tmp_path / "q.onnx", "--latency-budget", "1ms", "--report",
                str(report_path)) == 0
    mixed = _report(report_path)["mixed"]
    assert mixed["pareto"]["metric"] == "latency"
    assert 0 < mixed["totals"]["latency_s"] <= 1e-3
    assert all(p["latency_s"] is not None for p in mixed["pareto"]["points"])
    out = tmp_path / "none.onnx"
    capsys.readouterr()
    assert _run(data, out, "--latency-budget", "0.001us") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--latency-budget" in err[0] and "infeasible" in err[0]
    assert not out.exists()


def test_max_ilp_pairs_caps_the_pair_terms_and_the_report_bounds_the_rest(
        tmp_path: Path, data: dict[str, Path]) -> None:
    """Fashion's 5 units have 10 pairs, 4 of them graph neighbours (measured): a cap of 4
    keeps exactly the measured ones, leaves 6 Hessian couplings out and says so."""
    out, report_path = tmp_path / "capped.onnx", tmp_path / "capped.json"
    code = _run(data, out, "--avg-weight-bits", "4", "--max-ilp-pairs", "4",
                "--eval-configs", "0", "--report", str(report_path), fast=False)
    assert code == 0
    report = _report(report_path)
    pairs = report["mixed"]["pairs"]
    assert report["mixed"]["loss_model"] == "both"
    assert pairs["neighbours"] == 4 and pairs["in_ilp"] == 4 and pairs["left_out"] == 6
    assert pairs["left_out_bound"] > 0
    assert any("6 smallest of 10 pairwise loss terms left out" in n for n in report["notes"])
    with pytest.raises(SystemExit) as exc:
        main(["quantize", str(FASHION), "-o", str(tmp_path / "x.onnx"), "--calib",
              str(data["calib"]), "--avg-weight-bits", "4", "--max-ilp-pairs", "-1"])
    assert exc.value.code == 2
