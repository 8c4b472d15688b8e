"""Shape and data-movement ops: mirror vs onnxruntime across attributes and opsets, a dynamic
shape subgraph, and second-order gradients through the differentiable ones."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from hawq_onnx.mirror import Mirror
from tests.op_harness import IR_FOR_OPSET, assert_matches_ort, run_ort, single_op_model

RNG = np.random.default_rng(0)
INT64_MAX = np.iinfo(np.int64).max


def f32(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


@dataclass
class Case:
    """One single-node model: graph inputs, initializers and the node's input order."""

    op: str
    inputs: dict[str, np.ndarray]
    attrs: dict[str, Any] = field(default_factory=dict)
    opset: int = 13
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    order: list[str] | None = None
    n_outputs: int = 1


X = f32(2, 3, 4)
IMG = f32(1, 2, 4, 5)

CASES: dict[str, Case] = {
    # Constant in all attribute forms
    "constant_tensor": Case("Constant", {}, {"value": numpy_helper.from_array(f32(2, 3))}),
    "constant_int_tensor": Case("Constant", {}, {"value": numpy_helper.from_array(i64(4, -1))}),
    "constant_float": Case("Constant", {}, {"value_float": 2.5}),
    "constant_floats": Case("Constant", {}, {"value_floats": [1.5, -2.0]}),
    "constant_int": Case("Constant", {}, {"value_int": 7}),
    "constant_ints": Case("Constant", {}, {"value_ints": [3, 0, -1]}),
    # Flatten / Reshape / Transpose
    **{f"flatten_axis{a}": Case("Flatten", {"x": X}, {"axis": a}) for a in (0, 1, 2, -1)},
    "reshape_zero_copies": Case("Reshape", {"x": X}, constants={"s": i64(0, -1)}),
    "reshape_minus_one": Case("Reshape", {"x": X}, constants={"s": i64(-1, 2, 2)}),
    "reshape_allowzero": Case("Reshape", {"x": np.zeros((0, 3), np.float32)},
                              {"allowzero": 1}, opset=14, constants={"s": i64(3, 0)}),
    "reshape_runtime_shape": Case("Reshape", {"x": X, "s": i64(4, 0, 2, -1)}),
    "transpose_default": Case("Transpose", {"x": X}),
    "transpose_perm": Case("Transpose", {"x": X}, {"perm": [1, 2, 0]}),
    # Squeeze / Unsqueeze: axes attribute (11) vs input (13)
    "squeeze_attr_11": Case("Squeeze", {"x": f32(1, 3, 1, 2)}, {"axes": [0, -2]}, opset=11),
    "squeeze_input_13": Case("Squeeze", {"x": f32(1, 3, 1, 2)}, constants={"a": i64(-2)}),
    "squeeze_all": Case("Squeeze", {"x": f32(1, 3, 1, 2)}),
    "unsqueeze_attr_11": Case("Unsqueeze", {"x": f32(3, 2)}, {"axes": [0, 3]}, opset=11),
    "unsqueeze_input_13": Case("Unsqueeze", {"x": f32(3, 2)}, constants={"a": i64(-1, 1)}),
    "unsqueeze_scalar": Case("Unsqueeze", {"x": np.array(2.0, np.float32)},
                             constants={"a": i64(0)}),
    # Concat
    "concat_axis1": Case("Concat", {"a": f32(2, 1, 4), "b": f32(2, 3, 4)}, {"axis": 1}),
    "concat_negative": Case("Concat", {"a": f32(2, 2), "b": f32(2, 1), "c": f32(2, 3)},
                            {"axis": -1}),
    "concat_int64": Case("Concat", {"a": i64(2, 3), "b": i64(-1)}, {"axis": 0}),
    # Split: split input (13), attribute (11), equal split, num_outputs (18)
    "split_input_13": Case("Split", {"x": f32(2, 6)}, {"axis": 1}, constants={"s": i64(2, 4)},
                           n_outputs=2),
    "split_equal_13": Case("Split", {"x": f32(6, 2)}, n_outputs=3),
    "split_attr_11": Case("Split", {"x": f32(2, 5)}, {"axis": -1, "split": [1, 4]}, opset=11,
                          n_outputs=2),
    "split_num_outputs_18": Case("Split", {"x": f32(6, 2)}, {"num_outputs": 3}, opset=18,
                                 n_outputs=3),
    "split_uneven_18": Case("Split", {"x": f32(2, 7)}, {"num_outputs": 3, "axis": 1},
                            opset=18, n_outputs=3),
    "split_input_18": Case("Split", {"x": f32(5, 2)}, constants={"s": i64(3, 2)}, opset=18,
                           n_outputs=2),
    # Slice
    "slice_basic": Case("Slice", {"x": X}, constants={
        "st": i64(0, 1), "en": i64(1, 3), "ax": i64(0, 2)}),
    "slice_negative_step": Case("Slice", {"x": X}, constants={
        "st": i64(-1, 3), "en": i64(-INT64_MAX, 0), "ax": i64(2, 1), "sp": i64(-1, -2)}),
    "slice_clamped": Case("Slice", {"x": X}, constants={
        "st": i64(-100, 1), "en": i64(100, INT64_MAX), "ax": i64(1, -1), "sp": i64(2, 1)}),
    "slice_empty": Case("Slice", {"x": X}, constants={"st": i64(3), "en": i64(1), "ax": i64(2)}),
    "slice_no_axes": Case("Slice", {"x": X}, constants={"st": i64(1, 0), "en": i64(2, -1)}),
    "slice_attrs_9": Case("Slice", {"x": X}, {"starts": [1, -3], "ends": [2, 100],
                                              "axes": [0, 2]}, opset=9),
    # Gather family
    "gather_axis0_negative": Case("Gather", {"x": f32(5, 3)},
                                  constants={"i": np.array([[0, -1], [2, -5]], np.int64)}),
    "gather_axis1_scalar": Case("Gather", {"x": X}, {"axis": 1},
                                constants={"i": np.array(-2, np.int64)}),
    "gather_int32_index": Case("Gather", {"x": X}, {"axis": -1},
                               constants={"i": np.array([3, 0, 3], np.int32)}),
    "gather_shape_vector": Case("Gather", {"x": i64(4, 5, 6)}, constants={"i": i64(2, 0)}),
    "gather_elements": Case("GatherElements", {"x": f32(3, 4)}, {"axis": 1},
                            constants={"i": np.array([[0, -1], [3, 2], [-4, 1]], np.int64)}),
    "gather_nd": Case("GatherND", {"x": X},
                      constants={"i": np.array([[1, -1], [0, 2]], np.int64)}),
    "gather_nd_full_index": Case("GatherND", {"x": X},
                                 constants={"i": np.array([[[1, 0, 3]], [[0, 2, -1]]], np.int64)}),
    "gather_nd_batch_dims": Case("GatherND", {"x": X}, {"batch_dims": 1},
                                 constants={"i": np.array([[[2], [0]], [[1], [1]]], np.int64)}),
    # Scatter family
    "scatter_nd": Case("ScatterND", {"x": f32(4, 3), "u": f32(2, 3)},
                       constants={"i": np.array([[3], [-4]], np.int64)}, order=["x", "i", "u"]),
    "scatter_nd_elements": Case("ScatterND", {"x": X, "u": f32(2)},
                                constants={"i": np.array([[1, 2, 3], [0, 0, 0]], np.int64)},
                                order=["x", "i", "u"]),
    **{f"scatter_nd_{r}": Case("ScatterND", {"x": f32(4, 3), "u": f32(3, 3)},
                               {"reduction": r}, opset=18,
                               constants={"i": np.array([[1], [3], [1]], np.int64)},
                               order=["x", "i", "u"]) for r in ("add", "mul", "max", "min")},
    "scatter_elements": Case("ScatterElements", {"x": f32(3, 4), "u": f32(3, 2)}, {"axis": 1},
                             constants={"i": np.array([[0, -1], [2, 1], [3, 0]], np.int64)},
                             order=["x", "i", "u"]),
    **{f"scatter_elements_{r}": Case(
        "ScatterElements", {"x": f32(3, 4), "u": f32(2, 4)}, {"reduction": r}, opset=18,
        constants={"i": np.array([[1, 0, 2, 1], [1, 2, 2, -3]], np.int64)},
        order=["x", "i", "u"]) for r in ("add", "mul", "max", "min")},
    # Expand / Tile
    "expand_bidirectional": Case("Expand", {"x": f32(3, 1)}, constants={"s": i64(2, 1, 4)}),
    "expand_keeps_larger": Case("Expand", {"x": f32(2, 3)}, constants={"s": i64(1, 1)}),
    "tile": Case("Tile", {"x": f32(2, 3)}, constants={"r": i64(2, 3)}),
    # DepthToSpace / SpaceToDepth
    "depth_to_space_dcr": Case("DepthToSpace", {"x": f32(1, 8, 2, 3)}, {"blocksize": 2}),
    "depth_to_space_crd": Case("DepthToSpace", {"x": f32(2, 8, 2, 3)},
                               {"blocksize": 2, "mode": "CRD"}),
    "space_to_depth": Case("SpaceToDepth", {"x": f32(2, 2, 4, 6)}, {"blocksize": 2}),
    # Shape / Size / ConstantOfShape / Range / NonZero / Trilu / OneHot / EyeLike
    "shape_13": Case("Shape", {"x": X}),
    **{f"shape_15_{s}_{e}": Case("Shape", {"x": X}, {k: v for k, v in
                                                     (("start", s), ("end", e)) if v is not None},
                                 opset=15)
       for s, e in ((1, None), (0, -1), (-2, None), (-10, 10), (2, 1))},
    "size": Case("Size", {"x": X}),
    "constant_of_shape_default": Case("ConstantOfShape", {}, constants={"s": i64(2, 3)}),
    "constant_of_shape_int": Case("ConstantOfShape", {"s": i64(3, 1)},
                                  {"value": numpy_helper.from_array(np.array([5], np.int32))}),
    "constant_of_shape_float": Case("ConstantOfShape", {"s": i64(2)}, {
        "value": numpy_helper.from_array(np.array([1.25], np.float32))}),
    "range_int": Case("Range", {}, constants={
        "a": np.array(10, np.int64), "b": np.array(-3, np.int64), "d": np.array(-4, np.int64)}),
    "range_float": Case("Range", {"a": np.array(0.5, np.float32), "b": np.array(3, np.float32),
                                  "d": np.array(0.3, np.float32)}),
    "non_zero": Case("NonZero", {"x": np.array([[0, 1.5, 0], [2, 0, -1]], np.float32)}),
    "non_zero_bool": Case("NonZero", {"x": np.array([[True, False], [True, True]])}),
    "non_zero_scalar": Case("NonZero", {"x": np.array(3, np.int32)}),
    "trilu_upper": Case("Trilu", {"x": f32(2, 3, 4)}, opset=14),
    "trilu_lower_k": Case("Trilu", {"x": f32(4, 3)}, {"upper": 0}, opset=14,
                          constants={"k": np.array(-1, np.int64)}),
    "trilu_upper_k": Case("Trilu", {"x": f32(2, 3, 4)}, opset=14,
                          constants={"k": np.array(2, np.int64)}),
    "one_hot_last_axis": Case("OneHot", {"v": np.array([0.0, 3.0], np.float32)}, constants={
        "i": np.array([[1, -1], [4, 0]], np.int64), "d": np.array(4, np.int64)},
        order=["i", "d", "v"]),
    "one_hot_axis0": Case("OneHot", {"v": np.array([-1, 2], np.float32)}, {"axis": 0},
                          constants={"i": np.array([2, 0, -3], np.int32),
                                     "d": np.array([3], np.float32)}, order=["i", "d", "v"]),
    "one_hot_float_indices": Case("OneHot", {"v": np.array([0, 5], np.int64)}, constants={
        "i": np.array([[1.0, -2.0]], np.float32), "d": np.array(3, np.int64)},
        order=["i", "d", "v"]),
    "eye_like": Case("EyeLike", {"x": f32(3, 4)}, {"k": 1}),
    "eye_like_int": Case("EyeLike", {"x": f32(4, 2)}, {"k": -1, "dtype": TensorProto.INT32}),
}

