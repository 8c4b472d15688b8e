"""GraphView on small hand-built models: layers with exact params/MACs, shape subgraphs,
control flow, producer/consumer lookups and generated node names."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from hawq_onnx.graph import GraphView, QuantizableLayer, unique_node_names
from tests.op_harness import run_ort

RNG = np.random.default_rng(0)


def _init(name: str, shape: tuple[int, ...], dtype: type = np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(dtype), name)


def _ints(name: str, values: list[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, np.int64), name)


def _model(nodes, inputs, outputs, initializers, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


def _cnn() -> onnx.ModelProto:
    """Conv, grouped Conv, ConvTranspose, Gemm(transB), two MatMuls sharing a transposed
    weight. Batch is symbolic."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv_grouped", group=2),
        helper.make_node("ConvTranspose", ["c2", "w3"], ["up"], name="deconv", strides=[2, 2]),
        helper.make_node("Flatten", ["up"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w4", "b4"], ["fc"], name="fc", transB=1),
        helper.make_node("Transpose", ["w5"], ["w5_t"]),
        helper.make_node("MatMul", ["fc", "w5_t"], ["head_a"], name="head_a"),
        helper.make_node("MatMul", ["fc", "w5_t"], ["head_b"], name="head_b"),
    ]
    inits = [_init("w1", (4, 3, 3, 3)), _init("b1", (4,)), _init("w2", (4, 2, 1, 1)),
             _init("w3", (4, 2, 2, 2)), _init("w4", (10, 512)), _init("b4", (10,)),
             _init("w5", (6, 10))]
    return _model(
        nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 6])
         for n in ("head_a", "head_b")],
        inits)


def test_cnn_layers_params_macs_and_axes() -> None:
    layers = {layer.node: layer for layer in GraphView(_cnn()).quantizable_layers()}
    assert list(layers) == ["conv1", "conv_grouped", "deconv", "fc", "head_a", "head_b"]
    # conv1: 4x8x8 outputs x (3 in-channels x 3x3 kernel)
    assert layers["conv1"] == QuantizableLayer(
        node="conv1", op="Conv", kind="conv", weight="w1", params=108, macs=256 * 27,
        inputs=("x",), output="c1", weight_axis_out=0)
    # grouped: each output sees C_in/group = 2 channels of a 1x1 kernel
    assert (layers["conv_grouped"].params, layers["conv_grouped"].macs) == (8, 256 * 2)
    # ConvTranspose: 4x8x8 input elements, each meets (C_out/group=2) x 2x2 weights
    deconv = layers["deconv"]
    assert (deconv.kind, deconv.params, deconv.macs, deconv.weight_axis_out) == (
        "conv_transpose", 32, 256 * 8, 1)
    fc = layers["fc"]
    assert (fc.kind, fc.weight, fc.params, fc.macs, fc.inputs, fc.weight_axis_out) == (
        "gemm", "w4", 5120, 512 * 10, ("flat",), 0)
    for name in ("head_a", "head_b"):  # one weight shared by two layers, through a Transpose
        head = layers[name]
        assert (head.kind, head.weight, head.params, head.macs) == ("matmul", "w5", 60, 60)
        # output columns of w5_t = [10, 6] are axis 0 of the stored [6, 10] initializer
        assert head.weight_axis_out == 0


def test_producer_and_consumers() -> None:
    view = GraphView(_cnn())
    assert view.producer("c1").name == "conv1"
    assert view.producer("x") is None and view.producer("w1") is None
    assert [n.name for n in view.consumers("w5_t")] == ["head_a", "head_b"]
    assert [n.name for n in view.consumers("fc")] == ["head_a", "head_b"]
    assert view.consumers("head_a") == []
    assert view.shape("up") == ("batch", 2, 16, 16)


def _transformer() -> onnx.ModelProto:
    """Token + position embeddings, Q/K projections, attention scores, and a Reshape whose
    target comes from a Shape subgraph that detours through float arithmetic."""
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["tok"], name="tok_emb"),
        helper.make_node("Shape", ["ids"], ["ids_shape"], name="ids_shape"),
        helper.make_node("Gather", ["ids_shape", "one"], ["seq"], name="seq_len"),
        helper.make_node("Range", ["zero", "seq", "one"], ["positions"], name="positions"),
        helper.make_node("Gather", ["pos_table", "positions"], ["pos"], name="pos_emb"),
        helper.make_node("Add", ["tok", "pos"], ["h"], name="add_pos"),
        helper.make_node("MatMul", ["h", "wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["h", "wk"], ["k"], name="k_proj"),
        helper.make_node("Transpose", ["k"], ["kt"], name="k_t", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"], name="attention"),
        helper.make_node("Shape", ["scores"], ["s_shape"], name="s_shape"),
        helper.make_node("Gather", ["s_shape", "zero"], ["batch"], name="batch_dim"),
        helper.make_node("Cast", ["batch"], ["batch_f"], name="to_float", to=TensorProto.FLOAT),
        helper.make_node("Div", ["batch_f", "one_f"], ["batch_f2"], name="float_math"),
        helper.make_node("Cast", ["batch_f2"], ["batch_i"], name="to_int", to=TensorProto.INT64),
        helper.make_node("Unsqueeze", ["batch_i", "axis0"], ["batch_1d"], name="unsq"),
        helper.make_node("Concat", ["batch_1d", "minus_one"], ["target"], name="cat", axis=0),
        helper.make_node("Reshape", ["scores", "target"], ["flat"], name="reshape"),
    ]
    inits = [_init("table", (50, 8)), _init("pos_table", (5, 8)), _init("wq", (8, 8)),
             _init("wk", (8, 8)), _ints("axis0", [0]), _ints("minus_one", [-1]),
             numpy_helper.from_array(np.array(1, np.int64), "one"),
             numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one_f")]
    return _model(
        nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 5])],
        [helper.make_tensor_value_info("flat", TensorProto.FLOAT, ["batch", 25])], inits)


