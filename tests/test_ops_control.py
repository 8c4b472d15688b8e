"""Control flow: If branches chosen from static conditions (constants, shapes, integer inputs)
match onnxruntime; conditions that read float input data are refused at construction."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from hawq_onnx.errors import HawqError
from hawq_onnx.mirror import Mirror
from hawq_onnx.mirror.static import DataDependentControlFlowError, data_dependent_ifs
from tests.op_harness import IR_FOR_OPSET, assert_matches_ort, run_ort

OPSET = 17
RNG = np.random.default_rng(0)
BIAS = np.array([0.5, -1.0, 2.0], np.float32)


def _branch(name: str, nodes: list[onnx.NodeProto], output: str) -> onnx.GraphProto:
    out = helper.make_tensor_value_info(output, TensorProto.FLOAT, None)
    return helper.make_graph(nodes, name, [], [out])


def _then_add_bias() -> onnx.GraphProto:
    """Reads the outer graph input ``x`` and the outer initializer ``bias``."""
    return _branch("then", [helper.make_node("Add", ["x", "bias"], ["t_out"])], "t_out")


def _else_relu() -> onnx.GraphProto:
    return _branch("else", [helper.make_node("Relu", ["x"], ["e_out"])], "e_out")


def _model(cond_nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
           inits: list[onnx.TensorProto], then_branch: onnx.GraphProto | None = None
           ) -> onnx.ModelProto:
    gate = helper.make_node("If", ["cond"], ["y"], name="gate",
                            then_branch=then_branch or _then_add_bias(),
                            else_branch=_else_relu())
    graph = helper.make_graph(
        [*cond_nodes, gate], "if_model", inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(BIAS, "bias"), *inits])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                             ir_version=IR_FOR_OPSET[OPSET])


def _x_input(batch: int | str = "N") -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3])


def _constant_condition_model(value: bool) -> onnx.ModelProto:
    cond = helper.make_node("Constant", [], ["cond"],
                            value=numpy_helper.from_array(np.array(value)))
    return _model([cond], [_x_input(2)], [])


def _shape_condition_model() -> onnx.ModelProto:
    """cond = table[x.shape[0]] with table = [F, F, T, T, ...]: batch >= 2 takes `then`."""
    table = numpy_helper.from_array(np.arange(8) >= 2, "table")
    zero = numpy_helper.from_array(np.array(0, np.int64), "zero")
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Gather", ["shape", "zero"], ["batch"]),
             helper.make_node("Gather", ["table", "batch"], ["cond"])]
    return _model(nodes, [_x_input()], [table, zero])


@pytest.mark.parametrize("value", [True, False])
def test_constant_condition_matches_onnxruntime(value: bool) -> None:
    x = RNG.standard_normal((2, 3)).astype(np.float32)
    (got,) = assert_matches_ort(_constant_condition_model(value), {"x": x})
    expected = x + BIAS if value else np.maximum(x, 0)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_shape_condition_takes_both_branches_across_batch_sizes() -> None:
    model = _shape_condition_model()
    mirror = Mirror(model, weight_names=[])
    for batch, expected in ((1, "relu"), (3, "add")):
        x = RNG.standard_normal((batch, 3)).astype(np.float32)
        (want,) = run_ort(model, {"x": x})
        got = mirror.run_numpy({"x": x})["y"]
        np.testing.assert_allclose(got, want, rtol=1e-6)
        branch = x + BIAS if expected == "add" else np.maximum(x, 0)
        np.testing.assert_allclose(got, branch, rtol=1e-6)


def test_gradients_reach_weights_read_inside_a_branch() -> None:
    mirror = Mirror(_shape_condition_model(), weight_names=["bias"])
    x = torch.randn(4, 3, requires_grad=True)
    (y,) = mirror(x)
    (y * y).sum().backward()
    expected = 2 * (x.detach() + torch.from_numpy(BIAS)).sum(0)
    torch.testing.assert_close(mirror.weights["bias"].grad, expected)
    torch.testing.assert_close(x.grad, 2 * (x.detach() + torch.from_numpy(BIAS)))


def test_condition_from_bool_input_is_allowed() -> None:
    model = _model([], [_x_input(2), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                   [])
    x = RNG.standard_normal((2, 3)).astype(np.float32)
    for value in (True, False):
        assert_matches_ort(model, {"x": x, "cond": np.array(value)})


def _data_condition_nodes() -> list[onnx.NodeProto]:
    """cond = bool(relu(x)[0, 0]): reads float input values."""
    zero = helper.make_node("Constant", [], ["zero"], value_int=0)
    return [helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Gather", ["r", "zero"], ["row"]),
            helper.make_node("Gather", ["row", "zero"], ["first"]),
            helper.make_node("Cast", ["first"], ["cond"], to=TensorProto.BOOL), zero]


def test_condition_on_float_input_data_is_refused() -> None:
    model = _model(_data_condition_nodes(), [_x_input()], [])
    with pytest.raises(DataDependentControlFlowError, match="If node 'gate'.*input data"):
        Mirror(model, weight_names=[])
    assert issubclass(DataDependentControlFlowError, HawqError)


def test_nested_data_dependent_condition_is_refused() -> None:
    """The outer If is static; the one inside its then-branch reads x's values."""
    inner = helper.make_node("If", ["inner_cond"], ["t_out"], name="inner_gate",
                             then_branch=_branch("t2", [helper.make_node("Relu", ["x"], ["a"])],
                                                 "a"),
                             else_branch=_branch("e2", [helper.make_node("Add", ["x", "x"],
                                                                         ["b"])], "b"))
    cast = helper.make_node("Cast", ["x"], ["inner_cond"], to=TensorProto.BOOL)
    then_branch = _branch("then", [cast, inner], "t_out")
    cond = helper.make_node("Constant", [], ["cond"], value=numpy_helper.from_array(np.array(True)))
    model = _model([cond], [_x_input(1)], [], then_branch=then_branch)
    assert data_dependent_ifs(model.graph) == ["inner_gate"]
    with pytest.raises(DataDependentControlFlowError, match="'inner_gate'"):
        Mirror(model, weight_names=[])


@pytest.mark.parametrize("source,dependent", [
    ("Shape", False), ("Size", False), ("Relu", True), ("Identity", True)])
def test_taint_flows_through_values_but_not_shapes(source: str, dependent: bool) -> None:
    nodes = [helper.make_node(source, ["x"], ["s"]),
             helper.make_node("Cast", ["s"], ["cond"], to=TensorProto.BOOL)]
    model = _model(nodes, [_x_input()], [])
    assert data_dependent_ifs(model.graph) == (["gate"] if dependent else [])