PAD_X = f32(2, 3, 4)
for _opset in (13, 18):
    for _mode in ("constant", "reflect", "edge"):
        CASES[f"pad_{_mode}_{_opset}"] = Case(
            "Pad", {"x": PAD_X}, {"mode": _mode}, opset=_opset,
            constants={"p": i64(0, 1, 2, 1, 2, 3), "v": np.array(1.5, np.float32)})
    for _mode in ("constant", "reflect", "edge"):
        CASES[f"pad_{_mode}_{_opset}_negative"] = Case(
            "Pad", {"x": PAD_X}, {"mode": _mode}, opset=_opset,
            constants={"p": i64(1, -1, 0, 0, 1, -2)})
for _mode in ("constant", "reflect", "edge", "wrap"):
    CASES[f"pad_{_mode}_19_axes"] = Case(
        "Pad", {"x": PAD_X}, {"mode": _mode}, opset=19,
        constants={"p": i64(2, 1, 1, 2), "v": np.array(-2.0, np.float32),
                   "a": i64(-1, 1)}, order=["x", "p", "v", "a"])
CASES["pad_axes_18_no_value"] = Case("Pad", {"x": PAD_X}, {"mode": "reflect"}, opset=18,
                                     constants={"p": i64(1, 2), "a": i64(2)},
                                     order=["x", "p", "", "a"])
