"""The lazy .npz reader and the file-backed Dataset on top of it.

The reader must return exactly what ``np.load`` returns, for stored and compressed archives,
C and Fortran order and every dtype a model takes, while reading only the rows asked for;
damaged and pickled members are refused in one line.
"""

from __future__ import annotations

import io
import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from hawq_onnx.data import Dataset, input_specs, load_npz
from hawq_onnx.errors import InvalidDataError
from hawq_onnx.hessian.cache import arrays_sha256, dataset_sha256
from hawq_onnx.hessian.hvp import HessianVectorProduct
from hawq_onnx.hessian.objective import Objective
from hawq_onnx.mirror.module import Mirror
from hawq_onnx.npz_reader import NpzReader
from tests.tiny_models import mlp_model

SAVERS = {"stored": np.savez, "compressed": np.savez_compressed}


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "f32": rng.standard_normal((10, 3, 5)).astype(np.float32),
        "f16": rng.standard_normal((10, 4)).astype(np.float16),
        "i64": rng.integers(-2**40, 2**40, (10, 2, 3)),
        "flag": rng.random((10, 7)) > 0.5,
        "u8": rng.integers(0, 256, (10, 6), dtype=np.uint8),
        "big_endian": rng.standard_normal((10, 3)).astype(">f4"),
        "fortran": np.asfortranarray(rng.standard_normal((10, 4, 3)).astype(np.float32)),
        "vector": np.arange(10, dtype=np.int64),
        "scalar": np.array(16000, dtype=np.int64),
    }


def _save(path: Path, kind: str, **arrays: np.ndarray) -> Path:
    SAVERS[kind](path, **arrays)
    return path


def _refused(path: Path, action=NpzReader) -> str:  # noqa: ANN001 - any callable of a path
    with pytest.raises(InvalidDataError) as info:
        action(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path)), message
    return message


# ---------------------------------------------------------------------- exact contents
@pytest.mark.parametrize("kind", SAVERS)
def test_rows_along_every_axis_equal_np_load(tmp_path: Path, kind: str) -> None:
    """Batches of 4 (not dividing 10) along each axis, twice: the same bytes as np.load."""
    path = _save(tmp_path / "a.npz", kind, **_arrays())
    with NpzReader(path) as reader, np.load(path) as expected:
        assert reader.keys == list(expected.files)
        for key in expected.files:
            want = expected[key]
            assert reader.header(key).fortran_order == (key == "fortran")
            np.testing.assert_array_equal(reader.read(key), want, strict=True)
            for axis in range(want.ndim):
                size = want.shape[axis]
                passes = []
                for _ in range(2):  # a second pass reads the same bytes again
                    parts = [reader.read_rows(key, axis, start, min(start + 4, size))
                             for start in range(0, size, 4)]
                    assert [p.shape[axis] for p in parts] == [4] * (size // 4) + (
                        [size % 4] if size % 4 else [])
                    assert all(p.dtype == want.dtype and p.flags.c_contiguous for p in parts)
                    np.testing.assert_array_equal(np.concatenate(parts, axis=axis), want)
                    passes.append([p.tobytes() for p in parts])
                assert passes[0] == passes[1]


@pytest.mark.parametrize("kind", SAVERS)
def test_scan_yields_every_element_in_storage_order(tmp_path: Path, kind: str) -> None:
    path = _save(tmp_path / "a.npz", kind, **_arrays())
    with NpzReader(path) as reader, np.load(path) as expected:
        for key in expected.files:
            want = expected[key]
            order = "F" if reader.header(key).fortran_order else "C"
            chunks = list(reader.scan(key, chunk_bytes=16))
            assert all(c.ndim == 1 and c.nbytes <= max(16, want.itemsize) for c in chunks)
            np.testing.assert_array_equal(np.concatenate(chunks), want.ravel(order=order))


def test_only_the_rows_asked_for_are_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    """Positional reads of exactly the requested range: no whole-member read, no mapping."""
    data = np.arange(60, dtype=np.float32).reshape(10, 6)
    path = _save(tmp_path / "a.npz", "stored", x=data)
    reader = NpzReader(path)
    sizes: list[int] = []
    real = os.preadv

    def counting(fd: int, buffers: list, offset: int) -> int:
        sizes.append(sum(len(memoryview(b)) for b in buffers))
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", counting)
    rows = reader.read_rows("x", 0, 2, 5)
    np.testing.assert_array_equal(rows, data[2:5])
    assert sizes[-1] == 3 * 6 * 4 and sum(sizes) < data.nbytes
    reader.close()


def test_compressed_members_leave_no_file_behind(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The decompressed copy is an anonymous temporary file: nothing to clean up after a
    crash or Ctrl-C, nothing visible while it is in use."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    data = np.arange(200, dtype=np.float64).reshape(20, 10)
    reader = NpzReader(_save(tmp_path / "a.npz", "compressed", x=data))
    np.testing.assert_array_equal(reader.read_rows("x", 0, 5, 9), data[5:9])
    assert list(scratch.iterdir()) == []
    reader.close()
    assert list(scratch.iterdir()) == []
    with pytest.raises(ValueError):  # closed files
        reader.read_rows("x", 0, 0, 1)


# ---------------------------------------------------------------------- hostile archives
@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_truncated_member_is_refused(tmp_path: Path, compression: int) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((4, 8), np.float32))
    path = tmp_path / "short.npz"
    with zipfile.ZipFile(path, "w", compression) as archive:
        archive.writestr("x.npy", buffer.getvalue()[:-40])
    message = _refused(path)
    assert "array 'x' is unreadable (truncated: 88 data bytes for shape (4, 8) float32" in message


