"""Mirror ops: convolution, dense products and pooling.

Padding is resolved to explicit per-side amounts (ONNX allows asymmetric pads and auto_pad,
torch only symmetric padding), applied with ``F.pad`` where needed, and the torch kernel then
runs unpadded. Pooling output sizes follow onnxruntime, including its ceil_mode rule that a
window may not start inside the trailing padding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from hawq_onnx.mirror.registry import OpContext, ints, register

Pads = list[tuple[int, int]]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


# ---------------------------------------------------------------------------- geometry
def _per_dim(attrs: dict[str, Any], name: str, n: int, default: int = 1) -> list[int]:
    value = attrs.get(name)
    return [int(v) for v in value] if value else [default] * n


def _same_pads(size: int, kernel: int, stride: int, dilation: int, upper: bool) -> tuple[int,
                                                                                          int]:
    """auto_pad SAME_*: output = ceil(size / stride); the odd pixel goes last for UPPER."""
    out = -(-size // stride)
    total = max(0, (out - 1) * stride + (kernel - 1) * dilation + 1 - size)
    small, big = total // 2, total - total // 2
    return (small, big) if upper else (big, small)


def _resolve_pads(attrs: dict[str, Any], sizes: Sequence[int], kernel: Sequence[int],
                  strides: Sequence[int], dilations: Sequence[int]) -> Pads:
    """Per spatial dimension (begin, end) padding from ``pads`` or ``auto_pad``."""
    n = len(sizes)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        upper = auto_pad == "SAME_UPPER"
        return [_same_pads(sizes[i], kernel[i], strides[i], dilations[i], upper)
                for i in range(n)]
    if auto_pad == "VALID":
        return [(0, 0)] * n
    pads = _per_dim(attrs, "pads", 2 * n, 0)
    return [(pads[i], pads[i + n]) for i in range(n)]


def _torch_pad(pads: Pads) -> list[int]:
    """ONNX per-dim (begin, end) pairs -> F.pad's last-dimension-first flat list."""
    return [v for begin, end in reversed(pads) for v in (begin, end)]


def _symmetric(pads: Pads) -> bool:
    return all(begin == end for begin, end in pads)


