"""ONNX element types <-> torch / numpy dtypes."""

from __future__ import annotations

import numpy as np
import onnx
import torch

_ONNX_TO_TORCH: dict[int, torch.dtype] = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.UINT16: torch.uint16,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.UINT32: torch.uint32,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.UINT64: torch.uint64,
    onnx.TensorProto.BOOL: torch.bool,
}

_TORCH_TO_ONNX = {v: k for k, v in _ONNX_TO_TORCH.items()}


def torch_dtype(onnx_elem_type: int) -> torch.dtype:
    try:
        return _ONNX_TO_TORCH[onnx_elem_type]
    except KeyError as exc:
        name = onnx.TensorProto.DataType.Name(onnx_elem_type)
        raise TypeError(f"tensor element type {name} is not supported by the mirror") from exc


def onnx_elem_type(dtype: torch.dtype) -> int:
    return _TORCH_TO_ONNX[dtype]


def to_torch(array: np.ndarray, device: torch.device | None = None) -> torch.Tensor:
    """numpy -> torch, keeping the dtype (copies so the tensor owns writable memory)."""
    return torch.from_numpy(np.array(array, copy=True)).to(device) if device else torch.from_numpy(
        np.array(array, copy=True)
    )