CASES["pad_attr_10"] = Case("Pad", {"x": PAD_X}, {"mode": "edge", "pads": [0, 1, 1, 0, 2, 1]},
                            opset=10)
CASES["pad_int64"] = Case("Pad", {"x": i64(4, 5, 6)}, constants={"p": i64(2, 1),
                                                                  "v": np.array(9, np.int64)})


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_onnxruntime(case: Case) -> None:
    model = single_op_model(case.op, case.inputs, case.attrs, opset=case.opset,
                            constants=case.constants, input_order=case.order,
                            n_outputs=case.n_outputs)
    assert_matches_ort(model, case.inputs)


# ---------------------------------------------------------------------------------- Resize
def _resize_model(opset: int, attrs: dict[str, Any], *, scales: list[float] | None = None,
                  sizes: list[int] | None = None, roi: list[float] | None = None):
    constants: dict[str, np.ndarray] = {}
    order = ["x", "", "", ""]
    if roi is not None:
        constants["roi"], order[1] = np.array(roi, np.float32), "roi"
    if scales is not None:
        constants["scales"], order[2] = np.array(scales, np.float32), "scales"
    if sizes is not None:
        constants["sizes"], order[3] = np.array(sizes, np.int64), "sizes"
    while order[-1] == "":
        order.pop()
    return single_op_model("Resize", {"x": IMG}, attrs, opset=opset, constants=constants,
                           input_order=order)


