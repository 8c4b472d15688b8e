"""Mirror ops: normalization layers (inference semantics).

Statistics are written out as explicit mean / variance arithmetic rather than calling
``F.batch_norm`` and friends, so every op is plain differentiable algebra (double backward and
forward-mode AD work on any device) and the Mean / InvStdDev outputs come for free.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from hawq_onnx.mirror.registry import OpContext, register

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _channel_shape(x: torch.Tensor) -> list[int]:
    """Shape that broadcasts a per-channel [C] vector against an [N, C, ...] tensor."""
    return [1, -1] + [1] * (x.dim() - 2)


def _moments(x: torch.Tensor, dims: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance over ``dims`` (kept as size-1 dims)."""
    dims = tuple(dims)
    mean = x.mean(dim=dims, keepdim=True)
    centred = x - mean
    return mean, (centred * centred).mean(dim=dims, keepdim=True)


def _stash(x: torch.Tensor) -> torch.Tensor:
    """Half-precision inputs are normalized in float32, as ONNX's stash_type=1 asks."""
    return x.float() if x.dtype in _LOW_PRECISION else x


@register("BatchNormalization")
def batch_normalization(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> Any:
    if int(attrs.get("training_mode", 0)):
        raise NotImplementedError(
            "BatchNormalization with training_mode=1 is not supported (the mirror runs "
            "models in inference mode; export the model in eval mode)")
    x, scale, bias, mean, var = inputs[:5]
    shape = _channel_shape(x)
    inv_std = torch.rsqrt(var + float(attrs.get("epsilon", 1e-5)))
    return (x - mean.reshape(shape)) * (scale * inv_std).reshape(shape) + bias.reshape(shape)


@register("InstanceNormalization")
def instance_normalization(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> Any:
    x, scale, bias = inputs[:3]
    mean, var = _moments(x, range(2, x.dim()))
    y = (x - mean) * torch.rsqrt(var + float(attrs.get("epsilon", 1e-5)))
    shape = _channel_shape(x)
    return y * scale.reshape(shape) + bias.reshape(shape)


@register("LayerNormalization")
def layer_normalization(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> Any:
    """Returns Y, Mean and InvStdDev (the optional outputs cost nothing extra)."""
    x, scale = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    axis = int(attrs.get("axis", -1)) % x.dim()
    work = _stash(x)
    mean, var = _moments(work, range(axis, x.dim()))
    inv_std = torch.rsqrt(var + float(attrs.get("epsilon", 1e-5)))
    y = ((work - mean) * inv_std).to(x.dtype) * scale
    if bias is not None:
        y = y + bias
    return y, mean, inv_std


@register("GroupNormalization")
def group_normalization(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> Any:
    """Opset 18 scales/shifts per group, opset 21 per channel. The scale's size tells which
    (when G == C both readings agree), so either form works under either opset."""
    x, scale, bias = inputs[:3]
    groups = int(attrs["num_groups"])
    work = _stash(x)
    grouped = work.reshape(x.shape[0], groups, -1)
    mean, var = _moments(grouped, [2])
    y = ((grouped - mean) * torch.rsqrt(var + float(attrs.get("epsilon", 1e-5))))
    if scale.numel() == groups:
        y = y * scale.reshape(1, groups, 1) + bias.reshape(1, groups, 1)
        return y.reshape(x.shape).to(x.dtype)
    y = y.reshape(x.shape).to(x.dtype)
    shape = _channel_shape(x)
    return y * scale.reshape(shape) + bias.reshape(shape)


@register("LpNormalization")
def lp_normalization(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> Any:
    """x / ||x||_p along ``axis``; an all-zero slice stays zero (as in onnxruntime)."""
    x = inputs[0]
    axis, p = int(attrs.get("axis", -1)), int(attrs.get("p", 2))
    if p not in (1, 2):
        raise ValueError(f"LpNormalization supports p=1 or p=2, not p={p}")
    if p == 1:
        norm = x.abs().sum(dim=axis, keepdim=True)
    else:
        squares = (x * x).sum(dim=axis, keepdim=True)
        # sqrt'(0) is infinite: take the root of one where the slice is all zero.
        norm = torch.sqrt(torch.where(squares > 0, squares, torch.ones_like(squares)))
    return x / torch.where(norm > 0, norm, torch.ones_like(norm))


@register("MeanVarianceNormalization")
def mean_variance_normalization(ctx: OpContext, inputs: list[Any],
                                attrs: dict[str, Any]) -> Any:
    """(x - E[x]) / (sqrt(Var[x]) + 1e-9), the ONNX function body's epsilon."""
    x = inputs[0]
    axes = [int(a) % x.dim() for a in attrs.get("axes", [0, 2, 3])]
    mean, var = _moments(x, axes)
    return (x - mean) / (torch.sqrt(var) + 1e-9)


@register("LRN")
def local_response_normalization(ctx: OpContext, inputs: list[Any],
                                 attrs: dict[str, Any]) -> Any:
    """Across-channel LRN (classic AlexNet/GoogLeNet exports); the window is
    [c - floor((size-1)/2), c + ceil((size-1)/2)] as the ONNX spec defines it."""
    x = inputs[0]
    size = int(attrs["size"])
    alpha, beta, bias = attrs.get("alpha", 1e-4), attrs.get("beta", 0.75), attrs.get("bias", 1.0)
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2
    squares = (x * x).unsqueeze(1)  # N, 1, C, spatial...
    pad = [0, 0] * (x.dim() - 2) + [before, after]
    window = torch.nn.functional.pad(squares, pad).unfold(2, size, 1).sum(-1).squeeze(1)
    return x / (bias + alpha / size * window) ** beta
