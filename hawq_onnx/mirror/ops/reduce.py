"""Mirror ops: reductions, ArgMax/ArgMin, TopK and CumSum.

Reduce* take ``axes`` as an attribute before opset 18 (ReduceSum: 13) and as an optional
input after; each function accepts whichever form the node carries. Integer inputs keep their
dtype (torch would widen sums and products to int64; onnxruntime does not).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hawq_onnx.mirror.registry import OpContext, OpFunction, ints, register

# fn(x, dims, keepdim) with dims a non-empty list of non-negative axes, or [] for a 0-d x.
Reducer = Callable[[torch.Tensor, list[int], bool], torch.Tensor]


def _reduce_dims(x: torch.Tensor, inputs: list[Any], attrs: dict[str, Any]) -> list[int] | None:
    """The axes to reduce, normalized and sorted; None when no axis is reduced
    (empty axes with ``noop_with_empty_axes``)."""
    given = inputs[1] if len(inputs) > 1 and inputs[1] is not None else attrs.get("axes")
    axes = ints(given)
    if not axes:
        return None if attrs.get("noop_with_empty_axes", 0) else list(range(x.dim()))
    return sorted({a + x.dim() if a < 0 else a for a in axes})


def _reduction(fn: Reducer) -> OpFunction:
    """An op function running ``fn`` over the node's axes with its ``keepdims``."""

    def op(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
        x = inputs[0]
        dims = _reduce_dims(x, inputs, attrs)
        if dims is None:  # reduce each element alone: onnxruntime still maps |x|, x*x, log x
            return fn(x.unsqueeze(0), [0], False)
        return fn(x, dims, bool(attrs.get("keepdims", 1)))

    return op


def _float_only(fn: Reducer) -> Reducer:
    """Integer inputs are reduced in float64 and truncated back, as onnxruntime casts."""

    def wrapped(x: torch.Tensor, dims: list[int], keep: bool) -> torch.Tensor:
        if x.is_floating_point():
            return fn(x, dims, keep)
        return fn(x.double(), dims, keep).to(x.dtype)

    return wrapped


def _sum(x: torch.Tensor, dims: list[int], keep: bool) -> torch.Tensor:
    return torch.sum(x, dims, keepdim=keep, dtype=x.dtype)


def _mean(x: torch.Tensor, dims: list[int], keep: bool) -> torch.Tensor:
    if x.is_floating_point():
        return torch.mean(x, dims, keepdim=keep)
    count = 1
    for d in dims:
        count *= x.shape[d]
    return torch.div(_sum(x, dims, keep), count, rounding_mode="trunc")


def _prod(x: torch.Tensor, dims: list[int], keep: bool) -> torch.Tensor:
    """torch.prod reduces one axis at a time; go from the last so indices stay valid."""
    for d in reversed(dims):
        x = torch.prod(x, d, keepdim=keep, dtype=x.dtype)
    return x


def _l2(x: torch.Tensor, dims: list[int], keep: bool) -> torch.Tensor:
    """vector_norm's backward is 0 (not NaN) where the norm is 0."""
    return torch.linalg.vector_norm(x, 2, dims, keepdim=keep)


_REDUCERS: dict[str, Reducer] = {
    "ReduceSum": _sum,
    "ReduceMean": _mean,
    "ReduceMax": lambda x, dims, keep: torch.amax(x, dims, keepdim=keep),
    "ReduceMin": lambda x, dims, keep: torch.amin(x, dims, keepdim=keep),
    "ReduceProd": _prod,
    "ReduceL1": lambda x, dims, keep: _sum(torch.abs(x), dims, keep),
    "ReduceL2": _float_only(_l2),
    "ReduceSumSquare": lambda x, dims, keep: _sum(x * x, dims, keep),
    "ReduceLogSum": _float_only(lambda x, dims, keep: torch.log(_sum(x, dims, keep))),
    "ReduceLogSumExp": _float_only(
        lambda x, dims, keep: torch.logsumexp(x, dims, keepdim=keep)),
}

for _name, _fn in _REDUCERS.items():
    register(_name)(_reduction(_fn))


def _arg_extreme(fn: Callable[..., torch.Tensor]) -> OpFunction:
    """ArgMax/ArgMin: first index of the extreme value, or the last with
    ``select_last_index`` (found by searching the flipped axis)."""

    def op(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
        x = inputs[0]
        axis = int(attrs.get("axis", 0))
        keep = bool(attrs.get("keepdims", 1))
        if not attrs.get("select_last_index", 0):
            return fn(x, dim=axis, keepdim=keep)
        flipped = fn(torch.flip(x, [axis]), dim=axis, keepdim=keep)
        return x.shape[axis] - 1 - flipped

    return op


register("ArgMax")(_arg_extreme(torch.argmax))
register("ArgMin")(_arg_extreme(torch.argmin))


@register("TopK")
def top_k(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> list[torch.Tensor]:
    """Always sorted (allowed for ``sorted=0``); ties go to the lower index like onnxruntime,
    which a stable sort guarantees and torch.topk does not."""
    x = inputs[0]
    k = ints(inputs[1])[0] if len(inputs) > 1 and inputs[1] is not None else int(attrs["k"])
    axis = int(attrs.get("axis", -1))
    largest = bool(attrs.get("largest", 1))
    order = torch.sort(x, dim=axis, descending=largest, stable=True).indices
    indices = order.narrow(axis, 0, k)
    return [torch.gather(x, axis, indices), indices]


@register("CumSum")
def cum_sum(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    """``exclusive`` shifts the running sum by one (not ``cumsum - x``, which would round
    differently); ``reverse`` sums from the end."""
    x = inputs[0]
    axis = ints(inputs[1])[0]
    reverse = bool(attrs.get("reverse", 0))
    y = torch.flip(x, [axis]) if reverse else x
    total = torch.cumsum(y, axis, dtype=x.dtype)
    if attrs.get("exclusive", 0) and x.shape[axis] > 0:
        zero = torch.zeros_like(total.narrow(axis, 0, 1))
        total = torch.cat([zero, total.narrow(axis, 0, x.shape[axis] - 1)], dim=axis)
    return torch.flip(total, [axis]) if reverse else total
