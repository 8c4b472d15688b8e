"""`hawq-onnx quantize`: the report, the output file, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from hawq_onnx.cli import main
from tests.conftest import MODELS

FASHION = MODELS / "fashion_cnn_op17.onnx"
CALIB = MODELS / "fashion_calib.npz"
EVAL = MODELS / "fashion_eval.npz"


def _small_eval(tmp_path: Path, n: int = 300) -> Path:
    with np.load(EVAL) as data:
        arrays = {k: data[k][:n] for k in data.files}
    np.savez(tmp_path / "eval.npz", **arrays)
    return tmp_path / "eval.npz"


def test_quantize_writes_model_and_report_with_metrics(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    out, report_path = tmp_path / "q.onnx", tmp_path / "report.json"
    code = main(["quantize", str(FASHION), "-o", str(out), "--calib", str(CALIB),
                 "--max-calib-samples", "128", "--eval", str(_small_eval(tmp_path)),
                 "--report", str(report_path)])
    assert code == 0
    stdout = capsys.readouterr().out
    assert f"wrote {out}" in stdout and "5 of 5 Conv/Gemm/MatMul nodes (100%)" in stdout
    report = json.loads(report_path.read_text())
    assert [row["op"] for row in report["layers"]] == ["Conv", "Conv", "Conv", "Gemm", "Gemm"]
    params = {"onnx::Conv_40": 144, "classifier.1.weight": 73728, "classifier.3.weight": 1280}
    rows = {row["name"]: row for row in report["layers"]}
    for name, count in params.items():
        assert rows[name]["params"] == count and rows[name]["weight_bits"] == 8
        assert rows[name]["act_bits"] == 8
    assert report["avg_weight_bits"] == 8.0
    assert report["bytes_float"] == FASHION.stat().st_size
    assert report["bytes_quant"] == out.stat().st_size
    metrics = report["metrics"]
    assert metrics["samples"] == 300 and metrics["drop"] <= 0.01 and metrics["sqnr_db"] > 25
    onnx.checker.check_model(onnx.load(out), full_check=True)


def test_average_bits_are_parameter_weighted(tmp_path: Path) -> None:
    """Excluding the 73,728-parameter Gemm leaves it at 32 bits in the average."""
    report_path = tmp_path / "r.json"
    assert main(["quantize", str(FASHION), "-o", str(tmp_path / "q.onnx"), "--calib", str(CALIB),
                 "--max-calib-samples", "64", "--weight-bits", "4", "--exclude",
                 "/classifier/classifier.1/Gemm", "--report", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    params = {row["name"]: (row["params"], row["weight_bits"]) for row in report["layers"]}
    total = sum(p for p, _ in params.values())
    expected = sum(p * b for p, b in params.values()) / total
    assert params["classifier.1.weight"] == (73728, 32)
    assert report["avg_weight_bits"] == pytest.approx(expected, abs=1e-4)
    assert report["avg_weight_bits"] == pytest.approx((73728 * 32 + (total - 73728) * 4) / total,
                                                      abs=1e-4)


def test_weight_only_needs_no_calibration_data(tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(FASHION), "-o", str(out), "--act-bits", "none",
                 "--weight-bits", "8"]) == 0
    ops = {n.op_type for n in onnx.load(out).graph.node}
    assert "QuantizeLinear" not in ops and "DequantizeLinear" in ops


@pytest.mark.parametrize(("args", "message"), [
    (["--weight-bits", "8"], "--calib is required"),
    (["--calib", str(MODELS / "digits_calib.npz")], "per-sample shape"),
    (["--calib", str(MODELS / "missing.npz")], "no such file"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture,
                                              args: list[str], message: str) -> None:
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(FASHION), "-o", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    for args in (["--weight-bits", "9"], ["--act-bits", "4"], ["--group-size", "1"],
                 ["--calib-method", "magic"]):
        with pytest.raises(SystemExit) as exc:
            main(["quantize", str(FASHION), "-o", str(tmp_path / "q.onnx"), *args])
        assert exc.value.code == 2


def test_refuses_to_overwrite_its_input_and_quantized_inputs(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture
                                                             ) -> None:
    copy = tmp_path / "model.onnx"
    copy.write_bytes(FASHION.read_bytes())
    assert main(["quantize", str(copy), "-o", str(copy), "--calib", str(CALIB),
                 "--max-calib-samples", "32"]) == 2
    assert "refusing to overwrite the input" in capsys.readouterr().err
    assert copy.read_bytes() == FASHION.read_bytes()
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(copy), "-o", str(out), "--calib", str(CALIB),
                 "--max-calib-samples", "32"]) == 0
    assert main(["quantize", str(out), "-o", str(tmp_path / "qq.onnx"), "--calib",
                 str(CALIB)]) == 2
    assert "already quantized" in capsys.readouterr().err