COORDINATE_MODES = ["half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric"]
NEAREST_MODES = ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"]
TARGETS = {"up": {"scales": [1, 1, 2, 1.5]}, "down": {"scales": [1, 1, 0.6, 0.5]},
           "sizes": {"sizes": [1, 2, 7, 3]}}

RESIZE: dict[str, tuple[int, dict[str, Any], dict[str, Any]]] = {}
for _opset in (13, 19):
    _coords = COORDINATE_MODES + (["half_pixel_symmetric"] if _opset >= 19 else [])
    for _coord in _coords:
        for _tname, _target in TARGETS.items():
            for _nearest in NEAREST_MODES:
                RESIZE[f"{_opset}_nearest_{_nearest}_{_coord}_{_tname}"] = (
                    _opset, {"mode": "nearest", "nearest_mode": _nearest,
                             "coordinate_transformation_mode": _coord}, _target)
            RESIZE[f"{_opset}_linear_{_coord}_{_tname}"] = (
                _opset, {"mode": "linear", "coordinate_transformation_mode": _coord}, _target)
            RESIZE[f"{_opset}_cubic_{_coord}_{_tname}"] = (
                _opset, {"mode": "cubic", "coordinate_transformation_mode": _coord}, _target)
    for _tname, _target in TARGETS.items():
        RESIZE[f"{_opset}_cubic_exclude_outside_a05_{_tname}"] = (
            _opset, {"mode": "cubic", "exclude_outside": 1, "cubic_coeff_a": -0.5}, _target)
    for _mode in ("nearest", "linear", "cubic"):
        RESIZE[f"{_opset}_{_mode}_tf_crop_and_resize"] = (
            _opset, {"mode": _mode, "coordinate_transformation_mode": "tf_crop_and_resize",
                     "extrapolation_value": -7.0},
            {"sizes": [1, 2, 5, 4], "roi": [0, 0, -0.2, 0.3, 1, 1, 0.9, 1.4]})
