"""QDQ placement and insertion: where Q/DQ pairs go, what stays float, what runs on integers."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from hawq_onnx.errors import AlreadyQuantizedError
from hawq_onnx.export import kernel_report
from hawq_onnx.importer import load_model
from hawq_onnx.model_io import save_model
from hawq_onnx.quantize import QuantizeOptions, Quantizer, quantize

RNG = np.random.default_rng(0)


def _w(name: str, *shape: int, scale: float = 0.3) -> onnx.TensorProto:
    return numpy_helper.from_array((scale * RNG.standard_normal(shape)).astype(np.float32), name)


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
           outputs: list[str], inits: list[onnx.TensorProto], opset: int = 17
           ) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs,
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None)
                               for o in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              ir_version=10)
    return onnx.shape_inference.infer_shapes(model)  # fills the outputs' shapes


def _image_input(channels: int = 3, size: int = 8) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, size, size])


def _quantize(tmp_path: Path, model: onnx.ModelProto, feeds: dict[str, np.ndarray],
              **options: object) -> tuple[onnx.ModelProto, dict]:
    """Save, quantize with ``feeds`` as calibration data, return (model, report)."""
    save_model(model, tmp_path / "float.onnx")
    np.savez(tmp_path / "calib.npz", **feeds)
    result = quantize(tmp_path / "float.onnx", tmp_path / "quant.onnx", tmp_path / "calib.npz",
                      QuantizeOptions(**options))  # type: ignore[arg-type]
    return onnx.load(tmp_path / "quant.onnx"), result.report


def _run(model: onnx.ModelProto | Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feeds)


def _sqnr(want: np.ndarray, have: np.ndarray) -> float:
    noise = float(np.square(want.astype(np.float64) - have).sum())
    return 10 * np.log10(float(np.square(want.astype(np.float64)).sum()) / max(noise, 1e-30))


def _readers(model: onnx.ModelProto, tensor: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if tensor in n.input]


def _producer(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto | None:
    return next((n for n in model.graph.node if tensor in n.output), None)


def _images(n: int = 16, channels: int = 3, size: int = 8) -> dict[str, np.ndarray]:
    return {"x": RNG.standard_normal((n, channels, size, size)).astype(np.float32)}


# ------------------------------------------------------------------------ fan-out, ReLU, pools


def test_fan_out_shares_one_quantize_dequantize_pair(tmp_path: Path) -> None:
    """A ReLU output read by two Convs and an Add: one Q and one DQ, every reader reads the DQ
    output, and the three consumers fuse into integer kernels."""
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("Conv", ["r0", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["r0", "w2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c1", "c2"], ["s"]),
             helper.make_node("Add", ["s", "r0"], ["y"])]
    model = _model(nodes, [_image_input()], ["y"],
                   [_w("w0", 4, 3, 3, 3), _w("w1", 4, 4, 3, 3), _w("w2", 4, 4, 3, 3)])
    quant, report = _quantize(tmp_path, model, _images())
    q_nodes = [n for n in quant.graph.node if n.op_type == "QuantizeLinear"
               and n.input[0].startswith("r0")]
    assert len(q_nodes) == 1
    dq = _readers(quant, q_nodes[0].output[0])
    assert len(dq) == 1 and dq[0].op_type == "DequantizeLinear" and dq[0].output[0] == "r0"
    assert sorted(n.op_type for n in _readers(quant, "r0")) == ["Add", "Conv", "Conv"]
    # the Conv before the ReLU keeps no Q/DQ of its own: onnxruntime drops the ReLU
    assert _producer(quant, "c0").op_type == "Conv"
    ops = report["kernels"]["op_counts"]
    assert ops.get("QLinearConv") == 3 and ops.get("QLinearAdd") == 2
    feeds = _images(4)
    assert _sqnr(_run(model, feeds)[0], _run(quant, feeds)[0]) > 25


def test_relu_output_zero_point_is_the_grid_minimum(tmp_path: Path) -> None:
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p", "w2"], ["y"])]
    model = _model(nodes, [_image_input()], ["y"], [_w("w", 4, 3, 3, 3), _w("w2", 2, 4, 1, 1)])
    quant, report = _quantize(tmp_path, model, _images())
    inits = {t.name: numpy_helper.to_array(t) for t in quant.graph.initializer}
    q_r = next(n for n in quant.graph.node if n.op_type == "QuantizeLinear"
               and n.input[0].startswith("r"))
    q_p = next(n for n in quant.graph.node if n.op_type == "QuantizeLinear"
               and n.input[0].startswith("p"))
    assert int(inits[q_r.input[2]]) == 0 and inits[q_r.input[2]].dtype == np.uint8
    # MaxPool's output shares its input's scale and zero point (onnxruntime drops the pair)
    assert q_p.input[1:] == q_r.input[1:]
    assert report["kernels"]["op_counts"].get("QLinearConv") == 2
    assert "MaxPool" in report["kernels"]["op_counts"]  # runs on uint8, no Q/DQ around it
    assert report["kernels"]["quantize_nodes"] == 1  # only the graph input is quantized


def test_symmetric_activations_share_across_relu(tmp_path: Path) -> None:
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"])]
    model = _model(nodes, [_image_input()], ["y"], [_w("w", 4, 3, 3, 3), _w("w2", 2, 4, 1, 1)])
    quant, report = _quantize(tmp_path, model, _images(), symmetric_activations=True)
    inits = {t.name: numpy_helper.to_array(t) for t in quant.graph.initializer}
    zero_points = [inits[n.input[2]] for n in quant.graph.node if n.op_type == "QuantizeLinear"]
    assert all(z.dtype == np.int8 and int(z) == 0 for z in zero_points)
    q_c = next(n for n in quant.graph.node if n.op_type == "QuantizeLinear"
               and n.input[0].startswith("c"))
    q_r = next(n for n in quant.graph.node if n.op_type == "QuantizeLinear"
               and n.input[0].startswith("r"))
    assert q_c.input[1:] == q_r.input[1:]
    assert report["kernels"]["integer_fraction"] == 1.0


# ------------------------------------------------------------------------ what stays float


def test_shape_paths_are_untouched(tmp_path: Path) -> None:
    """Shape -> Gather -> Concat -> Reshape feeds a Gemm: no Q/DQ on any integer tensor, the
    shape nodes are unchanged, the data path is quantized."""
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
             helper.make_node("Concat", ["batch", "minus_one"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["flat"]),
             helper.make_node("Gemm", ["flat", "w"], ["y"], transB=1)]
    inits = [numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
             _w("w", 5, 48)]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
                   ["y"], inits)
    quant, report = _quantize(tmp_path, model, {"x": RNG.standard_normal((8, 3, 4, 4)).astype(
        np.float32)})
    integer_tensors = {"shape", "batch", "target", "zero", "minus_one"}
    for node in quant.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert not integer_tensors & set(node.input), node
    original = {n.op_type: n for n in model.graph.node}
    for op in ("Gather", "Concat"):
        kept = next(n for n in quant.graph.node if n.op_type == op)
        assert kept.input == original[op].input and kept.output == original[op].output
    assert report["kernels"]["op_counts"].get("QGemm") == 1
    feeds = {"x": RNG.standard_normal((3, 3, 4, 4)).astype(np.float32)}
    assert _sqnr(_run(model, feeds)[0], _run(quant, feeds)[0]) > 30


def _layer_norm(x: str, prefix: str) -> list[onnx.NodeProto]:
    return [helper.make_node("ReduceMean", [x], [f"{prefix}_mean"], axes=[-1]),
            helper.make_node("Sub", [x, f"{prefix}_mean"], [f"{prefix}_centered"]),
            helper.make_node("Pow", [f"{prefix}_centered", "two"], [f"{prefix}_sq"]),
            helper.make_node("ReduceMean", [f"{prefix}_sq"], [f"{prefix}_var"], axes=[-1]),
            helper.make_node("Add", [f"{prefix}_var", "eps"], [f"{prefix}_var_eps"]),
            helper.make_node("Sqrt", [f"{prefix}_var_eps"], [f"{prefix}_std"]),
            helper.make_node("Div", [f"{prefix}_centered", f"{prefix}_std"], [f"{prefix}_norm"]),
            helper.make_node("Mul", [f"{prefix}_norm", "gamma"], [f"{prefix}_scaled"]),
            helper.make_node("Add", [f"{prefix}_scaled", "beta"], [f"{prefix}_out"])]


def test_decomposed_layer_norm_and_gelu_stay_float(tmp_path: Path) -> None:
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"]),
             helper.make_node("Add", ["h", "x"], ["res"]),  # residual into the LayerNorm
             *_layer_norm("res", "ln"),
             helper.make_node("MatMul", ["ln_out", "w1"], ["u"]),
             helper.make_node("Div", ["u", "sqrt2"], ["u_div"]),  # exact GELU, decomposed
             helper.make_node("Erf", ["u_div"], ["u_erf"]),
             helper.make_node("Add", ["u_erf", "one"], ["u_erf1"]),
             helper.make_node("Mul", ["u", "u_erf1"], ["u_mul"]),
             helper.make_node("Mul", ["u_mul", "half"], ["gelu"]),
             helper.make_node("MatMul", ["gelu", "w2"], ["y"])]
    scalars = {"two": 2.0, "eps": 1e-5, "sqrt2": 2**0.5, "one": 1.0, "half": 0.5}
    inits = [_w("w0", 16, 16), _w("w1", 16, 32), _w("w2", 32, 4),
             numpy_helper.from_array(np.linspace(0.5, 1.5, 16).astype(np.float32), "gamma"),
             numpy_helper.from_array(np.linspace(-0.1, 0.1, 16).astype(np.float32), "beta"),
             *[numpy_helper.from_array(np.array(v, np.float32), k) for k, v in scalars.items()]]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 16])],
                   ["y"], inits)
    feeds = {"x": RNG.standard_normal((64, 4, 16)).astype(np.float32)}
    quant, report = _quantize(tmp_path, model, feeds)
    quantized_sources = {n.input[0].removesuffix("_float") for n in quant.graph.node
                         if n.op_type == "QuantizeLinear"}
    # MatMul inputs are quantized; nothing inside the normalization or the GELU is
    assert {"x", "ln_out", "gelu"} <= quantized_sources
    norm = {"res", "ln_mean", "ln_centered", "ln_sq", "ln_var", "ln_var_eps", "ln_std",
            "ln_norm", "ln_scaled", "u_div", "u_erf", "u_erf1", "u_mul"}
    assert not norm & quantized_sources
    assert report["float_nodes"]  # the Adds/Muls say why they stay float
    assert set(report["float_nodes"].values()) == {"normalization/GELU arithmetic"}
    assert report["kernels"]["integer_fraction"] == 1.0
    assert _sqnr(_run(model, feeds)[0], _run(quant, feeds)[0]) > 25


def test_exclude_by_name_op_type_and_regex(tmp_path: Path) -> None:
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], name="stem"),
             helper.make_node("Relu", ["c0"], ["r0"], name="stem_relu"),
             helper.make_node("Conv", ["r0", "w1"], ["c1"], name="block1_conv"),
             helper.make_node("Relu", ["c1"], ["r1"], name="block1_relu"),
             helper.make_node("Flatten", ["r1"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "w2"], ["y"], name="head", transB=1)]
    model = _model(nodes, [_image_input(3, 4)], ["y"],
                   [_w("w0", 4, 3, 3, 3), _w("w1", 4, 4, 1, 1), _w("w2", 3, 16)])
    feeds = _images(8, 3, 4)
    cases = {"stem": {"w1", "w2"}, "Gemm": {"w0", "w1"}, "block[0-9]+_.*": {"w0", "w2"},
             "w1": {"w0", "w2"}}
    for index, (pattern, expected) in enumerate(cases.items()):
        folder = tmp_path / str(index)
        folder.mkdir()
        quant, report = _quantize(folder, model, feeds, exclude=(pattern,))
        float_weights = {t.name for t in quant.graph.initializer if t.name in ("w0", "w1", "w2")}
        assert float_weights == {"w0", "w1", "w2"} - expected, pattern
        excluded = {row["name"] for row in report["layers"] if row["weight_bits"] == 32}
        assert excluded == {"w0", "w1", "w2"} - expected
        assert all(r.get("float_reason") == "excluded" for r in report["layers"]
                   if r["weight_bits"] == 32)


def _if_branch(name: str, factor: float) -> onnx.GraphProto:
    return helper.make_graph(
        [helper.make_node("Mul", ["r0", f"{name}_k"], [f"{name}_out"])], name, [],
        [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array(factor, np.float32), f"{name}_k")])


def test_control_flow_and_lstm_are_quantized_around(tmp_path: Path) -> None:
    """Conv -> If (branches read the Conv output) -> LSTM -> Gemm: the If bodies and the LSTM
    stay float and untouched, the layers around them are quantized, the model runs."""
    hidden = 6
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"]),
             helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("ReduceMean", ["x"], ["m"], keepdims=0, axes=[0, 1, 2, 3]),
             helper.make_node("Greater", ["m", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["branch"], then_branch=_if_branch("then", 2.0),
                              else_branch=_if_branch("else", 0.5)),
             helper.make_node("Reshape", ["branch", "seq_shape"], ["seq"]),
             helper.make_node("LSTM", ["seq", "lw", "lr"], ["", "h"], hidden_size=hidden),
             helper.make_node("Reshape", ["h", "flat_shape"], ["hf"]),
             helper.make_node("Gemm", ["hf", "w1"], ["y"], transB=1)]
    inits = [_w("w0", 4, 3, 3, 3), _w("w1", 5, hidden), _w("lw", 1, 4 * hidden, 4 * 36),
             _w("lr", 1, 4 * hidden, hidden),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array([1, -1, 4 * 36], np.int64), "seq_shape"),
             numpy_helper.from_array(np.array([-1, hidden], np.int64), "flat_shape")]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                   ["y"], inits)
    feeds = {"x": RNG.standard_normal((8, 3, 8, 8)).astype(np.float32)}
    quant, report = _quantize(tmp_path, model, feeds)
    if_node = next(n for n in quant.graph.node if n.op_type == "If")
    for attr in if_node.attribute:
        assert [n.op_type for n in attr.g.node] == ["Mul"]
    lstm = next(n for n in quant.graph.node if n.op_type == "LSTM")
    assert list(lstm.input) == ["seq", "lw", "lr"]  # float weights, float input
    inits_q = {t.name: t for t in quant.graph.initializer}
    assert inits_q["lw"].data_type == TensorProto.FLOAT
    assert {row["name"]: row["weight_bits"] for row in report["layers"]} == {"w0": 8, "w1": 8}
    assert report["float_nodes"]["LSTM_6"] == "control flow / recurrent"
    assert report["kernels"]["op_counts"].get("QLinearConv") == 1
    sample = {"x": feeds["x"][:1]}
    assert _sqnr(_run(model, sample)[0], _run(quant, sample)[0]) > 25


def test_already_quantized_models_are_refused(tmp_path: Path) -> None:
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"])]
    model = _model(nodes, [_image_input()], ["y"], [_w("w", 2, 3, 1, 1)])
    quant, _ = _quantize(tmp_path, model, _images(4))
    save_model(quant, tmp_path / "again.onnx")
    with pytest.raises(AlreadyQuantizedError, match="already quantized"):
        quantize(tmp_path / "again.onnx", tmp_path / "twice.onnx", tmp_path / "calib.npz")
    assert not (tmp_path / "twice.onnx").exists()


# ------------------------------------------------------------------------ weights and biases


def _weighted(op: str, tmp_path: Path) -> tuple[onnx.ModelProto, dict[str, np.ndarray], int]:
    """One weighted node whose output channels differ 1000x in magnitude; returns the model,
    feeds and the expected per-channel axis of its weight."""
    scales = np.logspace(-3, 0, 6).astype(np.float32)
    if op == "Conv":
        weight = RNG.standard_normal((6, 3, 3, 3)).astype(np.float32) * scales[:, None, None, None]
        node = helper.make_node("Conv", ["x", "w", "b"], ["y"])
        inputs, axis = [_image_input()], 0
        feeds = _images(8)
    elif op == "ConvTranspose":
        weight = RNG.standard_normal((3, 6, 3, 3)).astype(np.float32) * scales[None, :, None, None]
        node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"])
        inputs, axis = [_image_input()], 1
        feeds = _images(8)
    else:
        trans = op == "GemmT"
        weight = RNG.standard_normal((5, 6)).astype(np.float32) * scales[None, :]
        if trans:
            weight = weight.T.copy()
        node = helper.make_node("Gemm" if op.startswith("Gemm") else "MatMul",
                                ["x", "w", "b"] if op.startswith("Gemm") else ["x", "w"], ["y"],
                                **({"transB": 1} if trans else {}))
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])]
        axis = 0 if trans else 1
        feeds = {"x": RNG.standard_normal((16, 5)).astype(np.float32)}
    inits = [numpy_helper.from_array(weight, "w"),
             numpy_helper.from_array(np.linspace(-0.01, 0.01, 6).astype(np.float32), "b")]
    return _model([node], inputs, ["y"], inits), feeds, axis


@pytest.mark.parametrize("op", ["Conv", "ConvTranspose", "Gemm", "GemmT", "MatMul"])
def test_per_channel_axis_for_every_weighted_op(op: str, tmp_path: Path) -> None:
    """Weight-only, so that only the weight grid decides the error of each channel."""
    model, feeds, axis = _weighted(op, tmp_path)
    quant, report = _quantize(tmp_path, model, feeds, act_bits=None)
    dq = next(n for n in quant.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == "w")
    assert helper.get_attribute_value(dq.attribute[0]) == axis
    scale = next(numpy_helper.to_array(t) for t in quant.graph.initializer if t.name == dq.input[1])
    assert scale.shape == (6,)
    assert report["layers"][0]["axis"] == axis and report["layers"][0]["granularity"] == \
        "per_channel"
    # every output channel, even the one 1000x smaller than the largest, stays accurate
    want, have = _run(model, feeds)[0], _run(quant, feeds)[0]
    channel_axis = 1 if op in ("Conv", "ConvTranspose") else want.ndim - 1
    for channel in range(6):
        assert _sqnr(np.take(want, channel, channel_axis),
                     np.take(have, channel, channel_axis)) > 25, channel


def test_bias_is_int32_with_input_times_weight_scale(tmp_path: Path) -> None:
    model, feeds, _ = _weighted("Conv", tmp_path)
    quant, report = _quantize(tmp_path, model, feeds, bias_correction=False)
    inits = {t.name: t for t in quant.graph.initializer}
    conv = next(n for n in quant.graph.node if n.op_type == "Conv")
    bias_dq = _producer(quant, conv.input[2])
    assert bias_dq.op_type == "DequantizeLinear" and len(bias_dq.input) == 2
    assert inits[bias_dq.input[0]].data_type == TensorProto.INT32
    x_dq = _producer(quant, conv.input[0])
    w_dq = _producer(quant, conv.input[1])
    act_scale = numpy_helper.to_array(inits[x_dq.input[1]])
    weight_scale = numpy_helper.to_array(inits[w_dq.input[1]])
    bias_scale = numpy_helper.to_array(inits[bias_dq.input[1]])
    np.testing.assert_array_equal(bias_scale, (act_scale * weight_scale).astype(np.float32))
    values = numpy_helper.to_array(inits[bias_dq.input[0]])
    np.testing.assert_array_equal(values, np.rint(np.linspace(-0.01, 0.01, 6) / bias_scale))
    assert report["biases"] == {"Conv_0": "int32"}
    assert report["kernels"]["op_counts"] == {"QLinearConv": 1, "DequantizeLinear": 1,
                                              "QuantizeLinear": 1}


def test_bias_overflow_raises_the_weight_scale_and_stays_correct(tmp_path: Path) -> None:
    """A bias 1e6 times larger than the weights times inputs would overflow int32 at scale
    s_x*s_w: the weight scale of that channel is raised, and the model still computes it."""
    weight = np.full((2, 1, 1, 1), 1e-4, np.float32)
    bias = np.array([3e6, 1e-6], np.float32)
    model = _model([helper.make_node("Conv", ["x", "w", "b"], ["y"])], [_image_input(1, 2)],
                   ["y"], [numpy_helper.from_array(weight, "w"),
                           numpy_helper.from_array(bias, "b")])
    feeds = {"x": RNG.uniform(0, 1e-3, (4, 1, 2, 2)).astype(np.float32)}
    quant, _ = _quantize(tmp_path, model, feeds)
    inits = {t.name: numpy_helper.to_array(t) for t in quant.graph.initializer}
    conv = next(n for n in quant.graph.node if n.op_type == "Conv")
    bias_q = inits[_producer(quant, conv.input[2]).input[0]]
    weight_scale = inits[_producer(quant, conv.input[1]).input[1]]
    assert np.abs(bias_q.astype(np.int64)).max() <= 2**31 - 1
    assert weight_scale[0] > 1e-4 / 127 * 10 and weight_scale[1] == pytest.approx(1e-4 / 127)
    out = _run(quant, feeds)[0]
    np.testing.assert_allclose(out[:, 0], 3e6, rtol=1e-2)  # the output grid's resolution


def test_int2_weights_use_int4_storage_next_to_quantized_activations(tmp_path: Path) -> None:
    model, feeds, _ = _weighted("Conv", tmp_path)
    quant, report = _quantize(tmp_path, model, feeds, weight_bits=2)
    (row,) = report["layers"]
    weights = next(t for t in quant.graph.initializer if t.name.startswith("w_quantized"))
    values = numpy_helper.to_array(weights).astype(np.int64)
    assert row["weight_bits"] == 2 and values.min() >= -2 and values.max() <= 1
    expected = TensorProto.INT4 if row["container_bits"] == 4 else onnx.TensorProto.INT2
    assert weights.data_type == expected
    assert [o.version for o in quant.opset_import if o.domain == ""] == \
        [21 if row["container_bits"] == 4 else 25]
    _run(quant, feeds)


def test_weight_only_quantization_has_no_activation_qdq(tmp_path: Path) -> None:
    model, feeds, _ = _weighted("MatMul", tmp_path)
    quant, report = _quantize(tmp_path, model, feeds, act_bits=None, weight_bits=4)
    counts = Counter(n.op_type for n in quant.graph.node)
    assert counts["QuantizeLinear"] == 0 and counts["DequantizeLinear"] == 1
    assert report["activations"]["quantized"] == 0
    assert _sqnr(_run(model, feeds)[0], _run(quant, feeds)[0]) > 15


def test_quantizer_builds_many_plans_from_one_calibration(tmp_path: Path) -> None:
    """The mixed-precision path: one calibration, a different width per weight."""
    model, feeds, _ = _weighted("Conv", tmp_path)
    save_model(model, tmp_path / "float.onnx")
    np.savez(tmp_path / "calib.npz", **feeds)
    from hawq_onnx.data import load_npz
    from hawq_onnx.quant.plan import ActSpec, WeightSpec

    loaded = load_model(tmp_path / "float.onnx").model
    quantizer = Quantizer(loaded, target_opset=21)
    quantizer.calibrate(load_npz(tmp_path / "calib.npz", loaded))
    errors = {}
    for bits in (8, 4, 3):
        plan = quantizer.uniform_plan(WeightSpec(bits), ActSpec(8))
        built = quantizer.build(plan)
        assert built.record.weights["w"].bits == bits
        errors[bits] = _sqnr(_run(model, feeds)[0], _run(built.model, feeds)[0])
    assert errors[8] > errors[4] > errors[3]
    assert kernel_report(quantizer.build(quantizer.uniform_plan(WeightSpec(8), ActSpec(8))
                                         ).model).integer_fraction == 1.0


def test_bias_correction_removes_the_mean_output_shift(tmp_path: Path) -> None:
    """Images that are mostly one background value round the same way everywhere: the
    uncorrected model's outputs drift per channel; the corrected one's do not."""
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("Conv", ["r0", "w1", "b1"], ["y"], pads=[1, 1, 1, 1])]
    inits = [_w("w0", 8, 1, 3, 3), _w("w1", 4, 8, 3, 3),
             numpy_helper.from_array(np.full(8, 0.05, np.float32), "b0"),
             numpy_helper.from_array(np.zeros(4, np.float32), "b1")]
    model = _model(nodes, [_image_input(1, 12)], ["y"], inits)
    images = np.full((64, 1, 12, 12), -0.8137, np.float32)  # the background value
    images[:, :, 3:9, 3:9] += RNG.uniform(0, 2.5, (64, 1, 6, 6)).astype(np.float32)
    shifts = {}
    for corrected in (False, True):
        folder = tmp_path / str(corrected)
        folder.mkdir()
        quant, report = _quantize(folder, model, {"x": images}, bias_correction=corrected)
        diff = _run(quant, {"x": images})[0] - _run(model, {"x": images})[0]
        shifts[corrected] = np.abs(diff.mean(axis=(0, 2, 3))).max()
        assert any("bias correction" in note for note in report["notes"]) == corrected
    assert shifts[True] < 0.3 * shifts[False], shifts  # the rest: rounding of y itself


def test_quantized_weight_is_exactly_what_the_model_stores(tmp_path: Path) -> None:
    """The sensitivity tables' Q_b(W) equals the exported weight DequantizeLinear output."""
    from hawq_onnx.quant.plan import WeightSpec

    model, feeds, _ = _weighted("GemmT", tmp_path)
    save_model(model, tmp_path / "float.onnx")
    quantizer = Quantizer(load_model(tmp_path / "float.onnx").model, target_opset=21)
    for spec in (WeightSpec(8), WeightSpec(3), WeightSpec(4, "group", 2)):
        built = quantizer.build(quantizer.uniform_plan(spec, None))
        dq = next(n for n in built.model.graph.node if n.op_type == "DequantizeLinear")
        probe = helper.make_model(
            helper.make_graph([dq], "dq", [], [helper.make_tensor_value_info(
                dq.output[0], TensorProto.FLOAT, None)], list(built.model.graph.initializer)),
            opset_imports=list(built.model.opset_import), ir_version=10)
        (stored,) = ort.InferenceSession(probe.SerializeToString(),
                                         providers=["CPUExecutionProvider"]).run(None, {})
        np.testing.assert_array_equal(quantizer.quantized_weight("w", spec).dequantize(),
                                      stored)
