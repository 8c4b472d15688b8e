"""Refuse models that already contain quantization ops.

Quantizing a QDQ or QLinear model again would stack a second rounding on top of the first and
silently damage it, so the import stops with :class:`AlreadyQuantizedError` instead. Every
graph is searched: the main graph, If/Loop/Scan bodies and model-local functions.
"""

from __future__ import annotations

from collections import Counter

import onnx

from hawq_onnx.errors import AlreadyQuantizedError
from hawq_onnx.model_io import iter_nodes
from hawq_onnx.passes.base import PassReport

#: ops that consume or produce quantized integer tensors (onnx and com.microsoft).
QUANTIZED_OP_TYPES = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
    "MatMulInteger", "ConvInteger", "QGemm", "MatMulNBits", "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "QAttention", "QEmbedLayerNormalization",
    "QMoE", "GatherBlockQuantized", "MatMulBnb4", "MatMulFpQ4", "QuantizeBFP",
    "DequantizeBFP", "QuantizeWithOrder", "DequantizeWithOrder",
})
#: op-type prefixes of whole quantized families (QLinearConv, QLinearMatMul, QOrderedGelu...).
QUANTIZED_PREFIXES = ("QLinear", "QOrdered")


def is_quantized_op(op_type: str) -> bool:
    return op_type in QUANTIZED_OP_TYPES or op_type.startswith(QUANTIZED_PREFIXES)


def find_quantized_ops(model: onnx.ModelProto) -> Counter[str]:
    """How often each quantization op type occurs anywhere in the model."""
    return Counter(node.op_type for node in iter_nodes(model) if is_quantized_op(node.op_type))


def reject_quantized(model: onnx.ModelProto) -> tuple[onnx.ModelProto, PassReport]:
    """Raise :class:`AlreadyQuantizedError` listing the op types found; otherwise a no-op."""
    found = find_quantized_ops(model)
    if found:
        listing = ", ".join(f"{op} x{count}" for op, count in sorted(found.items()))
        raise AlreadyQuantizedError(
            f"the model is already quantized (found {listing}); hawq-onnx quantizes float "
            "models only - pass the original float model"
        )
    return model, PassReport("reject_quantized")
