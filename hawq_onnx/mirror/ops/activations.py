"""Mirror ops: activation functions."""

from __future__ import annotations

import torch

from hawq_onnx.mirror.registry import register


@register("Relu")
def relu(ctx, inputs, attrs):
    return torch.relu(inputs[0])
