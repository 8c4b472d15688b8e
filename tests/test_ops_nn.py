"""Mirror ops Conv, ConvTranspose, Gemm, MatMul, Einsum and pooling: parity with onnxruntime,
weight gradients against finite differences, and a Hessian-vector product through
Conv -> LayerNormalization -> Gemm.

The gradient helpers here are shared by the normalization and recurrent op tests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from hawq_onnx.mirror import Mirror
from tests.op_harness import IR_FOR_OPSET, assert_matches_ort, single_op_model

Loss = Callable[[Sequence[torch.Tensor]], torch.Tensor]


def rand(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------------------- gradient helpers
def _float64_feeds(feeds: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in feeds.items():
        tensor = torch.from_numpy(np.array(value))
        out[name] = tensor.double() if tensor.is_floating_point() else tensor
    return out


def _projection_loss(outputs: Sequence[torch.Tensor], seed: int = 7) -> torch.Tensor:
    """A fixed random linear functional plus a square of every float output: generic enough
    that every weight entry matters, curved so Hessians are non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros((), dtype=torch.float64)
    for out in outputs:
        if out.is_floating_point():
            probe = torch.randn(out.shape, generator=gen, dtype=out.dtype)
            total = total + (out * probe).sum() + 0.5 * (out * out).sum()
    return total


def check_weight_gradients(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray],
                           weight_names: Sequence[str], *, eps: float = 1e-6,
                           max_entries: int = 16, rtol: float = 1e-5,
                           atol: float = 1e-7) -> None:
    """Autograd gradients of the mirror (float64) match central finite differences on up to
    ``max_entries`` random entries of each weight."""
    mirror = Mirror(model, weight_names=list(weight_names), dtype=torch.float64)
    inputs = _float64_feeds(feeds)

    def loss() -> torch.Tensor:
        return _projection_loss(mirror(**inputs))

    loss().backward()
    rng = np.random.default_rng(3)
    for name, param in mirror.weights.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
        flat = param.data.view(-1)
        picked = rng.choice(flat.numel(), min(flat.numel(), max_entries), replace=False)
        numeric = []
        with torch.no_grad():
            for index in picked:
                original = flat[index].item()
                flat[index] = original + eps
                up = loss().item()
                flat[index] = original - eps
                down = loss().item()
                flat[index] = original
                numeric.append((up - down) / (2 * eps))
        analytic = param.grad.view(-1)[torch.from_numpy(picked)].numpy()
        np.testing.assert_allclose(analytic, numeric, rtol=rtol, atol=atol, err_msg=name)


