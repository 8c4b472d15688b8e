"""Reductions, ArgMax/ArgMin, TopK and CumSum: parity with onnxruntime and gradients."""

from __future__ import annotations

import numpy as np
import pytest

from hawq_onnx.mirror import Mirror
from tests.op_harness import (
    assert_gradients_match_finite_differences,
    assert_matches_ort,
    run_ort,
    single_op_model,
)

RNG = np.random.default_rng(3)

X = RNG.standard_normal((2, 3, 4)).astype(np.float32)
POSITIVE = RNG.uniform(0.2, 2.0, (2, 3, 4)).astype(np.float32)
INT64 = RNG.integers(-9, 10, (2, 3, 4)).astype(np.int64)
INT32 = RNG.integers(-9, 10, (2, 3, 4)).astype(np.int32)
TIES = RNG.integers(-2, 3, (3, 6)).astype(np.float32)


def axes_input_opset(op: str) -> int:
    """Since which opset the op takes ``axes`` as an input instead of an attribute."""
    return 13 if op == "ReduceSum" else 18


def reduce_model(op: str, x: np.ndarray, axes: list[int] | None, opset: int,
                 **attrs: int):
    """A Reduce* model with ``axes`` in whichever form ``opset`` expects."""
    constants = {}
    if axes is not None and opset >= axes_input_opset(op):
        constants["axes"] = np.array(axes, np.int64)
    elif axes is not None:
        attrs["axes"] = axes  # type: ignore[assignment]
    return single_op_model(op, {"x": x}, attrs, opset=opset, constants=constants)


# (axes, keepdims) combinations every reduction is checked with.
AXES = [([1], 1), ([-1, 0], 0), ([2, 1, 0], 1), (None, 1), (None, 0)]
FLOAT_REDUCE = ["ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
                "ReduceL2", "ReduceSumSquare", "ReduceLogSumExp"]
INT_REDUCE = ["ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
              "ReduceL2", "ReduceSumSquare"]


def reduce_cases() -> list:
    params = []
    for op in [*FLOAT_REDUCE, "ReduceLogSum"]:
        opsets = (11, 13, 18) if op == "ReduceSum" else (13, 18)
        for opset in opsets:
            for axes, keep in AXES:
                x = POSITIVE if op == "ReduceLogSum" else X
                params.append(pytest.param(op, x, axes, opset, {"keepdims": keep},
                                           id=f"{op}-axes{axes}-keep{keep}-opset{opset}"))
    for op in INT_REDUCE:
        for x in (INT64, INT32):
            opset = axes_input_opset(op)
            params.append(pytest.param(op, x, [0, 2], opset, {"keepdims": 0},
                                       id=f"{op}-{x.dtype}-opset{opset}"))
    bools = RNG.integers(0, 2, (3, 4)).astype(bool)
    params += [pytest.param(op, bools, [1], 20, {"keepdims": 0}, id=f"{op}-bool-opset20")
               for op in ("ReduceMax", "ReduceMin")]
    return params


@pytest.mark.parametrize(("op", "x", "axes", "opset", "attrs"), reduce_cases())
def test_reduce_matches_onnxruntime(op: str, x: np.ndarray, axes: list[int] | None,
                                    opset: int, attrs: dict) -> None:
    assert_matches_ort(reduce_model(op, x, axes, opset, **attrs), {"x": x})


@pytest.mark.parametrize("op", [*FLOAT_REDUCE, "ReduceLogSum"])
@pytest.mark.parametrize("noop", [0, 1])
@pytest.mark.parametrize("axes", [None, []], ids=["omitted", "empty"])
def test_reduce_empty_axes(op: str, noop: int, axes: list[int] | None) -> None:
    """Empty or omitted axes reduce everything, or nothing with noop_with_empty_axes (where
    onnxruntime still applies the per-element part: |x| for L1/L2, x*x for SumSquare)."""
    x = POSITIVE if op == "ReduceLogSum" else X
    model = reduce_model(op, x, axes, 18, noop_with_empty_axes=noop)
    (out,) = assert_matches_ort(model, {"x": x})
    assert out.shape == ((2, 3, 4) if noop else (1, 1, 1))


ARG_CASES = [
    pytest.param(op, x, {"axis": axis, "keepdims": keep, "select_last_index": last}, opset,
                 id=f"{op}-{label}-axis{axis}-keep{keep}-last{last}-opset{opset}")
    for op in ("ArgMax", "ArgMin")
    for label, x in (("ties", TIES), ("int64", INT64[0]))
    for axis, keep, last in ((1, 1, 0), (0, 0, 0), (-1, 0, 1), (0, 1, 1))
    for opset in (13, 22)
]


@pytest.mark.parametrize(("op", "x", "attrs", "opset"), ARG_CASES)
def test_arg_extreme_matches_onnxruntime(op: str, x: np.ndarray, attrs: dict,
                                         opset: int) -> None:
    assert_matches_ort(single_op_model(op, {"x": x}, attrs, opset=opset), {"x": x})


