"""onnxruntime's own static quantizer fed the same calibration batches hawq-onnx uses.

Why one place: every bench compares against this peer, and the comparison is only fair if
all of them give it identical data (the project's loader, batches of 32, only the inputs the
model declares) and identical settings (QDQ, per-channel weights, uint8 activations).
"""

from __future__ import annotations

from pathlib import Path


def quantize_static_like_hawq(model: Path, calib: Path, out: Path, *, int4: bool = False
                              ) -> None:
    """``onnxruntime.quantization.quantize_static`` on ``calib``; int8 or int4 weights."""
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from hawq_onnx.data import load_npz
    from hawq_onnx.importer import load_model

    dataset = load_npz(calib, load_model(model).model)
    inputs = {i.name for i in ort.InferenceSession(
        str(model), providers=["CPUExecutionProvider"]).get_inputs()}

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(dataset.batches(32))

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            return None if batch is None else {k: v for k, v in batch.items() if k in inputs}

    quantize_static(str(model), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt4 if int4 else QuantType.QInt8)
