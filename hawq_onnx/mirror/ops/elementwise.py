"""Mirror ops: elementwise arithmetic with numpy-style broadcasting."""

from __future__ import annotations

import torch

from hawq_onnx.mirror.registry import register


@register("Add")
def add(ctx, inputs, attrs):
    return torch.add(inputs[0], inputs[1])
