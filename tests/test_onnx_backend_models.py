"""Models the `onnx` package ships with its backend tests, at old opsets (6-9).

They were exported by other tools years ago (the PyTorch converter's per-layer cases, the
classic model-zoo architectures with light weights), so they test the importer's opset
upgrade and the mirror's generality on graphs it was never tuned for. The PyTorch cases carry
reference outputs; the architectures are compared with onnxruntime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from hawq_onnx.importer import load_model
from hawq_onnx.mirror import Mirror

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"

# Cases outside the mirror's scope, each with the reason.
EXCLUDED = {
    "test_PoissonNLLLLoss_no_reduce": "a training loss, not an inference graph",
    "test_operator_symbolic_override_nested": "sequence-typed output",
    "test_AvgPool3d_stride1_pad0_gpu_input": "identical to test_AvgPool3d_stride (GPU copy)",
}


def _reference_cases() -> list[Path]:
    cases = sorted((DATA / "pytorch-converted").iterdir()) + sorted(
        (DATA / "pytorch-operator").iterdir())
    return [c for c in cases if c.name not in EXCLUDED]


def _read_tensors(folder: Path, prefix: str) -> list[np.ndarray]:
    files = sorted(folder.glob(f"{prefix}_*.pb"), key=lambda p: int(p.stem.split("_")[-1]))
    tensors = []
    for file in files:
        proto = onnx.TensorProto()
        proto.ParseFromString(file.read_bytes())
        tensors.append(numpy_helper.to_array(proto))
    return tensors


def test_reference_case_count_is_stable() -> None:
    """Guards against silently testing nothing if the onnx package layout changes."""
    assert len(_reference_cases()) >= 110


@pytest.mark.parametrize("case", _reference_cases(), ids=lambda p: p.name)
def test_mirror_reproduces_reference_outputs(case: Path) -> None:
    model = load_model(case / "model.onnx").model
    mirror = Mirror(model)
    data = case / "test_data_set_0"
    inputs = _read_tensors(data, "input")
    expected = _read_tensors(data, "output")
    got = mirror.run_numpy(dict(zip(mirror.input_names, inputs, strict=True)))
    for name, want in zip(mirror.output_names, expected, strict=True):
        np.testing.assert_allclose(got[name], want, rtol=1e-4, atol=1e-5, err_msg=name)


LIGHT = sorted((DATA / "light").glob("light_*.onnx"))


@pytest.mark.parametrize("path", LIGHT, ids=lambda p: p.stem)
def test_mirror_matches_onnxruntime_on_classic_architectures(path: Path) -> None:
    model = load_model(path).model
    mirror = Mirror(model)
    (graph_input,) = [i for i in model.graph.input if i.name in mirror.input_names]
    shape = [d.dim_value or 1 for d in graph_input.type.tensor_type.shape.dim]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (want,) = session.run(None, {graph_input.name: x})
    have = mirror.run_numpy({graph_input.name: x})[mirror.output_names[0]]
    np.testing.assert_allclose(have, want, rtol=1e-4, atol=1e-6)