def check_hessian_vector_product(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray],
                                 weight_names: Sequence[str], *, eps: float = 1e-5,
                                 rtol: float = 1e-5, atol: float = 1e-7) -> None:
    """H v by double backward is non-zero, equals central differences of gradients, and
    equals forward-over-reverse (torch.func.jvp of torch.func.grad)."""
    mirror = Mirror(model, weight_names=list(weight_names), dtype=torch.float64)
    inputs = _float64_feeds(feeds)
    params = [mirror.weights[n] for n in weight_names]
    gen = torch.Generator().manual_seed(11)
    vs = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]

    grads = torch.autograd.grad(_projection_loss(mirror(**inputs)), params, create_graph=True)
    hv = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vs, strict=True)), params)
    assert sum(float(h.abs().sum()) for h in hv) > 1e-3

    def grads_at(step: float) -> list[torch.Tensor]:
        with torch.no_grad():
            for p, v in zip(params, vs, strict=True):
                p.add_(step * v)
        out = torch.autograd.grad(_projection_loss(mirror(**inputs)), params)
        with torch.no_grad():
            for p, v in zip(params, vs, strict=True):
                p.sub_(step * v)
        return list(out)

    plus, minus = grads_at(eps), grads_at(-eps)
    for h, gp, gm, name in zip(hv, plus, minus, weight_names, strict=True):
        np.testing.assert_allclose(h.numpy(), ((gp - gm) / (2 * eps)).numpy(), rtol=rtol,
                                   atol=atol, err_msg=name)

    by_id = {id(p): key for key, p in mirror.named_parameters()}
    keys = [by_id[id(p)] for p in params]

    def loss_of(values: dict[str, torch.Tensor]) -> torch.Tensor:
        return _projection_loss(torch.func.functional_call(mirror, values, kwargs=inputs))

    primals = {k: p.detach() for k, p in zip(keys, params, strict=True)}
    tangents = dict(zip(keys, vs, strict=True))
    _, forward_hv = torch.func.jvp(torch.func.grad(loss_of), (primals,), (tangents,))
    for h, key in zip(hv, keys, strict=True):
        np.testing.assert_allclose(forward_hv[key].numpy(), h.numpy(), rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------------------- Conv
CONV_CASES = {
    "1d": (13, (2, 3, 9), (4, 3, 3), {}, True),
    "1d-kernel-shape-attr": (22, (1, 2, 8), (3, 2, 2), {"kernel_shape": [2], "strides": [3]},
                             True),
    "2d-stride-pads": (17, (1, 3, 7, 8), (4, 3, 3, 3), {"strides": [2, 2],
                                                       "pads": [1, 1, 1, 1]}, True),
    "2d-asymmetric-pads": (22, (1, 2, 6, 7), (3, 2, 3, 2), {"pads": [0, 1, 2, 1]}, True),
    "2d-dilations": (13, (1, 2, 9, 9), (3, 2, 3, 3), {"dilations": [2, 3],
                                                     "pads": [2, 1, 2, 1]}, True),
    "2d-group": (18, (1, 4, 6, 6), (6, 2, 3, 3), {"group": 2}, True),
    "2d-depthwise": (21, (2, 4, 6, 6), (4, 1, 3, 3), {"group": 4, "strides": [2, 2],
                                                     "pads": [1, 1, 1, 1]}, True),
    "3d": (13, (1, 2, 4, 5, 5), (3, 2, 2, 3, 3), {"strides": [1, 2, 1],
                                                 "pads": [0, 1, 1, 1, 0, 1]}, True),
    "same-upper": (13, (1, 2, 7, 6), (3, 2, 3, 3), {"auto_pad": "SAME_UPPER",
                                                   "strides": [2, 2]}, True),
    "same-lower": (19, (1, 2, 7, 6), (3, 2, 3, 3), {"auto_pad": "SAME_LOWER",
                                                   "strides": [2, 2]}, True),
    "valid": (22, (1, 2, 7, 6), (3, 2, 3, 3), {"auto_pad": "VALID", "strides": [2, 1]}, True),
    "no-bias": (13, (2, 3, 5, 5), (2, 3, 1, 1), {}, False),
}


def _conv_model(op: str, case: tuple) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    opset, x_shape, w_shape, attrs, with_bias = case
    out_channels = w_shape[0] if op == "Conv" else w_shape[1] * attrs.get("group", 1)
    constants = {"w": rand(1, *w_shape)}
    if with_bias:
        constants["b"] = rand(2, out_channels)
    feeds = {"x": rand(0, *x_shape)}
    return single_op_model(op, feeds, attrs, opset=opset, constants=constants), feeds


@pytest.mark.parametrize("case", CONV_CASES.values(), ids=CONV_CASES.keys())
def test_conv_matches_onnxruntime(case: tuple) -> None:
    model, feeds = _conv_model("Conv", case)
    assert_matches_ort(model, feeds, rtol=1e-5, atol=1e-5)


CONV_TRANSPOSE_CASES = {
    "2d": (13, (1, 2, 4, 4), (2, 3, 3, 3), {}, True),
    "stride-output-padding": (17, (1, 2, 3, 4), (2, 3, 3, 3), {"strides": [2, 2],
                                                              "output_padding": [1, 0]}, True),
    "asymmetric-pads": (22, (1, 2, 4, 4), (2, 3, 3, 3), {"strides": [2, 2],
                                                        "pads": [0, 1, 1, 2]}, True),
    "pads-and-output-padding": (13, (1, 2, 3, 3), (2, 2, 3, 3), {
        "strides": [3, 2], "pads": [1, 1, 1, 1], "output_padding": [2, 1]}, True),
    "group": (13, (1, 4, 3, 3), (4, 2, 3, 3), {"group": 2, "strides": [2, 2]}, True),
    "depthwise": (18, (1, 3, 3, 3), (3, 1, 2, 2), {"group": 3, "strides": [2, 2]}, False),
    "dilations": (18, (1, 2, 4, 4), (2, 2, 2, 3), {"dilations": [2, 1],
                                                  "pads": [1, 1, 1, 1]}, True),
    "output-shape": (13, (1, 2, 3, 3), (2, 2, 3, 3), {"strides": [2, 2],
                                                     "output_shape": [6, 5]}, True),
    "output-shape-same-upper": (13, (1, 2, 3, 3), (2, 2, 3, 3), {
        "strides": [2, 2], "output_shape": [6, 5], "auto_pad": "SAME_UPPER"}, True),
    "same-upper": (19, (1, 2, 3, 4), (2, 2, 3, 3), {"strides": [2, 2],
                                                   "auto_pad": "SAME_UPPER"}, True),
    "same-lower": (19, (1, 2, 3, 4), (2, 2, 3, 3), {"strides": [2, 2],
                                                   "auto_pad": "SAME_LOWER"}, True),
    "valid": (22, (1, 2, 3, 4), (2, 2, 3, 3), {"strides": [2, 2], "auto_pad": "VALID"}, True),
    "1d": (13, (1, 2, 5), (2, 3, 3), {"strides": [3], "pads": [1, 0]}, True),
    "3d": (13, (1, 2, 2, 3, 3), (2, 2, 2, 2, 3), {"strides": [2, 1, 2],
                                                 "pads": [0, 1, 1, 1, 0, 0]}, True),
}


@pytest.mark.parametrize("case", CONV_TRANSPOSE_CASES.values(), ids=CONV_TRANSPOSE_CASES.keys())
def test_conv_transpose_matches_onnxruntime(case: tuple) -> None:
    model, feeds = _conv_model("ConvTranspose", case)
    assert_matches_ort(model, feeds, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("op", "case"),
    [("Conv", CONV_CASES["2d-depthwise"]), ("Conv", CONV_CASES["same-lower"]),
     ("ConvTranspose", CONV_TRANSPOSE_CASES["pads-and-output-padding"]),
     ("ConvTranspose", CONV_TRANSPOSE_CASES["group"])],
    ids=["conv-depthwise", "conv-same-lower", "convT-pads-outpad", "convT-group"])
def test_conv_weight_gradients_match_finite_differences(op: str, case: tuple) -> None:
    model, feeds = _conv_model(op, case)
    check_weight_gradients(model, feeds, ["w", "b"])


# ---------------------------------------------------------------------------- Gemm / MatMul
GEMM_CASES = {
    "plain": ((3, 4), (4, 5), (5,), {}),
    "trans-a": ((4, 3), (4, 5), (3, 5), {"transA": 1}),
    "trans-b": ((3, 4), (5, 4), (1, 5), {"transB": 1}),
    "trans-both-alpha-beta": ((4, 3), (5, 4), (3, 1), {"transA": 1, "transB": 1,
                                                       "alpha": 0.5, "beta": -2.0}),
    "scalar-c": ((3, 4), (4, 5), (), {"beta": 3.0}),
    "no-c": ((3, 4), (4, 5), None, {"alpha": 1.5}),
}


def _gemm_model(case: tuple, opset: int) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    a_shape, b_shape, c_shape, attrs = case
    constants = {"b": rand(1, *b_shape)}
    if c_shape is not None:
        constants["c"] = rand(2, *c_shape)
    feeds = {"a": rand(0, *a_shape)}
    return single_op_model("Gemm", feeds, attrs, opset=opset, constants=constants), feeds


@pytest.mark.parametrize("opset", [13, 22])
@pytest.mark.parametrize("case", GEMM_CASES.values(), ids=GEMM_CASES.keys())
def test_gemm_matches_onnxruntime(case: tuple, opset: int) -> None:
    model, feeds = _gemm_model(case, opset)
    assert_matches_ort(model, feeds, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", [GEMM_CASES["trans-both-alpha-beta"], GEMM_CASES["plain"]],
                         ids=["trans-both-alpha-beta", "plain"])
def test_gemm_weight_gradients_match_finite_differences(case: tuple) -> None:
    model, feeds = _gemm_model(case, 13)
    check_weight_gradients(model, feeds, ["b", "c"])


MATMUL_CASES = {
    "2d": ((3, 4), (4, 5)),
    "batched-broadcast": ((2, 3, 4), (4, 5)),
    "vector-left": ((4,), (2, 4, 5)),
    "vector-right": ((2, 3, 4), (4,)),
    "vector-vector": ((4,), (4,)),
    "4d-broadcast": ((2, 1, 3, 4), (5, 4, 2)),
}


def _matmul_model(case: tuple, opset: int = 13) -> tuple[onnx.ModelProto, dict[str,
                                                                            np.ndarray]]:
    a_shape, b_shape = case
    feeds = {"a": rand(0, *a_shape)}
    model = single_op_model("MatMul", feeds, opset=opset, constants={"b": rand(1, *b_shape)})
    return model, feeds


@pytest.mark.parametrize("opset", [13, 21])
@pytest.mark.parametrize("case", MATMUL_CASES.values(), ids=MATMUL_CASES.keys())
def test_matmul_matches_onnxruntime(case: tuple, opset: int) -> None:
    model, feeds = _matmul_model(case, opset)
    assert_matches_ort(model, feeds, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", [MATMUL_CASES["4d-broadcast"], MATMUL_CASES["vector-left"]],
                         ids=["4d-broadcast", "vector-left"])
def test_matmul_weight_gradients_match_finite_differences(case: tuple) -> None:
    model, feeds = _matmul_model(case)
    check_weight_gradients(model, feeds, ["b"])


EINSUM_CASES = {
    "matmul": ("ij,jk->ik", [(3, 4), (4, 5)]),
    "batched": ("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)]),
    "spaces": ("i j , j k -> i k", [(3, 4), (4, 2)]),
    "ellipsis-broadcast": ("...ij,...jk->...ik", [(2, 3, 4), (1, 4, 2)]),
    "transpose": ("ij->ji", [(3, 4)]),
    "attention-scores": ("bhqd,bhkd->bhqk", [(1, 2, 3, 4), (1, 2, 5, 4)]),
    "dot": ("i,i", [(5,), (5,)]),
    "implicit-output": ("ij,jk", [(2, 3), (3, 4)]),
}


@pytest.mark.parametrize("case", EINSUM_CASES.values(), ids=EINSUM_CASES.keys())
def test_einsum_matches_onnxruntime(case: tuple) -> None:
    equation, shapes = case
    feeds = {f"x{i}": rand(i, *s) for i, s in enumerate(shapes)}
    model = single_op_model("Einsum", feeds, {"equation": equation}, opset=13)
    assert_matches_ort(model, feeds, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- pooling
MAX_POOL_CASES = {
    "2d": (13, (1, 2, 6, 6), {"kernel_shape": [2, 2], "strides": [2, 2]}, 1),
    "2d-overlap-pads": (22, (2, 2, 7, 7), {"kernel_shape": [3, 3], "strides": [2, 2],
                                          "pads": [1, 1, 1, 1]}, 1),
    "asymmetric-pads": (13, (1, 2, 6, 7), {"kernel_shape": [3, 2], "pads": [0, 1, 2, 0]}, 1),
    "ceil-mode": (13, (1, 1, 7, 6), {"kernel_shape": [2, 3], "strides": [2, 2],
                                     "ceil_mode": 1}, 1),
    "ceil-mode-drops-window-in-padding": (19, (1, 1, 5, 5), {
        "kernel_shape": [2, 2], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1}, 1),
    "dilations": (13, (1, 2, 8, 8), {"kernel_shape": [2, 2], "dilations": [2, 3],
                                     "pads": [1, 1, 1, 1]}, 1),
    "same-upper": (13, (1, 2, 7, 6), {"kernel_shape": [3, 3], "strides": [2, 2],
                                      "auto_pad": "SAME_UPPER"}, 1),
    "same-lower": (13, (1, 2, 7, 6), {"kernel_shape": [2, 2], "strides": [2, 2],
                                      "auto_pad": "SAME_LOWER"}, 1),
    "valid": (13, (1, 2, 7, 6), {"kernel_shape": [3, 3], "auto_pad": "VALID"}, 1),
    "1d": (13, (2, 3, 9), {"kernel_shape": [3], "strides": [2], "pads": [1, 1]}, 1),
    "3d": (13, (1, 2, 4, 5, 5), {"kernel_shape": [2, 3, 3], "strides": [2, 2, 2],
                                 "pads": [0, 1, 1, 0, 1, 1]}, 1),
    "indices": (13, (2, 3, 6, 7), {"kernel_shape": [3, 3], "strides": [2, 2],
                                   "pads": [1, 1, 1, 0]}, 2),
    "indices-column-major": (13, (2, 2, 6, 5), {"kernel_shape": [2, 2], "strides": [2, 2],
                                                "storage_order": 1}, 2),
    "indices-1d-dilated": (22, (1, 2, 9), {"kernel_shape": [2], "dilations": [2],
                                           "pads": [1, 0]}, 2),
}


@pytest.mark.parametrize("case", MAX_POOL_CASES.values(), ids=MAX_POOL_CASES.keys())
def test_max_pool_matches_onnxruntime(case: tuple) -> None:
    opset, shape, attrs, n_outputs = case
    feeds = {"x": rand(0, *shape)}
    model = single_op_model("MaxPool", feeds, attrs, opset=opset, n_outputs=n_outputs)
    assert_matches_ort(model, feeds)


AVERAGE_POOL_CASES = {
    "2d": (13, (1, 2, 6, 6), {"kernel_shape": [2, 2], "strides": [2, 2]}),
    "pads-exclude": (13, (1, 2, 7, 7), {"kernel_shape": [3, 3], "strides": [2, 2],
                                        "pads": [1, 1, 1, 1]}),
    "pads-include": (22, (1, 2, 7, 7), {"kernel_shape": [3, 3], "strides": [2, 2],
                                        "pads": [1, 1, 1, 1], "count_include_pad": 1}),
    "asymmetric-pads-include": (13, (1, 2, 6, 7), {"kernel_shape": [3, 2],
                                                   "pads": [0, 1, 2, 0],
                                                   "count_include_pad": 1}),
    "asymmetric-pads-exclude": (13, (1, 2, 6, 7), {"kernel_shape": [3, 2],
                                                   "pads": [0, 1, 2, 0]}),
    "ceil-mode-include": (13, (1, 2, 6, 7), {"kernel_shape": [3, 3], "strides": [2, 2],
                                             "pads": [1, 0, 0, 1], "ceil_mode": 1,
                                             "count_include_pad": 1}),
    "ceil-mode-exclude": (19, (1, 2, 6, 7), {"kernel_shape": [3, 3], "strides": [2, 2],
                                             "pads": [1, 0, 0, 1], "ceil_mode": 1}),
    "ceil-mode-drops-window-in-padding": (13, (1, 1, 5, 5), {
        "kernel_shape": [2, 2], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1,
        "count_include_pad": 1}),
    "dilations-include": (19, (1, 2, 7, 7), {"kernel_shape": [2, 2], "dilations": [2, 2],
                                             "pads": [1, 1, 1, 1], "count_include_pad": 1}),
    "dilations-exclude-ceil": (22, (1, 2, 8, 7), {"kernel_shape": [2, 3],
                                                  "dilations": [2, 1], "strides": [2, 2],
                                                  "pads": [1, 1, 1, 1], "ceil_mode": 1}),
    "same-upper-include": (13, (1, 2, 7, 6), {"kernel_shape": [3, 3], "strides": [2, 2],
                                              "auto_pad": "SAME_UPPER",
                                              "count_include_pad": 1}),
    "same-lower-exclude": (13, (1, 2, 7, 6), {"kernel_shape": [2, 2], "strides": [2, 2],
                                              "auto_pad": "SAME_LOWER"}),
    "valid": (13, (1, 2, 7, 6), {"kernel_shape": [3, 2], "auto_pad": "VALID"}),
    "1d": (13, (2, 3, 9), {"kernel_shape": [3], "strides": [2], "pads": [1, 1]}),
    "3d": (13, (1, 2, 4, 5, 5), {"kernel_shape": [2, 3, 3], "strides": [2, 2, 2],
                                 "pads": [0, 1, 1, 0, 1, 1], "count_include_pad": 1}),
}


@pytest.mark.parametrize("case", AVERAGE_POOL_CASES.values(), ids=AVERAGE_POOL_CASES.keys())
def test_average_pool_matches_onnxruntime(case: tuple) -> None:
    opset, shape, attrs = case
    feeds = {"x": rand(0, *shape)}
    assert_matches_ort(single_op_model("AveragePool", feeds, attrs, opset=opset), feeds)


LP_POOL_CASES = {
    "p2": (13, (1, 2, 6, 6), {"kernel_shape": [2, 2], "strides": [2, 2]}),
    "p3-pads": (13, (1, 2, 6, 5), {"kernel_shape": [3, 2], "pads": [1, 0, 1, 1], "p": 3}),
    "p1-dilations": (18, (1, 2, 7, 7), {"kernel_shape": [2, 2], "dilations": [2, 2],
                                        "p": 1}),
    "1d": (22, (2, 3, 9), {"kernel_shape": [3], "strides": [2]}),
}


@pytest.mark.parametrize("case", LP_POOL_CASES.values(), ids=LP_POOL_CASES.keys())
def test_lp_pool_matches_onnxruntime(case: tuple) -> None:
    opset, shape, attrs = case
    feeds = {"x": rand(0, *shape)}
    assert_matches_ort(single_op_model("LpPool", feeds, attrs, opset=opset), feeds)


@pytest.mark.parametrize("op", ["GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"])
@pytest.mark.parametrize("shape", [(2, 3, 5), (2, 3, 4, 5), (1, 2, 3, 3, 2)])
def test_global_pools_match_onnxruntime(op: str, shape: tuple[int, ...]) -> None:
    feeds = {"x": rand(0, *shape)}
    assert_matches_ort(single_op_model(op, feeds, opset=13), feeds)


def test_pooling_gradients_reach_every_window_member() -> None:
    """AveragePool's gradient spreads 1/count over each window (with the ORT divisor)."""
    feeds = {"x": np.zeros((1, 1, 3, 3), np.float32)}
    model = single_op_model("AveragePool", feeds, {"kernel_shape": [2, 2],
                                                   "pads": [1, 1, 0, 0]}, opset=13)
    mirror = Mirror(model, weight_names=[])
    x = torch.zeros(1, 1, 3, 3, requires_grad=True)
    mirror(x)[0].sum().backward()
    # Outputs: the corner window sees one pixel, edge windows two, inner windows four.
    expected = np.array([[1 + 1 / 2 + 1 / 2 + 1 / 4, 1 / 2 + 1 / 4 + 1 / 2 + 1 / 4,
                          1 / 2 + 1 / 4],
                         [1 / 2 + 1 / 4 + 1 / 2 + 1 / 4, 4 / 4, 2 / 4],
                         [1 / 2 + 1 / 4, 2 / 4, 1 / 4]])
    np.testing.assert_allclose(x.grad[0, 0].numpy(), expected, rtol=1e-6)


# ---------------------------------------------------------------------------- second order
def _conv_norm_gemm_model() -> onnx.ModelProto:
    """Conv -> LayerNormalization over channels -> spatial sum (Einsum) -> Gemm."""
    inits = {"conv_w": rand(1, 3, 2, 3, 3), "conv_b": rand(2, 3),
             "ln_scale": 1 + 0.1 * rand(3, 3, 1, 1), "ln_bias": rand(4, 3, 1, 1),
             "fc_w": rand(5, 4, 3), "fc_b": rand(6, 4)}
    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], strides=[2, 2],
                         pads=[1, 1, 1, 1]),
        helper.make_node("LayerNormalization", ["c", "ln_scale", "ln_bias"], ["n"], axis=1),
        helper.make_node("Einsum", ["n"], ["s"], equation="nchw->nc"),
        helper.make_node("Gemm", ["s", "fc_w", "fc_b"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "conv_norm_gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                             ir_version=IR_FOR_OPSET[17])


def test_conv_norm_gemm_chain_matches_onnxruntime() -> None:
    feeds = {"x": rand(0, 2, 2, 5, 5)}
    assert_matches_ort(_conv_norm_gemm_model(), feeds, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_hessian_vector_product_through_conv_norm_gemm() -> None:
    check_hessian_vector_product(_conv_norm_gemm_model(), {"x": rand(0, 2, 2, 5, 5)},
                                 ["conv_w", "fc_w"])


# Every float input made a weight: double backward, finite differences of gradients and
# forward-over-reverse must agree for ops without weights of their own too.
SECOND_ORDER_CASES = {
    "max-pool-ceil-pads": ("MaxPool", [(1, 2, 5, 5)], {
        "kernel_shape": [2, 2], "strides": [2, 2], "pads": [1, 0, 0, 1], "ceil_mode": 1}),
    "average-pool-dilated": ("AveragePool", [(1, 2, 6, 6)], {
        "kernel_shape": [2, 2], "dilations": [2, 1], "pads": [1, 1, 0, 1]}),
    "average-pool-ceil-include": ("AveragePool", [(1, 1, 6, 7)], {
        "kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 0, 0, 1], "ceil_mode": 1,
        "count_include_pad": 1}),
    "lp-pool": ("LpPool", [(1, 2, 5, 5)], {"kernel_shape": [2, 2], "p": 3}),
    "global-max-pool": ("GlobalMaxPool", [(2, 3, 4)], {}),
    "conv-transpose-same": ("ConvTranspose", [(1, 2, 3, 3), (2, 2, 3, 3)], {
        "strides": [2, 2], "auto_pad": "SAME_LOWER"}),
    "einsum": ("Einsum", [(2, 3, 4), (2, 4, 3)], {"equation": "bij,bjk->bik"}),
}


def second_order_check(op: str, shapes: Sequence[tuple[int, ...]], attrs: dict, opset: int,
                       extra: Mapping[str, np.ndarray] | None = None) -> None:
    """Build ``op`` with every float input an initializer and check its HVP."""
    arrays = {f"in{i}": rand(20 + i, *s) for i, s in enumerate(shapes)}
    model = single_op_model(op, {}, attrs, opset=opset,
                            constants={**arrays, **dict(extra or {})})
    check_hessian_vector_product(model, {}, list(arrays))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("case", SECOND_ORDER_CASES.values(), ids=SECOND_ORDER_CASES.keys())
def test_second_order_autograd(case: tuple) -> None:
    op, shapes, attrs = case
    second_order_check(op, shapes, attrs, opset=19)
