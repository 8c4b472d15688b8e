"""load_npz: every way a data file can disagree with the model is refused in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from hawq_onnx.data import load_npz
from hawq_onnx.errors import InvalidDataError

UNPICKLED: list[str] = []


def _model(inputs: list[tuple[str, int, list]]) -> onnx.ModelProto:
    """Identity per input: only the declared inputs matter to the loader."""
    nodes = [helper.make_node("Identity", [name], [f"{name}_out"]) for name, _, _ in inputs]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(f"{n}_out", t, s) for n, t, s in inputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(model)
    return model


TEXT_MODEL = _model([("x", TensorProto.FLOAT, ["n", 3, 4]),
                     ("ids", TensorProto.INT64, ["n", "seq"])])


def _save(tmp_path: Path, **arrays: np.ndarray) -> Path:
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return path


def _good(n: int = 10) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x": rng.standard_normal((n, 3, 4)), "ids": rng.integers(0, 9, (n, 6), np.int32)}


def _refused(path: Path, model: onnx.ModelProto = TEXT_MODEL) -> str:
    with pytest.raises(InvalidDataError) as info:
        load_npz(path, model)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path)), message
    return message


def test_valid_data_is_cast_batched_and_keeps_labels(tmp_path: Path) -> None:
    arrays = _good(10)
    labels = np.arange(10) % 3
    dataset = load_npz(_save(tmp_path, **arrays, labels=labels, extra=np.zeros(2)), TEXT_MODEL)
    assert len(dataset) == 10
    assert dataset.arrays["x"].dtype == np.float32 and dataset.arrays["ids"].dtype == np.int64
    np.testing.assert_array_equal(dataset.labels, labels)
    assert len(dataset.notes) == 1 and "extra" in dataset.notes[0]
    batches = list(dataset.batches(4))
    assert [b["x"].shape[0] for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b["ids"] for b in batches]), arrays["ids"])
    np.testing.assert_allclose(batches[1]["x"], arrays["x"][4:8].astype(np.float32))
    assert [len(lab) for lab in dataset.label_batches(4)] == [4, 4, 2]


def test_missing_input_names_it_and_lists_keys(tmp_path: Path) -> None:
    message = _refused(_save(tmp_path, x=_good()["x"], tokens=np.zeros((10, 6), np.int64)))
    assert "missing input 'ids'" in message and "keys found: tokens, x" in message


def test_integer_pixels_for_float_input_are_refused(tmp_path: Path) -> None:
    arrays = _good() | {"x": np.zeros((10, 3, 4), np.uint8)}
    message = _refused(_save(tmp_path, **arrays))
    assert "'x'" in message and "uint8" in message and "float32" in message


def test_float_data_for_integer_input_is_refused(tmp_path: Path) -> None:
    arrays = _good() | {"ids": np.zeros((10, 6), np.float32)}
    assert "'ids'" in _refused(_save(tmp_path, **arrays))


def test_integer_values_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    model = _model([("ids", TensorProto.INT32, ["n", 2])])
    path = _save(tmp_path, ids=np.array([[1, 2], [3, 2**40]], np.int64))
    assert "do not fit int32" in _refused(path, model)


def test_wrong_per_sample_shape(tmp_path: Path) -> None:
    arrays = _good() | {"x": np.zeros((10, 3, 5))}
    message = _refused(_save(tmp_path, **arrays))
    assert "per-sample shape (3, 5)" in message and "(3, 4)" in message


def test_wrong_rank(tmp_path: Path) -> None:
    arrays = _good() | {"x": np.zeros((10, 12))}
    assert "has 2 dims" in _refused(_save(tmp_path, **arrays))


def test_symbolic_dim_must_agree_across_inputs(tmp_path: Path) -> None:
    model = _model([("ids", TensorProto.INT64, ["n", "seq"]),
                    ("mask", TensorProto.INT64, ["n", "seq"])])
    path = _save(tmp_path, ids=np.zeros((4, 6), np.int64), mask=np.ones((4, 5), np.int64))
    assert "dimension 'seq' is 5 here but 6" in _refused(path, model)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_values_are_refused(tmp_path: Path, bad: float) -> None:
    arrays = _good()
    arrays["x"][3, 1, 2] = bad
    assert "'x' has 1 NaN/Inf" in _refused(_save(tmp_path, **arrays))


def test_overflow_on_cast_to_half_is_refused(tmp_path: Path) -> None:
    model = _model([("x", TensorProto.FLOAT16, ["n", 2])])
    path = _save(tmp_path, x=np.array([[1.0, 1e6]], np.float32))
    assert "after conversion to float16" in _refused(path, model)


def test_empty_data_is_refused(tmp_path: Path) -> None:
    arrays = {"x": np.zeros((0, 3, 4)), "ids": np.zeros((0, 6), np.int64)}
    assert "no samples" in _refused(_save(tmp_path, **arrays))


def test_mismatched_sample_counts(tmp_path: Path) -> None:
    arrays = _good() | {"ids": np.zeros((9, 6), np.int64)}
    assert "different numbers of samples (x: 10, ids: 9)" in _refused(_save(tmp_path, **arrays))


def test_labels_length_must_match(tmp_path: Path) -> None:
    path = _save(tmp_path, **_good(), labels=np.zeros(7))
    assert "'labels' has 7 entries for 10 samples" in _refused(path)


def _mark_unpickled(tag: str) -> str:
    UNPICKLED.append(tag)
    return tag


class _Payload:
    """Unpickling this object would call _mark_unpickled: a harmless stand-in for code."""

    def __reduce__(self):
        return (_mark_unpickled, ("ran",))


def test_pickled_object_array_is_refused_without_unpickling(tmp_path: Path) -> None:
    objects = np.empty(10, dtype=object)
    objects[:] = [_Payload() for _ in range(10)]
    path = _save(tmp_path, **_good(), labels=objects)
    UNPICKLED.clear()
    assert "array 'labels' holds Python objects" in _refused(path)
    assert UNPICKLED == []


def test_not_an_archive(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"\x00not a zip file at all" * 10)
    assert "not a readable .npz archive" in _refused(garbage)
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    assert "a single .npy array" in _refused(single)
    assert "no such file" in _refused(tmp_path / "absent.npz")


def test_fixed_batch_dimension_wins(tmp_path: Path) -> None:
    model = _model([("x", TensorProto.FLOAT, [2, 3])])
    data = np.arange(18, dtype=np.float32).reshape(6, 3)
    dataset = load_npz(_save(tmp_path, x=data), model)
    batches = list(dataset.batches(batch_size=5))
    assert [b["x"].shape for b in batches] == [(2, 3)] * 3
    np.testing.assert_array_equal(batches[2]["x"], data[4:6])
    message = _refused(_save(tmp_path, x=data[:5]), model)
    assert "5 samples is not a multiple of the model's fixed batch size 2" in message


def test_batch_axis_follows_named_dim_and_scalars_repeat(tmp_path: Path) -> None:
    """An RNN state declared [2, batch, 4] is batched along axis 1; a scalar input (sample
    rate) is fed whole with every batch."""
    model = _model([("audio", TensorProto.FLOAT, ["batch", 7]),
                    ("state", TensorProto.FLOAT, [2, "batch", 4]),
                    ("sr", TensorProto.INT64, [])])
    rng = np.random.default_rng(1)
    audio = rng.standard_normal((5, 7)).astype(np.float32)
    state = rng.standard_normal((2, 5, 4)).astype(np.float32)
    dataset = load_npz(_save(tmp_path, audio=audio, state=state, sr=np.array(16000)), model)
    assert len(dataset) == 5
    batches = list(dataset.batches(3))
    assert [b["state"].shape for b in batches] == [(2, 3, 4), (2, 2, 4)]
    np.testing.assert_array_equal(batches[1]["state"], state[:, 3:5])
    assert all(b["sr"].shape == () and int(b["sr"]) == 16000 for b in batches)
    message = _refused(_save(tmp_path, audio=audio, state=state, sr=np.full(5, 16000)), model)
    assert "'sr' is a scalar in the model" in message


def test_exporter_placeholder_dims_constrain_nothing(tmp_path: Path) -> None:
    """paddle2onnx writes -1 for a dynamic batch and '?' for every unknown dim; '?' twice in
    one input does not mean "equal sizes"."""
    model = _model([("x", TensorProto.FLOAT, [-1, 3, "?", "?"])])
    data = np.zeros((5, 3, 6, 8), np.float32)
    dataset = load_npz(_save(tmp_path, x=data), model)
    assert dataset.fixed_batch is None
    assert [b["x"].shape for b in dataset.batches(2)] == [(2, 3, 6, 8)] * 2 + [(1, 3, 6, 8)]


def test_head_takes_the_first_samples_with_their_labels(tmp_path: Path) -> None:
    model = _model([("x", TensorProto.FLOAT, ["n", 3])])
    x = np.arange(5 * 3, dtype=np.float32).reshape(5, 3)
    head = load_npz(_save(tmp_path, x=x, labels=np.arange(5)), model).head(2)
    assert len(head) == 2
    np.testing.assert_array_equal(next(head.batches(8))["x"], x[:2])
    np.testing.assert_array_equal(head.labels, [0, 1])