def test_arg_extreme_defaults_to_axis_0_keepdims() -> None:
    x = np.array([[1.0, 5.0], [3.0, 2.0], [3.0, 0.0]], np.float32)
    (out,) = assert_matches_ort(single_op_model("ArgMax", {"x": x}, opset=13), {"x": x})
    np.testing.assert_array_equal(out, [[1, 0]])


TOPK_CASES = [
    pytest.param(x, k, {"axis": axis, "largest": largest}, opset,
                 id=f"{label}-k{k}-axis{axis}-largest{largest}-opset{opset}")
    for label, x in (("random", X[0]), ("ties", TIES), ("int64", INT64[0]))
    for k, axis, largest in ((2, -1, 1), (3, -1, 0), (2, 0, 1), (1, 0, 0), (0, -1, 1))
    for opset in (13, 22)
]


@pytest.mark.parametrize(("x", "k", "attrs", "opset"), TOPK_CASES)
def test_topk_matches_onnxruntime(x: np.ndarray, k: int, attrs: dict, opset: int) -> None:
    """Values and indices exactly, ties included (the lower index wins)."""
    model = single_op_model("TopK", {"x": x}, attrs, opset=opset, n_outputs=2,
                            constants={"k": np.array([k], np.int64)})
    assert_matches_ort(model, {"x": x})


def test_topk_unsorted_selects_the_same_elements() -> None:
    """With sorted=0 the order is unspecified; the selected (index, value) pairs agree."""
    model = single_op_model("TopK", {"x": TIES}, {"sorted": 0}, opset=13, n_outputs=2,
                            constants={"k": np.array([3], np.int64)})
    want_values, want_indices = run_ort(model, {"x": TIES})
    got = Mirror(model, weight_names=[]).run_numpy({"x": TIES})
    for row in range(TIES.shape[0]):
        want = sorted(zip(want_indices[row], want_values[row], strict=True))
        have = sorted(zip(got["out1"][row], got["out0"][row], strict=True))
        assert have == want


CUMSUM_CASES = [
    pytest.param(x, axis, {"exclusive": exclusive, "reverse": reverse}, opset,
                 id=f"{x.dtype}-axis{axis.item()}{axis.dtype}-excl{exclusive}-rev{reverse}"
                    f"-opset{opset}")
    for x in (X[0], INT32[0], INT64[0])
    for axis in (np.array(1, np.int64), np.array(-2, np.int32))
    for exclusive in (0, 1)
    for reverse in (0, 1)
    for opset in (13, 22)
]


@pytest.mark.parametrize(("x", "axis", "attrs", "opset"), CUMSUM_CASES)
def test_cumsum_matches_onnxruntime(x: np.ndarray, axis: np.ndarray, attrs: dict,
                                    opset: int) -> None:
    model = single_op_model("CumSum", {"x": x}, attrs, opset=opset, constants={"axis": axis})
    assert_matches_ort(model, {"x": x})


DISTINCT = RNG.permutation(24).reshape(2, 3, 4).astype(np.float32) / 4 - 3

GRADIENTS = [
    pytest.param("ReduceL2", X, [1], {"keepdims": 0}, id="ReduceL2"),
    pytest.param("ReduceLogSumExp", X, [0, 2], {}, id="ReduceLogSumExp"),
    pytest.param("ReduceProd", X, [2], {}, id="ReduceProd"),
    pytest.param("ReduceMax", DISTINCT, [1], {}, id="ReduceMax"),
    pytest.param("ReduceMin", DISTINCT, None, {"keepdims": 0}, id="ReduceMin-all"),
    pytest.param("ReduceMean", X, [-1], {}, id="ReduceMean"),
    pytest.param("ReduceSumSquare", X, [0], {}, id="ReduceSumSquare"),
    pytest.param("ReduceL1", DISTINCT + 0.125, [1, 2], {}, id="ReduceL1"),
    pytest.param("ReduceLogSum", POSITIVE, [1], {}, id="ReduceLogSum"),
]


@pytest.mark.parametrize(("op", "x", "axes", "attrs"), GRADIENTS)
def test_reduce_gradients_match_finite_differences(op: str, x: np.ndarray,
                                                   axes: list[int] | None,
                                                   attrs: dict) -> None:
    assert_gradients_match_finite_differences(reduce_model(op, x, axes, 18, **attrs), {"x": x})


def test_topk_and_cumsum_gradients_match_finite_differences() -> None:
    topk = single_op_model("TopK", {"x": DISTINCT[0]}, {"axis": 0}, opset=13, n_outputs=2,
                           constants={"k": np.array([2], np.int64)})
    assert_gradients_match_finite_differences(topk, {"x": DISTINCT[0]})
    cumsum = single_op_model("CumSum", {"x": X[0]}, {"exclusive": 1, "reverse": 1}, opset=14,
                             constants={"axis": np.array(1, np.int64)})
    assert_gradients_match_finite_differences(cumsum, {"x": X[0]})
