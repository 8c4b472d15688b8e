"""Normalization passes, each checked against onnxruntime before and after the rewrite."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from hawq_onnx.errors import AlreadyQuantizedError, OpsetConversionError
from hawq_onnx.model_io import copy_model
from hawq_onnx.passes.fold_batchnorm import fold_batchnorm
from hawq_onnx.passes.lift_constants import lift_constants
from hawq_onnx.passes.reject_quantized import reject_quantized
from hawq_onnx.passes.upgrade_opset import upgrade_opset

RNG = np.random.default_rng(0)


def _info(name: str, shape: Sequence[int | str | None] | None,
          dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def _init(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
           outputs: list[onnx.ValueInfoProto], inits: Sequence[onnx.TensorProto] = (),
           opset: int = 13, ir_version: int = 7,
           extra_opsets: Sequence[tuple[str, int]] = ()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    opsets = [helper.make_opsetid("", opset)]
    opsets += [helper.make_opsetid(d, v) for d, v in extra_opsets]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=ir_version)
    onnx.checker.check_model(model, full_check=True)
    return model


def _run(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    readable = copy_model(model)
    readable.ir_version = min(readable.ir_version, 10)
    session = ort.InferenceSession(readable.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, dict(feeds))


def _rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _op_types(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


# --------------------------------------------------------------------------- reject_quantized


def _qdq_conv_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
        helper.make_node("Conv", ["xd", "w"], ["y"]),
    ]
    inits = [_init("s", np.float32(0.1)), _init("z", np.uint8(128)), _init("w", _rand(2, 1, 1, 1))]
    return _model(nodes, [_info("x", [1, 1, 3, 3])], [_info("y", [1, 2, 3, 3])], inits)


def _qlinear_conv_model() -> onnx.ModelProto:
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"])
    inits = [_init("xs", np.float32(0.1)), _init("xz", np.uint8(128)),
             _init("w", np.ones((2, 1, 1, 1), np.int8)), _init("ws", np.float32(0.05)),
             _init("wz", np.int8(0)), _init("ys", np.float32(0.2)), _init("yz", np.uint8(128))]
    return _model([node], [_info("x", [1, 1, 3, 3], TensorProto.UINT8)],
                  [_info("y", [1, 2, 3, 3], TensorProto.UINT8)], inits)


def _dequantize_in_subgraph_model() -> onnx.ModelProto:
    branch = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["q", "s"], ["d"])], "then", [], [_info("d", [3])])
    other = helper.make_graph([helper.make_node("Identity", ["f"], ["e"])], "else", [],
                              [_info("e", [3])])
    node = helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=other)
    inits = [_init("q", np.array([1, 2, 3], np.int8)), _init("s", np.float32(0.5)),
             _init("f", np.zeros(3, np.float32))]
    return _model([node], [_info("c", [], TensorProto.BOOL)], [_info("y", [3])], inits)


@pytest.mark.parametrize(("build", "listed"), [
    (_qdq_conv_model, "DequantizeLinear x1, QuantizeLinear x1"),
    (_qlinear_conv_model, "QLinearConv x1"),
    (_dequantize_in_subgraph_model, "DequantizeLinear x1"),
])
def test_reject_quantized_lists_the_ops(build, listed: str) -> None:
    with pytest.raises(AlreadyQuantizedError, match=listed):
        reject_quantized(build())


def test_reject_quantized_passes_float_model_through() -> None:
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [_info("x", [2])], [_info("y", [2])])
    out, report = reject_quantized(model)
    assert out is model and report.changed == 0


# --------------------------------------------------------------------------- lift_constants


def _constants_model() -> onnx.ModelProto:
    weight = _rand(4, 3)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=_init("w_value", weight)),
        helper.make_node("Constant", [], ["shift"], value_float=0.25),
        helper.make_node("Constant", [], ["gain"], value_floats=[1.0, -2.0, 0.5]),
        helper.make_node("Constant", [], ["shape"], value_ints=[3, 2]),
        helper.make_node("Constant", [], ["pick"], value_int=1),
        helper.make_node("Constant", [], ["bias_out"], value_floats=[7.0, 8.0, 9.0]),
        helper.make_node("MatMul", ["x", "w"], ["mm"]),
        helper.make_node("Add", ["mm", "shift"], ["a"]),
        helper.make_node("Mul", ["a", "gain"], ["m"]),
        helper.make_node("Reshape", ["m", "shape"], ["r"]),
        helper.make_node("Gather", ["r", "pick"], ["y"], axis=1),
    ]
    return _model(nodes, [_info("x", [2, 4])], [_info("y", [3]), _info("bias_out", [3])])


def test_lift_constants_lifts_every_tensor_constant_and_keeps_outputs() -> None:
    model = _constants_model()
    before_nodes = list(model.graph.node)
    feeds = {"x": _rand(2, 4)}
    out, report = lift_constants(model)
    lifted = {init.name: numpy_helper.to_array(init) for init in out.graph.initializer}
    assert set(lifted) == {"w", "shift", "gain", "shape", "pick"}
    assert report.changed == 5
    assert lifted["shift"].dtype == np.float32 and lifted["shift"].shape == ()
    np.testing.assert_array_equal(lifted["shape"], np.array([3, 2], np.int64))
    assert lifted["pick"].dtype == np.int64 and int(lifted["pick"]) == 1
    # a Constant that is itself a graph output stays a node
    assert _op_types(out) == ["Constant", "MatMul", "Add", "Mul", "Reshape", "Gather"]
    assert list(model.graph.node) == before_nodes  # input untouched
    for want, have in zip(_run(model, feeds), _run(out, feeds), strict=True):
        np.testing.assert_array_equal(have, want)


def test_lift_constants_leaves_subgraph_constants() -> None:
    then = helper.make_graph([helper.make_node("Constant", [], ["t"], value_floats=[1.0, 2.0])],
                             "then", [], [_info("t", [2])])
    other = helper.make_graph([helper.make_node("Constant", [], ["e"], value_floats=[3.0, 4.0])],
                              "else", [], [_info("e", [2])])
    model = _model([helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
                   [_info("c", [], TensorProto.BOOL)], [_info("y", [2])])
    out, report = lift_constants(model)
    assert out is model and report.changed == 0


# --------------------------------------------------------------------------- upgrade_opset


def _clip_pad_resize_model(opset: int) -> onnx.ModelProto:
    """Clip(min/max attributes) -> Pad(pads attribute) -> Upsample-9 or Resize-10."""
    upsample = "Upsample" if opset == 9 else "Resize"
    nodes = [
        helper.make_node("Clip", ["x"], ["c"], min=-0.5, max=0.75),
        helper.make_node("Pad", ["c"], ["p"], pads=[0, 0, 1, 1, 0, 0, 1, 1], mode="constant",
                         value=0.5),
        helper.make_node(upsample, ["p", "scales"], ["y"], mode="nearest"),
    ]
    inits = [_init("scales", np.array([1, 1, 2, 2], np.float32))]
    return _model(nodes, [_info("x", [1, 2, 3, 3])], [_info("y", [1, 2, 10, 10])], inits,
                  opset=opset, ir_version=4)


def _opset9_model() -> onnx.ModelProto:
    return _clip_pad_resize_model(9)


def _opset10_model() -> onnx.ModelProto:
    return _clip_pad_resize_model(10)


def _opset11_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Squeeze", ["x"], ["s"], axes=[0]),
        helper.make_node("Split", ["s"], ["a", "b"], axis=1, split=[1, 3]),
        helper.make_node("ReduceSum", ["b"], ["r"], axes=[1], keepdims=1),
        helper.make_node("Unsqueeze", ["a"], ["ua"], axes=[0]),
        helper.make_node("Resize", ["x", "roi", "scales"], ["up"], mode="linear"),
    ]
    inits = [_init("roi", np.zeros(0, np.float32)),
             _init("scales", np.array([1, 1, 2, 2], np.float32))]
    return _model(nodes, [_info("x", [1, 3, 4, 4])],
                  [_info("r", [3, 1, 4]), _info("ua", [1, 3, 1, 4]), _info("up", [1, 3, 8, 8])],
                  inits, opset=11, ir_version=6)


def _opset12_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=0),
        helper.make_node("Unsqueeze", ["m"], ["u"], axes=[2]),
        helper.make_node("Dropout", ["u"], ["d"]),
        helper.make_node("Squeeze", ["d"], ["y"], axes=[2]),
    ]
    return _model(nodes, [_info("x", [2, 3, 4, 5])], [_info("y", [2, 3])], opset=12)


@pytest.mark.parametrize("build", [_opset9_model, _opset10_model, _opset11_model,
                                   _opset12_model])
def test_upgrade_opset_to_13_keeps_outputs(build) -> None:
    model = build()
    model.metadata_props.add(key="classes", value="cat,dog")
    model.doc_string, model.producer_name, model.model_version = "doc", "exporter", 3
    feeds = {"x": _rand(*[d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim])}
    out, report = upgrade_opset(model)
    assert report.changed == 1
    assert [(o.domain, o.version) for o in out.opset_import] == [("", 13)]
    assert model.opset_import[0].version != 13  # input untouched
    assert out.ir_version == 10
    assert {p.key: p.value for p in out.metadata_props} == {"classes": "cat,dog"}
    assert (out.doc_string, out.producer_name, out.model_version) == ("doc", "exporter", 3)
    for want, have in zip(_run(model, feeds), _run(out, feeds), strict=True):
        np.testing.assert_allclose(have, want, rtol=1e-6, atol=1e-7)


def test_upgrade_opset_leaves_opset_13_alone() -> None:
    model = _opset12_model()
    model.opset_import[0].version = 13
    del model.graph.node[:]
    model.graph.node.extend([helper.make_node("Relu", ["x"], ["y0"]),
                             helper.make_node("ReduceMean", ["y0"], ["y"], axes=[2, 3],
                                              keepdims=0)])
    out, report = upgrade_opset(model)
    assert out is model and report.changed == 0


def test_upgrade_opset_failure_names_the_op() -> None:
    params = {k: _init(k, np.full((2, 2, 2), 0.5 + i, np.float32))
              for i, k in enumerate(("gamma", "beta", "mean", "var"))}
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("BatchNormalization", ["r", *params], ["y"], spatial=0)]
    model = _model(nodes, [_info("x", [1, 2, 2, 2])], [_info("y", [1, 2, 2, 2])],
                   list(params.values()), opset=8, ir_version=6)
    with pytest.raises(OpsetConversionError, match=r"op type\(s\) BatchNormalization \(") as err:
        upgrade_opset(model)
    assert "spatial" in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------- fold_batchnorm


def _bn_params(channels: int, prefix: str = "bn") -> list[onnx.TensorProto]:
    gamma = RNG.uniform(0.5, 2.0, channels).astype(np.float32)
    beta = RNG.standard_normal(channels).astype(np.float32)
    mean = RNG.standard_normal(channels).astype(np.float32)
    var = RNG.uniform(0.2, 3.0, channels).astype(np.float32)
    return [_init(f"{prefix}.{n}", v) for n, v in
            (("gamma", gamma), ("beta", beta), ("mean", mean), ("var", var))]


def _bn(x: str, y: str, prefix: str = "bn") -> onnx.NodeProto:
    names = [f"{prefix}.{n}" for n in ("gamma", "beta", "mean", "var")]
    return helper.make_node("BatchNormalization", [x, *names], [y], epsilon=1e-3, name=prefix)


def _conv_bn(bias: bool) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    inputs = ["x", "w", "b"] if bias else ["x", "w"]
    nodes = [helper.make_node("Conv", inputs, ["c"], pads=[1, 1, 1, 1], name="conv"),
             _bn("c", "y"), helper.make_node("Relu", ["y"], ["z"])]
    inits = [_init("w", _rand(4, 3, 3, 3)), *_bn_params(4)]
    if bias:
        inits.append(_init("b", _rand(4)))
    model = _model(nodes, [_info("x", ["N", 3, 5, 5])], [_info("z", ["N", 4, 5, 5])], inits)
    return model, {"x": _rand(2, 3, 5, 5)}


def _conv_transpose_bn() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    # 4 input channels, group 2, 3 output channels per group -> 6 output channels
    nodes = [helper.make_node("ConvTranspose", ["x", "w", "b"], ["c"], group=2, strides=[2, 2],
                              name="deconv"), _bn("c", "y")]
    inits = [_init("w", _rand(4, 3, 2, 2)), _init("b", _rand(6)), *_bn_params(6)]
    model = _model(nodes, [_info("x", [1, 4, 3, 3])], [_info("y", [1, 6, 6, 6])], inits)
    return model, {"x": _rand(1, 4, 3, 3)}


def _gemm_bn(trans_b: int, with_c: bool) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    weight = _rand(5, 4) if trans_b else _rand(4, 5)
    inputs = ["x", "w", "c0"] if with_c else ["x", "w"]
    nodes = [helper.make_node("Gemm", inputs, ["g"], transB=trans_b, alpha=0.7, beta=1.3,
                              name="fc"), _bn("g", "y")]
    inits = [_init("w", weight), *_bn_params(5)]
    if with_c:
        inits.append(_init("c0", _rand(1, 5)))
    model = _model(nodes, [_info("x", [3, 4])], [_info("y", [3, 5])], inits)
    return model, {"x": _rand(3, 4)}


@pytest.mark.parametrize("case", [
    lambda: _conv_bn(bias=True), lambda: _conv_bn(bias=False), _conv_transpose_bn,
    lambda: _gemm_bn(0, True), lambda: _gemm_bn(1, True), lambda: _gemm_bn(0, False),
    lambda: _gemm_bn(1, False),
], ids=["conv", "conv-nobias", "convtranspose-g2", "gemm", "gemm-transB", "gemm-noC",
        "gemm-transB-noC"])
def test_fold_batchnorm_folds_and_keeps_outputs(case) -> None:
    model, feeds = case()
    original = model.SerializeToString()
    out, report = fold_batchnorm(model)
    assert report.changed == 1
    assert "BatchNormalization" not in _op_types(out)
    assert model.SerializeToString() == original  # input untouched
    assert not any(i.name.startswith("bn.") for i in out.graph.initializer)
    onnx.checker.check_model(out, full_check=True)
    for want, have in zip(_run(model, feeds), _run(out, feeds), strict=True):
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5)


def test_fold_batchnorm_skips_bn_after_relu() -> None:
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["r"]),
             _bn("r", "y")]
    model = _model(nodes, [_info("x", [1, 2, 3, 3])], [_info("y", [1, 4, 3, 3])],
                   [_init("w", _rand(4, 2, 1, 1)), *_bn_params(4)])
    out, report = fold_batchnorm(model)
    assert out is model and report.changed == 0


def test_fold_batchnorm_skips_conv_with_second_consumer() -> None:
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), _bn("c", "y"),
             helper.make_node("Add", ["c", "y"], ["z"])]
    model = _model(nodes, [_info("x", [1, 2, 3, 3])], [_info("z", [1, 4, 3, 3])],
                   [_init("w", _rand(4, 2, 1, 1)), *_bn_params(4)])
    out, report = fold_batchnorm(model)
    assert out is model and report.changed == 0


def test_fold_batchnorm_skips_conv_output_that_is_a_graph_output() -> None:
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), _bn("c", "y")]
    model = _model(nodes, [_info("x", [1, 2, 3, 3])],
                   [_info("y", [1, 4, 3, 3]), _info("c", [1, 4, 3, 3])],
                   [_init("w", _rand(4, 2, 1, 1)), *_bn_params(4)])
    out, report = fold_batchnorm(model)
    assert out is model and report.changed == 0


def test_fold_batchnorm_with_shared_weight_keeps_other_user() -> None:
    nodes = [helper.make_node("Conv", ["x", "w"], ["c1"], name="a"), _bn("c1", "y1"),
             helper.make_node("Conv", ["x", "w"], ["y2"], name="b")]
    model = _model(nodes, [_info("x", [1, 2, 3, 3])],
                   [_info("y1", [1, 4, 3, 3]), _info("y2", [1, 4, 3, 3])],
                   [_init("w", _rand(4, 2, 1, 1)), *_bn_params(4)])
    feeds = {"x": _rand(1, 2, 3, 3)}
    out, report = fold_batchnorm(model)
    assert report.changed == 1
    conv_a, conv_b = out.graph.node
    assert conv_b.input[1] == "w" and conv_a.input[1] != "w"
    for want, have in zip(_run(model, feeds), _run(out, feeds), strict=True):
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5)
