"""Tiny models and data files for the CLI-level tests (recipes, hostile input, fuzzing).

Why tiny: these tests run the whole command (load, check, calibrate, export, onnxruntime
session) hundreds of times; an 8-wide MLP keeps each run in tens of milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: IR 10 covers opsets up to 22 (onnxruntime 1.31 reads at most IR 13).
IR_VERSION = 10


def mlp_model(features: int = 8, hidden: int = 16, classes: int = 4, seed: int = 0,
              batch: int | str = "batch") -> onnx.ModelProto:
    """x -> MatMul(W1) -> Add(b1) -> Relu -> Gemm(W2, b2) -> logits."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array((rng.standard_normal((features, hidden)) * 0.4)
                                .astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal(hidden) * 0.1).astype(np.float32), "b1"),
        numpy_helper.from_array((rng.standard_normal((hidden, classes)) * 0.4)
                                .astype(np.float32), "w2"),
        numpy_helper.from_array((rng.standard_normal(classes) * 0.1).astype(np.float32), "b2"),
    ]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="bias1"),
             helper.make_node("Relu", ["hb"], ["a"], name="act"),
             helper.make_node("Gemm", ["a", "w2", "b2"], ["logits"], name="fc2")]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                             ir_version=IR_VERSION, producer_name="hawq-onnx-tests")


def save_mlp(path: Path, **kwargs: object) -> Path:
    onnx.save(mlp_model(**kwargs), path)  # type: ignore[arg-type]
    return path


def save_data(path: Path, samples: int = 32, features: int = 8, classes: int = 4,
              seed: int = 1) -> Path:
    """Standard-normal inputs ``x`` plus integer ``labels``."""
    rng = np.random.default_rng(seed)
    np.savez(path, x=rng.standard_normal((samples, features)).astype(np.float32),
             labels=rng.integers(0, classes, samples))
    return path


def chain_model(nodes: int, width: int = 4, seed: int = 0) -> onnx.ModelProto:
    """A straight chain of MatMul -> Add -> Relu blocks with ``nodes`` nodes in all."""
    rng = np.random.default_rng(seed)
    graph_nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    previous = "x"
    for i in range(nodes // 3):
        inits.append(numpy_helper.from_array(
            (np.eye(width) + 0.05 * rng.standard_normal((width, width))).astype(np.float32),
            f"w{i}"))
        inits.append(numpy_helper.from_array(np.full(width, 0.01, np.float32), f"b{i}"))
        graph_nodes += [helper.make_node("MatMul", [previous, f"w{i}"], [f"m{i}"], name=f"mm{i}"),
                        helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"add{i}"),
                        helper.make_node("Relu", [f"a{i}"], [f"r{i}"], name=f"relu{i}")]
        previous = f"r{i}"
    graph = helper.make_graph(
        graph_nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])],
        [helper.make_tensor_value_info(previous, TensorProto.FLOAT, ["n", width])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                             ir_version=IR_VERSION)