def test_cut_archive_is_refused(tmp_path: Path) -> None:
    path = _save(tmp_path / "a.npz", "stored", x=np.zeros((64, 8), np.float32))
    path.write_bytes(path.read_bytes()[:1000])
    assert "not a readable .npz archive" in _refused(path)


def test_corrupt_stored_member_fails_its_crc(tmp_path: Path) -> None:
    """Positional reads bypass zipfile's CRC check; the load-time scan does it instead."""
    model = mlp_model(features=8)
    path = _save(tmp_path / "a.npz", "stored", x=np.ones((4096, 8), np.float32))
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one bit inside x's data: still a finite float
    path.write_bytes(bytes(raw))
    with NpzReader(path) as reader:  # headers are fine; rows are read unchecked, as documented
        assert np.count_nonzero(reader.read_rows("x", 0, 0, 4096) != 1) == 1
        with pytest.raises(InvalidDataError, match="CRC-32 mismatch"):
            list(reader.scan("x"))
    assert "array 'x' is unreadable (CRC-32 mismatch" in _refused(
        path, lambda p: load_npz(p, model))


def test_corrupt_compressed_member_is_refused(tmp_path: Path) -> None:
    model = mlp_model(features=8)
    rng = np.random.default_rng(0)
    path = _save(tmp_path / "a.npz", "compressed", x=rng.standard_normal((64, 8)))
    raw = bytearray(path.read_bytes())
    for offset in range(300, 340):  # inside the deflate stream
        raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert "array 'x' is unreadable" in _refused(path, lambda p: load_npz(p, model))


def test_pickled_objects_are_refused_from_the_header(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def no_unpickling(*args: object, **kwargs: object) -> None:
        raise AssertionError("a data file was unpickled")

    path = tmp_path / "p.npz"
    np.savez(path, x=np.zeros(3), extra=np.array([{"a": 1}, None], dtype=object),
             allow_pickle=True)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    assert "array 'extra' holds Python objects (pickled data)" in _refused(path)


def test_members_that_are_not_arrays(tmp_path: Path) -> None:
    path = tmp_path / "mixed.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("README.txt", b"calibration images, 2024")
        buffer = io.BytesIO()
        np.save(buffer, np.arange(3))
        archive.writestr("x.npy", buffer.getvalue())
    with NpzReader(path) as reader:
        assert reader.keys == ["README.txt", "x"]
        np.testing.assert_array_equal(reader.read("x"), np.arange(3))
        with pytest.raises(InvalidDataError, match="'README.txt' is unreadable"):
            reader.header("README.txt")


# ---------------------------------------------------------------------- the dataset on top
def _identity(inputs: list[tuple[str, int, list]]) -> onnx.ModelProto:
    nodes = [helper.make_node("Identity", [n], [f"{n}_out"]) for n, _, _ in inputs]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(f"{n}_out", t, s) for n, t, s in inputs])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


@pytest.mark.parametrize("kind", SAVERS)
def test_file_backed_dataset_matches_the_arrays(tmp_path: Path, kind: str) -> None:
    """Casts happen per batch (float64 data, float32 model; Fortran-ordered ids), slices and
    heads are views, and the hash follows the content, not the container."""
    model = _identity([("x", TensorProto.FLOAT, ["n", 3]), ("ids", TensorProto.INT32, ["n", 2])])
    rng = np.random.default_rng(3)
    x = rng.standard_normal((11, 3))
    ids = np.asfortranarray(rng.integers(-5, 5, (11, 2)))
    labels = np.arange(11) % 3
    dataset = load_npz(_save(tmp_path / "d.npz", kind, x=x, ids=ids, labels=labels), model)
    batches = list(dataset.batches(4))
    assert [len(b["x"]) for b in batches] == [4, 4, 3]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]),
                                  x.astype(np.float32), strict=True)
    np.testing.assert_array_equal(np.concatenate([b["ids"] for b in batches]),
                                  ids.astype(np.int32), strict=True)
    part = dataset.slice(3, 9).slice(1, 100)  # samples 4..8
    assert len(part) == 5 and len(dataset.head(50)) == 11
    np.testing.assert_array_equal(part.arrays["x"], x[4:9].astype(np.float32))
    np.testing.assert_array_equal(part.labels, labels[4:9])
    view = part.batched(2)
    assert len(view) == 3 and [len(b["ids"]) for b in view] == [2, 2, 1]
    assert [b["ids"].tobytes() for b in view] == [b["ids"].tobytes() for b in view]
    memory = Dataset(Path("<arrays>"), dataset.specs,
                     {"x": x.astype(np.float32), "ids": ids.astype(np.int32)})
    assert dataset_sha256(dataset, labels) == dataset_sha256(memory, labels)
    assert dataset_sha256(dataset, labels) != dataset_sha256(dataset.head(10), labels[:10])


