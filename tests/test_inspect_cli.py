"""`hawq-onnx inspect`: summary, --json, --check parity and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from hawq_onnx.cli import main
from hawq_onnx.data import load_npz
from hawq_onnx.importer import load_model
from hawq_onnx.mirror import registry
from hawq_onnx.parity import check_parity
from tests.conftest import REPO

RNG = np.random.default_rng(0)


def _save_model(path: Path, nodes, inputs, outputs, inits, opsets=(("", 17),)) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets],
                              ir_version=10)
    onnx.save(model, path)
    return path


def _mlp(tmp_path: Path, batch: int | str = "batch") -> Path:
    """x -> Gemm(W1, transB) -> Add(bias) -> Relu -> Gemm(W2) -> logits."""
    inits = [numpy_helper.from_array(RNG.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (16, 8)), ("b1", (16,)), ("w2", (16, 4)))]
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["h"], name="fc1", transB=1),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="bias"),
             helper.make_node("Relu", ["hb"], ["a"], name="act"),
             helper.make_node("Gemm", ["a", "w2"], ["logits"], name="fc2")]
    return _save_model(tmp_path / "mlp.onnx", nodes,
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 8])],
                       [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 4])],
                       inits)


def _data(tmp_path: Path, n: int = 10, **extra: np.ndarray) -> Path:
    path = tmp_path / "data.npz"
    np.savez(path, x=np.random.default_rng(1).standard_normal((n, 8)), **extra)
    return path


def _foobar(tmp_path: Path) -> Path:
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("FooBar", ["r"], ["y"], domain="com.example")]
    return _save_model(tmp_path / "foobar.onnx", nodes,
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])], [],
                       opsets=(("", 17), ("com.example", 1)))


def _run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict, str]:
    code = main(["inspect", *argv, "--json"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out), captured.err


def test_text_summary_lists_io_ops_and_layer_table(tmp_path, capsys) -> None:
    assert main(["inspect", str(_mlp(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "IR version 10; opsets: ai.onnx 17" in out
    assert "  x     float  [batch, 8]" in out
    assert "ops (4 nodes): Gemm 2, Add 1, Relu 1" in out
    assert "quantizable layers: 2 (192 weight params, 192 MACs per sample)" in out
    table = out.split("MACs per sample)\n")[1].splitlines()[:3]
    assert table == ["  node  op    kind  weight  params  MACs",
                     "  fc1   Gemm  gemm  w1         128   128",
                     "  fc2   Gemm  gemm  w2          64    64"]
    assert "control flow: none" in out and "unsupported ops: none" in out


def test_json_summary_and_parity_pass(tmp_path, capsys) -> None:
    code, report, err = _run_json(capsys, str(_mlp(tmp_path)), "--check", str(_data(tmp_path)),
                                  "--batch-size", "4")
    assert code == 0, err
    assert report["inputs"] == [{"name": "x", "dtype": "float", "shape": ["batch", 8]}]
    assert [(q["node"], q["params"], q["macs"]) for q in report["quantizable_layers"]] == [
        ("fc1", 128, 128), ("fc2", 64, 64)]
    parity = report["parity"]
    assert (parity["ok"], parity["samples"], parity["batches"]) == (True, 10, 3)
    (logits,) = parity["outputs"]
    assert logits["name"] == "logits" and logits["ok"]
    assert 0 <= logits["max_rel"] <= 1e-4 and logits["ref_max_abs"] > 1.0


def test_fixed_batch_model_checks_in_declared_batches(tmp_path, capsys) -> None:
    code, report, _ = _run_json(capsys, str(_mlp(tmp_path, batch=2)), "--check",
                                str(_data(tmp_path, n=6)), "--batch-size", "5")
    assert code == 0 and report["parity"]["batches"] == 3


def test_mirror_disagreement_exits_1(tmp_path, capsys, monkeypatch) -> None:
    """A deliberately wrong Relu in the mirror (1 % too large) must fail the check."""
    registry.lookup("Relu")  # make sure the real ops are registered before replacing one
    monkeypatch.setitem(registry._REGISTRY, ("", "Relu"),
                        lambda ctx, inputs, attrs: torch.relu(inputs[0]) * 1.01)
    code = main(["inspect", str(_mlp(tmp_path)), "--check", str(_data(tmp_path))])
    captured = capsys.readouterr()
    assert code == 1
    assert "FAIL" in captured.out
    failure = [line for line in captured.err.splitlines() if "parity check failed" in line]
    assert len(failure) == 1 and "logits (max relative error 1.00e-02)" in failure[0]


def test_unknown_op_is_listed_and_refused_only_for_check(tmp_path, capsys) -> None:
    model = str(_foobar(tmp_path))
    code, report, _ = _run_json(capsys, model)
    assert code == 0 and report["unsupported_ops"] == ["com.example.FooBar"]
    assert main(["inspect", model, "--check", str(_data(tmp_path))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["hawq-onnx: error: unsupported op type(s) in the model: com.example.FooBar"]


def test_bad_data_exits_2_with_one_line(tmp_path, capsys) -> None:
    data = tmp_path / "bad.npz"
    np.savez(data, x=np.zeros((4, 7), np.float32))
    assert main(["inspect", str(_mlp(tmp_path)), "--check", str(data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "per-sample shape (7,)" in err[0] and str(data) in err[0]


def test_extra_keys_are_noted(tmp_path, capsys) -> None:
    code, report, _ = _run_json(capsys, str(_mlp(tmp_path)), "--check",
                                str(_data(tmp_path, ids=np.zeros(3))))
    assert code == 0 and any("ignoring keys" in n and "ids" in n for n in report["notes"])


def test_garbage_file_via_console_script(tmp_path) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(bytes(range(256)) * 4)
    script = Path(sys.executable).parent / "hawq-onnx"
    if not script.exists():
        script = REPO / ".venv" / "bin" / "hawq-onnx"
    result = subprocess.run([str(script), "inspect", str(garbage)], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hawq-onnx: error:"), result.stderr
    assert "Traceback" not in result.stderr and str(garbage) in lines[0]


def test_parity_counts_nan_in_the_same_places_as_agreement(tmp_path) -> None:
    """Log of negative inputs is NaN in both engines: that is agreement, not failure; the
    finite entries still set the error."""
    path = _save_model(tmp_path / "log.onnx", [helper.make_node("Log", ["x"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])], [])
    model = load_model(path).model
    dataset = load_npz(_data(tmp_path, n=6), model)
    assert (dataset.arrays["x"] < 0).any()
    report = check_parity(model, dataset, batch_size=4)
    (y,) = report.outputs
    assert report.ok and np.isfinite(y.max_abs) and y.max_rel <= 1e-4 and y.ref_max_abs > 0.5


def test_data_the_graph_cannot_run_on_exits_2(tmp_path, capsys) -> None:
    """Sizes only the graph constrains (Reshape to [-1, 6] needs a multiple of 6 elements)
    pass the loader; onnxruntime's refusal becomes one data error line."""
    shape = numpy_helper.from_array(np.array([-1, 6], np.int64), "target")
    path = _save_model(tmp_path / "reshape.onnx", [helper.make_node("Reshape", ["x", "target"],
                                                                    ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "?"])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", 6])], [shape])
    data = tmp_path / "odd.npz"
    np.savez(data, x=np.ones((3, 5), np.float32))
    assert main(["inspect", str(path), "--check", str(data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "batch 0: onnxruntime cannot run the model" in err[0]
