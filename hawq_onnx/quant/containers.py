"""ONNX integer types for b-bit values, their opset needs, and exact packing.

Weights are stored in the smallest ONNX integer type that holds b bits: INT2 (opset 25),
INT4 (opset 21), INT8 (opset 13 with per-channel axes), INT16 (opset 21). Widths without a
type of their own (3, 5, 6, 7) use the next larger one with values kept inside the b-bit
range, so the file says what the hardware sees while the report states the true width.

Sub-byte tensors are packed here with numpy (low bits first, two's complement) into
``raw_data``: exact, deterministic, and fast for large weights.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
from onnx import TensorProto, helper

INT2 = getattr(TensorProto, "INT2", None)
UINT2 = getattr(TensorProto, "UINT2", None)

#: (container bits, signed) -> (ONNX type, the opset its QDQ ops need)
_CONTAINERS: dict[tuple[int, bool], tuple[int | None, int]] = {
    (2, True): (INT2, 25),
    (2, False): (UINT2, 25),
    (4, True): (TensorProto.INT4, 21),
    (4, False): (TensorProto.UINT4, 21),
    (8, True): (TensorProto.INT8, 13),
    (8, False): (TensorProto.UINT8, 13),
    (16, True): (TensorProto.INT16, 21),
    (16, False): (TensorProto.UINT16, 21),
    (32, True): (TensorProto.INT32, 13),
}
_SUB_BYTE = {TensorProto.INT4: 4, TensorProto.UINT4: 4}
if INT2 is not None and UINT2 is not None:
    _SUB_BYTE.update({INT2: 2, UINT2: 2})
_NUMPY = {TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8,
          TensorProto.INT16: np.int16, TensorProto.UINT16: np.uint16,
          TensorProto.INT32: np.int32}


def container_bits(bits: int, max_opset: int | None = None) -> int:
    """The storage width for ``bits``; ``max_opset`` forbids types needing a newer opset
    (then the next larger container that is allowed is used)."""
    for width in (2, 4, 8, 16, 32):
        if width < bits:
            continue
        elem, opset = _CONTAINERS[(width, True)]
        if elem is None or (max_opset is not None and opset > max_opset):
            continue
        return width
    raise ValueError(f"no integer container holds {bits} bits at opset <= {max_opset}")


def container_type(width: int, signed: bool) -> int:
    elem, _ = _CONTAINERS[(width, signed)]
    if elem is None:
        raise ValueError(f"this onnx has no {width}-bit integer type")
    return elem


def required_opset(width: int, signed: bool = True) -> int:
    """The lowest default-domain opset whose Q/DQ ops accept this container."""
    return _CONTAINERS[(width, signed)][1]


def _pack(values: np.ndarray, bits: int) -> bytes:
    """Pack ``bits``-wide two's complement (or unsigned) values, lowest bits first."""
    mask = (1 << bits) - 1
    flat = (values.reshape(-1).astype(np.int64) & mask).astype(np.uint8)
    per_byte = 8 // bits
    padded = np.zeros(-(-flat.size // per_byte) * per_byte, dtype=np.uint8)
    padded[: flat.size] = flat
    lanes = padded.reshape(-1, per_byte)
    packed = np.zeros(lanes.shape[0], dtype=np.uint8)
    for lane in range(per_byte):
        packed |= (lanes[:, lane] << (lane * bits)).astype(np.uint8)
    return packed.tobytes()


def make_int_tensor(name: str, values: np.ndarray, elem_type: int) -> TensorProto:
    """A TensorProto of an integer ONNX type holding ``values`` exactly (raw_data)."""
    tensor = TensorProto()
    tensor.name = name
    tensor.data_type = elem_type
    tensor.dims.extend(int(d) for d in values.shape)
    if elem_type in _SUB_BYTE:
        tensor.raw_data = _pack(values, _SUB_BYTE[elem_type])
        return tensor
    dtype = _NUMPY[elem_type]
    info = np.iinfo(dtype)
    if values.size and (values.min() < info.min or values.max() > info.max):
        raise ValueError(f"{name}: values do not fit {np.dtype(dtype).name}")
    tensor.raw_data = np.ascontiguousarray(values, dtype=np.dtype(dtype).newbyteorder("<")
                                           ).tobytes()
    return tensor


def make_float_tensor(name: str, values: np.ndarray) -> TensorProto:
    """A float32 tensor with little-endian raw data (deterministic)."""
    return onnx.numpy_helper.from_array(np.asarray(values, dtype=np.float32), name)


def tensor_nbytes(tensor: TensorProto) -> int:
    """Payload bytes of an initializer (packed size for sub-byte types)."""
    count = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
    if tensor.data_type in _SUB_BYTE:
        return -(-count * _SUB_BYTE[tensor.data_type] // 8)
    try:
        size = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except Exception:  # strings and exotic types: count what is stored
        return tensor.ByteSize()
    return count * size


@functools.lru_cache(maxsize=1)
def int2_fuses_safely() -> bool:
    """Whether the installed onnxruntime loads int2 weights next to quantized activations.

    onnxruntime 1.31's QDQ selectors fuse ``DQ(int2 weight)`` with a quantized input into
    QLinearConv/QGemm/QLinearMatMul, which reject int2, and the model fails to load. Probed
    once on a one-Conv model, so a fixed onnxruntime is used as soon as it is installed.
    """
    if INT2 is None:
        return False
    import onnxruntime as ort

    weights = make_int_tensor("w_q", np.ones((2, 1, 1, 1), np.int64), INT2)
    inits = [weights, onnx.numpy_helper.from_array(np.ones(2, np.float32), "w_s"),
             onnx.numpy_helper.from_array(np.asarray(0.1, np.float32), "x_s"),
             make_int_tensor("x_z", np.asarray(0), TensorProto.UINT8)]
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_s"], ["w"], axis=0),
             helper.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["x_q"]),
             helper.make_node("DequantizeLinear", ["x_q", "x_s", "x_z"], ["x_d"]),
             helper.make_node("Conv", ["x_d", "w"], ["y_f"]),
             helper.make_node("QuantizeLinear", ["y_f", "x_s", "x_z"], ["y_q"]),
             helper.make_node("DequantizeLinear", ["y_q", "x_s", "x_z"], ["y"])]
    graph = helper.make_graph(
        nodes, "int2_probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 25)], ir_version=11)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        session = ort.InferenceSession(model.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        session.run(None, {"x": np.ones((1, 1, 2, 2), np.float32)})
    except Exception:  # any refusal: use a larger container
        return False
    return True


__all__ = ["container_bits", "container_type", "make_float_tensor", "make_int_tensor",
           "int2_fuses_safely", "required_opset", "tensor_nbytes"]
