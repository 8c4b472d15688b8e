"""Fuzzing the command line: mutated models and calibration files never crash a command.

Every case mutates a zoo model (or a tiny synthetic one) or its calibration file, runs one
command in-process (inspect, inspect --check, quantize in several modes, validate, analyze
with tiny settings) and asserts the contract of ``hawq_onnx.cli``: exit code 0, 1 or 2; a
failure is one line on stderr starting with ``hawq-onnx:``; never the catch-all's
"internal error" line (an uncaught exception) and never a traceback.

Deterministic: ``derandomize=True`` (a fixed seed per test), no example database, no
deadline. The case counts (MODEL_CASES + DATA_CASES >= 1,000) and crashes found are recorded
in BENCHMARKS.md ("Fuzzing").
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from hawq_onnx.cli import main
from hawq_onnx.data import input_specs
from tests.conftest import MODELS
from tests.tiny_models import mlp_model

#: cases per run (environment overrides exist for longer local fuzzing sessions).
MODEL_CASES = int(os.environ.get("HAWQ_FUZZ_MODEL_CASES", "1500"))
DATA_CASES = int(os.environ.get("HAWQ_FUZZ_DATA_CASES", "700"))
_ZOO = {  # model -> its calibration file in models/ (None: random inputs)
    "digits_resnet_op17": "digits", "fashion_cnn_op13": "fashion", "fashion_cnn_op17": "fashion",
    "mobilenet_op21": None, "transformer_op17": "text", "transformer_constants_op13": "text",
}
_SAMPLES = 4
_COMMANDS = ("inspect", "check", "quantize", "quantize_w4", "qoperator", "weight_only",
             "validate", "analyze")
_DTYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.INT64,
           TensorProto.INT32, TensorProto.INT8, TensorProto.UINT8, TensorProto.BOOL,
           TensorProto.STRING, TensorProto.BFLOAT16, 0, 99)
_OPS = ("Relu", "Sigmoid", "Add", "Mul", "MatMul", "Gemm", "Conv", "Identity", "Softmax",
        "Transpose", "Reshape", "Concat", "Flatten", "MaxPool", "Cast", "NotAnOp")
_ATTRS = ("axis", "transA", "transB", "perm", "pads", "strides", "kernel_shape", "group",
          "to", "alpha", "epsilon", "keepdims", "mode", "dilations", "allowzero")


# ---------------------------------------------------------------------- base models and data
def _random_inputs(model: onnx.ModelProto, rng: np.random.Generator) -> dict[str, np.ndarray]:
    arrays = {}
    for spec in input_specs(model):
        dims = [(_SAMPLES if i == spec.batch_axis else 1) if not isinstance(d, int) or d <= 0
                else d for i, d in enumerate(spec.dims or ())]
        if spec.batch_axis is not None and spec.dims and isinstance(spec.dims[spec.batch_axis],
                                                                     int):
            dims[spec.batch_axis] = spec.dims[spec.batch_axis]
        if spec.dtype.kind == "f":
            arrays[spec.name] = rng.standard_normal(dims).astype(spec.dtype)
        else:
            arrays[spec.name] = rng.integers(0, 4, dims).astype(spec.dtype)
    return arrays


@functools.cache
def _bases() -> dict[str, tuple[bytes, dict[str, np.ndarray]]]:
    """Serialized model and a small calibration set (with labels where the zoo has them)."""
    rng = np.random.default_rng(0)
    bases: dict[str, tuple[bytes, dict[str, np.ndarray]]] = {}
    mlp = mlp_model()
    bases["mlp"] = (mlp.SerializeToString(), {
        "x": rng.standard_normal((8, 8)).astype(np.float32), "labels": np.arange(8) % 4})
    for name, data in _ZOO.items():
        model = onnx.load(MODELS / f"{name}.onnx")
        if data is None:
            arrays = _random_inputs(model, rng)
        else:
            with np.load(MODELS / f"{data}_calib.npz") as archive:
                arrays = {key: archive[key][:_SAMPLES] for key in archive.files}
        bases[name] = (model.SerializeToString(), arrays)
    return bases


# ---------------------------------------------------------------------- model mutations
Draw = Callable[[st.SearchStrategy[Any]], Any]


def _names(model: onnx.ModelProto) -> list[str]:
    graph = model.graph
    names = [v.name for v in graph.input] + [t.name for t in graph.initializer]
    names += [o for node in graph.node for o in node.output]
    return names or ["x"]


def _node(model: onnx.ModelProto, draw: Draw) -> onnx.NodeProto | None:
    nodes = model.graph.node
    return nodes[draw(st.integers(0, len(nodes) - 1))] if len(nodes) else None


def _drop_node(model: onnx.ModelProto, draw: Draw) -> str:
    if not len(model.graph.node):
        return "no node"
    index = draw(st.integers(0, len(model.graph.node) - 1))
    del model.graph.node[index]
    return f"drop node {index}"


def _rewire(model: onnx.ModelProto, draw: Draw) -> str:
    node = _node(model, draw)
    if node is None or not len(node.input):
        return "no input"
    slot = draw(st.integers(0, len(node.input) - 1))
    node.input[slot] = draw(st.sampled_from([*_names(model), "", "ghost"]))
    return f"rewire {node.name}[{slot}] <- {node.input[slot]!r}"


def _rewire_output(model: onnx.ModelProto, draw: Draw) -> str:
    node = _node(model, draw)
    if node is None or not len(node.output):
        return "no output"
    node.output[0] = draw(st.sampled_from([*_names(model), ""]))
    return f"output of {node.name} -> {node.output[0]!r}"


def _attribute(model: onnx.ModelProto, draw: Draw) -> str:
    node = _node(model, draw)
    if node is None:
        return "no node"
    name = draw(st.sampled_from(_ATTRS))
    value = draw(st.one_of(st.integers(-3, 8), st.floats(-2, 2), st.just(float("nan")),
                           st.lists(st.integers(-2, 6), max_size=5), st.text(max_size=4)))
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept)
    if not (isinstance(value, list) and not value):
        node.attribute.append(helper.make_attribute(name, value))
    return f"{node.name}.{name} = {value!r}"


def _op_type(model: onnx.ModelProto, draw: Draw) -> str:
    node = _node(model, draw)
    if node is None:
        return "no node"
    node.op_type = draw(st.sampled_from(_OPS))
    return f"{node.name} becomes {node.op_type}"


def _dtype(model: onnx.ModelProto, draw: Draw) -> str:
    graph = model.graph
    where = draw(st.sampled_from(["input", "output", "initializer", "value_info"]))
    items = {"input": graph.input, "output": graph.output, "initializer": graph.initializer,
             "value_info": graph.value_info}[where]
    if not len(items):
        return f"no {where}"
    item = items[draw(st.integers(0, len(items) - 1))]
    dtype = draw(st.sampled_from(_DTYPES))
    if where == "initializer":
        item.data_type = dtype
    else:
        item.type.tensor_type.elem_type = dtype
    return f"{where} {item.name} dtype {dtype}"


def _truncate_tensor(model: onnx.ModelProto, draw: Draw) -> str:
    inits = [t for t in model.graph.initializer if t.raw_data or t.float_data or t.int64_data]
    if not inits:
        return "no tensor"
    tensor = inits[draw(st.integers(0, len(inits) - 1))]
    if tensor.raw_data:
        cut = draw(st.integers(0, max(0, len(tensor.raw_data) - 1)))
        tensor.raw_data = tensor.raw_data[:cut]
        return f"{tensor.name} raw_data cut to {cut} bytes"
    field = "float_data" if tensor.float_data else "int64_data"
    del getattr(tensor, field)[len(getattr(tensor, field)) // 2:]
    return f"{tensor.name} {field} halved"


def _dims(model: onnx.ModelProto, draw: Draw) -> str:
    graph = model.graph
    if draw(st.booleans()) and len(graph.initializer):
        tensor = graph.initializer[draw(st.integers(0, len(graph.initializer) - 1))]
        dims = draw(st.lists(st.integers(0, 9), max_size=4))
        del tensor.dims[:]
        tensor.dims.extend(dims)
        return f"{tensor.name} dims {dims}"
    values = list(graph.input) + list(graph.output)
    value = values[draw(st.integers(0, len(values) - 1))]
    shape = value.type.tensor_type.shape
    del shape.dim[:]
    for dim in draw(st.lists(st.one_of(st.integers(0, 9), st.sampled_from(["n", "?", ""])),
                             max_size=5)):
        entry = shape.dim.add()
        if isinstance(dim, int):
            entry.dim_value = dim
        elif dim:
            entry.dim_param = dim
    return f"{value.name} shape {[d.dim_value or d.dim_param for d in shape.dim]}"


def _shuffle(model: onnx.ModelProto, draw: Draw) -> str:
    nodes = list(model.graph.node)
    order = draw(st.permutations(range(len(nodes))))
    del model.graph.node[:]
    model.graph.node.extend(nodes[i] for i in order)
    return "nodes shuffled"


def _duplicate(model: onnx.ModelProto, draw: Draw) -> str:
    node = _node(model, draw)
    if node is None:
        return "no node"
    model.graph.node.append(node)
    return f"{node.name} duplicated (two producers)"


def _opset(model: onnx.ModelProto, draw: Draw) -> str:
    version = draw(st.sampled_from([1, 6, 9, 11, 13, 17, 21, 23, 25, 99]))
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = version
    model.ir_version = draw(st.sampled_from([3, 7, 10, 11, 13, 14, 99]))
    return f"opset {version}, IR {model.ir_version}"


def _drop_io(model: onnx.ModelProto, draw: Draw) -> str:
    graph = model.graph
    which = draw(st.sampled_from(["input", "output"]))
    items = graph.input if which == "input" else graph.output
    if not len(items):
        return f"no {which}"
    index = draw(st.integers(0, len(items) - 1))
    del items[index]
    return f"drop graph {which} {index}"


_MODEL_MUTATIONS = (_drop_node, _rewire, _rewire_output, _attribute, _op_type, _dtype,
                    _truncate_tensor, _dims, _shuffle, _duplicate, _opset, _drop_io)


def _mutated_model(data: st.DataObject, base: bytes) -> tuple[bytes, list[str]]:
    model = onnx.ModelProto()
    model.ParseFromString(base)
    done = [data.draw(st.sampled_from(_MODEL_MUTATIONS), label="mutation")(model, data.draw)
            for _ in range(data.draw(st.integers(1, 3), label="mutations"))]
    raw = model.SerializeToString()
    if data.draw(st.integers(0, 9), label="byte-level") == 0:  # damage the file itself
        cut = data.draw(st.integers(0, max(0, len(raw) - 1)), label="cut")
        raw = raw[:cut] if data.draw(st.booleans()) else \
            raw[:cut] + bytes([(raw[cut] + 1) % 256]) + raw[cut + 1:]
        done.append(f"file bytes damaged at {cut}")
    return raw, done


# ---------------------------------------------------------------------- data mutations
def _data_mutation(arrays: dict[str, np.ndarray], data: st.DataObject) -> str:
    if not arrays:
        return "nothing left to mutate"
    key = data.draw(st.sampled_from(sorted(arrays)), label="key")
    array = arrays[key]
    kind = data.draw(st.sampled_from(["drop", "rename", "dtype", "shape", "nan", "inf",
                                      "empty", "extra", "scalar", "labels", "object",
                                      "huge"]), label="data mutation")
    if kind == "drop":
        del arrays[key]
    elif kind == "rename":
        arrays[key + "_renamed"] = arrays.pop(key)
    elif kind == "dtype":
        dtype = data.draw(st.sampled_from(["int32", "uint8", "float16", "float64", "bool",
                                           "complex64", "int64", "U3"]))
        try:
            arrays[key] = array.astype(dtype) if dtype != "U3" else array.astype(str)
        except (TypeError, ValueError):  # e.g. strings from an earlier mutation to int
            arrays[key] = np.zeros(array.shape, dtype)
    elif kind == "shape":
        shape = data.draw(st.lists(st.integers(0, 6), max_size=4))
        arrays[key] = np.zeros(shape, array.dtype)
    elif kind in ("nan", "inf") and array.size and array.dtype.kind == "f":
        flat = array.astype(np.float32).reshape(-1)
        flat[data.draw(st.integers(0, flat.size - 1))] = np.nan if kind == "nan" else -np.inf
        arrays[key] = flat.reshape(array.shape)
    elif kind == "empty":
        arrays[key] = array[:0] if array.ndim else np.zeros((0,), array.dtype)
    elif kind == "extra":
        arrays["unexpected"] = np.ones(3)
    elif kind == "scalar":
        arrays[key] = np.asarray(array.reshape(-1)[0] if array.size else 0)
    elif kind == "labels":
        arrays["labels"] = np.asarray(data.draw(st.lists(
            st.one_of(st.integers(-5, 20), st.floats(-2, 30), st.just(float("nan"))),
            max_size=10)))
    elif kind == "object":
        arrays[key] = np.array([None, {"a": 1}], dtype=object)
    elif kind == "huge" and array.dtype.kind == "f":
        with np.errstate(over="ignore"):  # Inf after the cast back is the point
            arrays[key] = (array * 1e38).astype(np.float64) * 1e10
    return f"{kind} {key}"


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    np.savez(path, allow_pickle=True, **arrays)


def _mutated_data(data: st.DataObject, arrays: dict[str, np.ndarray], path: Path) -> list[str]:
    arrays = dict(arrays)
    done = [_data_mutation(arrays, data) for _ in range(data.draw(st.integers(1, 2)))]
    _write_npz(path, arrays)
    if data.draw(st.integers(0, 7), label="file damage") == 0:
        raw = path.read_bytes()
        cut = data.draw(st.integers(0, len(raw) - 1))
        path.write_bytes(raw[:cut] if data.draw(st.booleans())
                         else raw[:cut] + b"\x00" * 8 + raw[cut + 8:])
        done.append(f"npz bytes damaged at {cut}")
    return done


# ---------------------------------------------------------------------- running commands
def _argv(command: str, model: Path, data: Path, folder: Path) -> list[str]:
    out = str(folder / "out.onnx")
    quantize = ["quantize", str(model), "-o", out, "--calib", str(data),
                "--max-calib-samples", str(_SAMPLES)]
    return {
        "inspect": ["inspect", str(model)],
        "check": ["inspect", str(model), "--check", str(data)],
        "quantize": quantize,
        "quantize_w4": [*quantize, "--weight-bits", "4", "--act-bits", "16",
                        "--calib-method", "percentile"],
        "qoperator": [*quantize, "--format", "qoperator", "--per-tensor"],
        "weight_only": ["quantize", str(model), "-o", out, "--act-bits", "none",
                        "--group-size", "4"],
        "validate": ["validate", str(model), str(model), "--eval", str(data),
                     "--latency-runs", "0", "--max-drop", "0.5"],
        "analyze": ["analyze", str(model), "--calib", str(data), "--no-cache", "--min-probes",
                    "1", "--max-probes", "1", "--max-samples", "2", "--batch-size", "2"],
    }[command]


def _assert_contract(argv: list[str], what: list[str]) -> None:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse exits only on usage errors, never made here
            raise AssertionError(f"SystemExit({exc.code}) for {argv}; {what}") from exc
    text = err.getvalue()
    _OUTCOMES[f"{argv[0]} exit {code}"] += 1
    context = f"{' '.join(argv[:1])} after {what}: exit {code}, stderr {text!r}"
    assert code in (0, 1, 2), context
    assert "internal error" not in text and "Traceback" not in text, context
    if code != 0:
        last = text.strip().splitlines()[-1] if text.strip() else ""
        assert last.startswith("hawq-onnx: "), context
        errors = [line for line in text.splitlines() if line.startswith("hawq-onnx: ")]
        assert len(errors) == 1, context


_OUTCOMES: Counter[str] = Counter()
_FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                        HealthCheck.filter_too_much])


def _record(kind: str) -> None:
    """With HAWQ_FUZZ_STATS=file, append the outcome counts (for BENCHMARKS.md)."""
    target = os.environ.get("HAWQ_FUZZ_STATS")
    if target:
        with open(target, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"kind": kind, **dict(sorted(_OUTCOMES.items()))}) + "\n")
    _OUTCOMES.clear()


def test_mutated_models_never_crash_a_command() -> None:
    _OUTCOMES.clear()
    _fuzz_models()
    _record("models")


def test_mutated_calibration_files_never_crash_a_command() -> None:
    _OUTCOMES.clear()
    _fuzz_data()
    _record("calibration files")


@settings(_FUZZ, max_examples=MODEL_CASES)
@given(data=st.data())
def _fuzz_models(data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(_bases())), label="model")
    base, arrays = _bases()[name]
    raw, what = _mutated_model(data, base)
    command = data.draw(st.sampled_from(_COMMANDS), label="command")
    with tempfile.TemporaryDirectory(prefix="hawq-fuzz-") as folder:
        model, calib = Path(folder) / "model.onnx", Path(folder) / "calib.npz"
        model.write_bytes(raw)
        _write_npz(calib, arrays)
        _assert_contract(_argv(command, model, calib, Path(folder)), [name, *what])


@settings(_FUZZ, max_examples=DATA_CASES)
@given(data=st.data())
def _fuzz_data(data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(_bases())), label="model")
    base, arrays = _bases()[name]
    command = data.draw(st.sampled_from([c for c in _COMMANDS if c not in
                                         ("inspect", "weight_only")]), label="command")
    with tempfile.TemporaryDirectory(prefix="hawq-fuzz-") as folder:
        model, calib = Path(folder) / "model.onnx", Path(folder) / "calib.npz"
        model.write_bytes(base)
        what = _mutated_data(data, arrays, calib)
        _assert_contract(_argv(command, model, calib, Path(folder)), [name, *what])


def test_the_harness_sees_a_crash(monkeypatch: Any) -> None:
    """The contract check must fail on an uncaught exception inside a command."""
    from hawq_onnx.commands import inspect as inspect_command

    def broken(*args: object) -> int:
        raise ZeroDivisionError("injected")

    with tempfile.TemporaryDirectory() as folder:
        model = Path(folder) / "m.onnx"
        model.write_bytes(_bases()["mlp"][0])
        monkeypatch.setattr(inspect_command, "summarize", broken)
        try:
            _assert_contract(["inspect", str(model)], ["injected"])
        except AssertionError as exc:
            assert "internal error: ZeroDivisionError: injected" in str(exc)
        else:
            raise AssertionError("the harness missed an internal error")


def test_bases_are_valid_and_cover_the_zoo() -> None:
    """Unmutated, every base model passes every command (so failures come from mutations)."""
    assert set(_bases()) == {"mlp", *_ZOO}
    for name, (raw, arrays) in _bases().items():
        with tempfile.TemporaryDirectory() as folder:
            model, calib = Path(folder) / "model.onnx", Path(folder) / "calib.npz"
            model.write_bytes(raw)
            _write_npz(calib, arrays)
            for command in _COMMANDS:
                out, err = io.StringIO(), io.StringIO()
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                    code = main(_argv(command, model, calib, Path(folder)))
                assert code in (0, 1), (name, command, err.getvalue())
