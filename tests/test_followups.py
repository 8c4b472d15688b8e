"""Follow-ups: output permissions, one-line onnxruntime refusals, hashes that cover external
data, and calibration of activations that are zero in all but rounding."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from hawq_onnx.analysis import AnalysisSettings, analyze
from hawq_onnx.calibration.histogram import StreamingHistogram
from hawq_onnx.calibration.ranges import select_range
from hawq_onnx.cli import main
from hawq_onnx.errors import InvalidModelError
from hawq_onnx.export import export_model
from hawq_onnx.model_io import file_sha256, save_model
from hawq_onnx.quant.activations import act_qparams
from hawq_onnx.quant.plan import CALIB_METHODS, ActSpec
from tests.tiny_models import IR_VERSION, mlp_model, save_data, save_mlp


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture()
def umask() -> Iterator[None]:
    """Run with umask 022 (what most shells use); the previous umask is restored."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


# ---------------------------------------------------------------------- permissions
def test_cli_outputs_get_ordinary_permissions(tmp_path: Path, umask: None,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Model, JSON and HTML reports: 0o666 & ~umask when new, their own mode when they
    exist already (as open(path, "w") leaves them), and no temporary files left behind."""
    model, calib = save_mlp(tmp_path / "mlp.onnx"), save_data(tmp_path / "calib.npz")
    outputs = [tmp_path / name for name in ("q.onnx", "r.json", "r.html")]
    argv = ["quantize", str(model), "--calib", str(calib), "-o", str(outputs[0]),
            "--report", str(outputs[1]), "--report-html", str(outputs[2])]
    assert main(argv) == 0
    assert [_mode(p) for p in outputs] == [0o644, 0o644, 0o644]
    kept = [0o600, 0o640, 0o664]  # 0o664 cannot come from umask 022: it must be kept
    for path, mode in zip(outputs, kept, strict=True):
        path.chmod(mode)
    assert main(argv) == 0
    assert [_mode(p) for p in outputs] == kept

    os.umask(0o027)
    report = tmp_path / "analysis.json"
    assert main(["analyze", str(model), "--calib", str(calib), "--no-cache", "--min-probes",
                 "2", "--max-probes", "2", "--report", str(report)]) == 0
    assert _mode(report) == 0o640 and json.loads(report.read_text())["probes"] == 2
    capsys.readouterr()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "analysis.json", "calib.npz", "mlp.onnx", "q.onnx", "r.html", "r.json"]


def test_cache_entries_are_written_whole_with_ordinary_permissions(tmp_path: Path,
                                                                 umask: None) -> None:
    """Analysis and latency cache entries go through the same atomic writer as outputs:
    complete files, 0o666 & ~umask, no temporary files left in the cache."""
    from hawq_onnx.mixed.costs import LatencyCache

    model, calib = save_mlp(tmp_path / "mlp.onnx"), save_data(tmp_path / "calib.npz")
    cache = tmp_path / "cache"
    assert main(["analyze", str(model), "--calib", str(calib), "--cache-dir", str(cache),
                 "--min-probes", "2", "--max-probes", "2"]) == 0
    LatencyCache(cache).put("k", {"ms": [1.5, 2.0]})
    entries = sorted(p for p in cache.rglob("*") if p.is_file())
    assert [p.parent.name for p in entries] == ["analysis", "latency"]
    assert all(not p.name.startswith(".") and p.suffix == ".json" for p in entries)
    assert [_mode(p) for p in entries] == [0o644, 0o644]
    assert LatencyCache(cache).get("k") == {"ms": [1.5, 2.0]}
    assert json.loads(entries[0].read_text())["probes"] == 2


def test_external_data_files_get_ordinary_permissions(tmp_path: Path, umask: None) -> None:
    path = save_model(mlp_model(), tmp_path / "ext.onnx", external_data=True,
                      external_data_threshold=256)
    data = tmp_path / "ext.onnx.data"
    assert data.stat().st_size >= 512 + 256  # w1 and w2 moved out
    assert (_mode(path), _mode(data)) == (0o644, 0o644)


# ---------------------------------------------------------------------- refusals
def _refused_model() -> onnx.ModelProto:
    """Passes onnx.checker (full_check too), but onnxruntime has no kernel for the op."""
    graph = helper.make_graph(
        [helper.make_node("Foo", ["x"], ["logits"], domain="com.example")], "refused",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 8])])
    model = helper.make_model(graph, ir_version=IR_VERSION, opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_onnxruntime_refusal_names_the_model_once(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    float_model, data = save_mlp(tmp_path / "f.onnx"), save_data(tmp_path / "eval.npz")
    quant = tmp_path / "q.onnx"
    onnx.save(_refused_model(), quant)
    assert main(["validate", str(float_model), str(quant), "--eval", str(data)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hawq-onnx: error: ")
    assert err.count("onnxruntime cannot load") == 1 and err.count(str(quant)) == 1
    assert err.count("cannot load") == 1 and "[ONNXRuntimeError]" not in err
    assert f"onnxruntime cannot load {quant}: " in err
    assert err.rstrip().endswith("com.example:Foo(-1) is not a registered function/op")


def test_exporter_refusal_has_one_prefix_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelError) as caught:
        export_model(_refused_model(), tmp_path / "q.onnx")
    message = str(caught.value)
    assert message.startswith("onnxruntime cannot load the quantized model: ")
    assert message.count("cannot load") == 1 and "\n" not in message
    assert "Foo" in message and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- hashes
def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _report_hash(model: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["quantize", str(model), "-o", str(out), "--act-bits", "none",
                 "--json"]) == 0
    return json.loads(capsys.readouterr().out)["result"]["build"]["inputs"]["model"]["sha256"]


def test_hashes_cover_external_data(tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """One changed byte in the .data file changes the report's input hash (inspect shows
    the same digest) and misses the analysis cache; the .onnx file itself is unchanged."""
    folder = tmp_path / "model"
    folder.mkdir()
    model = save_model(mlp_model(), folder / "ext.onnx", external_data=True,
                       external_data_threshold=256)
    data_file = folder / "ext.onnx.data"
    calib = save_data(tmp_path / "calib.npz")
    listing = (f"{_sha(model.read_bytes())}  ext.onnx\n"
               f"{_sha(data_file.read_bytes())}  ext.onnx.data\n")
    first = _report_hash(model, tmp_path / "q1.onnx", capsys)
    assert first == _sha(listing.encode())
    assert main(["inspect", str(model), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["import"]["sha256"] == first
    settings = AnalysisSettings(min_probes=2, max_probes=2)
    cache = tmp_path / "cache"
    fresh = analyze(model, calib, settings, cache_dir=cache)
    assert not fresh.cached and analyze(model, calib, settings, cache_dir=cache).cached

    model_digest = file_sha256(model)
    payload = bytearray(data_file.read_bytes())
    payload[0] ^= 1  # lowest mantissa bits of w1[0, 0]
    data_file.write_bytes(bytes(payload))
    assert file_sha256(model) == model_digest
    second = _report_hash(model, tmp_path / "q2.onnx", capsys)
    assert second != first
    assert second == _sha(f"{model_digest}  ext.onnx\n{_sha(bytes(payload))}  ext.onnx.data\n"
                          .encode())
    changed = analyze(model, calib, settings, cache_dir=cache)
    assert not changed.cached and changed.model_sha256 != fresh.model_sha256
    assert len(list((cache / "analysis").iterdir())) == 2


def test_model_without_external_data_hashes_as_its_file(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    model = save_mlp(tmp_path / "mlp.onnx")
    assert _report_hash(model, tmp_path / "q.onnx", capsys) == _sha(model.read_bytes())


# ---------------------------------------------------------------------- calibration
_TINY = np.float32(1e-45)  # the smallest float32 denormal


@pytest.mark.parametrize(("values", "underflows"), [
    (np.r_[np.zeros(100), _TINY], True), (np.r_[np.zeros(100), -_TINY], True),
    (np.r_[_TINY, -_TINY, 0.0], True),
    (np.r_[np.zeros(10), np.float32(1e-40), np.float32(2e-40)], False)])
def test_near_zero_ranges_raise_no_warning(values: np.ndarray, underflows: bool) -> None:
    """Ranges at float32's resolution: every method and grid, no RuntimeWarning, a range
    inside the data, and a positive finite scale: the intended fallback 1.0 where the
    scale itself would round to 0 in float32 (the tensor is zero on any grid)."""
    hist = StreamingHistogram()
    hist.update(values.astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for method in CALIB_METHODS:
            for spec in (ActSpec(8, False), ActSpec(8, True), ActSpec(16, False)):
                low, high = select_range(hist, method, spec)
                assert hist.min <= low <= 0.0 <= high <= hist.max
                scale = act_qparams(low, high, spec).scale
                assert (scale == 1.0) if underflows else (0.0 < scale < 1e-40)


def test_entropy_on_zeros_with_one_spike_keeps_the_spike() -> None:
    hist = StreamingHistogram()
    hist.update(np.r_[np.zeros(1000), 1.0].astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select_range(hist, "entropy", ActSpec(8, False)) == (0.0, 1.0)
        assert select_range(hist, "entropy", ActSpec(8, True)) == (0.0, 1.0)


def test_model_with_a_zero_activation_calibrates_without_warnings(tmp_path: Path) -> None:
    """h = x * 1e-45 is zero up to denormals; the default (mse) calibration used to divide
    by a scale that float32 rounds to 0. Now: no warning, and the quantized model's output
    equals the float one exactly (h @ W is lost against the bias in float too)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array(_TINY), "tiny"),
             numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")]
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "tiny"], ["h"]), helper.make_node("MatMul", ["h", "w"],
                                                                          ["m"]),
         helper.make_node("Add", ["m", "b"], ["y"])], "zero_activation",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], inits)
    model = tmp_path / "zero.onnx"
    onnx.save(helper.make_model(graph, ir_version=IR_VERSION,
                                opset_imports=[helper.make_opsetid("", 17)]), model)
    x = (rng.standard_normal((16, 8)) * 3).astype(np.float32)
    assert np.count_nonzero(x * _TINY) > 16  # denormals, not exact zeros
    np.savez(tmp_path / "calib.npz", x=x)
    out = tmp_path / "q.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["quantize", str(model), "--calib", str(tmp_path / "calib.npz"),
                     "-o", str(out)]) == 0
    quantized = onnx.load(str(out))
    onnx.checker.check_model(quantized, full_check=True)
    assert [n.op_type for n in quantized.graph.node].count("QuantizeLinear") >= 1
    want = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    have = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    np.testing.assert_array_equal(have, want)
