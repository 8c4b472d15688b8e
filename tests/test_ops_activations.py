"""Activation mirror ops: parity with onnxruntime across opsets, and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hawq_onnx.mirror import Mirror
from tests.op_harness import (
    assert_gradients_match_finite_differences,
    assert_matches_ort,
    single_op_model,
)

RNG = np.random.default_rng(7)


def normal(*shape: int, scale: float = 1.0) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def away_from(points: list[float], *shape: int, scale: float = 4.0) -> np.ndarray:
    """Random values at least 0.05 from every kink in ``points`` (finite differences
    straddling a kink would measure a one-sided mix)."""
    x = RNG.standard_normal(shape) * scale
    for p in points:
        near = np.abs(x - p) < 0.05
        x[near] = p + 0.1
    return x.astype(np.float32)


def f32(value: float) -> np.ndarray:
    return np.array(value, np.float32)


def cases(op: str, inputs: dict[str, np.ndarray], attrs: dict | None = None, *,
          label: str = "", opsets: tuple[int, ...] = (13, 22),
          constants: dict[str, np.ndarray] | None = None,
          order: list[str] | None = None) -> list:
    """One pytest param per opset for a single-node model."""
    name = f"{op}-{label}" if label else op
    return [pytest.param(op, inputs, attrs or {}, opset, constants or {}, order,
                         id=f"{name}-opset{opset}")
            for opset in opsets]


X = normal(2, 3, 4, scale=3.0)
WIDE = np.concatenate([normal(10, scale=4.0), np.array([-40, -25, 0, 25, 40], np.float32)])

PARITY = [
    *cases("Relu", {"x": X}),
    *cases("Relu", {"x": RNG.integers(-5, 5, (3, 4)).astype(np.int32)}, label="int32",
           opsets=(14, 22)),
    *cases("Tanh", {"x": X}),
    *cases("Sigmoid", {"x": WIDE}),
    *cases("LeakyRelu", {"x": X}, label="default"),
    *cases("LeakyRelu", {"x": X}, {"alpha": 0.3}, label="alpha"),
    *cases("PRelu", {"x": X}, constants={"slope": normal(3, 1)}, label="per-channel"),
    *cases("PRelu", {"x": X}, constants={"slope": f32(0.25).reshape(1)}, label="scalar"),
    *cases("PRelu", {"x": X, "slope": normal(4)}, label="input-slope"),
    *cases("PRelu", {"x": RNG.integers(-9, 9, (2, 5)).astype(np.int64)},
           constants={"slope": np.array([2, 3, 0, -1, 4], np.int64)}, label="int64",
           opsets=(16,)),
    *cases("Elu", {"x": X}),
    *cases("Elu", {"x": X}, {"alpha": 0.5}, label="alpha"),
    *cases("Selu", {"x": X}),
    *cases("Selu", {"x": X}, {"alpha": 1.5, "gamma": 0.9}, label="custom"),
    *cases("Celu", {"x": X}, opsets=(12, 22)),
    *cases("Celu", {"x": X}, {"alpha": 2.0}, label="alpha", opsets=(12, 22)),
    *cases("ThresholdedRelu", {"x": X}),
    *cases("ThresholdedRelu", {"x": X}, {"alpha": 0.5}, label="alpha"),
    *cases("HardSigmoid", {"x": X}),
    *cases("HardSigmoid", {"x": X}, {"alpha": 0.1, "beta": 0.3}, label="custom"),
    *cases("HardSwish", {"x": X * 2}, opsets=(14, 22)),
    *cases("Softplus", {"x": WIDE}),
    *cases("Softsign", {"x": X}),
    *cases("Mish", {"x": WIDE}, opsets=(18, 22)),
    *cases("Gelu", {"x": X}, opsets=(20, 22)),
    *cases("Gelu", {"x": X}, {"approximate": "tanh"}, label="tanh", opsets=(20, 22)),
    # Clip: attributes before opset 11, optional inputs after.
    *cases("Clip", {"x": X}, {"min": -1.0, "max": 2.0}, label="attrs", opsets=(10,)),
    *cases("Clip", {"x": X}, {"min": -1.0}, label="attr-min-only", opsets=(10,)),
    *cases("Clip", {"x": X}, constants={"lo": f32(-1.0), "hi": f32(2.0)}, label="inputs",
           opsets=(11, 13, 22)),
    *cases("Clip", {"x": X}, constants={"lo": f32(-0.5)}, label="min-only"),
    *cases("Clip", {"x": X}, constants={"hi": f32(0.5)}, order=["x", "", "hi"],
           label="max-only"),
    *cases("Clip", {"x": X}, label="no-bounds"),
    *cases("Clip", {"x": X}, constants={"lo": f32(1.0), "hi": f32(-1.0)}, label="min>max"),
    *cases("Clip", {"x": RNG.integers(-9, 9, (3, 4)).astype(np.int64)},
           constants={"lo": np.array(-3, np.int64), "hi": np.array(4, np.int64)},
           label="int64"),
    # Softmax family: per-axis from opset 13 (default -1), coerced to 2-D before.
    *cases("Softmax", {"x": X}, label="default-axis"),
    *cases("Softmax", {"x": X}, {"axis": 1}, label="axis1"),
    *cases("Softmax", {"x": X}, {"axis": 0}, label="axis0"),
    *cases("Softmax", {"x": X}, label="default-axis-2d", opsets=(11,)),
    *cases("Softmax", {"x": X}, {"axis": 0}, label="axis0-2d", opsets=(11,)),
    *cases("Softmax", {"x": X}, {"axis": -1}, label="axis-1-2d", opsets=(11,)),
    *cases("LogSoftmax", {"x": X}, label="default-axis"),
    *cases("LogSoftmax", {"x": X}, {"axis": -2}, label="axis-2"),
    *cases("LogSoftmax", {"x": X}, label="default-axis-2d", opsets=(11,)),
    *cases("LogSoftmax", {"x": X}, {"axis": 2}, label="axis2-2d", opsets=(11,)),
]


@pytest.mark.parametrize(("op", "inputs", "attrs", "opset", "constants", "order"), PARITY)
def test_matches_onnxruntime(op: str, inputs: dict, attrs: dict, opset: int, constants: dict,
                             order: list[str] | None) -> None:
    model = single_op_model(op, inputs, attrs, opset=opset, constants=constants,
                            input_order=order)
    assert_matches_ort(model, inputs)


def test_softmax_before_opset_13_normalizes_the_flattened_tail() -> None:
    """The coerce-to-2D rule really differs from per-axis softmax on a 3-D input."""
    model = single_op_model("Softmax", {"x": X}, opset=11)
    out = Mirror(model, weight_names=[]).run_numpy({"x": X})["out0"]
    np.testing.assert_allclose(out.reshape(2, -1).sum(axis=1), [1.0, 1.0], rtol=1e-6)
    assert not np.allclose(out.sum(axis=1), 1.0)


GRADIENTS = [
    pytest.param("Softmax", 13, {"x": normal(2, 3, 4)}, {"axis": 1}, {}, id="Softmax"),
    pytest.param("Softmax", 11, {"x": normal(2, 3, 4)}, {}, {}, id="Softmax-2d"),
    pytest.param("LogSoftmax", 13, {"x": normal(2, 5)}, {}, {}, id="LogSoftmax"),
    pytest.param("Clip", 13, {"x": away_from([-1.0, 1.5], 3, 4, scale=2.0)}, {},
                 {"lo": f32(-1.0), "hi": f32(1.5)}, id="Clip"),
    pytest.param("Clip", 13, {"x": away_from([0.0], 3, 4), "lo": f32(0.0)}, {}, {},
                 id="Clip-bound-input"),
    pytest.param("HardSwish", 14, {"x": away_from([-3.0, 3.0], 3, 4)}, {}, {},
                 id="HardSwish"),
    pytest.param("HardSigmoid", 13, {"x": away_from([-2.5, 2.5], 3, 4)}, {}, {},
                 id="HardSigmoid"),
    pytest.param("Gelu", 20, {"x": normal(3, 4, scale=2.0)}, {}, {}, id="Gelu"),
    pytest.param("Gelu", 20, {"x": normal(3, 4, scale=2.0)}, {"approximate": "tanh"}, {},
                 id="Gelu-tanh"),
    pytest.param("Mish", 18, {"x": normal(3, 4, scale=2.0)}, {}, {}, id="Mish"),
    pytest.param("Softplus", 13, {"x": normal(3, 4, scale=2.0)}, {}, {}, id="Softplus"),
    pytest.param("Elu", 13, {"x": away_from([0.0], 3, 4)}, {"alpha": 0.7}, {}, id="Elu"),
    pytest.param("Selu", 13, {"x": away_from([0.0], 3, 4)}, {}, {}, id="Selu"),
    pytest.param("Celu", 13, {"x": away_from([0.0], 3, 4)}, {"alpha": 2.0}, {}, id="Celu"),
    pytest.param("Softsign", 13, {"x": away_from([0.0], 3, 4)}, {}, {}, id="Softsign"),
    pytest.param("PRelu", 13, {"x": away_from([0.0], 2, 3, 4), "slope": normal(3, 1)}, {}, {},
                 id="PRelu"),
    pytest.param("Sigmoid", 13, {"x": normal(3, 4)}, {}, {}, id="Sigmoid"),
    pytest.param("Tanh", 13, {"x": normal(3, 4)}, {}, {}, id="Tanh"),
]


@pytest.mark.parametrize(("op", "opset", "inputs", "attrs", "constants"), GRADIENTS)
def test_gradients_match_finite_differences(op: str, opset: int, inputs: dict, attrs: dict,
                                            constants: dict) -> None:
    model = single_op_model(op, inputs, attrs, opset=opset, constants=constants)
    assert_gradients_match_finite_differences(model, inputs)


def test_prelu_slope_weight_gradient_and_hessian_match_finite_differences() -> None:
    """The HAWQ use: a slope initializer as a mirror Parameter; its gradient and a
    Hessian-vector product of a loss match central differences in float64."""
    x = away_from([0.0], 2, 3, 4)
    slope = normal(3, 1)
    model = single_op_model("PRelu", {"x": x}, opset=13, constants={"slope": slope})
    mirror = Mirror(model, weight_names=["slope"], dtype=torch.float64)
    weight = mirror.weights["slope"]
    inputs = torch.from_numpy(x).double()

    def loss() -> torch.Tensor:
        (out,) = mirror(inputs)
        return (torch.sin(out) ** 2).sum()

    (grad,) = torch.autograd.grad(loss(), weight, create_graph=True)
    direction = torch.from_numpy(normal(3, 1)).double()
    (hvp,) = torch.autograd.grad(grad, weight, direction)

    eps = 1e-5
    fd_grad = torch.zeros_like(grad)
    with torch.no_grad():
        for i in range(weight.numel()):
            weight.view(-1)[i] += eps
            up = loss()
            weight.view(-1)[i] -= 2 * eps
            down = loss()
            weight.view(-1)[i] += eps
            fd_grad.view(-1)[i] = (up - down) / (2 * eps)
    np.testing.assert_allclose(grad.detach().numpy(), fd_grad.numpy(), rtol=1e-6, atol=1e-8)

    def grad_at(shift: float) -> torch.Tensor:
        with torch.no_grad():
            weight.add_(shift * direction)
        (g,) = torch.autograd.grad(loss(), weight)
        with torch.no_grad():
            weight.sub_(shift * direction)
        return g

    fd_hvp = (grad_at(eps) - grad_at(-eps)) / (2 * eps)
    np.testing.assert_allclose(hvp.numpy(), fd_hvp.numpy(), rtol=1e-5, atol=1e-7)
    assert hvp.abs().max() > 1e-3  # a non-trivial curvature, so the check means something
