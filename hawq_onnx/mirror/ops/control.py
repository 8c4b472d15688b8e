"""Mirror ops: control flow.

``If`` picks its branch from the concrete condition at run time; the Mirror refuses, at
construction, conditions that depend on input data (see :mod:`hawq_onnx.mirror.static`), so
the branch taken is the same for every sample fed through one graph.
"""

from __future__ import annotations

from typing import Any

import torch

from hawq_onnx.mirror.registry import OpContext, register


@register("If")
def if_(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> list[torch.Tensor]:
    cond = inputs[0]
    if cond.numel() != 1:
        raise ValueError(f"If condition must hold one element, got shape {tuple(cond.shape)}")
    branch = attrs["then_branch"] if bool(cond.reshape(())) else attrs["else_branch"]
    assert ctx.run_subgraph is not None, "If needs a subgraph runner"
    return ctx.run_subgraph(branch)
