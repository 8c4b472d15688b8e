"""Input ranges beyond which an activation function's output no longer changes.

Why: a tensor read only by saturating functions (ReLU, Clip, HardSwish, HardSigmoid) needs
no grid points where those functions are flat. HardSwish maps everything below -3 to 0, so
a Conv output spanning [-12, 9] that feeds only a HardSwish can be quantized on [-3, 9]: the
result after the activation is identical for every value, and the grid is 40 % finer.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import numpy_helper

from hawq_onnx.graph import GraphView


def _attr(node: onnx.NodeProto, name: str, default: float) -> float:
    for attr in node.attribute:
        if attr.name == name:
            return float(attr.f)
    return default


def _constant(view: GraphView, node: onnx.NodeProto, index: int) -> float | None:
    if len(node.input) <= index or not node.input[index]:
        return None
    tensor = view.initializers.get(node.input[index])
    if tensor is None:
        return None
    array = numpy_helper.to_array(tensor)
    return float(array.reshape(-1)[0]) if array.size == 1 else None


def flat_outside(view: GraphView, node: onnx.NodeProto) -> tuple[float, float]:
    """``(low, high)`` outside which ``node``'s output does not depend on input 0;
    ``(-inf, inf)`` for anything that is not a saturating activation."""
    op = node.op_type
    if op == "Relu":
        return 0.0, math.inf
    if op == "HardSwish":
        return -3.0, math.inf
    if op == "HardSigmoid":
        alpha, beta = _attr(node, "alpha", 0.2), _attr(node, "beta", 0.5)
        if alpha > 0:
            return -beta / alpha, (1.0 - beta) / alpha
    if op == "Clip":
        if any(a.name in ("min", "max") for a in node.attribute):  # opset < 11
            return _attr(node, "min", -math.inf), _attr(node, "max", math.inf)
        low, high = _constant(view, node, 1), _constant(view, node, 2)
        no_bound = (len(node.input) <= 1 or not node.input[1], len(node.input) <= 2
                    or not node.input[2])
        if (low is not None or no_bound[0]) and (high is not None or no_bound[1]):
            return (-math.inf if low is None else low), (math.inf if high is None else high)
    return -math.inf, math.inf


def useful_range(view: GraphView, tensor: str) -> tuple[float, float]:
    """The widest input range any reader of ``tensor`` can tell apart (graph outputs and
    non-saturating readers need everything)."""
    if tensor in {o.name for o in view.graph.output}:
        return -math.inf, math.inf
    readers = view.consumers(tensor)
    if not readers:
        return -math.inf, math.inf
    lows, highs = [], []
    for node in readers:
        if not node.input or node.input[0] != tensor or tensor in node.input[1:]:
            return -math.inf, math.inf
        low, high = flat_outside(view, node)
        lows.append(low)
        highs.append(high)
    return float(np.min(lows)), float(np.max(highs))


__all__ = ["flat_outside", "useful_range"]
