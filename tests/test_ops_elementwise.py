"""Elementwise mirror ops: parity with onnxruntime (values and dtypes) and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto

from hawq_onnx.mirror import Mirror
from tests.op_harness import (
    assert_gradients_match_finite_differences,
    assert_matches_ort,
    single_op_model,
)

RNG = np.random.default_rng(20240613)


def normal(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def uniform(low: float, high: float, *shape: int) -> np.ndarray:
    return RNG.uniform(low, high, shape).astype(np.float32)


def integers(low: int, high: int, *shape: int, dtype: type = np.int64) -> np.ndarray:
    return RNG.integers(low, high, shape).astype(dtype)


def nonzero_integers(bound: int, *shape: int, dtype: type = np.int64) -> np.ndarray:
    magnitude = RNG.integers(1, bound, shape)
    return (magnitude * RNG.choice([-1, 1], shape)).astype(dtype)


def cases(op: str, inputs: dict[str, np.ndarray], attrs: dict | None = None, *,
          label: str = "", opsets: tuple[int, ...] = (13, 22)) -> list:
    """One pytest param per opset for a single-node model."""
    name = f"{op}-{label}" if label else op
    return [pytest.param(op, inputs, attrs or {}, opset, id=f"{name}-opset{opset}")
            for opset in opsets]


HALVES = np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, -3.7, 0.2, 4.49], np.float32)
SPECIAL = np.array([np.nan, np.inf, -np.inf, 0.0, -1.5, 3.0], np.float32)

PARITY = [
    *cases("Add", {"a": normal(2, 3, 4), "b": normal(3, 1)}, label="broadcast"),
    *cases("Add", {"a": integers(-50, 50, 2, 3), "b": integers(-50, 50, 3)}, label="int64"),
    *cases("Sub", {"a": normal(2, 3), "b": normal(1, 3)}),
    *cases("Sub", {"a": integers(-9, 9, 4, dtype=np.int32), "b": integers(-9, 9, 4,
                                                                          dtype=np.int32)},
           label="int32"),
    *cases("Mul", {"a": normal(2, 3, 4), "b": normal(4)}),
    *cases("Mul", {"a": integers(-9, 9, 2, 3), "b": integers(-9, 9, 2, 1)}, label="int64"),
    *cases("Div", {"a": normal(2, 3), "b": uniform(0.5, 2.0, 3)}),
    *cases("Div", {"a": integers(-20, 20, 3, 4), "b": nonzero_integers(6, 3, 4)},
           label="int64-truncates"),
    *cases("Div", {"a": integers(-20, 20, 3, 4, dtype=np.int32),
                   "b": nonzero_integers(6, 4, dtype=np.int32)}, label="int32-truncates"),
    *cases("Pow", {"a": uniform(0.1, 3.0, 2, 3), "b": normal(2, 3)}),
    *cases("Pow", {"a": normal(2, 3), "b": integers(0, 4, 3)}, label="float-int-exponent"),
    *cases("Pow", {"a": normal(2, 3), "b": np.array(2.0, np.float32)}, label="square"),
    *cases("Pow", {"a": integers(-5, 5, 2, 3), "b": integers(0, 4, 2, 3)}, label="int-int"),
    *cases("Pow", {"a": integers(0, 6, 2, 3), "b": uniform(0.0, 2.5, 2, 3)},
           label="int-float-exponent"),
    *cases("Sqrt", {"x": uniform(0.0, 9.0, 3, 4)}),
    *cases("Reciprocal", {"x": np.concatenate([uniform(0.5, 3.0, 6), -uniform(0.5, 3.0, 6)])}),
    *cases("Neg", {"x": normal(3, 4)}),
    *cases("Neg", {"x": integers(-9, 9, 3, 4)}, label="int64"),
    *cases("Abs", {"x": normal(3, 4)}),
    *cases("Abs", {"x": integers(-9, 9, 3, 4, dtype=np.int32)}, label="int32"),
    *cases("Exp", {"x": normal(3, 4)}),
    *cases("Log", {"x": uniform(0.01, 10.0, 3, 4)}),
    *cases("Erf", {"x": normal(3, 4) * 2}),
    *cases("Sin", {"x": uniform(-6.0, 6.0, 3, 4)}),
    *cases("Cos", {"x": uniform(-6.0, 6.0, 3, 4)}),
    *cases("Floor", {"x": HALVES}),
    *cases("Ceil", {"x": HALVES}),
    *cases("Round", {"x": HALVES}, label="half-to-even"),
    *cases("Sign", {"x": np.array([-2.0, 0.0, 3.5, -0.1], np.float32)}),
    *cases("Sign", {"x": integers(-3, 3, 8)}, label="int64"),
    *cases("Min", {"a": normal(2, 3), "b": normal(3), "c": normal(1, 1)}, label="variadic"),
    *cases("Min", {"a": normal(2, 3)}, label="single"),
    *cases("Max", {"a": normal(2, 3), "b": normal(3), "c": normal(2, 1)}, label="variadic"),
    *cases("Max", {"a": integers(-9, 9, 2, 3), "b": integers(-9, 9, 3)}, label="int64"),
    *cases("Sum", {"a": normal(2, 3), "b": normal(3), "c": normal(2, 1)}, label="variadic"),
    *cases("Min", {"a": integers(-9, 9, 2, 3, dtype=np.int32),
                   "b": integers(-9, 9, 3, dtype=np.int32)}, label="int32"),
    *cases("Mean", {"a": normal(2, 3), "b": normal(3), "c": normal(2, 1)}, label="variadic"),
    *cases("Mean", {"a": normal(4)}, label="single"),
    *cases("Mod", {"a": normal(3, 4) * 5, "b": uniform(0.5, 2.0, 4)}, {"fmod": 1},
           label="float-fmod"),
    *cases("Mod", {"a": integers(-20, 20, 3, 4), "b": nonzero_integers(6, 3, 4)},
           label="int64-sign-of-divisor"),
    *cases("Mod", {"a": integers(-20, 20, 3, 4, dtype=np.int32),
                   "b": nonzero_integers(6, 3, 4, dtype=np.int32)}, {"fmod": 1},
           label="int32-fmod"),
    *cases("IsNaN", {"x": SPECIAL}),
    *cases("IsInf", {"x": SPECIAL}, label="both"),
    *cases("IsInf", {"x": SPECIAL}, {"detect_negative": 0}, label="positive"),
    *cases("IsInf", {"x": SPECIAL}, {"detect_positive": 0}, label="negative"),
    *cases("IsInf", {"x": SPECIAL}, {"detect_negative": 0, "detect_positive": 0},
           label="neither"),
    *cases("Identity", {"x": normal(2, 3)}),
    *cases("Identity", {"x": integers(0, 9, 2, 3)}, label="int64"),
    *cases("Cast", {"x": HALVES * 3}, {"to": TensorProto.INT64}, label="float-int64"),
    *cases("Cast", {"x": HALVES * 3}, {"to": TensorProto.INT32}, label="float-int32"),
    *cases("Cast", {"x": np.abs(HALVES) * 9}, {"to": TensorProto.UINT8}, label="float-uint8"),
    *cases("Cast", {"x": np.array([0.0, -0.0, 2.0, np.nan], np.float32)},
           {"to": TensorProto.BOOL}, label="float-bool"),
    *cases("Cast", {"x": integers(-99, 99, 3, 4)}, {"to": TensorProto.FLOAT}, label="int-float"),
    *cases("Cast", {"x": integers(-99, 99, 3, dtype=np.int32)}, {"to": TensorProto.INT64},
           label="int32-int64"),
    *cases("Cast", {"x": integers(-2, 3, 6)}, {"to": TensorProto.BOOL}, label="int-bool"),
    *cases("Cast", {"x": np.array([True, False, True])}, {"to": TensorProto.FLOAT},
           label="bool-float"),
    *cases("Cast", {"x": normal(2, 3)}, {"to": TensorProto.FLOAT}, label="float-float"),
]


@pytest.mark.parametrize(("op", "inputs", "attrs", "opset"), PARITY)
def test_matches_onnxruntime(op: str, inputs: dict, attrs: dict, opset: int) -> None:
    assert_matches_ort(single_op_model(op, inputs, attrs, opset=opset), inputs)


@pytest.mark.parametrize("opset", [15, 22])
@pytest.mark.parametrize(
    ("x", "like"),
    [(HALVES * 3, np.zeros(1, np.int64)),
     (integers(-9, 9, 2, 3), np.zeros(1, np.float32)),
     (integers(-9, 9, 2, 3, dtype=np.int32), np.zeros(1, np.int64))],
    ids=["float-to-int64", "int64-to-float", "int32-to-int64"],
)
def test_cast_like_matches_onnxruntime(x: np.ndarray, like: np.ndarray, opset: int) -> None:
    model = single_op_model("CastLike", {"x": x}, opset=opset, constants={"like": like})
    assert_matches_ort(model, {"x": x})


@pytest.mark.parametrize("n_outputs", [1, 2])
@pytest.mark.parametrize("opset", [13, 22])
def test_dropout_is_identity_with_all_true_mask(opset: int, n_outputs: int) -> None:
    x = normal(2, 3, 4)
    model = single_op_model("Dropout", {"x": x}, opset=opset, n_outputs=n_outputs,
                            constants={"ratio": np.array(0.3, np.float32)})
    outputs = assert_matches_ort(model, {"x": x})
    np.testing.assert_array_equal(outputs[0], x)
    if n_outputs == 2:
        assert outputs[1].dtype == bool and outputs[1].all()


def test_cast_to_float_follows_float64_mirror() -> None:
    """A float64 mirror keeps float64 through Cast(to=FLOAT) and Cast(to=FLOAT16)."""
    x = np.array([1, 3, 7], np.int64)
    for target in (TensorProto.FLOAT, TensorProto.FLOAT16):
        model = single_op_model("Cast", {"x": x}, {"to": target}, opset=13)
        (out,) = Mirror(model, weight_names=[], dtype=torch.float64)(torch.from_numpy(x))
        assert out.dtype == torch.float64
        np.testing.assert_array_equal(out.numpy(), [1.0, 3.0, 7.0])


GRADIENTS = [
    pytest.param("Div", {"a": normal(2, 3), "b": uniform(0.5, 2.0, 3)}, id="Div"),
    pytest.param("Pow", {"a": uniform(0.5, 2.0, 2, 3), "b": normal(2, 3)}, id="Pow"),
    pytest.param("Pow", {"a": normal(2, 3), "b": np.array(3, np.int64)}, id="Pow-int-exponent"),
    pytest.param("Erf", {"x": normal(2, 3)}, id="Erf"),
    pytest.param("Sqrt", {"x": uniform(0.5, 4.0, 2, 3)}, id="Sqrt"),
    pytest.param("Reciprocal", {"x": uniform(0.5, 4.0, 2, 3)}, id="Reciprocal"),
    pytest.param("Log", {"x": uniform(0.5, 4.0, 2, 3)}, id="Log"),
    pytest.param("Exp", {"x": normal(2, 3)}, id="Exp"),
    pytest.param("Sin", {"x": normal(2, 3)}, id="Sin"),
    pytest.param("Mul", {"a": normal(2, 3), "b": normal(3)}, id="Mul-broadcast"),
    pytest.param("Mean", {"a": normal(2, 3), "b": normal(3), "c": normal(2, 1)}, id="Mean"),
    pytest.param("Max", {"a": np.array([1.0, -2.0, 0.5], np.float32),
                          "b": np.array([0.0, 1.0, 2.0], np.float32)},
                 id="Max"),
]


@pytest.mark.parametrize(("op", "inputs"), GRADIENTS)
def test_gradients_match_finite_differences(op: str, inputs: dict) -> None:
    assert_gradients_match_finite_differences(single_op_model(op, inputs, opset=17), inputs)
