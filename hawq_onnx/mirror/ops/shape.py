"""Mirror ops: shape and data-movement ops (reshape, slice, gather, pad, resize, ...).

Integer shape/axes/index tensors are read as Python ints with :func:`registry.ints`; float
data only ever flows through differentiable, out-of-place torch ops so gradients (and
gradients of gradients) reach every input that carries them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from hawq_onnx.mirror.dtypes import to_torch, torch_dtype
from hawq_onnx.mirror.registry import OpContext, ints, register

Inputs = list[Any]
Attrs = dict[str, Any]


# ---------------------------------------------------------------------------------- helpers
def _opt(inputs: Inputs, index: int) -> Any:
    """The optional input at ``index``, or None when omitted or absent."""
    return inputs[index] if index < len(inputs) else None


def _axis(axis: int, rank: int) -> int:
    """An ONNX axis (negative counts from the end) as a non-negative index."""
    if not -rank <= axis < max(rank, 1):
        raise ValueError(f"axis {axis} out of range for rank {rank}")
    return axis + rank if axis < 0 else axis


def _axes_from(inputs: Inputs, attrs: Attrs, index: int) -> list[int] | None:
    """Axes given as an input (newer opsets) or as the ``axes`` attribute (older ones)."""
    tensor = _opt(inputs, index)
    if tensor is not None:
        return ints(tensor)
    if "axes" in attrs:
        return [int(a) for a in attrs["axes"]]
    return None


def _tensor_from_array(ctx: OpContext, array: np.ndarray) -> torch.Tensor:
    """An attribute array as a tensor on the mirror's device; floats in its compute dtype."""
    tensor = to_torch(np.asarray(array)).to(ctx.device)
    return tensor.to(ctx.dtype) if tensor.is_floating_point() else tensor


def _long(indices: torch.Tensor, dim: int) -> torch.Tensor:
    """Integer indices as int64 with negative entries wrapped (ONNX counts from the end)."""
    indices = indices.to(torch.int64)
    return torch.where(indices < 0, indices + dim, indices)


def _shape_tensor(values: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.int64, device=device)


