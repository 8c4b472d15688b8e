"""Hostile and broken input through the command line: exit 2 (or 130), one line, no traceback,
nothing partial left behind.

Library-level checks of the same conditions live in test_importer.py and test_data.py; here
every case goes through ``hawq_onnx.cli.main`` the way a build pipeline calls it.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from hawq_onnx import model_io
from hawq_onnx.cli import main
from hawq_onnx.importer import load_model
from hawq_onnx.model_io import model_sha256, save_model
from tests.conftest import MODELS
from tests.tiny_models import IR_VERSION, chain_model, mlp_model, save_data, save_mlp


def _cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str]:
    """Run the CLI; return (exit code, stderr) after checking stderr is one clean line."""
    code, _, err = _cli_out(capsys, *argv)
    return code, err


def _cli_out(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    """(exit code, stdout, stderr); a failure must be one clean line on stderr."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    if code != 0:  # notes ("note: ...") may come first; the error is one last line
        lines = err.splitlines()
        assert lines and lines[-1].startswith("hawq-onnx: "), err
        assert all(line.startswith("note: ") for line in lines[:-1]), err
        assert "Traceback" not in err and "internal error" not in err, err
    return code, out, err


@pytest.fixture()
def work(tmp_path: Path) -> Path:
    save_mlp(tmp_path / "mlp.onnx")
    save_data(tmp_path / "calib.npz")
    return tmp_path


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------- broken model files
def _text(path: Path) -> None:
    path.write_text("this is a README, not a model\n")