# ---------------------------------------------------------------------------- convolution
@register("Conv")
def conv(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    x, w = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    n = x.dim() - 2
    if n not in _CONV:
        raise NotImplementedError(f"Conv with {n} spatial dimensions is not supported")
    kernel = list(w.shape[2:])
    strides, dilations = _per_dim(attrs, "strides", n), _per_dim(attrs, "dilations", n)
    pads = _resolve_pads(attrs, list(x.shape[2:]), kernel, strides, dilations)
    padding = [begin for begin, _ in pads]
    if not _symmetric(pads):
        x, padding = F.pad(x, _torch_pad(pads)), [0] * n
    return _CONV[n](x, w, bias, strides, padding, dilations, int(attrs.get("group", 1)))


def _conv_transpose_pads(attrs: dict[str, Any], sizes: Sequence[int], kernel: Sequence[int],
                         strides: Sequence[int], dilations: Sequence[int],
                         out_pad: Sequence[int]) -> Pads:
    """Pads of a ConvTranspose; ``output_shape`` or SAME_* fix the total, split as ORT does."""
    n = len(sizes)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    target = ints(attrs.get("output_shape"))[-n:] if attrs.get("output_shape") else None
    if target is None and auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        target = [sizes[i] * strides[i] for i in range(n)]
    if target is None:
        return _resolve_pads(attrs, sizes, kernel, strides, dilations)
    pads: Pads = []
    for i in range(n):
        full = strides[i] * (sizes[i] - 1) + out_pad[i] + (kernel[i] - 1) * dilations[i] + 1
        total = max(0, full - target[i])
        small, big = total // 2, total - total // 2
        pads.append((small, big) if auto_pad == "SAME_UPPER" else (big, small))
    return pads


@register("ConvTranspose")
def conv_transpose(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    """Unpadded transposed conv, then crop ``pads`` / extend by ``output_padding``."""
    x, w = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    n = x.dim() - 2
    if n not in _CONV_T:
        raise NotImplementedError(f"ConvTranspose with {n} spatial dimensions is not supported")
    kernel = list(w.shape[2:])
    strides, dilations = _per_dim(attrs, "strides", n), _per_dim(attrs, "dilations", n)
    out_pad = _per_dim(attrs, "output_padding", n, 0)
    sizes = list(x.shape[2:])
    pads = _conv_transpose_pads(attrs, sizes, kernel, strides, dilations, out_pad)
    group = int(attrs.get("group", 1))
    y = _CONV_T[n](x, w, None, strides, 0, 0, group, dilations)
    # Output dim i spans [begin, full + output_padding - end) of the unpadded result.
    crop = [(-begin, extra - end) for (begin, end), extra in zip(pads, out_pad, strict=True)]
    if any(v != 0 for pair in crop for v in pair):
        y = F.pad(y, _torch_pad(crop))
    if bias is not None:
        y = y + bias.reshape([1, -1] + [1] * n)
    return y


# ---------------------------------------------------------------------------- products
@register("Gemm")
def gemm(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    a, b = inputs[0], inputs[1]
    c = inputs[2] if len(inputs) > 2 else None
    if attrs.get("transA", 0):
        a = a.transpose(0, 1)
    if attrs.get("transB", 0):
        b = b.transpose(0, 1)
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    y = a @ b
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    return y


@register("MatMul")
def matmul(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    return torch.matmul(inputs[0], inputs[1])


@register("Einsum")
def einsum(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    equation = "".join(str(attrs["equation"]).split())
    return torch.einsum(equation, *inputs)


# ---------------------------------------------------------------------------- pooling
class _PoolGeometry:
    """Kernel, strides, dilations and the explicit padding a pooling window needs."""

    def __init__(self, x: torch.Tensor, attrs: dict[str, Any]) -> None:
        n = x.dim() - 2
        self.sizes = list(x.shape[2:])
        self.kernel = [int(k) for k in attrs["kernel_shape"]]
        self.strides = _per_dim(attrs, "strides", n)
        self.dilations = _per_dim(attrs, "dilations", n)
        self.pads = _resolve_pads(attrs, self.sizes, self.kernel, self.strides, self.dilations)
        ceil_mode = bool(attrs.get("ceil_mode", 0))
        self.extra = [self._extra(i, ceil_mode) for i in range(n)]

    def _extra(self, i: int, ceil_mode: bool) -> int:
        """Trailing padding beyond ``pads`` that ceil_mode's last window reaches."""
        begin, end = self.pads[i]
        span = (self.kernel[i] - 1) * self.dilations[i] + 1
        padded = self.sizes[i] + begin + end
        steps = padded - span
        out = (-(-steps // self.strides[i]) if ceil_mode else steps // self.strides[i]) + 1
        if ceil_mode and (out - 1) * self.strides[i] >= self.sizes[i] + begin:
            out -= 1  # onnxruntime (like torch) drops a window starting in the end padding
        return max(0, (out - 1) * self.strides[i] + span - padded)

    def full_pads(self) -> Pads:
        return [(b, e + x) for (b, e), x in zip(self.pads, self.extra, strict=True)]

    def padded_sizes(self) -> list[int]:
        return [s + b + e for s, (b, e) in zip(self.sizes, self.full_pads(), strict=True)]


def _windows(x: torch.Tensor, geo: _PoolGeometry) -> torch.Tensor:
    """[N, C, out..., k...] view of every (dilated) pooling window of a padded input."""
    n = x.dim() - 2
    for i in range(n):
        span = (geo.kernel[i] - 1) * geo.dilations[i] + 1
        x = x.unfold(2 + i, span, geo.strides[i])
    index = (Ellipsis,) + tuple(slice(None, None, d) for d in geo.dilations)
    return x[index]


def _window_sum(x: torch.Tensor, geo: _PoolGeometry) -> torch.Tensor:
    """Sum over every pooling window of an already padded input."""
    n = x.dim() - 2
    if n in _AVG_POOL and all(d == 1 for d in geo.dilations):
        mean = _AVG_POOL[n](x, geo.kernel, geo.strides, 0, False, True)
        return mean * math.prod(geo.kernel)
    return _windows(x, geo).sum(dim=tuple(range(-n, 0)))


def _count_mask(x: torch.Tensor, geo: _PoolGeometry, include_pad: bool) -> torch.Tensor:
    """1 where a padded position counts toward an average's divisor (ORT's rule: explicit
    pads count with count_include_pad, the ceil_mode overhang never does)."""
    mask = torch.ones([1, 1] + geo.sizes, dtype=x.dtype, device=x.device)
    pads = geo.pads if include_pad else [(0, 0)] * len(geo.sizes)
    if include_pad:
        mask = F.pad(mask, _torch_pad(pads), value=1.0)
    rest = [(b - p[0], e - p[1]) for (b, e), p in zip(geo.full_pads(), pads, strict=True)]
    return F.pad(mask, _torch_pad(rest), value=0.0)


@register("AveragePool")
def average_pool(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    x = inputs[0]
    geo = _PoolGeometry(x, attrs)
    total = _window_sum(F.pad(x, _torch_pad(geo.full_pads())), geo)
    with torch.no_grad():
        include = bool(attrs.get("count_include_pad", 0))
        count = _window_sum(_count_mask(x, geo, include), geo)
    return total / count


@register("LpPool")
def lp_pool(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> torch.Tensor:
    x = inputs[0]
    p = float(attrs.get("p", 2))
    geo = _PoolGeometry(x, attrs)
    total = _window_sum(F.pad(x.abs() ** p, _torch_pad(geo.full_pads())), geo)
    return total ** (1.0 / p)


def _flat_indices(indices: torch.Tensor, x: torch.Tensor, geo: _PoolGeometry,
                  storage_order: int) -> torch.Tensor:
    """torch's per-(n, c) indices into the padded input -> ONNX flat indices into ``x``."""
    padded = geo.padded_sizes()
    coords = []
    rest = indices
    for size in reversed(padded):
        coords.append(rest % size)
        rest = torch.div(rest, size, rounding_mode="floor")
    coords.reverse()
    coords = [c - b for c, (b, _) in zip(coords, geo.pads, strict=True)]
    dims = range(len(coords))
    order = list(dims) if storage_order == 0 else list(reversed(dims))
    flat = torch.zeros_like(indices)
    for i in order:
        flat = flat * geo.sizes[i] + coords[i]
    planes = torch.arange(x.shape[0] * x.shape[1], device=x.device).reshape(
        [x.shape[0], x.shape[1]] + [1] * len(coords))
    return flat + planes * math.prod(geo.sizes)


@register("MaxPool")
def max_pool(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> Any:
    x = inputs[0]
    n = x.dim() - 2
    if n not in _MAX_POOL:
        raise NotImplementedError(f"MaxPool with {n} spatial dimensions is not supported")
    geo = _PoolGeometry(x, attrs)
    low = float("-inf") if x.is_floating_point() else torch.iinfo(x.dtype).min
    xp = F.pad(x, _torch_pad(geo.full_pads()), value=low)
    pool: Callable[..., Any] = _MAX_POOL[n]
    y, indices = pool(xp, geo.kernel, geo.strides, 0, geo.dilations, False, True)
    return y, _flat_indices(indices, x, geo, int(attrs.get("storage_order", 0)))


@register("GlobalAveragePool")
def global_average_pool(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> Any:
    x = inputs[0]
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@register("GlobalMaxPool")
def global_max_pool(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> Any:
    x = inputs[0]
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


@register("GlobalLpPool")
def global_lp_pool(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> Any:
    x = inputs[0]
    p = float(attrs.get("p", 2))
    return (x.abs() ** p).sum(dim=tuple(range(2, x.dim())), keepdim=True) ** (1.0 / p)
