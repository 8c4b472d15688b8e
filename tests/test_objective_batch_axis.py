"""The objective counts a micro-batch's samples along each input's own sample axis.

A recurrent model may list its state ``[2, N, H]`` before its features ``[N, F]``; counting
samples on axis 0 of the first input would give 2 and slice the labels wrongly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from hawq_onnx.data import load_npz
from hawq_onnx.hessian.objective import Objective
from hawq_onnx.mirror import Mirror

SAMPLES, HIDDEN, FEATURES, CLASSES = 10, 3, 4, 5


def _state_first_model() -> onnx.ModelProto:
    """logits = Gemm(concat(flatten(transpose(state)), x)): state [2, N, H] comes first."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((2 * HIDDEN + FEATURES, CLASSES)).astype(np.float32)
    nodes = [
        helper.make_node("Transpose", ["state"], ["st"], perm=[1, 0, 2]),
        helper.make_node("Flatten", ["st"], ["sf"], axis=1),
        helper.make_node("Concat", ["sf", "x"], ["h"], axis=1),
        helper.make_node("Gemm", ["h", "w"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "state_first",
        [helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", HIDDEN]),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def test_labels_follow_the_sample_axis_of_a_state_listed_first(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    state = rng.standard_normal((2, SAMPLES, HIDDEN)).astype(np.float32)
    x = rng.standard_normal((SAMPLES, FEATURES)).astype(np.float32)
    labels = rng.integers(0, CLASSES, SAMPLES).astype(np.int64)
    path = tmp_path / "calib.npz"
    np.savez(path, state=state, x=x, labels=labels)
    model = _state_first_model()
    dataset = load_npz(path, model)
    mirror = Mirror(model)
    objective = Objective(mirror, dataset.batched(4), labels=dataset.labels, loss="ce")
    assert objective.total == SAMPLES
    assert [batch.size for batch in objective.batches] == [4, 4, 2]
    with torch.no_grad():
        total = sum(objective.weight(b) * objective.batch_loss(b) for b in objective.batches)
    weight = numpy_helper.to_array(model.graph.initializer[0])
    features = np.concatenate([state.transpose(1, 0, 2).reshape(SAMPLES, -1), x], axis=1)
    reference = torch.nn.functional.cross_entropy(
        torch.from_numpy(features.astype(np.float64) @ weight.astype(np.float64)),
        torch.from_numpy(labels))
    assert abs(float(total) - float(reference)) < 1e-5 * abs(float(reference))