def test_embeddings_projections_and_attention() -> None:
    model = _transformer()
    # the model is real: onnxruntime runs it and the Reshape target is computed right
    (flat,) = run_ort(model, {"ids": np.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]], np.int64)})
    assert flat.shape == (2, 25)
    layers = {layer.node: layer for layer in GraphView(model).quantizable_layers()}
    assert list(layers) == ["tok_emb", "pos_emb", "q_proj", "k_proj", "attention"]
    tok, pos = layers["tok_emb"], layers["pos_emb"]
    assert (tok.kind, tok.weight, tok.params, tok.macs, tok.inputs) == (
        "embedding", "table", 400, 0, ("ids",))
    assert (pos.kind, pos.weight, pos.params, pos.inputs) == (
        "embedding", "pos_table", 40, ("positions",))
    q = layers["q_proj"]
    assert (q.kind, q.weight, q.params, q.macs, q.weight_axis_out) == ("matmul", "wq", 64,
                                                                      5 * 8 * 8, 1)
    att = layers["attention"]
    assert (att.kind, att.weight, att.params, att.inputs, att.output) == (
        "matmul_activations", None, 0, ("q", "kt"), "scores")
    assert att.macs == 5 * 5 * 8  # batch symbolic -> 1; [5, 8] x [8, 5]


def test_shape_subgraph_marking() -> None:
    view = GraphView(_transformer())
    shape = view.shape_tensors()
    expected = {"ids", "ids_shape", "seq", "positions", "s_shape", "batch", "batch_f",
                "batch_f2", "batch_i", "batch_1d", "target", "axis0", "minus_one", "one",
                "zero"}
    assert expected <= shape
    # float activations, the embedding tables and weights are not shape tensors, not even
    # the position embedding whose indices come from the Shape subgraph
    for name in ("tok", "pos", "h", "q", "kt", "scores", "flat", "table", "pos_table", "wq"):
        assert name not in shape, name
    for name in ("ids_shape", "to_float", "float_math", "cat"):
        assert view.is_shape_node(name), name
    for name in ("reshape", "pos_emb", "tok_emb", "attention", "add_pos"):
        assert not view.is_shape_node(name), name
    assert view.is_shape_node(view.producer("target"))


def test_control_flow_and_recurrent_nodes() -> None:
    hidden, inp = 3, 2
    then_graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["then_out"])], "then", [],
        [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, [1, 4, inp])])
    else_graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["else_out"])], "else", [],
        [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, [1, 4, inp])])
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
        helper.make_node("Greater", ["total", "zero_f"], ["cond"]),
        helper.make_node("If", ["cond"], ["branch"], name="switch",
                         then_branch=then_graph, else_branch=else_graph),
        helper.make_node("Transpose", ["branch"], ["seq_major"], perm=[1, 0, 2]),
        helper.make_node("LSTM", ["seq_major", "W", "R"], ["Y"], hidden_size=hidden),
        helper.make_node("MatMul", ["x", "proj"], ["side"], name="switch"),  # duplicate name
    ]
    inits = [_init("W", (1, 4 * hidden, inp)), _init("R", (1, 4 * hidden, hidden)),
             _init("proj", (inp, 2)),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero_f")]
    model = _model(
        nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, inp])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [4, 1, 1, hidden]),
         helper.make_tensor_value_info("side", TensorProto.FLOAT, [1, 4, 2])], inits)
    view = GraphView(model)
    assert view.control_flow_nodes() == ["switch", "LSTM_4"]
    assert view.node("LSTM_4").op_type == "LSTM"
    # the If reads x from inside its branches: it is a consumer of x
    assert [view.node_name(n) for n in view.consumers("x")] == [
        "ReduceSum_0", "switch", "switch_1"]
    # LSTM weights are not quantizable layers; the MatMul renamed for uniqueness is
    layers = view.quantizable_layers()
    assert [(lay.node, lay.weight, lay.macs) for lay in layers] == [("switch_1", "proj", 16)]
    assert view.op_histogram()["Relu"] == 1 and view.op_histogram()["If"] == 1
    assert "cond" in view.shape_tensors() and "branch" not in view.shape_tensors()


def test_unique_node_names_are_stable_and_never_collide() -> None:
    nodes = [helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Relu", ["b"], ["c"], name="Relu_0"),  # taken by an explicit name
             helper.make_node("Relu", ["c"], ["d"], name="dup"),
             helper.make_node("Relu", ["d"], ["e"], name="dup"),
             helper.make_node("Relu", ["e"], ["f"])]
    assert unique_node_names(nodes) == ["Relu_0_1", "Relu_0", "dup", "dup_1", "Relu_4"]
    assert unique_node_names(nodes) == unique_node_names(nodes)


def test_constant_node_weight_and_folded_matmul_are_handled() -> None:
    """A weight held by a Constant node (paddle/spox style) is still found; a MatMul of two
    constants is folded at load time and is not a layer."""
    w = numpy_helper.from_array(RNG.standard_normal((4, 3)).astype(np.float32), "w_const")
    nodes = [helper.make_node("Constant", [], ["w"], value=w),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
             helper.make_node("MatMul", ["a", "b"], ["ab"], name="folded"),
             helper.make_node("Add", ["y", "ab"], ["z"])]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                   [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3])],
                   [_init("a", (2, 5)), _init("b", (5, 3))])
    layers = GraphView(model).quantizable_layers()
    assert [(lay.node, lay.weight, lay.params, lay.macs) for lay in layers] == [
        ("mm", "w", 12, 2 * 4 * 3)]
