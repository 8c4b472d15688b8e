"""The autograd mirror: ONNX graphs re-executed as torch ops (see :mod:`.module`)."""

from hawq_onnx.mirror.module import Mirror, unsupported_op_types
from hawq_onnx.mirror.registry import OpContext, register, supported_ops

__all__ = ["Mirror", "OpContext", "register", "supported_ops", "unsupported_op_types"]