for _policy in ("stretch", "not_larger", "not_smaller"):
    for _mode in ("nearest", "linear"):
        RESIZE[f"18_{_mode}_axes_{_policy}"] = (
            18, {"mode": _mode, "axes": [3, 2], "keep_aspect_ratio_policy": _policy},
            {"sizes": [8, 6]})
for _mode in ("linear", "cubic"):
    for _exclude in (0, 1):
        for _tname, _target in TARGETS.items():
            RESIZE[f"18_{_mode}_antialias_exclude{_exclude}_{_tname}"] = (
                18, {"mode": _mode, "antialias": 1, "exclude_outside": _exclude}, _target)
        RESIZE[f"18_{_mode}_antialias_exclude{_exclude}_align_corners"] = (
            18, {"mode": _mode, "antialias": 1, "exclude_outside": _exclude,
                 "coordinate_transformation_mode": "align_corners"}, {"scales": [1, 1, 0.5, 0.4]})
RESIZE["13_linear_sizes_with_empty_scales"] = (13, {"mode": "linear"},
                                               {"scales": [], "sizes": [1, 2, 3, 8]})
RESIZE["18_linear_axes_scales"] = (18, {"mode": "linear", "axes": [-1, -2]},
                                   {"scales": [0.8, 1.75]})
RESIZE["18_nearest_tf_half_pixel_for_nn"] = (
    13, {"mode": "nearest", "coordinate_transformation_mode": "tf_half_pixel_for_nn"},
    {"scales": [1, 1, 1.5, 0.7]})


@pytest.mark.parametrize("opset,attrs,target", RESIZE.values(), ids=RESIZE.keys())
def test_resize_matches_onnxruntime(opset: int, attrs: dict[str, Any],
                                    target: dict[str, Any]) -> None:
    assert_matches_ort(_resize_model(opset, attrs, **target), {"x": IMG}, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attrs", [{"mode": "linear"}, {"mode": "linear", "antialias": 1},
                                   {"mode": "nearest"}])
def test_resize_uint8_image_matches_onnxruntime(attrs: dict[str, Any]) -> None:
    image = RNG.integers(0, 256, (1, 2, 5, 4), dtype=np.uint8)
    model = single_op_model("Resize", {"x": image}, attrs, opset=18,
                            constants={"s": np.array([1, 1, 0.6, 2.5], np.float32)},
                            input_order=["x", "", "s"])
    assert_matches_ort(model, {"x": image})


@pytest.mark.parametrize("opset,op,attrs,scales", [
    (9, "Upsample", {"mode": "nearest"}, [1, 1, 2, 3]),
    (9, "Upsample", {"mode": "linear"}, [1, 1, 2, 1.5]),
    (10, "Resize", {"mode": "nearest"}, [1, 1, 0.5, 1.6]),
    (10, "Resize", {"mode": "linear"}, [1, 1, 2, 0.6]),
])
def test_legacy_resize_matches_onnxruntime(opset: int, op: str, attrs: dict[str, Any],
                                           scales: list[float]) -> None:
    model = single_op_model(op, {"x": IMG}, attrs, opset=opset,
                            constants={"s": np.array(scales, np.float32)})
    assert_matches_ort(model, {"x": IMG})


