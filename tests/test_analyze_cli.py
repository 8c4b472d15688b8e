"""``hawq-onnx analyze``: table, JSON report, plots, cache, and one-line errors."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from hawq_onnx.cli import main
from tests.test_hessian_engine import mlp_data, mlp_model

X = mlp_data(24)
LABELS = np.random.default_rng(3).integers(0, 5, len(X))


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    model = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(), model)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=X, labels=LABELS)
    return {"model": model, "calib": calib, "cache": tmp_path / "cache", "dir": tmp_path}


def _run(files: dict[str, Path], *extra: str) -> int:
    return main(["analyze", str(files["model"]), "--calib", str(files["calib"]),
                 "--cache-dir", str(files["cache"]), "--min-probes", "8",
                 "--max-probes", "8", *extra])


def test_table_and_report(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    report = files["dir"] / "analysis.json"
    assert _run(files, "--eigs", "2", "--report", str(report)) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split() == ["layer", "op", "params", "trace", "±", "SE", "trace/params",
                                "top", "eig"]
    data = json.loads(report.read_text())
    assert data["probes"] == 8
    rows = {line.split()[0]: line.split() for line in lines[2:4]}
    for entry in data["layers"]:
        assert {"name", "op", "params", "trace", "trace_se", "top_eigenvalue"} <= set(entry)
        row = rows[entry["name"]]
        assert row[1] == entry["op"] and row[2] == str(entry["params"])
        assert float(row[3]) == pytest.approx(entry["trace"], rel=1e-3)
        assert float(row[5].rstrip("*")) == pytest.approx(entry["trace_se"], rel=0.05)
        assert float(row[-1].rstrip("*")) == pytest.approx(entry["top_eigenvalue"], rel=1e-3)
    assert [e["name"] for e in data["layers"]] == ["fc1.w", "fc2.w"]
    assert "8 probes" in out and "kl(logits)" in out and "top eigenvalues" in out
    assert err == ""  # no progress bar when stderr is not a terminal


def test_json_flag_prints_the_result_object(files: dict[str, Path],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(files, "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["exit_code"] == 0 and summary["command"] == "analyze"
    assert summary["result"]["probes"] == 8
    assert [e["name"] for e in summary["result"]["layers"]] == ["fc1.w", "fc2.w"]


def test_second_run_is_served_from_the_cache(files: dict[str, Path],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(files) == 0
    first = capsys.readouterr().out
    assert _run(files) == 0
    second = capsys.readouterr().out
    assert "(cached)" in second and "(cached)" not in first
    assert first.splitlines()[:4] == second.splitlines()[:4]
    assert _run(files, "--no-cache") == 0
    assert "(cached)" not in capsys.readouterr().out


def test_labels_key_switches_to_cross_entropy(files: dict[str, Path],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    report = files["dir"] / "ce.json"
    assert _run(files, "--labels-key", "labels", "--report", str(report)) == 0
    assert "ce(logits)" in capsys.readouterr().out
    assert json.loads(report.read_text())["losses"] == [{"output": "logits", "kind": "ce"}]


def test_plot_writes_an_image(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    plot = files["dir"] / "spectra.png"
    assert _run(files, "--density", "--eigs", "1", "--plot", str(plot)) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "density global: SLQ trace" in capsys.readouterr().out


def test_plot_without_matplotlib_is_a_one_line_error_before_any_work(
        files: dict[str, Path], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_matplotlib(name: str, *args, **kwargs):
        if name.split(".")[0] == "matplotlib":
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    report = files["dir"] / "never.json"
    assert _run(files, "--plot", str(files["dir"] / "p.png"), "--report", str(report)) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1
    assert "matplotlib" in err and "hawq-onnx[plot]" in err
    assert not report.exists() and not files["cache"].exists()


@pytest.mark.parametrize(("extra", "message"), [
    (["--device", "cuda"], "CUDA"),
    (["--loss", "ce", "--labels-key", "nope"], "no labels array 'nope'"),
    (["--outputs", "nope"], "unknown output"),
])
def test_user_errors_exit_2_with_one_line(files: dict[str, Path], extra: list[str],
                                         message: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(files, *extra) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and message in err


def test_outputs_never_replace_inputs_and_need_a_directory(
        files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    before = files["calib"].read_bytes()
    assert _run(files, "--report", str(files["calib"])) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert files["calib"].read_bytes() == before
    assert _run(files, "--report", str(files["dir"] / "missing" / "a.json")) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not files["cache"].exists()  # refused before any analysis ran


def test_missing_calibration_file_and_bad_flags(files: dict[str, Path],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    files = dict(files, calib=files["dir"] / "missing.npz")
    assert _run(files) == 2
    assert "missing.npz" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        _run(files, "--loss", "hinge")
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        _run(files, "--rel-tol", "0")
    assert exc.value.code == 2


def _gain_mlp() -> onnx.ModelProto:
    """The MLP with a scalar input ``gain`` scaling its hidden activations (like a sample
    rate or a temperature fed beside the batch)."""
    model = mlp_model()
    graph = model.graph
    tanh = next(n for n in graph.node if n.op_type == "Tanh")
    tanh.output[0] = "a_raw"
    graph.node.insert(list(graph.node).index(tanh) + 1,
                      onnx.helper.make_node("Mul", ["a_raw", "gain"], ["a"], name="gain_mul"))
    graph.input.append(onnx.helper.make_tensor_value_info("gain", onnx.TensorProto.FLOAT, []))
    return model


def test_a_scalar_input_is_fed_whole_to_analyze_and_mixed_quantize(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A scalar model input (no batch axis) broke the data hash both commands key their cache
    on; it must be fed unchanged with every batch and change the analysis when it changes."""
    model = tmp_path / "gain.onnx"
    onnx.save(_gain_mlp(), model)
    traces = []
    for gain in (1.0, 3.0):
        calib = tmp_path / f"calib_{gain}.npz"
        np.savez(calib, x=X, gain=np.array(gain, dtype=np.float32))
        report = tmp_path / f"analysis_{gain}.json"
        assert main(["analyze", str(model), "--calib", str(calib), "--cache-dir",
                     str(tmp_path / "cache"), "--min-probes", "8", "--max-probes", "8",
                     "--report", str(report)]) == 0
        traces.append({e["name"]: e["trace"] for e in json.loads(report.read_text())["layers"]})
    # scaling the hidden layer by g scales fc2's input, so its Hessian trace grows ~g²
    assert traces[1]["fc2.w"] > 4.0 * traces[0]["fc2.w"]
    out = tmp_path / "q.onnx"
    calib = tmp_path / "calib_mixed.npz"
    rng = np.random.default_rng(4)
    np.savez(calib, x=rng.standard_normal((80, X.shape[1])).astype(np.float32),
             gain=np.array(2.0, dtype=np.float32))
    assert main(["quantize", str(model), "-o", str(out), "--calib", str(calib),
                 "--avg-weight-bits", "4", "--analysis-samples", "32", "--holdout-samples", "32",
                 "--eval-configs", "0", "--no-cache"]) == 0
    assert "average weight bits" in capsys.readouterr().out and out.exists()
