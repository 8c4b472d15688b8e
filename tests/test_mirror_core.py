"""The mirror's own machinery: parameters, hooks, constant folding, ordering."""

from __future__ import annotations

import numpy as np
import torch
from onnx import TensorProto, helper, numpy_helper

from hawq_onnx.mirror import Mirror
from tests.op_harness import assert_matches_ort


def _add_relu_model(unsorted: bool = False):
    weight = numpy_helper.from_array(np.array([1.0, -2.0, 0.5], np.float32), "layer.0/w")
    nodes = [helper.make_node("Add", ["x", "layer.0/w"], ["y"]),
             helper.make_node("Relu", ["y"], ["z"])]
    if unsorted:
        nodes.reverse()
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3])], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_weights_are_parameters_keyed_by_onnx_name() -> None:
    mirror = Mirror(_add_relu_model(), weight_names=["layer.0/w"])
    assert set(mirror.weights) == {"layer.0/w"}
    assert mirror.weights["layer.0/w"].requires_grad
    (out,) = mirror(torch.ones(2, 3))
    out.sum().backward()
    np.testing.assert_array_equal(mirror.weights["layer.0/w"].grad.numpy(), [2.0, 0.0, 2.0])


def test_hook_reads_and_replaces_tensor() -> None:
    mirror = Mirror(_add_relu_model(), weight_names=["layer.0/w"])
    seen = {}
    mirror.add_hook("y", lambda name, t: seen.setdefault(name, t.detach().clone()))
    handle = mirror.add_hook("y", lambda name, t: torch.zeros_like(t))
    (out,) = mirror(torch.ones(2, 3))
    assert torch.equal(out, torch.zeros(2, 3))
    np.testing.assert_allclose(seen["y"].numpy()[0], [2.0, -1.0, 1.5])
    handle.remove()
    (out,) = mirror(torch.ones(2, 3))
    np.testing.assert_allclose(out.numpy()[0], [2.0, 0.0, 1.5])


def test_unsorted_graph_runs_and_matches_onnxruntime() -> None:
    model = _add_relu_model(unsorted=True)
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    mirror = Mirror(model, weight_names=[])
    np.testing.assert_allclose(mirror.run_numpy({"x": x})["z"],
                               np.maximum(x + [1.0, -2.0, 0.5], 0), rtol=1e-6)
    assert_matches_ort(_add_relu_model(), {"x": x})


def test_float64_mode_keeps_double_precision() -> None:
    mirror = Mirror(_add_relu_model(), weight_names=["layer.0/w"], dtype=torch.float64)
    (out,) = mirror(torch.ones(2, 3, dtype=torch.float64))
    assert out.dtype == torch.float64