# ---------------------------------------------------------------------------------- graphs
def _reshape_by_batch_model():
    """x[N, 3, 4] -> Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0)), [-1])) = [N, 12]."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "zero_axes"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus_one"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(i64(0), "zero_axes"),
             numpy_helper.from_array(i64(-1), "minus_one")]
    graph = helper.make_graph(
        nodes, "shape_subgraph",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 12])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                             ir_version=IR_FOR_OPSET[13])


def test_shape_subgraph_follows_dynamic_batch() -> None:
    model = _reshape_by_batch_model()
    mirror = Mirror(model, weight_names=[])
    for batch in (1, 2, 5):
        x = f32(batch, 3, 4)
        (want,) = run_ort(model, {"x": x})
        got = mirror.run_numpy({"x": x})["y"]
        assert got.shape == (batch, 12)
        np.testing.assert_array_equal(got, want)


def _differentiable_chain_model():
    """Resize(linear) -> Pad(reflect) -> Slice -> Flatten, concatenated with a Gather from a
    float table input: every op on the way carries gradients to both inputs."""
    nodes = [
        helper.make_node("Resize", ["x", "", "scales"], ["r"], mode="linear"),
        helper.make_node("Pad", ["r", "pads"], ["p"], mode="reflect"),
        helper.make_node("Slice", ["p", "starts", "ends", "axes", "steps"], ["s"]),
        helper.make_node("Flatten", ["s"], ["f"], axis=0),
        helper.make_node("Gather", ["table", "idx"], ["g"], axis=0),
        helper.make_node("Flatten", ["g"], ["gf"], axis=0),
        helper.make_node("Concat", ["f", "gf"], ["y"], axis=1),
    ]
    inits = [
        numpy_helper.from_array(np.array([1, 1, 2, 1.5], np.float32), "scales"),
        numpy_helper.from_array(i64(0, 0, 1, 2, 0, 0, 2, 1), "pads"),
        numpy_helper.from_array(i64(-1, 1), "starts"),
        numpy_helper.from_array(i64(0, 100), "ends"),
        numpy_helper.from_array(i64(3, 2), "axes"),
        numpy_helper.from_array(i64(-2, 2), "steps"),
        numpy_helper.from_array(np.array([[2, -1], [0, 2]], np.int64), "idx"),
    ]
    graph = helper.make_graph(
        nodes, "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 3, 4]),
         helper.make_tensor_value_info("table", TensorProto.FLOAT, [4, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)],
                             ir_version=IR_FOR_OPSET[18])


def test_chain_matches_onnxruntime() -> None:
    assert_matches_ort(_differentiable_chain_model(), {"x": f32(1, 1, 3, 4), "table": f32(4, 3)})


def test_second_order_gradients_match_finite_differences() -> None:
    mirror = Mirror(_differentiable_chain_model(), weight_names=[], dtype=torch.float64)
    x = torch.tensor(f32(1, 1, 3, 4), dtype=torch.float64, requires_grad=True)
    table = torch.tensor(f32(4, 3), dtype=torch.float64, requires_grad=True)

    def squared(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        (y,) = mirror(x, table)
        assert y.dtype == torch.float64
        return y * y  # makes the second derivative non-zero

    assert torch.autograd.gradcheck(squared, (x, table))
    assert torch.autograd.gradgradcheck(squared, (x, table))


FLOAT_SOURCES = ["constant_tensor", "constant_float", "constant_floats",
                 "constant_of_shape_default", "constant_of_shape_float", "eye_like", "range_float",
                 "one_hot_axis0"]


@pytest.mark.parametrize("name", FLOAT_SOURCES)
def test_float_outputs_follow_float64_compute_dtype(name: str) -> None:
    """Float tensors an op creates itself must follow a float64 mirror, not stay float32."""
    case = CASES[name]
    model = single_op_model(case.op, case.inputs, case.attrs, opset=case.opset,
                            constants=case.constants, input_order=case.order)
    (want,) = run_ort(model, case.inputs)
    got = Mirror(model, weight_names=[], dtype=torch.float64).run_numpy(case.inputs)["out0"]
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
