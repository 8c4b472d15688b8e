"""The mirror on every committed zoo model: onnxruntime parity, gradients, HVPs.

Downstream Hessian numbers are only as good as the mirror, so every zoo file must match
onnxruntime to 1e-5 relative in float32 on real evaluation samples, and its weight gradients
must be the true derivatives of what onnxruntime computes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hawq_onnx.data import load_npz
from hawq_onnx.importer import load_model
from hawq_onnx.mirror import Mirror
from hawq_onnx.parity import check_parity
from tests.conftest import MODELS

EVAL_FILE = {"fashion": "fashion_eval.npz", "mobilenet": "fashion_eval.npz",
             "digits": "digits_eval.npz", "transformer": "text_eval.npz"}
ZOO = sorted(MODELS.glob("*.onnx"))


def _eval_file(model_path: Path) -> Path:
    return MODELS / EVAL_FILE[model_path.stem.split("_")[0]]


def test_zoo_is_complete() -> None:
    """Guards the parametrized tests below against silently running on nothing."""
    names = {p.name for p in ZOO}
    for expected in ("fashion_cnn_op13.onnx", "fashion_cnn_op17.onnx", "digits_resnet_op17.onnx",
                     "mobilenet_op21.onnx", "transformer_op17.onnx",
                     "transformer_constants_op13.onnx", "transformer_decomposed_ln_op17.onnx"):
        assert expected in names


@pytest.mark.parametrize("path", ZOO, ids=lambda p: p.stem)
def test_mirror_matches_onnxruntime_on_zoo(path: Path) -> None:
    model = load_model(path).model
    dataset = load_npz(_eval_file(path), model)
    report = check_parity(model, dataset.head(256), batch_size=64, tolerance=1e-5)
    assert report.ok, report.to_dict()
    assert all(o.ref_max_abs > 0 for o in report.outputs)


@pytest.mark.parametrize("path", ZOO, ids=lambda p: p.stem)
def test_zoo_hessian_vector_product_is_nonzero_and_symmetric(path: Path) -> None:
    """HVPs exist through every zoo graph: non-zero, and uᵀHv = vᵀHu (H is symmetric)."""
    model = load_model(path).model
    mirror = Mirror(model)
    assert mirror.weights, "no quantizable weights found"
    dataset = load_npz(_eval_file(path), model)
    feeds = next(dataset.batches(4 if dataset.fixed_batch is None else dataset.fixed_batch))
    params = list(mirror.weights.values())
    outputs = mirror(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    loss = outputs[0].float().pow(2).mean()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    gen = torch.Generator().manual_seed(0)
    u = [torch.randn(p.shape, generator=gen) for p in params]
    v = [torch.randn(p.shape, generator=gen) for p in params]
    hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
    hu = torch.autograd.grad(grads, params, grad_outputs=u)
    u_hv = sum(float((a * b).sum()) for a, b in zip(u, hv, strict=True))
    v_hu = sum(float((a * b).sum()) for a, b in zip(v, hu, strict=True))
    assert any(float(h.abs().max()) > 0 for h in hv)
    assert u_hv == pytest.approx(v_hu, rel=1e-3, abs=1e-6)


def test_zoo_weight_gradient_matches_finite_differences() -> None:
    """float64 central differences on a few weight entries of the residual CNN."""
    path = MODELS / "digits_resnet_op17.onnx"
    model = load_model(path).model
    mirror = Mirror(model, dtype=torch.float64)
    feeds = next(load_npz(_eval_file(path), model).batches(8))
    inputs = {k: torch.from_numpy(v).double() for k, v in feeds.items()}

    def loss() -> torch.Tensor:
        return torch.log_softmax(mirror(**inputs)[0], dim=-1)[:, 0].sum()

    rng = np.random.default_rng(0)
    for name, param in mirror.weights.items():
        (grad,) = torch.autograd.grad(loss(), [param])
        index = tuple(int(rng.integers(0, s)) for s in param.shape)
        with torch.no_grad():
            original = param[index].item()
            param[index] = original + 1e-6
            up = loss().item()
            param[index] = original - 1e-6
            down = loss().item()
            param[index] = original
        numeric = (up - down) / 2e-6
        assert float(grad[index]) == pytest.approx(numeric, rel=1e-5, abs=1e-8), name
