"""Mirror normalization ops: parity with onnxruntime and weight gradients."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from hawq_onnx.mirror import Mirror
from tests.op_harness import assert_matches_ort, single_op_model
from tests.test_ops_nn import check_weight_gradients, rand, second_order_check


def _positive(seed: int, *shape: int) -> np.ndarray:
    return (0.5 + np.abs(rand(seed, *shape))).astype(np.float32)


# ---------------------------------------------------------------------------- BatchNormalization
@pytest.mark.parametrize("opset", [13, 15, 22])
@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 5), (2, 3, 4, 4), (1, 3, 2, 3, 2)])
def test_batch_normalization_matches_onnxruntime(shape: tuple[int, ...], opset: int) -> None:
    channels = shape[1]
    constants = {"scale": rand(1, channels), "bias": rand(2, channels),
                 "mean": rand(3, channels), "var": _positive(4, channels)}
    feeds = {"x": rand(0, *shape)}
    model = single_op_model("BatchNormalization", feeds, {"epsilon": 1e-3}, opset=opset,
                            constants=constants)
    assert_matches_ort(model, feeds, rtol=1e-5, atol=1e-5)


def test_batch_normalization_training_mode_is_refused() -> None:
    constants = {"scale": rand(1, 2), "bias": rand(2, 2), "mean": rand(3, 2),
                 "var": _positive(4, 2)}
    feeds = {"x": rand(0, 2, 2, 3)}
    model = single_op_model("BatchNormalization", feeds, {"training_mode": 1}, opset=15,
                            constants=constants)
    with pytest.raises(NotImplementedError, match="training_mode=1"):
        Mirror(model, weight_names=[]).run_numpy(feeds)


# ---------------------------------------------------------------------------- LayerNormalization
LAYER_NORM_CASES = {
    "last-axis": (17, (2, 3, 8), {}, True, 1),
    "axis-1-all-outputs": (17, (2, 3, 4), {"axis": 1, "epsilon": 1e-3}, True, 3),
    "negative-axis-no-bias": (22, (2, 3, 4, 2), {"axis": -2}, False, 1),
    "axis-0-stats": (18, (3, 4), {"axis": 0}, True, 3),
}


def _layer_norm_model(case: tuple) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    opset, shape, attrs, with_bias, n_outputs = case
    axis = attrs.get("axis", -1) % len(shape)
    norm_shape = shape[axis:]
    constants = {"scale": 1 + 0.2 * rand(1, *norm_shape)}
    if with_bias:
        constants["bias"] = rand(2, *norm_shape)
    feeds = {"x": rand(0, *shape)}
    model = single_op_model("LayerNormalization", feeds, attrs, opset=opset,
                            n_outputs=n_outputs, constants=constants)
    return model, feeds


@pytest.mark.parametrize("case", LAYER_NORM_CASES.values(), ids=LAYER_NORM_CASES.keys())
def test_layer_normalization_matches_onnxruntime(case: tuple) -> None:
    model, feeds = _layer_norm_model(case)
    assert_matches_ort(model, feeds, rtol=1e-5, atol=1e-5)


def test_layer_normalization_weight_gradients_match_finite_differences() -> None:
    model, feeds = _layer_norm_model(LAYER_NORM_CASES["axis-1-all-outputs"])
    check_weight_gradients(model, feeds, ["scale", "bias"])


# ---------------------------------------------------------------------------- Instance / Group
@pytest.mark.parametrize("shape", [(2, 3, 5), (2, 3, 4, 4), (1, 2, 3, 2, 3)])
def test_instance_normalization_matches_onnxruntime(shape: tuple[int, ...]) -> None:
    constants = {"scale": rand(1, shape[1]), "bias": rand(2, shape[1])}
    feeds = {"x": rand(0, *shape)}
    model = single_op_model("InstanceNormalization", feeds, {"epsilon": 1e-4}, opset=13,
                            constants=constants)
    assert_matches_ort(model, feeds, rtol=1e-5, atol=1e-5)


# (opset, input shape, groups, size of scale/bias: per group at 18, per channel at 21)
GROUP_NORM_CASES = {
    "opset18-per-group": (18, (2, 6, 3, 3), 3, 3),
    "opset18-one-group": (18, (2, 4, 5), 1, 1),
    "opset21-per-channel": (21, (2, 6, 3, 3), 3, 6),
    "opset21-groups-equal-channels": (21, (2, 4, 5), 4, 4),
}


def _group_norm_model(case: tuple) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    opset, shape, groups, size = case
    constants = {"scale": 1 + 0.3 * rand(1, size), "bias": rand(2, size)}
    feeds = {"x": rand(0, *shape)}
    model = single_op_model("GroupNormalization", feeds,
                            {"num_groups": groups, "epsilon": 1e-4}, opset=opset,
                            constants=constants)
    return model, feeds


@pytest.mark.parametrize("case", GROUP_NORM_CASES.values(), ids=GROUP_NORM_CASES.keys())
def test_group_normalization_matches_onnxruntime(case: tuple) -> None:
    model, feeds = _group_norm_model(case)
    assert_matches_ort(model, feeds, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", [GROUP_NORM_CASES["opset18-per-group"],
                                  GROUP_NORM_CASES["opset21-per-channel"]],
                         ids=["opset18", "opset21"])
def test_group_normalization_weight_gradients_match_finite_differences(case: tuple) -> None:
    model, feeds = _group_norm_model(case)
    check_weight_gradients(model, feeds, ["scale", "bias"])


def test_group_normalization_group_sized_scale_applies_per_group() -> None:
    """A G-sized scale is applied per group: at opset 18 by definition, and at opset 21
    (which expects C values) because its size allows no other reading."""
    x = rand(0, 1, 4, 3)
    scale = np.array([1.0, 2.0], np.float32)
    bias = np.zeros(2, np.float32)
    outputs = []
    for opset in (18, 21):
        model = single_op_model("GroupNormalization", {"x": x}, {"num_groups": 2},
                                opset=opset, constants={"scale": scale, "bias": bias})
        outputs.append(Mirror(model, weight_names=[]).run_numpy({"x": x})["out0"])
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-6)
    # The second group (channels 2-3) is scaled by 2 relative to a unit-scale run.
    unit = single_op_model("GroupNormalization", {"x": x}, {"num_groups": 2}, opset=18,
                           constants={"scale": np.ones(2, np.float32), "bias": bias})
    base = Mirror(unit, weight_names=[]).run_numpy({"x": x})["out0"]
    np.testing.assert_allclose(outputs[0][:, 2:], 2 * base[:, 2:], rtol=1e-6)
    np.testing.assert_allclose(outputs[0][:, :2], base[:, :2], rtol=1e-6)


# ---------------------------------------------------------------------------- Lp / MVN
@pytest.mark.parametrize(("axis", "p"), [(-1, 2), (1, 1), (0, 2), (2, 1)])
def test_lp_normalization_matches_onnxruntime(axis: int, p: int) -> None:
    x = rand(0, 2, 3, 4)
    x[1, :, 2] = 0.0  # an all-zero slice along axis 1
    x[0, 1, :] = 0.0  # and one along the last axis
    model = single_op_model("LpNormalization", {"x": x}, {"axis": axis, "p": p}, opset=13)
    assert_matches_ort(model, {"x": x}, rtol=1e-5, atol=1e-6)


def test_lp_normalization_gradient_is_finite_on_zero_slices() -> None:
    x = torch.zeros(2, 3, dtype=torch.float64)
    x[1] = torch.tensor([3.0, 0.0, 4.0])
    x.requires_grad_(True)
    model = single_op_model("LpNormalization", {"x": np.zeros((2, 3))}, {"p": 2}, opset=13)
    (y,) = Mirror(model, weight_names=[], dtype=torch.float64)(x)
    (y * torch.arange(6.0, dtype=torch.float64).reshape(2, 3)).sum().backward()
    assert torch.isfinite(x.grad).all()
    # d/dx of x/|x| applied to w is (w - (w.u)u)/|x| with u = x/|x|.
    u = torch.tensor([0.6, 0.0, 0.8], dtype=torch.float64)
    w = torch.tensor([3.0, 4.0, 5.0], dtype=torch.float64)
    np.testing.assert_allclose(x.grad[1].numpy(), ((w - (w @ u) * u) / 5).numpy(), rtol=1e-12)


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize(("shape", "axes"), [((2, 3, 4, 5), None), ((2, 3, 4), [2]),
                                             ((2, 3, 4, 5), [1, 2, 3])])
def test_mean_variance_normalization_matches_onnxruntime(shape: tuple[int, ...],
                                                         axes: list[int] | None,
                                                         opset: int) -> None:
    feeds = {"x": rand(0, *shape) * 3 + 1}
    attrs = {} if axes is None else {"axes": axes}
    model = single_op_model("MeanVarianceNormalization", feeds, attrs, opset=opset)
    assert_matches_ort(model, feeds, rtol=1e-5, atol=1e-5)


# (op, shapes of the inputs made weights, attrs, opset, further constant inputs)
SECOND_ORDER_CASES = {
    "batch-norm": ("BatchNormalization", [(2, 3, 4), (3,), (3,)], {}, 15,
                   {"in3": rand(9, 3), "in4": _positive(10, 3)}),
    "instance-norm": ("InstanceNormalization", [(2, 3, 4), (3,), (3,)], {}, 13, {}),
    "layer-norm": ("LayerNormalization", [(2, 3, 4), (3, 4), (3, 4)], {"axis": 1}, 17, {}),
    "group-norm-18": ("GroupNormalization", [(2, 4, 3), (2,), (2,)], {"num_groups": 2}, 18,
                      {}),
    "group-norm-21": ("GroupNormalization", [(2, 4, 3), (4,), (4,)], {"num_groups": 2}, 21,
                      {}),
    "lp-norm": ("LpNormalization", [(3, 4)], {"p": 2}, 13, {}),
    "mean-variance-norm": ("MeanVarianceNormalization", [(2, 3, 4)], {"axes": [0, 2]}, 13,
                           {}),
}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("case", SECOND_ORDER_CASES.values(), ids=SECOND_ORDER_CASES.keys())
def test_second_order_autograd(case: tuple) -> None:
    op, shapes, attrs, opset, extra = case
    second_order_check(op, shapes, attrs, opset, extra)


@pytest.mark.parametrize(("shape", "size"),
                         [((2, 5, 4, 4), 3), ((1, 6, 3, 3), 5), ((1, 7, 2, 2), 1)])
def test_lrn_matches_onnxruntime(shape: tuple[int, ...], size: int) -> None:
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    model = single_op_model("LRN", {"x": x}, {"size": size, "alpha": 0.01, "beta": 0.6,
                                              "bias": 1.5}, opset=13)
    assert_matches_ort(model, {"x": x})
