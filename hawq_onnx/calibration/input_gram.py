"""Each layer's input second-moment matrix ``H = E[x xᵀ]``, for error-feedback rounding.

``x`` is one dot product's worth of input: a row of a MatMul/Gemm operand, or one
convolution patch (``C_in · k_h · k_w`` values, unfolded in the weight's own axis order). The
float model runs on the calibration data once, through onnxruntime, with the layer inputs
added as outputs; ``Σ x xᵀ`` is accumulated in float64 batch by batch, so memory is one batch
of activations plus one ``K × K`` matrix per layer.

Only layers whose weight rows pair with a well-defined ``x`` get a matrix: MatMul/Gemm with
the weight as the second operand (directly, not through a Transpose), 1-D/2-D Conv with
explicit padding, and ungrouped 1-D/2-D ConvTranspose (``K = C_in · k_h · k_w``, the patches of
the equivalent stride-1 convolution). A grouped Conv (depthwise included) gets one matrix per
group, ``[G, K, K]`` with ``K = C_in/G · k_h · k_w``: each group's output channels see only
that group's inputs.
The others are listed with the reason (they keep plain rounding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
import torch.nn.functional as F  # noqa: N812

from hawq_onnx.calibration.collector import _with_outputs
from hawq_onnx.calibration.session import make_session, run_session, session_options
from hawq_onnx.data import Dataset
from hawq_onnx.graph import GraphView, QuantizableLayer
from hawq_onnx.mirror.module import node_attributes
from hawq_onnx.progress import progress

#: samples unfolded at a time (convolution patches are ``C·k²`` times the input).
_ROWS_CHUNK = 8


@dataclass(frozen=True)
class _Unfold:
    """How to turn one layer input into rows ``x`` of length K."""

    weight: str
    tensor: str
    kind: str  # rows | rows_transposed | conv | conv_transpose
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    groups: int = 1
    output_padding: tuple[int, ...] = ()

    def rows(self, value: np.ndarray) -> np.ndarray:
        array = np.asarray(value, dtype=np.float64)
        if self.kind == "rows":
            return array.reshape(-1, array.shape[-1])
        if self.kind == "rows_transposed":
            return array.T
        if self.kind == "conv_transpose":
            return _transposed_patches(array, self)
        return _patches(array, self)


@dataclass
class InputGrams:
    """``H`` per weight name (float64, ``[K, K]``, mean over rows) and why others have none."""

    grams: dict[str, np.ndarray] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    batches: int = 0


def _unfold_for(layer: QuantizableLayer, node: onnx.NodeProto,
                dims: Sequence[int]) -> _Unfold | str:
    """The unfolding for ``layer``, or a one-line reason why it has none."""
    weight = layer.weight or ""
    if layer.kind == "embedding":
        return "embedding lookups have no input rows to weigh"
    if layer.kind not in ("matmul", "gemm", "conv", "conv_transpose"):
        return f"no input unfolding for {layer.kind} layers yet"
    if len(node.input) < 2 or node.input[1] != weight:
        return "the weight reaches the node through another op"
    if layer.kind == "matmul":
        if len(dims) != 2 or layer.weight_axis_out != 1:
            return "not a 2-D right-hand MatMul weight"
        return _Unfold(weight, node.input[0], "rows")
    attrs = node_attributes(node)
    if layer.kind == "gemm":
        if len(dims) != 2:
            return "not a 2-D Gemm weight"
        kind = "rows_transposed" if attrs.get("transA", 0) else "rows"
        return _Unfold(weight, node.input[0], kind)
    spatial = len(dims) - 2
    if spatial not in (1, 2):
        return f"{spatial}-D convolution"
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID"):
        return f"auto_pad {auto_pad}"
    pads = attrs.get("pads", [0] * 2 * spatial) if auto_pad == "NOTSET" else [0] * 2 * spatial
    groups = int(attrs.get("group", 1))
    extra: dict[str, tuple[int, ...]] = {}
    if layer.kind == "conv_transpose":
        if groups != 1:  # its output channels interleave the groups' input channels
            return "grouped ConvTranspose"
        if "output_shape" in attrs:
            return "ConvTranspose with output_shape (implicit padding)"
        extra["output_padding"] = tuple(attrs.get("output_padding", [0] * spatial))
    return _Unfold(weight, node.input[0], layer.kind, tuple(dims[2:]),
                   tuple(attrs.get("strides", [1] * spatial)), tuple(pads),
                   tuple(attrs.get("dilations", [1] * spatial)), groups, **extra)


def _patches(array: np.ndarray, spec: _Unfold) -> np.ndarray:
    """Convolution patches as rows ``[N·L, C·k...]`` in the weight's (C, k_h, k_w) order."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    kernel, strides, dilations = spec.kernel, spec.strides, spec.dilations
    spatial = len(kernel)
    begin, end = spec.pads[:spatial], spec.pads[spatial:]
    if spatial == 1:  # a 1-D convolution is a 2-D one over a height of 1
        tensor = tensor.unsqueeze(2)
        kernel, strides, dilations = (1, *kernel), (1, *strides), (1, *dilations)
        begin, end = (0, *begin), (0, *end)
    padding = [v for axis in reversed(range(2)) for v in (begin[axis], end[axis])]
    tensor = F.pad(tensor, padding)
    cols = F.unfold(tensor, kernel, dilation=dilations, stride=strides)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1]).numpy()


