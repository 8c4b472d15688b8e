"""The import entry point and the model writer: bad files, external data, the pass pipeline,
metadata, IR versions, atomic and deterministic saves."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from hawq_onnx import importer, model_io
from hawq_onnx.errors import (
    AlreadyQuantizedError,
    HawqError,
    InvalidModelError,
    OpsetConversionError,
    UnsafeExternalDataError,
)
from hawq_onnx.importer import load_model
from hawq_onnx.model_io import (
    file_sha256,
    model_sha256,
    required_ir_version,
    save_model,
)

RNG = np.random.default_rng(0)


def _rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _info(name: str, shape: list[int | str], dtype: int = TensorProto.FLOAT
          ) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def _run(model: onnx.ModelProto | Path, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return session.run(None, dict(feeds))


def _mlp(opset: int = 13, ir_version: int = 10) -> onnx.ModelProto:
    """x[N,4] -> MatMul(w1) -> Add(b1) -> Relu -> MatMul(w2): weights large enough to be
    written as external data."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]),
             helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    inits = [numpy_helper.from_array(_rand(4, 64), "w1"),
             numpy_helper.from_array(_rand(64), "b1"),
             numpy_helper.from_array(_rand(64, 3), "w2")]
    graph = helper.make_graph(nodes, "mlp", [_info("x", ["N", 4])], [_info("y", ["N", 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                             ir_version=ir_version)


def _write(path: Path, model: onnx.ModelProto) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


# --------------------------------------------------------------------------- bad files


def _garbage(tmp: Path) -> Path:
    path = tmp / "garbage.onnx"
    path.write_bytes(bytes(range(256)) * 8)
    return path


def _truncated(tmp: Path) -> Path:
    data = _mlp().SerializeToString()
    path = tmp / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    return path


def _empty(tmp: Path) -> Path:
    path = tmp / "empty.onnx"
    path.write_bytes(b"")
    return path


def _directory(tmp: Path) -> Path:
    path = tmp / "adir.onnx"
    path.mkdir()
    return path


def _missing(tmp: Path) -> Path:
    return tmp / "missing.onnx"


def _checker_failure(tmp: Path) -> Path:
    graph = helper.make_graph([helper.make_node("Relu", ["nowhere"], ["y"])], "g",
                              [_info("x", [2])], [_info("y", [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=10)
    return _write(tmp / "dangling.onnx", model)


def _type_error(tmp: Path) -> Path:
    graph = helper.make_graph([helper.make_node("Add", ["x", "i"], ["y"])], "g",
                              [_info("x", [2]), _info("i", [2], TensorProto.INT64)],
                              [_info("y", [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=10)
    return _write(tmp / "typeerror.onnx", model)


@pytest.mark.parametrize(("make", "reason"), [
    (_garbage, "not an ONNX model"), (_truncated, "truncated|not an ONNX model|checker"),
    (_empty, "empty file"), (_directory, "is a directory"), (_missing, "no such file"),
    (_checker_failure, "fails the ONNX checker"), (_type_error, "shape/type checking"),
])
def test_unusable_files_raise_invalid_model_error(tmp_path: Path, make, reason: str) -> None:
    path = make(tmp_path)
    with pytest.raises(InvalidModelError, match=reason) as err:
        load_model(path)
    message = str(err.value)
    assert str(path) in message and "\n" not in message


def test_wrong_declared_output_shape_is_accepted_with_a_note(tmp_path: Path) -> None:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [_info("x", ["N", 3])], [_info("y", ["N", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=10)
    imported = load_model(_write(tmp_path / "m.onnx", model))
    assert any("strict shape inference failed" in note for note in imported.notes)
    out = _run(imported.model, {"x": np.array([[-1.0, 2.0, -3.0]], np.float32)})[0]
    np.testing.assert_array_equal(out, [[0.0, 2.0, 0.0]])


# --------------------------------------------------------------------------- external data


def _save_external(model: onnx.ModelProto, path: Path, location: str) -> Path:
    """onnx's own external-data writer (it converts the proto it is given: pass a copy)."""
    onnx.save_model(model_io.copy_model(model), str(path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=location, size_threshold=0)
    return path


def test_external_data_inside_directory_loads(tmp_path: Path) -> None:
    model = _mlp()
    path = _save_external(model, tmp_path / "m.onnx", "m.weights")
    assert (tmp_path / "m.weights").stat().st_size > 1000
    imported = load_model(path)
    assert imported.external_data
    got = _weights(imported.model)
    for name, want in _weights(model).items():
        np.testing.assert_array_equal(got[name], want)
    assert imported.sha256 == file_sha256(path)


def _point_tensor_at(model: onnx.ModelProto, name: str, location: str) -> onnx.ModelProto:
    """Make initializer ``name`` refer to external ``location`` (its bytes are dropped)."""
    for init in model.graph.initializer:
        if init.name == name:
            nbytes = len(init.raw_data)
            init.ClearField("raw_data")
            init.data_location = TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", "0"), ("length", str(nbytes))):
                init.external_data.add(key=key, value=value)
    return model


@pytest.fixture
def no_external_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records (and forbids) every external-data read the importer attempts."""
    reads: list[str] = []

    def forbidden(ref, model_file):  # same signature as importer._read_external
        reads.append(ref.tensor.name)
        raise AssertionError("external data was read before validation finished")

    monkeypatch.setattr(importer, "_read_external", forbidden)
    return reads


def _outside_setup(tmp_path: Path) -> tuple[Path, onnx.ModelProto, np.ndarray]:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    model = _mlp()
    w2 = _weights(model)["w2"]
    (tmp_path / "outside.bin").write_bytes(w2.tobytes())
    (model_dir / "inside.bin").write_bytes(_weights(model)["w1"].tobytes())
    _point_tensor_at(model, "w1", "inside.bin")  # a valid reference comes first
    return model_dir, model, w2


@pytest.mark.parametrize("location", ["ABSOLUTE", "../outside.bin", "sub/../../outside.bin",
                                      "link.bin"])
def test_external_data_outside_directory_is_refused_before_reading(
        tmp_path: Path, location: str, no_external_reads: list[str]) -> None:
    model_dir, model, _ = _outside_setup(tmp_path)
    if location == "ABSOLUTE":  # the target does not even exist
        location = str(tmp_path / "does-not-exist" / "weights.bin")
    if location == "link.bin":
        os.symlink(tmp_path / "outside.bin", model_dir / "link.bin")
    path = _write(model_dir / "m.onnx", _point_tensor_at(model, "w2", location))
    with pytest.raises(UnsafeExternalDataError, match="'w2'") as err:
        load_model(path)
    assert str(path) in str(err.value)
    assert no_external_reads == []


def test_symlink_inside_directory_is_followed(tmp_path: Path) -> None:
    model = _mlp()
    want = _weights(model)["w2"]
    (tmp_path / "real.bin").write_bytes(want.tobytes())
    os.symlink("real.bin", tmp_path / "alias.bin")
    path = _write(tmp_path / "m.onnx", _point_tensor_at(model, "w2", "alias.bin"))
    np.testing.assert_array_equal(_weights(load_model(path).model)["w2"], want)


def test_symlinked_model_in_a_blob_store_loads(tmp_path: Path) -> None:
    """Hub caches link model.onnx and its data into a blob directory: the data resolves
    outside the link's directory but next to the model file itself, which is allowed."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    snapshot.mkdir()
    model = _mlp()
    want = _weights(model)["w2"]
    (blobs / "b2").write_bytes(want.tobytes())
    _write(blobs / "b1", _point_tensor_at(model, "w2", "weights.bin"))
    os.symlink(blobs / "b1", snapshot / "model.onnx")
    os.symlink(blobs / "b2", snapshot / "weights.bin")
    loaded = load_model(snapshot / "model.onnx", normalize=False).model
    np.testing.assert_array_equal(_weights(loaded)["w2"], want)


def test_missing_and_short_external_files_are_invalid(tmp_path: Path) -> None:
    model = _mlp()
    path = _write(tmp_path / "m.onnx", _point_tensor_at(_mlp(), "w2", "gone.bin"))
    with pytest.raises(InvalidModelError, match="gone.bin.*missing") as err:
        load_model(path)
    assert not isinstance(err.value, UnsafeExternalDataError)
    (tmp_path / "short.bin").write_bytes(_weights(model)["w2"].tobytes()[:100])
    path = _write(tmp_path / "m2.onnx", _point_tensor_at(_mlp(), "w2", "short.bin"))
    with pytest.raises(InvalidModelError, match="has 100 bytes.*expected 768"):
        load_model(path)


# --------------------------------------------------------------------------- pipeline


def _legacy_model() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """An opset-11 export with Constant-node weights, a Conv->BN pair and a Squeeze(axes)."""
    channels = 8
    bn = {n: RNG.uniform(0.5, 1.5, channels).astype(np.float32)
          for n in ("gamma", "beta", "mean", "var")}
    nodes = [helper.make_node("Constant", [], ["w"],
                              value=numpy_helper.from_array(_rand(channels, 2, 3, 3), "w")),
             helper.make_node("Constant", [], ["fcw"],
                              value=numpy_helper.from_array(_rand(channels, 5), "fcw")),
             helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"],
                              ["b"], name="bn"),
             helper.make_node("Relu", ["b"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Squeeze", ["p"], ["s"], axes=[2, 3]),
             helper.make_node("MatMul", ["s", "fcw"], ["y"])]
    graph = helper.make_graph(nodes, "legacy", [_info("x", ["N", 2, 6, 6])], [_info("y", ["N", 5])],
                              [numpy_helper.from_array(v, k) for k, v in bn.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=6)
    model.doc_string, model.producer_name, model.producer_version = "a legacy net", "exp", "0.9"
    model.model_version, model.domain = 7, "org.example"
    helper.set_model_props(model, {"classes": "a,b,c,d,e", "vocab": "x\ny"})
    return model, {"x": _rand(2, 2, 6, 6)}


def _meta(model: onnx.ModelProto) -> tuple[object, ...]:
    return (model.doc_string, model.producer_name, model.producer_version, model.model_version,
            model.domain, [(p.key, p.value) for p in model.metadata_props])


def test_pipeline_normalizes_legacy_model_and_keeps_outputs(tmp_path: Path) -> None:
    model, feeds = _legacy_model()
    imported = load_model(_write(tmp_path / "legacy.onnx", model))
    out = imported.model
    assert imported.original_opset == 11 and imported.original_ir_version == 6
    assert [r.name for r in imported.reports] == [
        "reject_quantized", "upgrade_opset", "lift_constants", "fold_batchnorm"]
    assert [r.changed for r in imported.reports][1:] == [1, 3, 1]  # fcw, w, squeeze axes lifted
    assert [n.op_type for n in out.graph.node] == [
        "Conv", "Relu", "GlobalAveragePool", "Squeeze", "MatMul"]
    assert out.opset_import[0].version == 13 and out.ir_version == 10
    assert {"w", "fcw"} <= set(_weights(out))
    assert any(info.name == "p" for info in out.graph.value_info)  # shapes inferred
    assert _meta(out) == _meta(model)
    reference = model_io.copy_model(model)
    for want, have in zip(_run(reference, feeds), _run(out, feeds), strict=True):
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5)


def test_ir3_model_initializers_stop_being_inputs_and_bn_folds(tmp_path: Path) -> None:
    """IR 3 (2017-2018 model zoo) lists every initializer as a graph input; after raising the
    IR those must not look like overridable inputs, or no weight would count as constant."""
    params = {n: RNG.uniform(0.5, 1.5, 3).astype(np.float32)
              for n in ("gamma", "beta", "mean", "var")} | {"w": _rand(3, 2, 1, 1)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"])]
    inputs = [_info("x", [1, 2, 4, 4])] + [_info(n, list(v.shape)) for n, v in params.items()]
    graph = helper.make_graph(nodes, "old", inputs, [_info("y", [1, 3, 4, 4])],
                              [numpy_helper.from_array(v, n) for n, v in params.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)], ir_version=3)
    feeds = {"x": _rand(1, 2, 4, 4)}
    imported = load_model(_write(tmp_path / "old.onnx", model))
    assert [i.name for i in imported.model.graph.input] == ["x"]
    assert [n.op_type for n in imported.model.graph.node] == ["Conv"]
    np.testing.assert_allclose(_run(imported.model, feeds)[0], _run(model, feeds)[0],
                               rtol=1e-5, atol=1e-5)


def test_normalize_false_keeps_the_graph(tmp_path: Path) -> None:
    model, _ = _legacy_model()
    imported = load_model(_write(tmp_path / "legacy.onnx", model), normalize=False)
    assert imported.reports == []
    assert [n.op_type for n in imported.model.graph.node] == [n.op_type for n in model.graph.node]


def test_metadata_survives_load_and_save(tmp_path: Path) -> None:
    model, feeds = _legacy_model()
    imported = load_model(_write(tmp_path / "legacy.onnx", model))
    saved = save_model(imported.model, tmp_path / "out.onnx", source=imported.path)
    reloaded = onnx.load(str(saved))
    assert _meta(reloaded) == _meta(model)
    assert reloaded.ir_version == 10 <= 13
    np.testing.assert_allclose(_run(saved, feeds)[0], _run(model, feeds)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op_type", ["qdq", "qlinear"])
def test_quantized_models_are_refused(tmp_path: Path, op_type: str) -> None:
    if op_type == "qdq":
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                 helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
        inputs, out_type, expect = [_info("x", [1, 3])], TensorProto.FLOAT, "DequantizeLinear x1"
    else:
        nodes = [helper.make_node("QLinearMatMul", ["x", "s", "z", "w", "s", "z", "s", "z"],
                                  ["y"])]
        inputs, out_type, expect = [_info("x", [1, 3], TensorProto.UINT8)], TensorProto.UINT8, \
            "QLinearMatMul x1"
    inits = [numpy_helper.from_array(np.float32(0.1), "s"), numpy_helper.from_array(
        np.uint8(128), "z"), numpy_helper.from_array(np.full((3, 3), 130, np.uint8), "w")]
    graph = helper.make_graph(nodes, "q", inputs, [_info("y", [1, 3], out_type)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=10)
    path = _write(tmp_path / "q.onnx", model)
    with pytest.raises(AlreadyQuantizedError, match=expect) as err:
        load_model(path)
    assert str(path) in str(err.value)


def test_conversion_failure_surfaces_with_file_name(tmp_path: Path) -> None:
    params = [numpy_helper.from_array(np.full((2, 2), 1.0 + i, np.float32), n)
              for i, n in enumerate(("g", "b", "m", "v"))]
    graph = helper.make_graph(
        [helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["y"], spatial=0)],
        "bn", [_info("x", [1, 2, 2])], [_info("y", [1, 2, 2])], params)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)], ir_version=6)
    path = _write(tmp_path / "bn7.onnx", model)
    with pytest.raises(OpsetConversionError, match="BatchNormalization") as err:
        load_model(path)
    assert str(err.value).startswith(str(path))


def test_ir14_model_from_new_onnx_is_made_readable(tmp_path: Path) -> None:
    model = _mlp(ir_version=onnx.IR_VERSION)
    imported = load_model(_write(tmp_path / "new.onnx", model))
    assert imported.original_ir_version == onnx.IR_VERSION
    assert imported.model.ir_version == 10
    feeds = {"x": _rand(2, 4)}
    np.testing.assert_allclose(_run(imported.model, feeds)[0],
                               _run(_mlp_reference(model), feeds)[0], rtol=1e-6)


def _mlp_reference(model: onnx.ModelProto) -> onnx.ModelProto:
    ref = model_io.copy_model(model)
    ref.ir_version = 10
    return ref


def test_large_model_path_uses_external_data(tmp_path: Path, monkeypatch) -> None:
    """With the protobuf limit lowered, the > 2 GiB code paths run on a small model: skeleton
    shape inference, automatic external data on save, and reloading it."""
    model, feeds = _legacy_model()
    expected = _run(model, feeds)[0]
    path = _save_external(model, tmp_path / "legacy.onnx", "legacy.bin")
    limit = 400
    assert model.ByteSize() > limit
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", limit)
    imported = load_model(path)
    assert imported.reports[-1].changed == 1  # BN folded
    assert any(info.name == "p" for info in imported.model.graph.value_info)
    saved = save_model(imported.model, tmp_path / "big.onnx", external_data_threshold=100)
    data = tmp_path / "big.onnx.data"
    assert data.stat().st_size >= 4 * (8 * 2 * 9 + 8 * 5)  # conv and fc weights moved out
    reloaded = load_model(saved)
    assert reloaded.external_data
    assert model_sha256(reloaded.model) == model_sha256(imported.model)
    np.testing.assert_allclose(_run(reloaded.model, feeds)[0], expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- save_model


def _typed_model(opset: int, dtype: int) -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Cast", ["x"], ["y"], to=dtype)], "cast",
                              [_info("x", [4])], [_info("y", [4], dtype)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize(("opset", "dtype", "ir"), [
    (13, TensorProto.FLOAT, 10), (21, TensorProto.FLOAT, 10), (21, TensorProto.INT4, 10),
    (22, TensorProto.FLOAT, 10), (23, TensorProto.FLOAT, 11), (25, TensorProto.FLOAT, 11),
    (23, TensorProto.FLOAT4E2M1, 11), (25, TensorProto.INT2, 13), (25, TensorProto.UINT2, 13),
])
def test_required_ir_version(opset: int, dtype: int, ir: int) -> None:
    assert required_ir_version(_typed_model(opset, dtype)) == ir


def test_save_sets_readable_ir_and_is_deterministic(tmp_path: Path) -> None:
    model = _mlp(ir_version=onnx.IR_VERSION)
    before = model.SerializeToString()
    first = save_model(model, tmp_path / "a.onnx")
    second = save_model(model, tmp_path / "b.onnx")
    assert model.SerializeToString() == before  # the caller's proto is not modified
    assert first.read_bytes() == second.read_bytes()
    assert onnx.load(str(first)).ir_version == 10
    readable = _mlp_reference(model)
    assert model_sha256(readable) == file_sha256(first) == hashlib.sha256(
        first.read_bytes()).hexdigest()
    feeds = {"x": _rand(3, 4)}
    np.testing.assert_array_equal(_run(first, feeds)[0], _run(readable, feeds)[0])


def test_save_refuses_to_overwrite_its_source(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.onnx", _mlp())
    original = path.read_bytes()
    for target in (path, tmp_path / "." / "m.onnx"):
        with pytest.raises(HawqError, match="refusing to overwrite the input"):
            save_model(_mlp(), target, source=path)
    os.symlink(path, tmp_path / "alias.onnx")
    with pytest.raises(HawqError, match="refusing to overwrite the input"):
        save_model(_mlp(), tmp_path / "alias.onnx", source=path)
    assert path.read_bytes() == original


@pytest.mark.parametrize("external", [False, True])
def test_failed_save_leaves_destination_and_no_temp_files(
        tmp_path: Path, monkeypatch, external: bool) -> None:
    dest = _write(tmp_path / "out.onnx", _mlp())
    old = dest.read_bytes()
    calls = {"n": 0}

    def failing_write(handle, data: bytes) -> None:
        calls["n"] += 1
        handle.write(data[: len(data) // 2])
        if ".data." not in handle.name:  # external: the data file is already complete
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_io, "_write_bytes", failing_write)
    with pytest.raises(OSError, match="No space left"):
        save_model(_mlp(), dest, external_data=external)
    assert dest.read_bytes() == old
    assert calls["n"] == (2 if external else 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_save_with_external_data_round_trips_and_aligns(tmp_path: Path) -> None:
    model = _mlp()
    big = numpy_helper.from_array(_rand(300, 1000), "big")  # 1.2 MB: aligned for mmap
    model.graph.initializer.append(big)
    model.graph.node.append(helper.make_node("Identity", ["big"], ["big_out"]))
    model.graph.output.append(_info("big_out", [300, 1000]))
    path = save_model(model, tmp_path / "ext.onnx", external_data=True)
    skeleton = onnx.load(str(path), load_external_data=False)
    offsets = {t.name: int({e.key: e.value for e in t.external_data}["offset"])
               for t in skeleton.graph.initializer if t.external_data}
    assert set(offsets) == {"w1", "big"}  # b1 and w2 are below the 1024-byte threshold
    assert offsets["w1"] == 0 and offsets["big"] == 64 * 1024
    assert path.stat().st_size < 2000
    loaded = load_model(path, normalize=False).model
    for name, want in _weights(model).items():
        np.testing.assert_array_equal(_weights(loaded)[name], want)
