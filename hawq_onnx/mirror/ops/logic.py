"""Mirror ops: comparisons, boolean logic and Where (all broadcasting, bool outputs)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hawq_onnx.mirror.registry import OpContext, OpFunction, register

Binary = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _binary(fn: Binary) -> OpFunction:
    """An op function applying ``fn`` to the node's two inputs."""

    def op(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
        return fn(inputs[0], inputs[1])

    return op


_BINARY: dict[str, Binary] = {
    "Equal": torch.eq,
    "Less": torch.lt,
    "Greater": torch.gt,
    "LessOrEqual": torch.le,
    "GreaterOrEqual": torch.ge,
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "Xor": torch.logical_xor,
}

for _name, _fn in _BINARY.items():
    register(_name)(_binary(_fn))


@register("Not")
def not_(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    return torch.logical_not(inputs[0])


@register("Where")
def where(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    """Gradients flow to X and Y only where each is selected."""
    return torch.where(inputs[0].bool(), inputs[1], inputs[2])