# ---------------------------------------------------------------------------------- constants
@register("Constant")
def constant(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    if "value" in attrs:
        return _tensor_from_array(ctx, attrs["value"])
    if "value_float" in attrs:
        return torch.tensor(float(attrs["value_float"]), dtype=ctx.dtype, device=ctx.device)
    if "value_floats" in attrs:
        return torch.tensor(list(attrs["value_floats"]), dtype=ctx.dtype, device=ctx.device)
    if "value_int" in attrs:
        return torch.tensor(int(attrs["value_int"]), dtype=torch.int64, device=ctx.device)
    if "value_ints" in attrs:
        return _shape_tensor(attrs["value_ints"], ctx.device)
    raise NotImplementedError(f"Constant with attribute(s) {sorted(attrs)} is not supported")


@register("ConstantOfShape")
def constant_of_shape(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    shape = ints(inputs[0])
    if "value" in attrs:
        value = _tensor_from_array(ctx, attrs["value"]).reshape(())
    else:
        value = torch.zeros((), dtype=ctx.dtype, device=ctx.device)
    return value.expand(shape).clone()


@register("EyeLike")
def eye_like(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    rows, cols = x.shape
    dtype = torch_dtype(attrs["dtype"]) if "dtype" in attrs else x.dtype
    dtype = ctx.float_dtype(dtype)
    r = torch.arange(rows, device=x.device).unsqueeze(1)
    c = torch.arange(cols, device=x.device).unsqueeze(0)
    return (c - r == int(attrs.get("k", 0))).to(dtype)


@register("Range")
def range_(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    """start + i * delta; the count is shape information, the values stay differentiable."""
    start, limit, delta = (t.reshape(()) for t in inputs[:3])
    if not start.is_floating_point():
        return torch.arange(int(start), int(limit), int(delta), dtype=start.dtype,
                            device=start.device)
    span = ((limit - start).detach().double() / delta.detach().double()).ceil()
    count = max(int(span), 0)
    steps = torch.arange(count, dtype=start.dtype, device=start.device)
    return start + steps * delta


# ---------------------------------------------------------------------------------- shapes
@register("Shape")
def shape(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    dims = list(inputs[0].shape)
    start = int(attrs.get("start", 0))
    end = attrs.get("end")
    return _shape_tensor(dims[start:None if end is None else int(end)], inputs[0].device)


@register("Size")
def size(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    return torch.tensor(inputs[0].numel(), dtype=torch.int64, device=inputs[0].device)


@register("Flatten")
def flatten(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    axis = int(attrs.get("axis", 1))
    axis = axis + x.dim() if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@register("Reshape")
def reshape(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x, target = inputs[0], ints(inputs[1])
    if not int(attrs.get("allowzero", 0)):
        target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return x.reshape(target)


@register("Transpose")
def transpose(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    perm = attrs.get("perm") or list(reversed(range(x.dim())))
    return x.permute(*[int(p) for p in perm])


@register("Squeeze")
def squeeze(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    axes = _axes_from(inputs, attrs, 1)
    if axes is None:
        return x.squeeze()
    dims = sorted({_axis(a, x.dim()) for a in axes})
    bad = [d for d in dims if x.shape[d] != 1]
    if bad:
        raise ValueError(f"cannot squeeze axes {bad} of shape {tuple(x.shape)}")
    return x.reshape([n for i, n in enumerate(x.shape) if i not in dims])


@register("Unsqueeze")
def unsqueeze(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    axes = _axes_from(inputs, attrs, 1) or []
    rank = x.dim() + len(axes)
    dims = {_axis(a, rank) for a in axes}
    rest = iter(x.shape)
    return x.reshape([1 if i in dims else next(rest) for i in range(rank)])


@register("Expand")
def expand(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    out = torch.broadcast_shapes(tuple(x.shape), tuple(ints(inputs[1])))
    return x.expand(out)


@register("Tile")
def tile(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    return inputs[0].repeat(ints(inputs[1]))


# ---------------------------------------------------------------------------------- join/split
@register("Concat")
def concat(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    parts = [t for t in inputs if t is not None]
    axis = _axis(int(attrs["axis"]), parts[0].dim())
    return torch.cat(parts, dim=axis)


def _split_sizes(ctx: OpContext, inputs: Inputs, attrs: Attrs, length: int) -> list[int]:
    """Split sizes from the ``split`` input (13+) or attribute (<13), ``num_outputs`` (18+),
    or an equal split into the node's outputs."""
    given = _opt(inputs, 1)
    if given is not None and given.numel() > 0:
        return ints(given)
    if attrs.get("split"):
        return [int(s) for s in attrs["split"]]
    parts = int(attrs.get("num_outputs", ctx.n_outputs))
    chunk = -(-length // parts)
    if "num_outputs" in attrs:  # the last chunk is smaller when it does not divide
        return [chunk] * (parts - 1) + [length - chunk * (parts - 1)]
    if length % parts:
        raise ValueError(f"cannot split length {length} into {parts} equal parts")
    return [length // parts] * parts


@register("Split")
def split(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> list[torch.Tensor]:
    x = inputs[0]
    axis = _axis(int(attrs.get("axis", 0)), x.dim())
    sizes = _split_sizes(ctx, inputs, attrs, x.shape[axis])
    return list(torch.split(x, sizes, dim=axis))


# ---------------------------------------------------------------------------------- slicing
def _slice_range(start: int, end: int, step: int, dim: int) -> range:
    """ONNX Slice clamping (negative starts/ends count from the end, INT64 bounds clamp)."""
    if step == 0:
        raise ValueError("Slice step must not be 0")
    start = start + dim if start < 0 else start
    end = end + dim if end < 0 else end
    if step > 0:
        return range(min(max(start, 0), dim), min(max(end, 0), dim), step)
    return range(min(max(start, 0), dim - 1), min(max(end, -1), dim - 1), step)


def _take_range(x: torch.Tensor, axis: int, span: range) -> torch.Tensor:
    if span.step > 0:
        index = [slice(None)] * axis + [slice(span.start, span.stop, span.step)]
        return x[tuple(index)]
    indices = torch.tensor(list(span), dtype=torch.int64, device=x.device)
    return torch.index_select(x, axis, indices)


@register("Slice")
def slice_(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    if ctx.opset < 10:
        starts, ends = list(attrs["starts"]), list(attrs["ends"])
        axes = list(attrs.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = ints(inputs[1]), ints(inputs[2])
        axes_t, steps_t = _opt(inputs, 3), _opt(inputs, 4)
        axes = ints(axes_t) if axes_t is not None else list(range(len(starts)))
        steps = ints(steps_t) if steps_t is not None else [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        dim = _axis(int(axis), x.dim())
        x = _take_range(x, dim, _slice_range(int(start), int(end), int(step), x.shape[dim]))
    return x


# ---------------------------------------------------------------------------------- gather
@register("Gather")
def gather(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x, indices = inputs[0], inputs[1]
    axis = _axis(int(attrs.get("axis", 0)), x.dim())
    flat = _long(indices, x.shape[axis]).reshape(-1)
    picked = torch.index_select(x, axis, flat)
    return picked.reshape(x.shape[:axis] + indices.shape + x.shape[axis + 1:])


@register("GatherElements")
def gather_elements(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x, indices = inputs[0], inputs[1]
    axis = _axis(int(attrs.get("axis", 0)), x.dim())
    return torch.gather(x, axis, _long(indices, x.shape[axis]))


def _nd_linear_index(indices: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """Row-major linear positions of the index tuples in the last axis of ``indices``."""
    linear = torch.zeros(indices.shape[:-1], dtype=torch.int64, device=indices.device)
    for j, dim in enumerate(dims):
        linear = linear * dim + _long(indices[..., j], dim)
    return linear


@register("GatherND")
def gather_nd(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x, indices = inputs[0], inputs[1]
    b = int(attrs.get("batch_dims", 0))
    k = indices.shape[-1]
    batch, lead, rest = x.shape[:b], x.shape[b:b + k], x.shape[b + k:]
    n_batch = math.prod(batch)
    table = x.reshape(n_batch, math.prod(lead), *rest)
    linear = _nd_linear_index(indices, lead).reshape(n_batch, -1)
    rows = torch.arange(n_batch, device=x.device).unsqueeze(1)
    picked = table[rows, linear]
    return picked.reshape(*indices.shape[:-1], *rest)


_SCATTER_REDUCE = {"mul": "prod", "max": "amax", "min": "amin"}


@register("ScatterND")
def scatter_nd(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    data, indices, updates = inputs[:3]
    k = indices.shape[-1]
    lead, rest = data.shape[:k], data.shape[k:]
    table = data.reshape(math.prod(lead), *rest)
    linear = _nd_linear_index(indices, lead).reshape(-1)
    values = updates.reshape(linear.shape[0], *rest)
    reduction = attrs.get("reduction", "none")
    if reduction in ("none", "add"):
        out = table.index_put((linear,), values, accumulate=reduction == "add")
    else:
        index = linear.reshape(-1, *[1] * len(rest)).expand(values.shape)
        out = table.scatter_reduce(0, index, values, _SCATTER_REDUCE[reduction])
    return out.reshape(data.shape)


@register("ScatterElements")
def scatter_elements(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    data, indices, updates = inputs[:3]
    axis = _axis(int(attrs.get("axis", 0)), data.dim())
    index = _long(indices, data.shape[axis])
    reduction = attrs.get("reduction", "none")
    if reduction == "none":
        return torch.scatter(data, axis, index, updates)
    if reduction == "add":
        return torch.scatter_add(data, axis, index, updates)
    return torch.scatter_reduce(data, axis, index, updates, _SCATTER_REDUCE[reduction])


@register("NonZero")
def non_zero(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    return torch.nonzero(x.reshape(1) if x.dim() == 0 else x).T.contiguous()


@register("Trilu")
def trilu(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x, k_t = inputs[0], _opt(inputs, 1)
    k = ints(k_t)[0] if k_t is not None else 0
    return torch.triu(x, k) if int(attrs.get("upper", 1)) else torch.tril(x, k)


@register("OneHot")
def one_hot(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    indices, depth_t, values = inputs[:3]
    depth = ints(depth_t)[0]
    axis = _axis(int(attrs.get("axis", -1)), indices.dim() + 1)
    idx = indices.to(torch.int64) if not indices.is_floating_point() else indices.long()
    idx = torch.where(idx < 0, idx + depth, idx).unsqueeze(axis)
    shape = [1] * (indices.dim() + 1)
    shape[axis] = depth
    classes = torch.arange(depth, device=indices.device).reshape(shape)
    off, on = values.reshape(-1)[0], values.reshape(-1)[1]
    return torch.where(idx == classes, on, off)


# ---------------------------------------------------------------------------------- blocks
@register("DepthToSpace")
def depth_to_space(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    bs = int(attrs["blocksize"])
    n, c, h, w = x.shape
    c_out = c // (bs * bs)
    if attrs.get("mode", "DCR") == "CRD":
        y = x.reshape(n, c_out, bs, bs, h, w).permute(0, 1, 4, 2, 5, 3)
    else:
        y = x.reshape(n, bs, bs, c_out, h, w).permute(0, 3, 4, 1, 5, 2)
    return y.reshape(n, c_out, h * bs, w * bs)


@register("SpaceToDepth")
def space_to_depth(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    bs = int(attrs["blocksize"])
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // bs, bs, w // bs, bs).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * bs * bs, h // bs, w // bs)


# ---------------------------------------------------------------------------------- pad
def _pad_index(size: int, before: int, after: int, mode: str) -> list[int]:
    """Source positions of a padded axis for the index-based modes."""
    positions = range(-before, size + after)
    if mode == "edge":
        return [min(max(p, 0), size - 1) for p in positions]
    if mode == "wrap":
        return [p % size for p in positions]
    if size == 1:
        return [0 for _ in positions]
    period = 2 * (size - 1)
    folded = [p % period for p in positions]
    return [period - q if q >= size else q for q in folded]


def _pad_axis(x: torch.Tensor, axis: int, before: int, after: int, mode: str,
              value: torch.Tensor) -> torch.Tensor:
    """Pad (or, for negative amounts, crop) one axis."""
    size = x.shape[axis]
    x = x.narrow(axis, max(-before, 0), size - max(-before, 0) - max(-after, 0))
    before, after = max(before, 0), max(after, 0)
    if before == 0 and after == 0:
        return x
    if mode == "constant":
        def block(n: int) -> torch.Tensor:
            shape = list(x.shape)
            shape[axis] = n
            return value.expand(shape)
        return torch.cat([block(before), x, block(after)], dim=axis)
    index = torch.tensor(_pad_index(x.shape[axis], before, after, mode), dtype=torch.int64,
                         device=x.device)
    return torch.index_select(x, axis, index)


@register("Pad")
def pad(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    mode = attrs.get("mode", "constant")
    if ctx.opset < 11:
        pads, value = list(attrs["pads"]), torch.tensor(float(attrs.get("value", 0.0)))
        axes = list(range(x.dim()))
    else:
        pads = ints(inputs[1])
        given = _opt(inputs, 2)
        value = given if given is not None and given.numel() else torch.zeros(())
        axes_t = _opt(inputs, 3)
        axes = [_axis(a, x.dim()) for a in ints(axes_t)] if axes_t is not None else list(
            range(x.dim()))
    value = value.reshape(()).to(device=x.device, dtype=x.dtype)
    n = len(axes)
    for i, axis in enumerate(axes):
        x = _pad_axis(x, axis, int(pads[i]), int(pads[i + n]), mode, value)
    return x


# ---------------------------------------------------------------------------------- resize
@dataclass
class _AxisPlan:
    """One axis of a separable resize: each output position reads ``index`` taps of the
    input, blends them with ``weight`` (None: take the single tap as is) and, where
    ``outside`` is set, is replaced by the extrapolation value."""

    index: np.ndarray
    weight: np.ndarray | None
    outside: np.ndarray | None


@dataclass
class _ResizeSpec:
    mode: str
    coordinate: str
    nearest: str
    cubic_a: float
    exclude_outside: bool
    extrapolation: float
    antialias: bool
    fixed_point: bool = False  # 8-bit antialias: onnxruntime's 22-bit integer weights


_F32 = np.float32


def _source_coordinates(spec: _ResizeSpec, n_in: int, n_out: int, scale: float,
                        roi: tuple[float, float]) -> np.ndarray:
    """Output positions mapped to input coordinates, in float32 like onnxruntime."""
    i = np.arange(n_out, dtype=_F32)
    s, length_in, length_out = _F32(scale), _F32(n_in), _F32(n_out)
    mode = spec.coordinate
    if mode == "asymmetric":
        return i / s
    if mode == "half_pixel":
        return (i + _F32(0.5)) / s - _F32(0.5)
    if mode == "pytorch_half_pixel":
        return (i + _F32(0.5)) / s - _F32(0.5) if n_out > 1 else np.zeros(n_out, _F32)
    if mode == "tf_half_pixel_for_nn":
        return (i + _F32(0.5)) / s
    if mode == "align_corners":
        return i * (length_in - 1) / (length_out - 1) if n_out > 1 else np.zeros(n_out, _F32)
    if mode == "half_pixel_symmetric":  # onnxruntime finishes this one in double
        adjustment = length_out / (s * length_in)
        offset = length_in / 2 * (_F32(1) - adjustment)
        return (float(offset) + (i.astype(np.float64) + 0.5) / float(s) - 0.5).astype(_F32)
    if mode == "tf_crop_and_resize":
        start, end = _F32(roi[0]), _F32(roi[1])
        if n_out > 1:
            return start * (length_in - 1) + i * (end - start) * (length_in - 1) / (
                length_out - 1)
        return np.full(n_out, 0.5 * float(start + end) * float(length_in - 1), _F32)
    raise NotImplementedError(f"coordinate_transformation_mode {mode!r} is not supported")


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """C's std::round (numpy rounds halves to even)."""
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def _nearest_index(x: np.ndarray, mode: str, downsampling: bool) -> np.ndarray:
    if mode == "round_prefer_floor":
        tie = x == np.trunc(x) + _F32(0.5)
        return np.where(tie, np.floor(x), _round_half_away(x))
    if mode == "round_prefer_ceil":
        return _round_half_away(x)
    if mode == "floor":
        return np.floor(x)
    if mode == "ceil":
        return np.ceil(x)
    if mode == "simple":  # opset < 11 behaviour in onnxruntime
        return np.ceil(x) if downsampling else np.trunc(x)
    raise NotImplementedError(f"nearest_mode {mode!r} is not supported")


def _cubic_weights(frac: np.ndarray, a: float) -> np.ndarray:
    """Keys cubic kernel at distances (1+s, s, 1-s, 2-s) for taps floor(x)-1 .. floor(x)+2."""
    a = _F32(a)
    s = frac.astype(_F32)
    far = lambda t: ((a * t - 5 * a) * t + 8 * a) * t - 4 * a  # noqa: E731
    near = lambda t: ((a + 2) * t - (a + 3)) * t * t + 1  # noqa: E731
    return np.stack([far(s + 1), near(s), near(1 - s), far(2 - s)], axis=1)


def _plan_axis(spec: _ResizeSpec, n_in: int, n_out: int, scale: float,
               roi: tuple[float, float]) -> _AxisPlan:
    x = _source_coordinates(spec, n_in, n_out, scale, roi)
    outside = None
    if spec.coordinate == "tf_crop_and_resize":
        outside = (x < 0) | (x > n_in - 1)
    if spec.mode == "nearest":
        index = _nearest_index(x, spec.nearest, scale < 1).astype(np.int64)
        return _AxisPlan(np.clip(index, 0, n_in - 1)[:, None], None, outside)
    if spec.mode == "linear":
        x = np.clip(x, 0, n_in - 1)
        low = np.minimum(x.astype(np.int64), n_in - 1)
        high = np.minimum(low + 1, n_in - 1)
        frac = (x - low).astype(_F32)
        weight = np.stack([1 - frac, frac], axis=1)
        weight[low == high] = 0.5
        return _AxisPlan(np.stack([low, high], axis=1), weight, outside)
    if spec.mode == "cubic":
        base = np.floor(x).astype(np.int64)
        taps = base[:, None] + np.arange(-1, 3)
        weight = _cubic_weights(x - base, spec.cubic_a)
        if spec.exclude_outside:
            weight = np.where((taps < 0) | (taps >= n_in), _F32(0), weight)
            weight = weight / weight.sum(axis=1, keepdims=True)
        return _AxisPlan(np.clip(taps, 0, n_in - 1), weight, outside)
    raise NotImplementedError(f"Resize mode {spec.mode!r} is not supported")


def _antialias_filter(mode: str, t: np.ndarray, a: float) -> np.ndarray:
    """Pillow-style kernels onnxruntime uses for antialiased resizing (float32)."""
    t = np.abs(t).astype(_F32)
    if mode == "linear":
        return np.where(t < 1, 1 - t, _F32(0)).astype(_F32)
    a = _F32(a)
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = (((t - 5) * t + 8) * t - 4) * a
    return np.where(t < 1, near, np.where(t < 2, far, _F32(0))).astype(_F32)


def _plan_axis_antialias(spec: _ResizeSpec, n_in: int, n_out: int, scale: float,
                         roi: tuple[float, float]) -> _AxisPlan:
    """A windowed filter whose support widens by 1/scale when downsampling, so every
    input sample contributes (onnxruntime's antialias=1 algorithm)."""
    rscale = _F32(scale)
    stretch = _F32(1) / rscale
    half = _F32(1 if spec.mode == "linear" else 2)
    support = half * stretch if stretch >= 1 else half
    inv = _F32(1) / stretch if stretch >= 1 else _F32(1)
    if stretch == 1:
        coords = np.arange(n_out, dtype=_F32)
    else:
        coords = _source_coordinates(spec, n_in, n_out, scale, roi)
    center = coords + _F32(0.5)
    low = np.floor(center - support + _F32(0.5)).astype(np.int64)
    high = np.floor(center + support + _F32(0.5)).astype(np.int64)
    if spec.exclude_outside:
        low, high = np.maximum(low, 0), np.minimum(high, n_in)
    taps, valid = _windows(low, high)
    dist = (taps.astype(_F32) - center[:, None] + _F32(0.5)) * inv
    raw = np.where(valid, _antialias_filter(spec.mode, dist, spec.cubic_a), _F32(0))
    total = raw.sum(axis=1, dtype=_F32)
    # Taps beyond the edges fold onto the edge samples before normalising.
    dense = np.zeros((n_out, n_in), _F32)
    rows = np.broadcast_to(np.arange(n_out)[:, None], taps.shape)
    np.add.at(dense, (rows[valid], np.clip(taps, 0, n_in - 1)[valid]), raw[valid])
    dense *= np.where(total == 0, _F32(1), _F32(1) / total)[:, None]
    if spec.fixed_point:
        dense = _round_half_away(dense.astype(np.float64) * 2**22) / 2**22
    index, inside = _windows(np.maximum(low, 0), np.minimum(high, n_in))
    index = np.clip(index, 0, n_in - 1)
    weight = np.where(inside, dense[rows[:, :index.shape[1]], index], 0)
    outside = None
    if spec.coordinate == "tf_crop_and_resize":
        outside = (coords < 0) | (coords > n_in - 1)
    return _AxisPlan(index, weight, outside)


def _windows(low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row tap positions low..high-1 padded to a common width, and which are real."""
    width = max(int((high - low).max()), 1)
    taps = low[:, None] + np.arange(width)
    return taps, taps < high[:, None]


def _apply_plan(x: torch.Tensor, axis: int, plan: _AxisPlan, extrapolation: float
                ) -> torch.Tensor:
    """Resample one axis: gather the taps, blend them, fill extrapolated positions."""
    index = torch.from_numpy(plan.index).to(x.device)
    shape = [1] * x.dim()
    shape[axis] = -1
    if plan.weight is None:
        y = torch.index_select(x, axis, index[:, 0])
    else:
        weight = torch.from_numpy(plan.weight).to(device=x.device, dtype=x.dtype)
        y = sum(torch.index_select(x, axis, index[:, t]) * weight[:, t].reshape(shape)
                for t in range(index.shape[1]))
    if plan.outside is not None and plan.outside.any():
        mask = torch.from_numpy(plan.outside).to(x.device).reshape(shape)
        y = torch.where(mask, torch.tensor(extrapolation, dtype=x.dtype, device=x.device), y)
    return y


def _float_list(tensor: torch.Tensor | None) -> list[float]:
    """Scales/roi values as float32-rounded Python floats (shape information, not data)."""
    if tensor is None or tensor.numel() == 0:
        return []
    return [float(v) for v in tensor.detach().cpu().to(torch.float32).reshape(-1).tolist()]


def _target(rank: int, in_shape: Sequence[int], axes: list[int], scales: list[float],
            sizes: list[int], policy: str) -> tuple[list[int], list[float]]:
    """Output sizes and per-axis scales from either ``scales`` or ``sizes`` (onnxruntime's
    float32 arithmetic, including keep_aspect_ratio_policy)."""
    out, scale = list(in_shape), [1.0] * rank
    if sizes:
        ratios = [float(_F32(sizes[j]) / _F32(in_shape[a])) for j, a in enumerate(axes)]
        if policy != "stretch":
            pick = min(ratios) if policy == "not_larger" else max(ratios)
            ratios = [pick] * len(axes)
            sizes = [int(np.round(_F32(pick) * _F32(in_shape[a]))) for a in axes]
        for j, a in enumerate(axes):
            out[a], scale[a] = sizes[j], ratios[j]
    else:
        for j, a in enumerate(axes):
            out[a], scale[a] = int(_F32(scales[j]) * _F32(in_shape[a])), scales[j]
    return out, scale


def _resize(x: torch.Tensor, spec: _ResizeSpec, axes: list[int], scales: list[float],
            sizes: list[int], roi: list[float], policy: str) -> torch.Tensor:
    """Integer images are blended in float and stored back the way onnxruntime does: the
    plain kernels truncate once at the end; the antialias ones use 22-bit fixed-point
    weights and round half up after every axis."""
    if x.is_floating_point() or spec.mode == "nearest":
        return _resample(x, spec, axes, scales, sizes, roi, policy, None)
    info = torch.iinfo(x.dtype)
    if not spec.antialias:
        y = _resample(x.to(torch.float32), spec, axes, scales, sizes, roi, policy, None)
        return y.trunc().clamp(info.min, info.max).to(x.dtype)
    spec = replace(spec, fixed_point=info.bits == 8)

    def store(y: torch.Tensor) -> torch.Tensor:
        return torch.floor(y + 0.5).clamp(info.min, info.max)

    y = _resample(x.to(torch.float64), spec, axes, scales, sizes, roi, policy, store)
    return y.to(x.dtype)


def _resample(x: torch.Tensor, spec: _ResizeSpec, axes: list[int], scales: list[float],
              sizes: list[int], roi: list[float], policy: str,
              per_axis: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    """Resize one axis at a time, innermost first (the order onnxruntime uses)."""
    rank = x.dim()
    out, scale = _target(rank, list(x.shape), axes, scales, sizes, policy)
    starts = dict.fromkeys(range(rank), 0.0)
    ends = dict.fromkeys(range(rank), 1.0)
    if roi:
        for j, a in enumerate(axes):
            starts[a], ends[a] = roi[j], roi[j + len(axes)]
    plan_axis = _plan_axis_antialias if spec.antialias and spec.mode != "nearest" else _plan_axis
    for axis in reversed(range(rank)):
        n_in = x.shape[axis]
        if out[axis] == n_in and scale[axis] == 1.0 and spec.coordinate != "tf_crop_and_resize":
            continue
        plan = plan_axis(spec, n_in, out[axis], scale[axis], (starts[axis], ends[axis]))
        x = _apply_plan(x, axis, plan, spec.extrapolation)
        if per_axis is not None:
            x = per_axis(x)
    return x


def _resize_spec(attrs: Attrs, legacy: bool) -> _ResizeSpec:
    return _ResizeSpec(
        mode=attrs.get("mode", "nearest"),
        coordinate="asymmetric" if legacy else attrs.get("coordinate_transformation_mode",
                                                         "half_pixel"),
        nearest="simple" if legacy else attrs.get("nearest_mode", "round_prefer_floor"),
        cubic_a=float(attrs.get("cubic_coeff_a", -0.75)),
        exclude_outside=bool(attrs.get("exclude_outside", 0)),
        extrapolation=float(attrs.get("extrapolation_value", 0.0)),
        antialias=bool(attrs.get("antialias", 0)),
    )


@register("Resize")
def resize(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    x = inputs[0]
    if ctx.opset < 11:
        roi, scales, sizes = [], _float_list(inputs[1]), []
    else:
        roi, scales = _float_list(_opt(inputs, 1)), _float_list(_opt(inputs, 2))
        sizes_t = _opt(inputs, 3)
        sizes = ints(sizes_t) if sizes_t is not None else []
    axes = [_axis(int(a), x.dim()) for a in attrs.get("axes", range(x.dim()))]
    policy = attrs.get("keep_aspect_ratio_policy", "stretch")
    return _resize(x, _resize_spec(attrs, ctx.opset < 11), axes, scales, sizes, roi, policy)


@register("Upsample")
def upsample(ctx: OpContext, inputs: Inputs, attrs: Attrs) -> torch.Tensor:
    """The pre-opset-10 Resize: asymmetric coordinates, scales only."""
    x = inputs[0]
    given = _opt(inputs, 1)
    scales = _float_list(given) if given is not None else [float(s) for s in attrs["scales"]]
    return _resize(x, _resize_spec(attrs, True), list(range(x.dim())), scales, [], [],
                   "stretch")