def _truncated(path: Path) -> None:
    data = mlp_model().SerializeToString()
    path.write_bytes(data[: len(data) // 2])


def _corrupted(path: Path) -> None:
    data = bytearray(mlp_model().SerializeToString())
    data[40:60] = b"\xff" * 20  # a run of bytes overwritten in the middle of the graph
    path.write_bytes(bytes(data))


def _inconsistent_shapes(path: Path) -> None:
    model = mlp_model()
    model.graph.initializer[0].CopyFrom(
        numpy_helper.from_array(np.ones((7, 16), np.float32), "w1"))  # x is [batch, 8]
    onnx.save(model, path)


def _dangling_input(path: Path) -> None:
    model = mlp_model()
    model.graph.node[1].input[1] = "no_such_tensor"
    onnx.save(model, path)


def _wrong_tensor_size(path: Path) -> None:
    """Found by fuzzing: dims that disagree with the stored bytes (numpy's reshape crashed)."""
    model = mlp_model()
    del model.graph.initializer[1].dims[:]  # b1 keeps 16 floats but claims to be a scalar
    onnx.save(model, path)


@pytest.mark.parametrize(("make", "message"), [
    (_wrong_tensor_size, "tensor 'b1' holds 64 bytes but its shape [] needs 4"),
    (_text, "not an ONNX model or truncated"),
    (_truncated, "not an ONNX model or truncated"),
    (_corrupted, "not an ONNX model or truncated"),
    (_inconsistent_shapes, "Incompatible dimensions for matrix multiplication"),
    (_dangling_input, "no_such_tensor"),
])
@pytest.mark.parametrize("command", ["inspect", "quantize", "analyze", "validate"])
def test_broken_models_exit_2_with_one_line(work: Path, capsys: pytest.CaptureFixture[str],
                                            make, message: str, command: str) -> None:
    bad = work / "bad.onnx"
    make(bad)
    argv = {"inspect": ["inspect", bad],
            "quantize": ["quantize", bad, "-o", work / "q.onnx", "--calib", work / "calib.npz"],
            "analyze": ["analyze", bad, "--calib", work / "calib.npz", "--no-cache"],
            "validate": ["validate", bad, work / "mlp.onnx", "--eval", work / "calib.npz"]}
    code, err = _cli(capsys, *argv[command])
    assert code == 2 and message in err and str(bad) in err
    assert _listing(work) == ["bad.onnx", "calib.npz", "mlp.onnx"]


# ---------------------------------------------------------------------- calibration data
def _save_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def _with_nan(path: Path) -> Path:
    x = np.zeros((4, 8), np.float32)
    x[1, 2] = np.nan
    return _save_npz(path, x=x)


def _with_inf(path: Path) -> Path:
    x = np.zeros((4, 8), np.float32)
    x[3, 0] = -np.inf
    return _save_npz(path, x=x)


def _pickled(path: Path) -> Path:
    np.savez(path, x=np.array([{"payload": "os.system"}, None], dtype=object),
             allow_pickle=True)
    return path


def _zero_bytes(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _bad_npy_header(path: Path) -> Path:
    """Found by fuzzing: a damaged .npy header inside the archive reached numpy's tokenizer,
    whose TokenError escaped as an internal error."""
    import zipfile

    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (4, 8), "  # unterminated
    npy = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", npy + bytes(128))
    return path


def _not_zip(path: Path) -> Path:
    path.write_bytes(b"PK\x03\x04 garbage that only looks like a zip")
    return path


_DATA_CASES = [
    (lambda p: _save_npz(p, y=np.zeros((4, 8), np.float32)), "missing input 'x' (keys found: y)"),
    (lambda p: _save_npz(p, x=np.zeros((4, 8), np.uint8)), "the data is uint8"),
    (lambda p: _save_npz(p, x=np.zeros((4, 9), np.float32)), "per-sample shape (9,)"),
    (lambda p: _save_npz(p, x=np.zeros((4, 2, 8), np.float32)), "has 3 dims"),
    (_with_nan, "1 NaN/Inf value(s)"),
    (_with_inf, "1 NaN/Inf value(s)"),
    (lambda p: _save_npz(p, x=np.zeros((0, 8), np.float32)), "the data holds no samples"),
    (lambda p: _save_npz(p), "missing input 'x' (keys found: none)"),
    (_pickled, "holds Python objects (pickled data), which is never loaded"),
    (_zero_bytes, "not a readable .npz archive"),
    (_not_zip, "not a readable .npz archive"),
    (_bad_npy_header, "array 'x' is unreadable"),
]


@pytest.mark.parametrize(("make", "message"), _DATA_CASES)
@pytest.mark.parametrize("command", ["quantize", "analyze", "validate", "inspect"])
def test_bad_calibration_data_exits_2(work: Path, capsys: pytest.CaptureFixture[str], make,
                                      message: str, command: str,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    def no_unpickling(*args: object, **kwargs: object) -> None:
        raise AssertionError("a data file was unpickled")

    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    data = make(work / "bad.npz")
    model = work / "mlp.onnx"
    argv = {"quantize": ["quantize", model, "-o", work / "q.onnx", "--calib", data],
            "analyze": ["analyze", model, "--calib", data, "--no-cache"],
            "validate": ["validate", model, model, "--eval", data, "--latency-runs", "0"],
            "inspect": ["inspect", model, "--check", data]}
    code, err = _cli(capsys, *argv[command])
    assert code == 2 and message in err and str(data) in err
    assert _listing(work) == ["bad.npz", "calib.npz", "mlp.onnx"]


def test_out_of_range_labels_are_a_data_error(work: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Found by fuzzing: labels outside [0, classes) crashed the analysis with IndexError."""
    data = _save_npz(work / "bad.npz", x=np.zeros((4, 8), np.float32),
                     labels=np.array([0, 1, 9, -3]))
    code, err = _cli(capsys, "analyze", work / "mlp.onnx", "--calib", data, "--labels-key",
                     "labels", "--no-cache", "--min-probes", "1", "--max-probes", "2")
    assert code == 2 and "labels must be class indices in [0, 4)" in err and "[-3, 9]" in err


def _batch_four_only(path: Path) -> Path:
    """Loads fine, runs only on batches of exactly 4 samples (a Reshape to [4, 4])."""
    model = mlp_model()
    model.graph.node[-1].output[0] = "scores"
    model.graph.initializer.append(numpy_helper.from_array(np.array([4, 4], np.int64), "shape"))
    model.graph.node.append(helper.make_node("Reshape", ["scores", "shape"], ["logits"],
                                             name="fixed"))
    del model.graph.output[0].type.tensor_type.shape.dim[:]
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("command", ["quantize", "analyze", "check", "validate"])
def test_a_model_that_cannot_run_on_the_data_is_bad_input(work: Path,
                                                           capsys: pytest.CaptureFixture[str],
                                                           command: str) -> None:
    """onnxruntime fails at run time on 32-sample batches: one line naming the data (the
    analysis used to crash inside the mirror, calibration inside onnxruntime)."""
    model, data = _batch_four_only(work / "four.onnx"), work / "calib.npz"
    argv = {"quantize": ["quantize", model, "-o", work / "q.onnx", "--calib", data],
            "analyze": ["analyze", model, "--calib", data, "--no-cache"],
            "check": ["inspect", model, "--check", data],
            "validate": ["validate", model, model, "--eval", data, "--latency-runs", "0"]}
    code, err = _cli(capsys, *argv[command])
    assert code == 2 and "onnxruntime cannot run the model on it" in err and str(data) in err
    assert "Reshape" in err or "reshape" in err
    assert _listing(work) == ["calib.npz", "four.onnx", "mlp.onnx"]


def test_reference_runs_before_the_mirror_folds_constants(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    """Found by fuzzing: an activation rewired to a weight makes a constant subgraph that
    onnxruntime refuses; the mirror evaluated it first (when built) and crashed in torch."""
    model = onnx.load(MODELS / "mobilenet_op21.onnx")
    for node in model.graph.node:
        if node.name == "/features/features.0/features.0.2/HardSwish":
            node.input[0] = "onnx::Conv_99"
    onnx.save(model, tmp_path / "m.onnx")
    data = _save_npz(tmp_path / "d.npz", input=np.zeros((1, 1, 28, 28), np.float32))
    for argv in (["inspect", tmp_path / "m.onnx", "--check", data],
                 ["analyze", tmp_path / "m.onnx", "--calib", data, "--no-cache"]):
        code, err = _cli(capsys, *argv)
        assert code == 2 and "Input channels C is not equal to kernel channels" in err


def test_outputs_that_ignore_the_batch_cannot_be_scored(work: Path,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    """Found by fuzzing: an activation rewired to a weight gives 8 predictions for a batch
    of 32 labels; validate crashed reshaping the labels."""
    model = mlp_model()
    model.graph.node[2].input[0] = "w1"  # Relu(w1): [8, 16] whatever the batch
    onnx.save(model, work / "const.onnx")
    code, err = _cli(capsys, "validate", work / "const.onnx", work / "const.onnx", "--eval",
                     work / "calib.npz", "--latency-runs", "0")
    assert code == 2
    assert err == ("hawq-onnx: error: the model's first output gives 8 predictions for a "
                   "batch with 32 labels; cannot score top-1\n")


# ---------------------------------------------------------------------- external data
def _external_model(folder: Path, location: str) -> Path:
    """mlp.onnx whose w1 lives in external data at ``location`` (the bytes are written next
    to the model and, for escaping paths, outside it)."""
    folder.mkdir(exist_ok=True)
    model = mlp_model()
    w1 = model.graph.initializer[0]
    payload = w1.raw_data or numpy_helper.to_array(w1).tobytes()
    (folder.parent / "outside.bin").write_bytes(payload)
    w1.ClearField("raw_data")
    del w1.float_data[:]
    w1.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(payload)))):
        w1.external_data.add(key=key, value=value)
    path = folder / "ext.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize(("location", "message"), [
    ("ABSOLUTE", "an absolute path; refusing to read it"),
    ("../outside.bin", "which leaves the model's directory"),
    ("a/../../outside.bin", "which leaves the model's directory"),
    ("link.bin", "which resolves outside the model's directory"),
])
@pytest.mark.parametrize("command", ["inspect", "quantize"])
def test_escaping_external_data_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           location: str, message: str, command: str) -> None:
    folder = tmp_path / "model"
    if location == "ABSOLUTE":
        location = str(tmp_path / "outside.bin")
    path = _external_model(folder, location)
    if location == "link.bin":
        os.symlink(tmp_path / "outside.bin", folder / "link.bin")
    argv = ["inspect", path] if command == "inspect" else \
        ["quantize", path, "-o", folder / "q.onnx", "--act-bits", "none"]
    code, err = _cli(capsys, *argv)
    assert code == 2 and message in err and "'w1'" in err
    assert not (folder / "q.onnx").exists()


def test_external_data_next_to_the_model_is_fine(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "model"
    path = _external_model(folder, "inside.bin")
    (folder / "inside.bin").write_bytes((tmp_path / "outside.bin").read_bytes())
    code, out, _ = _cli_out(capsys, "inspect", path, "--json")
    assert code == 0
    assert json.loads(out)["totals"]["params"] == 8 * 16 + 16 * 4


# ---------------------------------------------------------------------- outputs
@pytest.mark.parametrize(("flag", "target", "message"), [
    ("-o", "mlp.onnx", "refusing to overwrite the input"),
    ("-o", "calib.npz", "refusing to overwrite the input"),
    ("--report", "mlp.onnx", "refusing to overwrite the input"),
    ("--report-html", "calib.npz", "refusing to overwrite the input"),
    ("--report", "q.onnx", "-o/--output and --report are the same file"),
    ("-o", "alias.onnx", "refusing to overwrite the input"),  # a hard link to the model
    ("-o", "symlink.onnx", "refusing to overwrite the input"),
    ("-o", "missing/q.onnx", "directory"),
    ("-o", "file.txt/q.onnx", "does not exist"),
    ("-o", ".", "it is a directory"),
])
def test_outputs_never_overwrite_inputs(work: Path, capsys: pytest.CaptureFixture[str],
                                        flag: str, target: str, message: str) -> None:
    os.link(work / "mlp.onnx", work / "alias.onnx")
    os.symlink(work / "mlp.onnx", work / "symlink.onnx")
    (work / "file.txt").write_text("x")
    before = {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()}
    argv = ["quantize", work / "mlp.onnx", "-o", work / "q.onnx", "--calib", work / "calib.npz"]
    if flag == "-o":
        argv[3] = work / target
    else:
        argv += [flag, work / target]
    if target == "alias.onnx":
        argv[1] = work / "alias.onnx"
        argv[3] = work / "mlp.onnx"
    code, err = _cli(capsys, *argv)
    assert code == 2 and message in err
    assert {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()} == before


def test_unwritable_output_directory(work: Path, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only directory. Root ignores permission bits, so the refusal the kernel would
    give everyone else (EACCES when creating the temporary file) is injected as well."""
    locked = work / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    real_mkstemp = model_io.tempfile.mkstemp

    def denied(*args: object, dir: object = None, **kwargs: object) -> tuple[int, str]:
        if Path(str(dir)) == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(locked))
        return real_mkstemp(*args, dir=dir, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(model_io.tempfile, "mkstemp", denied)
    try:
        code, err = _cli(capsys, "quantize", work / "mlp.onnx", "-o", locked / "q.onnx",
                         "--calib", work / "calib.npz")
    finally:
        locked.chmod(0o755)
    assert code == 2 and err == f"hawq-onnx: error: Permission denied: {locked}\n"
    assert list(locked.iterdir()) == []


def test_write_failure_mid_save_leaves_nothing(work: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(handle, data: bytes) -> None:  # noqa: ANN001 - half written, then ENOSPC
        handle.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(model_io, "_write_bytes", disk_full)
    (work / "q.onnx").write_bytes(b"the previous build")
    code, err = _cli(capsys, "quantize", work / "mlp.onnx", "-o", work / "q.onnx", "--calib",
                     work / "calib.npz", "--report", work / "r.json")
    assert code == 2 and err == "hawq-onnx: error: No space left on device\n"
    assert (work / "q.onnx").read_bytes() == b"the previous build"
    assert _listing(work) == ["calib.npz", "mlp.onnx", "q.onnx"]  # no temp file, no report


# ---------------------------------------------------------------------- interrupts
def _interrupt_on_second(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> None:
    """Wrap the iterable ``module.name`` returns so the 2nd item raises KeyboardInterrupt
    (Ctrl-C in the middle of a loop)."""
    original = getattr(module, name)

    def wrapped(iterable, *args: object, **kwargs: object) -> Iterator[object]:  # noqa: ANN001
        for index, item in enumerate(original(iterable, *args, **kwargs)):
            if index == 1:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(module, name, wrapped)


def test_interrupt_during_calibration(work: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from hawq_onnx.calibration import collector

    _interrupt_on_second(monkeypatch, collector, "progress")
    code = main(["quantize", str(work / "mlp.onnx"), "-o", str(work / "q.onnx"), "--calib",
                 str(work / "calib.npz"), "--batch-size", "8", "--report", str(work / "r.json"),
                 "--report-html", str(work / "r.html")])
    assert code == 130 and capsys.readouterr().err == "hawq-onnx: interrupted\n"
    assert _listing(work) == ["calib.npz", "mlp.onnx"]


def test_interrupt_during_analysis_leaves_no_cache_entry(work: Path,
                                                         capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    from hawq_onnx.commands import analyze as analyze_command

    calls: list[str] = []

    def interrupt(self: object, stage: str, advance: int, total: int) -> None:
        calls.append(stage)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(analyze_command._ProgressBars, "update", interrupt)
    cache = work / "cache"
    code = main(["analyze", str(work / "mlp.onnx"), "--calib", str(work / "calib.npz"),
                 "--cache-dir", str(cache), "--report", str(work / "a.json"),
                 "--min-probes", "16", "--max-probes", "64"])
    assert code == 130 and capsys.readouterr().err == "hawq-onnx: interrupted\n"
    assert calls == ["traces", "traces"]
    assert not cache.exists() or [p for p in cache.rglob("*") if p.is_file()] == []
    assert _listing(work) == ["cache", "calib.npz", "mlp.onnx"] or \
        _listing(work) == ["calib.npz", "mlp.onnx"]


# ---------------------------------------------------------------------- progress output
class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_only_on_a_terminal(work: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["quantize", str(work / "mlp.onnx"), "-o", str(work / "q.onnx"), "--calib",
            str(work / "calib.npz"), "--batch-size", "4", "--no-bias-correction"]
    assert main(argv) == 0
    assert capsys.readouterr().err == ""  # captured stderr: not a terminal, no bar
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(argv) == 0
    assert "\rcalibrating:   0%|" in terminal.getvalue() and "/8 [" in terminal.getvalue()


# ---------------------------------------------------------------------- big graphs
def test_twenty_thousand_node_graph(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A 20,000-node chain: inspect and quantize stay linear. Before topological_order and
    InsertQDQ were made linear, 3,000 nodes took 26 s (inspect) and 93 s (quantize).

    The chain is elementwise apart from a MatMul at each end: onnxruntime's own session set-up
    is superlinear in the number of Q/DQ nodes (measured in BENCHMARKS.md), and this test
    is about this project's code, not onnxruntime's."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w_in"], ["t0"], name="mm_in")]
    ops = ("Abs", "Neg", "Sigmoid", "Neg")
    count = 20_000
    for i in range(count - 2):
        nodes.append(helper.make_node(ops[i % 4], [f"t{i}"], [f"t{i + 1}"], name=f"n{i}"))
    nodes.append(helper.make_node("MatMul", [f"t{count - 2}", "w_out"], ["y"], name="mm_out"))
    inits = [numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), name)
             for name in ("w_in", "w_out")]
    graph = helper.make_graph(
        nodes, "long", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], inits)
    path = tmp_path / "long.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                ir_version=IR_VERSION), path)
    calib = _save_npz(tmp_path / "calib.npz", x=rng.standard_normal((8, 4)).astype(np.float32))
    start = time.perf_counter()
    assert main(["inspect", str(path), "--json"]) == 0
    inspect_s = time.perf_counter() - start
    summary = json.loads(capsys.readouterr().out)
    assert summary["nodes"] == count and summary["totals"]["layers"] == 2
    start = time.perf_counter()
    assert main(["quantize", str(path), "-o", str(tmp_path / "q.onnx"), "--calib", str(calib),
                 "--json"]) == 0
    quantize_s = time.perf_counter() - start
    result = json.loads(capsys.readouterr().out)["result"]
    assert [row["weight_bits"] for row in result["layers"]] == [8, 8]
    assert len(onnx.load(tmp_path / "q.onnx").graph.node) > count
    assert inspect_s < 120 and quantize_s < 180, (inspect_s, quantize_s)


def test_topological_order_matches_the_wave_definition() -> None:
    """The linear-time ordering returns exactly the waves of the old quadratic loop."""
    from hawq_onnx.topology import node_reads, topological_order

    def waves(graph: onnx.GraphProto) -> list[str]:
        available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
        pending, ordered = list(graph.node), []
        while pending:
            ready = [n for n in pending if all(r in available for r in node_reads(n))]
            if not ready:
                return ["<unorderable>"]
            ordered += [n.name for n in ready]
            for node in ready:
                available.update(node.output)
            pending = [n for n in pending if n not in ready]
        return ordered

    rng = np.random.default_rng(0)
    for _ in range(400):
        size = int(rng.integers(1, 14))
        names = ["x", *[f"t{i}" for i in range(size)]]
        nodes = []
        for i in range(size):
            reads = list(rng.choice([*names, "", "dangling"], size=int(rng.integers(0, 4))))
            outputs = [f"t{i}"] + ([str(rng.choice(names))] if rng.random() < 0.1 else [])
            nodes.append(helper.make_node("Op", reads, outputs, name=f"n{i}"))
        rng.shuffle(nodes)
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1])], [])
        try:
            got = [n.name for n in topological_order(graph)]
        except ValueError:
            got = ["<unorderable>"]
        assert got == waves(graph)
    chain = chain_model(30_000).graph
    start = time.perf_counter()
    assert [n.name for n in topological_order(chain)][-1] == "relu9999"
    assert time.perf_counter() - start < 20


# ---------------------------------------------------------------------- large external data
def _write_big_model(folder: Path, rows: int, cols: int, chunk_rows: int = 512) -> Path:
    """x[n, rows] @ W[rows, cols] with W in ``big.bin`` next to the model, streamed to disk
    in chunks (never a whole copy of W in memory)."""
    rng = np.random.default_rng(0)
    with open(folder / "big.bin", "wb") as handle:
        for start in range(0, rows, chunk_rows):
            part = rng.standard_normal((min(chunk_rows, rows - start), cols), dtype=np.float32)
            handle.write((part * 0.02).tobytes())
    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[rows, cols],
                         data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "big.bin"), ("offset", "0"),
                       ("length", str(rows * cols * 4))):
        weight.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="big_matmul")], "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", cols])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              ir_version=IR_VERSION)
    path = folder / "big.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _round_trip_big_model(tmp_path: Path, capsys: pytest.CaptureFixture[str], rows: int,
                          cols: int) -> None:
    """inspect, load/save/reload with external data, and weight-only quantize through the
    CLI; the quantized output must agree with the float model in onnxruntime."""
    path = _write_big_model(tmp_path, rows, cols)
    assert main(["inspect", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["totals"]["params"] == rows * cols
    imported = load_model(path)
    assert imported.external_data
    digest = model_sha256(imported.model)
    saved = save_model(imported.model, tmp_path / "copy.onnx", external_data=True)
    del imported
    assert (tmp_path / "copy.onnx.data").stat().st_size == rows * cols * 4
    assert model_sha256(load_model(saved).model) == digest
    (tmp_path / "copy.onnx.data").unlink()
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(path), "-o", str(out), "--act-bits", "none", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["result"]
    assert result["layers"][0]["weight_bits"] == 8
    assert out.stat().st_size == result["bytes_quant"]
    x = np.random.default_rng(1).standard_normal((2, rows)).astype(np.float32)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    have = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    sqnr = 10 * np.log10(np.sum(want ** 2) / np.sum((want - have) ** 2))
    assert sqnr > 35, sqnr  # 8-bit per-channel weights on Gaussian data: ~40 dB


@pytest.fixture()
def scratch(tmp_path: Path) -> Iterator[Path]:
    """A folder emptied after the test: pytest keeps the last runs' tmp_path, and these
    models are hundreds of megabytes."""
    folder = tmp_path / "scratch"
    folder.mkdir()
    yield folder
    for path in folder.iterdir():
        path.unlink()


def test_few_hundred_megabyte_external_data_round_trip(scratch: Path,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    _round_trip_big_model(scratch, capsys, rows=8192, cols=9216)  # 302 MB of weights


@pytest.mark.slow
def test_model_above_two_gigabytes(scratch: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Beyond protobuf's 2 GiB limit: 2.36 GB of weights in external data (4 min 22 s and
    18.7 GB peak RSS on the project's 2-core VM)."""
    _round_trip_big_model(scratch, capsys, rows=24_576, cols=24_000)


def test_input_hashes_of_external_data_models_cover_the_model_and_its_data(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The digest of the ``sha256sum`` listing of the model file and its data file."""
    folder = tmp_path / "model"
    path = _external_model(folder, "inside.bin")
    (folder / "inside.bin").write_bytes((tmp_path / "outside.bin").read_bytes())
    assert main(["quantize", str(path), "-o", str(folder / "q.onnx"), "--act-bits", "none",
                 "--json"]) == 0
    build = json.loads(capsys.readouterr().out)["result"]["build"]
    listing = "".join(f"{hashlib.sha256(file.read_bytes()).hexdigest()}  {file.name}\n"
                      for file in (path, folder / "inside.bin"))
    assert build["inputs"]["model"]["sha256"] == hashlib.sha256(listing.encode()).hexdigest()