def _transposed_patches(array: np.ndarray, spec: _Unfold) -> np.ndarray:
    """ConvTranspose patches as rows ``[N·L, C_in·k...]`` in the weight's (C_in, k_h, k_w)
    order: ``y[o, p] = Σ_(c, k) W[c, o, k]·x̃_p[c, k]``.

    A transposed convolution is a stride-1 convolution of the input with ``s − 1`` zeros
    between its elements, padded by ``d·(k − 1) − pad`` (plus ``output_padding`` at the end;
    negative amounts crop), with the kernel flipped; the patches of that convolution, read
    with their kernel axes reversed, are the ``x̃_p``.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    kernel, strides, dilations = spec.kernel, spec.strides, spec.dilations
    spatial = len(kernel)
    begin, end, extra = spec.pads[:spatial], spec.pads[spatial:], spec.output_padding
    if spatial == 1:
        tensor = tensor.unsqueeze(2)
        kernel, strides, dilations = (1, *kernel), (1, *strides), (1, *dilations)
        begin, end, extra = (0, *begin), (0, *end), (0, *extra)
    n, c, height, width = tensor.shape
    spread = tensor.new_zeros((n, c, (height - 1) * strides[0] + 1, (width - 1) * strides[1] + 1))
    spread[:, :, ::strides[0], ::strides[1]] = tensor
    reach = [d * (k - 1) for d, k in zip(dilations, kernel, strict=True)]
    padding = [v for axis in (1, 0) for v in (reach[axis] - begin[axis],
                                                reach[axis] - end[axis] + extra[axis])]
    cols = F.unfold(F.pad(spread, padding), kernel, dilation=dilations)
    cols = cols.reshape(n, c, *kernel, -1).flip(2, 3).reshape(n, c * math.prod(kernel), -1)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1]).numpy()


def _second_moments(rows: np.ndarray, groups: int) -> np.ndarray:
    """``Σ x xᵀ`` over rows: ``[K, K]``, or ``[G, K/G, K/G]`` per group of columns."""
    if groups == 1:
        return rows.T @ rows
    split = rows.reshape(rows.shape[0], groups, -1)
    return np.einsum("rgk,rgl->gkl", split, split, optimize=True)


def collect_input_grams(model: onnx.ModelProto, layers: Sequence[QuantizableLayer],
                        dataset: Dataset, *, batch_size: int = 32,
                        max_samples: int = 256) -> InputGrams:
    """``H`` for every weight in ``layers`` that one input unfolding serves (a weight read by
    several layers is skipped: one rounding cannot favour all their inputs)."""
    view = GraphView(model)
    result = InputGrams()
    readers: dict[str, list[QuantizableLayer]] = {}
    for layer in layers:
        if layer.weight is not None:
            readers.setdefault(layer.weight, []).append(layer)
    specs: list[_Unfold] = []
    for weight, group in readers.items():
        if len(group) > 1:
            result.skipped[weight] = f"read by {len(group)} layers"
            continue
        dims = list(view.initializers[weight].dims) if weight in view.initializers else []
        found = _unfold_for(group[0], view.node(group[0].node), dims)
        if isinstance(found, str):
            result.skipped[weight] = found
        else:
            specs.append(found)
    if not specs:
        return result
    inputs = {spec.name for spec in dataset.specs}
    computed = sorted({s.tensor for s in specs} - inputs)
    session = make_session(_with_outputs(model, computed), session_options()) \
        if computed else None
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    slices = dataset.batch_slices(batch_size)
    batches = max(1, -(-max_samples // (dataset.fixed_batch or batch_size)))
    for _part, feeds in progress(zip(slices[:batches], dataset.batches(batch_size),
                                     strict=False),
                                 total=min(batches, len(slices)), desc="input moments"):
        values = dict(zip(computed, run_session(session, computed, feeds,
                                                str(dataset.source)), strict=True)) \
            if session is not None else {}
        values.update({k: v for k, v in feeds.items() if k in inputs})
        for spec in specs:
            value = values[spec.tensor]
            for start in range(0, len(value), _ROWS_CHUNK):  # bounds the unfolded patches
                rows = spec.rows(value[start:start + _ROWS_CHUNK])
                moments = _second_moments(rows, spec.groups)
                sums[spec.weight] = sums.get(spec.weight, 0.0) + moments
                counts[spec.weight] = counts.get(spec.weight, 0) + rows.shape[0]
        result.batches += 1
    result.grams = {k: sums[k] / max(counts[k], 1) for k in sums}
    return result


__all__ = ["InputGrams", "collect_input_grams"]
