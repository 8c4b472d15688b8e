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


def _branching_model(main_layer: bool) -> onnx.ModelProto:
    """``If(flag)`` picks one of two MatMul branches (silero-vad picks its 8 or 16 kHz
    network this way); with ``main_layer`` a MatMul in the main graph follows."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def branch(name: str) -> onnx.GraphProto:
        weight = numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32),
                                         f"{name}_w")
        return helper.make_graph(
            [helper.make_node("MatMul", ["x", f"{name}_w"], [f"{name}_y"])], name, [],
            [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, ["n", 4])], [weight])

    nodes = [helper.make_node("If", ["flag"], ["picked"], name="pick",
                              then_branch=branch("then"), else_branch=branch("else"))]
    inits = []
    if main_layer:
        inits.append(numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32),
                                             "head_w"))
        nodes.append(helper.make_node("MatMul", ["picked", "head_w"], ["y"], name="head"))
    graph = helper.make_graph(
        nodes, "branching",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4]),
         helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y" if main_layer else "picked", TensorProto.FLOAT,
                                       ["n", 3 if main_layer else 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_layers_inside_control_flow_bodies_are_named_not_silently_skipped(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Only the main graph is quantized. A model whose every layer sits in an If branch was
    written out "quantized" (0/0 layers, larger than the input) with exit 0; now every command
    says where the layers are, and quantize refuses to write a model it could not change."""
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(1).standard_normal((64, 4)).astype(np.float32),
             flag=np.array(True))
    only_nested = tmp_path / "nested.onnx"
    onnx.save(_branching_model(False), only_nested)
    out = tmp_path / "q.onnx"
    expected = "2 layer(s) inside control-flow bodies (pick: 2 MatMul)"
    for extra in ([], ["--avg-weight-bits", "4"]):
        assert main(["quantize", str(only_nested), "-o", str(out), "--calib", str(calib),
                     *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err and not out.exists()
    assert main(["analyze", str(only_nested), "--calib", str(calib), "--no-cache"]) == 2
    assert expected in capsys.readouterr().err
    assert main(["inspect", str(only_nested), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["nested_layers"] == {"pick": {"MatMul": 2}}
    assert main(["inspect", str(only_nested)]) == 0
    assert f"kept float: {expected}" in capsys.readouterr().out

    with_head = tmp_path / "head.onnx"
    onnx.save(_branching_model(True), with_head)
    report = tmp_path / "report.json"
    assert main(["quantize", str(with_head), "-o", str(out), "--calib", str(calib),
                 "--report", str(report)]) == 0
    data = json.loads(report.read_text())
    assert [layer["name"] for layer in data["layers"]] == ["head_w"]
    assert any(expected in note for note in data["notes"])
