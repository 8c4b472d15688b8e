"""Which axis of a weight constant is the output channel and which the reduction, per op.

Why per op: the same 2-D array is [C_out, K] for Gemm with transB=1, [K, C_out] for Gemm
without it and for MatMul, [C_out, C_in/g, k...] for Conv and [C_in, C_out/g, k...] for
ConvTranspose. Per-channel scales on the wrong axis mix unrelated channels (and the bias
scale ``s_x * s_w`` would be wrong); blocks on the wrong axis cut across dot products.
"""

from __future__ import annotations

import onnx

from hawq_onnx.graph import QuantizableLayer
from hawq_onnx.quant.weights import WeightLayout


def _int_attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(attr.i)
    return default


def weight_layout(layer: QuantizableLayer, node: onnx.NodeProto, weight_rank: int
                  ) -> WeightLayout:
    """The layout of ``layer.weight`` (a constant of rank ``weight_rank``) for this node.

    Where the weight reaches the node through Transpose/Identity the graph view's mapped
    channel axis is used and group-wise blocks are not offered (the reduction axis of the
    constant is then not known for certain).
    """
    if layer.weight is None:
        return WeightLayout()
    channel = (layer.weight_axis_out,) if layer.weight_axis_out is not None else ()
    operand = list(node.input).index(layer.weight) if layer.weight in node.input else None
    if operand is None:
        return WeightLayout(channel, None)
    if layer.kind == "conv_transpose":
        if _int_attr(node, "group", 1) > 1 and weight_rank >= 2:
            # a per-channel scale on axis 1 is shared by the groups; rows of axis 0 are the
            # input channels, each inside one group: whichever fits the weight better wins.
            return WeightLayout((1, 0), None)
        return WeightLayout((1,), None)
    if layer.kind == "conv":
        return WeightLayout((0,), None)
    if layer.kind == "gemm":
        reduction = 1 if _int_attr(node, "transB", 0) else 0
        return WeightLayout(channel, reduction if weight_rank == 2 else None)
    if layer.kind == "matmul":
        if weight_rank == 1:
            return WeightLayout((), 0)
        reduction = weight_rank - 2 if operand == 1 else weight_rank - 1
        return WeightLayout(channel, reduction)
    if layer.kind == "embedding":
        return WeightLayout((0,) if weight_rank >= 1 else (), None)
    return WeightLayout(channel, None)


__all__ = ["weight_layout"]
