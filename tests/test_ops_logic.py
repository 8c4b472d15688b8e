"""Comparison, boolean and Where mirror ops: exact parity with onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest

from tests.op_harness import (
    assert_gradients_match_finite_differences,
    assert_matches_ort,
    single_op_model,
)

RNG = np.random.default_rng(11)


def small_floats(*shape: int) -> np.ndarray:
    """Integer-valued floats, so comparisons hit exact ties as well as both orders."""
    return RNG.integers(-2, 3, shape).astype(np.float32)


def ints(*shape: int, dtype: type = np.int64) -> np.ndarray:
    return RNG.integers(-2, 3, shape).astype(dtype)


def bools(*shape: int) -> np.ndarray:
    return RNG.integers(0, 2, shape).astype(bool)


def cases(op: str, inputs: dict[str, np.ndarray], *, label: str = "",
          opsets: tuple[int, ...] = (13, 22)) -> list:
    name = f"{op}-{label}" if label else op
    return [pytest.param(op, inputs, opset, id=f"{name}-opset{opset}") for opset in opsets]


COMPARISONS = ["Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual"]

PARITY = [
    *[c for op in COMPARISONS for c in cases(
        op, {"a": small_floats(3, 4), "b": small_floats(4)}, label="float")],
    *[c for op in COMPARISONS for c in cases(
        op, {"a": ints(2, 3, 4), "b": ints(3, 1)}, label="int64")],
    *[c for op in COMPARISONS for c in cases(
        op, {"a": ints(5, dtype=np.int32), "b": ints(5, dtype=np.int32)}, label="int32")],
    *cases("Equal", {"a": bools(3, 4), "b": bools(4)}, label="bool"),
    *cases("Not", {"x": bools(3, 4)}),
    *[c for op in ["And", "Or", "Xor"] for c in cases(op, {"a": bools(2, 3, 4),
                                                         "b": bools(3, 1)})],
    *cases("Where", {"c": bools(3, 4), "x": RNG.standard_normal((3, 4)).astype(np.float32),
                     "y": RNG.standard_normal((4,)).astype(np.float32)}, label="float"),
    *cases("Where", {"c": bools(2, 1, 4), "x": ints(3, 1), "y": np.array(7, np.int64)},
           label="int64-broadcast"),
    *cases("Where", {"c": bools(4), "x": ints(4, dtype=np.int32),
                     "y": ints(2, 4, dtype=np.int32)}, label="int32"),
]


@pytest.mark.parametrize(("op", "inputs", "opset"), PARITY)
def test_matches_onnxruntime(op: str, inputs: dict, opset: int) -> None:
    assert_matches_ort(single_op_model(op, inputs, opset=opset), inputs)


def test_where_gradient_flows_to_the_selected_branch() -> None:
    inputs = {"c": bools(3, 4), "x": RNG.standard_normal((3, 4)).astype(np.float32),
              "y": RNG.standard_normal((1, 4)).astype(np.float32)}
    model = single_op_model("Where", inputs, opset=16)
    assert_gradients_match_finite_differences(model, inputs)