def test_dataset_hash_does_not_depend_on_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    """Samples are hashed batch axis first: a state batched along axis 1 gives the same
    digest whether the pass reads 1, 7 or all 50 samples at a time; a scalar input (a sample
    rate) is part of the digest too (it crashed the hash before)."""
    model = _identity([("a", TensorProto.FLOAT, ["b", 3]), ("s", TensorProto.FLOAT, [2, "b", 4]),
                       ("sr", TensorProto.INT64, [])])
    rng = np.random.default_rng(5)
    arrays = {"a": rng.random((50, 3)).astype(np.float32),
              "s": rng.random((2, 50, 4)).astype(np.float32), "sr": np.array(16000)}
    dataset = Dataset(Path("<arrays>"), input_specs(model), arrays)
    chunks = Dataset.chunks
    digests = []
    for max_bytes in (1, 7 * dataset.sample_nbytes, 2**30):
        monkeypatch.setattr(Dataset, "chunks", lambda self, m=max_bytes: chunks(self, m))
        digests.append(dataset_sha256(dataset, None))
    assert len(set(digests)) == 1
    monkeypatch.setattr(Dataset, "chunks", chunks)
    assert dataset_sha256(dataset.slice(1, 50), None) != digests[0]
    # an unbatched (scalar) input is hashed once, by value
    other_rate = Dataset(Path("<arrays>"), input_specs(model), {**arrays, "sr": np.array(8000)})
    assert dataset_sha256(other_rate, None) != digests[0]


def test_arrays_hash_is_the_c_order_bytes() -> None:
    """Chunked hashing gives the same digest as hashing ``tobytes()`` of everything."""
    import hashlib

    array = np.asfortranarray(np.random.default_rng(1).standard_normal((300, 70)))
    digest = hashlib.sha256(f"x:{array.dtype.str}:{array.shape};".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    assert arrays_sha256({"x": array}) == digest.hexdigest()


def test_anonymous_batch_axis_of_a_recurrent_state(tmp_path: Path) -> None:
    """silero-vad's export leaves the batch unnamed: input [?, ?], state [2, ?, 128]. The
    state's one unnamed dynamic axis is its batch axis, as for the exports that name it."""
    model = _identity([("input", TensorProto.FLOAT, [None, None]),
                       ("state", TensorProto.FLOAT, [2, None, 4]),
                       ("sr", TensorProto.INT64, [])])
    assert [(s.name, s.batch_axis, s.fixed_batch) for s in input_specs(model)] == [
        ("input", 0, None), ("state", 1, None), ("sr", None, None)]
    rng = np.random.default_rng(2)
    audio = rng.standard_normal((5, 16)).astype(np.float32)
    state = rng.standard_normal((2, 5, 4)).astype(np.float32)
    dataset = load_npz(_save(tmp_path / "s.npz", "stored", input=audio, state=state,
                             sr=np.array(16000)), model)
    batches = list(dataset.batches(3))
    np.testing.assert_array_equal(batches[1]["state"], state[:, 3:5])
    assert batches[1]["input"].shape == (2, 16) and int(batches[1]["sr"]) == 16000
    # a named batch dimension elsewhere is not second-guessed: [1, ?] stays batched on axis 0
    named = _identity([("ids", TensorProto.INT64, ["batch", 4]),
                       ("mask", TensorProto.INT64, [1, None])])
    assert [s.batch_axis for s in input_specs(named)] == [0, 0]


def test_objective_reads_the_file_on_every_pass(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The analysis keeps no list of batches: each Hessian-vector product reads them again,
    and gives exactly what in-memory batches give."""
    model = mlp_model(features=8)
    x = np.random.default_rng(4).standard_normal((20, 8)).astype(np.float32)
    dataset = load_npz(_save(tmp_path / "d.npz", "stored", x=x), model)
    reads: list[int] = []
    real = NpzReader.read_rows

    def counting(self: NpzReader, key: str, axis: int, start: int, stop: int) -> np.ndarray:
        reads.append(stop - start)
        return real(self, key, axis, start, stop)

    monkeypatch.setattr(NpzReader, "read_rows", counting)
    lazy = Objective(Mirror(model, weight_names=["w1", "w2"]), dataset.batched(8))
    assert reads == [8, 8, 4]  # the set-up pass
    eager = Objective(Mirror(model, weight_names=["w1", "w2"]), list(dataset.batches(8)))
    reads.clear()
    vector = {0: torch.ones(8, 16), 1: torch.ones(16, 4)}
    got = HessianVectorProduct(lazy).apply([vector])[0]
    assert reads == [8, 8, 4]
    HessianVectorProduct(lazy).apply([vector])
    assert reads == [8, 8, 4] * 2
    want = HessianVectorProduct(eager).apply([vector])[0]
    assert all(torch.equal(got[b], want[b]) for b in want)
