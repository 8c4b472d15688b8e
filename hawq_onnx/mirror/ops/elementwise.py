"""Mirror ops: elementwise arithmetic with numpy-style broadcasting.

Integer tensors keep their dtype exactly as onnxruntime does (C-style truncating division,
``Mod`` with or without ``fmod``); float casts follow the mirror's compute dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from hawq_onnx.mirror.dtypes import torch_dtype
from hawq_onnx.mirror.registry import OpContext, OpFunction, register

Unary = Callable[[torch.Tensor], torch.Tensor]
Binary = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _unary(fn: Unary) -> OpFunction:
    """An op function applying ``fn`` to the node's single input."""

    def op(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
        return fn(inputs[0])

    op.__doc__ = f"ONNX op computed by torch.{getattr(fn, '__name__', fn)}."
    return op


def _variadic(fn: Binary) -> OpFunction:
    """An op function folding ``fn`` over any number of broadcasting inputs."""

    def op(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
        return functools.reduce(fn, [t for t in inputs if t is not None])

    return op


_UNARY: dict[str, Unary] = {
    "Sqrt": torch.sqrt,
    "Reciprocal": torch.reciprocal,
    "Neg": torch.neg,
    "Abs": torch.abs,
    "Exp": torch.exp,
    "Log": torch.log,
    "Erf": torch.erf,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Round": torch.round,  # half to even, as ONNX specifies
    "Sign": torch.sign,
    "Sin": torch.sin,
    "Cos": torch.cos,
    "IsNaN": torch.isnan,
}

_VARIADIC: dict[str, Binary] = {
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Sum": torch.add,
    "Max": torch.maximum,
    "Min": torch.minimum,
}

for _name, _fn in _UNARY.items():
    register(_name)(_unary(_fn))
for _name, _fn2 in _VARIADIC.items():
    register(_name)(_variadic(_fn2))


@register("Div")
def div(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    """Integer division truncates toward zero like C (and onnxruntime)."""
    a, b = inputs[0], inputs[1]
    if a.is_floating_point():
        return torch.div(a, b)
    return torch.div(a, b, rounding_mode="trunc")


@register("Mod")
def mod(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    """``fmod=1``: sign of the dividend (C fmod); ``fmod=0``: sign of the divisor."""
    a, b = inputs[0], inputs[1]
    if attrs.get("fmod", 0):
        return torch.fmod(a, b)
    return torch.remainder(a, b)


@register("Pow")
def pow_(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    """The result has the base's dtype whatever the exponent's (ONNX Pow(T, T1) -> T)."""
    base, exponent = inputs[0], inputs[1]
    if base.is_floating_point():
        return torch.pow(base, exponent).to(base.dtype)
    if exponent.is_floating_point():  # onnxruntime: static_cast<T>(std::pow(double, double))
        return torch.pow(base.double(), exponent.double()).to(base.dtype)
    return torch.pow(base, exponent).to(base.dtype)


@register("Mean")
def mean(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    tensors = [t for t in inputs if t is not None]
    return functools.reduce(torch.add, tensors) / len(tensors)


@register("IsInf")
def is_inf(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    x = inputs[0]
    negative, positive = attrs.get("detect_negative", 1), attrs.get("detect_positive", 1)
    if negative and positive:
        return torch.isinf(x)
    if positive:
        return torch.isposinf(x)
    if negative:
        return torch.isneginf(x)
    return torch.zeros_like(x, dtype=torch.bool)


@register("Cast")
def cast(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    """Float targets become the compute dtype so a float64 mirror never drops precision
    (values are not rounded to a narrower float such as float16 either)."""
    return inputs[0].to(ctx.float_dtype(torch_dtype(int(attrs["to"]))))


@register("CastLike")
def cast_like(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    return inputs[0].to(ctx.float_dtype(inputs[1].dtype))


@register("Identity")
def identity(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> Any:
    return inputs[0]


@register("Dropout")
def dropout(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> list[torch.Tensor]:
    """The mirror always runs inference: identity, and an all-true mask (an expanded view,
    so an unused mask costs no memory)."""
    x = inputs[0]
    mask = torch.ones((), dtype=torch.bool, device=x.device).expand(x.shape)
    return [x, mask]
