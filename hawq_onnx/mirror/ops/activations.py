"""Mirror ops: activation functions.

Piecewise ops are written with ``clamp``/``where`` and smooth ones with composable torch
functions, so first and second derivatives exist (Hessians run through every activation).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from hawq_onnx.mirror.registry import OpContext, register


@register("Relu")
def relu(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    return torch.relu(inputs[0])


@register("Tanh")
def tanh(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    return torch.tanh(inputs[0])


@register("Sigmoid")
def sigmoid(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    return torch.sigmoid(inputs[0])


@register("LeakyRelu")
def leaky_relu(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    return F.leaky_relu(inputs[0], float(attrs.get("alpha", 0.01)))


@register("PRelu")
def prelu(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    """Slope broadcasts numpy-style against X (F.prelu only knows per-channel slopes)."""
    x, slope = inputs[0], inputs[1]
    return torch.where(x < 0, x * slope, x)


@register("Elu")
def elu(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    return F.elu(inputs[0], float(attrs.get("alpha", 1.0)))


@register("Selu")
def selu(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    alpha = float(attrs.get("alpha", 1.67326319217681884765625))
    gamma = float(attrs.get("gamma", 1.05070102214813232421875))
    return gamma * F.elu(inputs[0], alpha)


@register("Celu")
def celu(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    return F.celu(inputs[0], float(attrs.get("alpha", 1.0)))


@register("ThresholdedRelu")
def thresholded_relu(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    x = inputs[0]
    return torch.where(x > float(attrs.get("alpha", 1.0)), x, torch.zeros_like(x))


@register("Clip")
def clip(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    """Bounds are attributes before opset 11 and optional inputs from 11 on."""
    x = inputs[0]
    if ctx.opset < 11:
        low, high = attrs.get("min"), attrs.get("max")
    else:
        low = inputs[1] if len(inputs) > 1 else None
        high = inputs[2] if len(inputs) > 2 else None
    if low is None and high is None:
        return x
    return torch.clamp(x, min=low, max=high)


@register("HardSigmoid")
def hard_sigmoid(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    alpha, beta = float(attrs.get("alpha", 0.2)), float(attrs.get("beta", 0.5))
    return torch.clamp(alpha * inputs[0] + beta, 0.0, 1.0)


@register("HardSwish")
def hard_swish(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    x = inputs[0]
    return x * torch.clamp(x / 6.0 + 0.5, 0.0, 1.0)


@register("Softplus")
def softplus(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    return F.softplus(inputs[0])


@register("Softsign")
def softsign(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    x = inputs[0]
    return x / (1.0 + torch.abs(x))


@register("Mish")
def mish(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    x = inputs[0]
    return x * torch.tanh(F.softplus(x))


@register("Gelu")
def gelu(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    return F.gelu(inputs[0], approximate=str(attrs.get("approximate", "none")))


def _softmax_family(ctx: OpContext, x: torch.Tensor, attrs: dict[str, Any],
                    fn: Callable[..., torch.Tensor]) -> torch.Tensor:
    """Opset >= 13: plain ``axis`` (default -1). Before 13: X is coerced to 2-D at ``axis``
    (default 1) and normalized over everything from ``axis`` on."""
    if ctx.opset >= 13:
        return fn(x, dim=int(attrs.get("axis", -1)))
    axis = int(attrs.get("axis", 1))
    axis = axis + x.dim() if axis < 0 else axis
    rows = math.prod(x.shape[:axis])
    flat = x.reshape(rows, math.prod(x.shape[axis:]))
    return fn(flat, dim=1).reshape(x.shape)


@register("Softmax")
def softmax(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    return _softmax_family(ctx, inputs[0], attrs, torch.softmax)


@register("LogSoftmax")
def log_softmax(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    return _softmax_family(ctx, inputs[0], attrs, torch.log_softmax)
