"""Weight quantizers: grids, scales per channel/tensor/block, MSE search, bias to int32."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from hawq_onnx.graph import GraphView
from hawq_onnx.quant.containers import container_bits, make_int_tensor
from hawq_onnx.quant.layout import weight_layout
from hawq_onnx.quant.plan import WeightSpec
from hawq_onnx.quant.weights import (
    INT32_MAX,
    WeightLayout,
    bias_min_weight_scale,
    fake_quantize,
    qrange,
    quantize_bias,
    quantize_rows,
    quantize_weight,
)


def _channel_scaled(shape: tuple[int, ...], axis: int, seed: int = 0) -> np.ndarray:
    """Gaussian weights whose channels along ``axis`` differ in magnitude by 1000x."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal(shape).astype(np.float32)
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return weight * np.logspace(-3, 0, shape[axis], dtype=np.float32).reshape(view)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8, 16])
def test_values_stay_inside_the_signed_grid(bits: int) -> None:
    weight = np.random.default_rng(bits).standard_normal((8, 50)).astype(np.float32)
    for method in ("rtn", "mse"):
        q = quantize_weight(weight, WeightSpec(bits, method=method), WeightLayout((0,)))
        low, high = qrange(bits)
        assert q.values.min() >= low and q.values.max() <= high
        assert q.values.dtype == np.int64 and q.scale.dtype == np.float32
        # round to nearest: inside the clipping range the error is at most half a step
        step = q.expanded_scale()
        inside = np.abs(weight) <= high * step
        err = np.abs(q.dequantize() - weight)
        assert np.all(err[inside] <= 0.5 * step[inside] * (1 + 1e-5))


def test_rtn_per_channel_scale_is_max_over_qmax() -> None:
    weight = _channel_scaled((6, 4, 3, 3), axis=0)
    q = quantize_weight(weight, WeightSpec(8, method="rtn"), WeightLayout((0,)))
    expected = np.abs(weight).reshape(6, -1).max(axis=1) / 127
    np.testing.assert_allclose(q.scale, expected, rtol=1e-6)
    assert q.axis == 0 and q.granularity == "per_channel"
    # every channel's largest magnitude lands exactly on +-127
    assert np.all(np.abs(q.values).reshape(6, -1).max(axis=1) == 127)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_per_channel_beats_per_tensor_on_the_channel_axis(axis: int) -> None:
    weight = _channel_scaled((5, 7, 9), axis=axis)
    spec = WeightSpec(8, method="rtn")
    per_channel = quantize_weight(weight, spec, WeightLayout((axis,)))
    per_tensor = quantize_weight(weight, WeightSpec(8, "per_tensor", method="rtn"),
                                 WeightLayout((axis,)))
    assert per_channel.scale.shape == (weight.shape[axis],)
    assert per_tensor.scale.shape == () and per_tensor.axis is None
    small = np.take(weight, 0, axis=axis)
    err_pc = np.abs(np.take(per_channel.dequantize(), 0, axis=axis) - small).max()
    err_pt = np.abs(np.take(per_tensor.dequantize(), 0, axis=axis) - small).max()
    assert err_pc < err_pt / 100  # the smallest channel is 1000x below the largest


def test_group_wise_blocks_along_the_reduction_axis_with_a_partial_last_block() -> None:
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((70, 6)).astype(np.float32)  # MatMul B: K=70 x N=6
    weight[:32] *= 100.0  # the first block is 100x larger
    q = quantize_weight(weight, WeightSpec(4, "group", 32, method="rtn"),
                        WeightLayout((1,), reduction_axis=0))
    assert q.axis == 0 and q.block_size == 32 and q.scale.shape == (3, 6)
    for block, rows in enumerate((slice(0, 32), slice(32, 64), slice(64, 70))):
        np.testing.assert_allclose(q.scale[block], np.abs(weight[rows]).max(axis=0) / 7,
                                   rtol=1e-6)
    np.testing.assert_allclose(q.expanded_scale()[64:], np.broadcast_to(q.scale[2], (6, 6)))


def test_group_wise_falls_back_to_per_channel_without_a_reduction_axis() -> None:
    weight = _channel_scaled((4, 3, 3, 3), axis=0)
    q = quantize_weight(weight, WeightSpec(4, "group", 16), WeightLayout((0,), None))
    assert q.block_size is None and q.axis == 0


def test_mse_search_beats_round_to_nearest_at_low_bits() -> None:
    weight = np.random.default_rng(2).standard_normal((16, 256)).astype(np.float32)
    for bits in (2, 3, 4):
        rtn = quantize_weight(weight, WeightSpec(bits, method="rtn"), WeightLayout((0,)))
        mse = quantize_weight(weight, WeightSpec(bits, method="mse"), WeightLayout((0,)))
        err_rtn = np.square(rtn.dequantize() - weight).sum()
        err_mse = np.square(mse.dequantize() - weight).sum()
        assert err_mse < 0.8 * err_rtn, bits
        assert np.all(mse.scale <= rtn.scale * (1 + 1e-6))  # it clips, never widens
    assert WeightSpec(4).rounding == "gptq" and WeightSpec(5).rounding == "rtn"
    assert WeightSpec(4).scale_search == "mse" and WeightSpec(5).scale_search == "rtn"
    assert WeightSpec(4).error_feedback and not WeightSpec(4, method="mse").error_feedback


def test_fake_quantize_is_what_dequantize_linear_computes() -> None:
    """Q_b(W) for the sensitivity tables equals onnxruntime's DequantizeLinear output."""
    weight = _channel_scaled((4, 10), axis=1)
    spec = WeightSpec(4, method="mse")
    q = quantize_weight(weight, spec, WeightLayout((1,)))
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["q", "s"], ["y"], axis=1)], "dq", [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [make_int_tensor("q", q.values, TensorProto.INT4), numpy_helper.from_array(q.scale, "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    import onnxruntime as ort

    (out,) = ort.InferenceSession(model.SerializeToString(),
                                  providers=["CPUExecutionProvider"]).run(None, {})
    np.testing.assert_array_equal(out, fake_quantize(weight, spec, WeightLayout((1,))))


def test_min_scale_raises_scales() -> None:
    rows = np.ones((3, 4), np.float32)
    values, scale = quantize_rows(rows, 8, "rtn", min_scale=np.array([0.0, 0.5, 2.0]))
    np.testing.assert_allclose(scale, [1 / 127, 0.5, 2.0], rtol=1e-6)
    np.testing.assert_array_equal(values[:, 0], [127, 2, 0])


def test_all_zero_channels_get_a_usable_scale() -> None:
    weight = np.zeros((3, 5), np.float32)
    weight[1] = 1.0
    q = quantize_weight(weight, WeightSpec(8), WeightLayout((0,)))
    assert np.all(q.scale > 0) and np.all(q.values[[0, 2]] == 0)


def test_bias_is_int32_at_input_times_weight_scale() -> None:
    bias = np.array([0.5, -1.25, 3.0], np.float32)
    weight_scale = np.array([0.01, 0.02, 0.04], np.float32)
    values, scale = quantize_bias(bias, 0.1, weight_scale)
    np.testing.assert_allclose(scale, np.float32(0.1) * weight_scale, rtol=1e-7)
    np.testing.assert_array_equal(values, np.rint(bias / scale.astype(np.float64)))
    assert values.dtype == np.int32


def test_bias_overflow_is_guarded_by_raising_the_weight_scale() -> None:
    bias = np.array([1e6, 1.0], np.float32)
    act_scale, weight_scale = 1e-4, np.array([1e-4, 1e-4], np.float32)
    with pytest.raises(ValueError, match="int32"):
        quantize_bias(bias, act_scale, weight_scale)
    floor = bias_min_weight_scale(bias, act_scale)
    raised = np.maximum(weight_scale, floor)
    assert raised[0] > weight_scale[0] and raised[1] == weight_scale[1]
    values, _ = quantize_bias(bias, act_scale, raised)
    assert np.abs(values).max() <= INT32_MAX // 2 + 1


def test_containers() -> None:
    assert [container_bits(b) for b in (2, 3, 4, 5, 6, 7, 8, 16)] == [2, 4, 4, 8, 8, 8, 8, 16]
    assert container_bits(4, max_opset=17) == 8 and container_bits(2, max_opset=21) == 4


# ------------------------------------------------------------------------ layouts per op


def _layer_model(op: str, weight_shape: tuple[int, ...], x_shape: tuple[int, ...],
                 weight_first: bool = False, **attrs: object) -> onnx.ModelProto:
    inputs = ["w", "x"] if weight_first else ["x", "w"]
    graph = helper.make_graph(
        [helper.make_node(op, inputs, ["y"], **attrs)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.zeros(weight_shape, np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    return onnx.shape_inference.infer_shapes(model)


@pytest.mark.parametrize(("op", "wshape", "xshape", "attrs", "first", "channel", "reduction"), [
    ("Conv", (8, 3, 3, 3), (1, 3, 8, 8), {}, False, (0,), None),
    ("Conv", (6, 1, 3, 3), (1, 6, 8, 8), {"group": 6}, False, (0,), None),
    ("ConvTranspose", (3, 8, 3, 3), (1, 3, 8, 8), {}, False, (1,), None),
    ("ConvTranspose", (4, 3, 3, 3), (1, 4, 8, 8), {"group": 2}, False, (1, 0), None),
    ("Gemm", (16, 10), (2, 16), {}, False, (1,), 0),
    ("Gemm", (10, 16), (2, 16), {"transB": 1}, False, (0,), 1),
    ("MatMul", (16, 10), (2, 5, 16), {}, False, (1,), 0),
    ("MatMul", (4, 16, 10), (4, 5, 16), {}, False, (2,), 1),
    ("MatMul", (7, 5), (5, 3), {}, True, (0,), 1),
])
def test_weight_layout_per_op(op: str, wshape: tuple[int, ...], xshape: tuple[int, ...],
                              attrs: dict[str, object], first: bool,
                              channel: tuple[int, ...], reduction: int | None) -> None:
    model = _layer_model(op, wshape, xshape, weight_first=first, **attrs)
    view = GraphView(model)
    (layer,) = view.quantizable_layers()
    layout = weight_layout(layer, view.node(layer.node), len(wshape))
    assert layout == WeightLayout(channel, reduction)


def test_grouped_conv_transpose_takes_the_axis_with_less_error() -> None:
    """Two candidate axes (grouped ConvTranspose): scales follow the axis the magnitudes vary
    along."""
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    rows = weight * np.array([1, 1, 100, 100], np.float32)[:, None, None, None]
    cols = weight * np.array([1, 100, 1], np.float32)[None, :, None, None]
    spec = WeightSpec(8, method="rtn")
    assert quantize_weight(rows, spec, WeightLayout((1, 0))).axis == 0
    assert quantize_weight(cols, spec, WeightLayout((1, 0))).axis == 1
