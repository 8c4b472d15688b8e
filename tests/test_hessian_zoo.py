"""The analysis runs on every model of the zoo (CNNs, a batch-1 MobileNet, the transformer
with fused LayerNorm, decomposed LayerNorm and Constant-node weights), on a few samples and
probes so the whole file stays quick.

What must hold whatever the probe count: at the float point the label-free KL Hessian is
positive semi-definite, so every per-layer-loop sample ``z_lᵀ H_ll z_l`` and every top
eigenvalue is ≥ 0; every quantizable weight initializer is reported under its own name; the
global-probe estimates agree with the per-layer loop within their standard errors.
"""

from __future__ import annotations

import numpy as np
import pytest

from hawq_onnx.analysis import analyze
from hawq_onnx.graph import GraphView
from hawq_onnx.importer import load_model
from tests.conftest import MODELS

ZOO = {
    "fashion_cnn_op17.onnx": "fashion_calib.npz",
    "fashion_cnn_op13.onnx": "fashion_calib.npz",
    "digits_resnet_op17.onnx": "digits_calib.npz",
    "mobilenet_op21.onnx": "fashion_calib.npz",
    "transformer_op17.onnx": "text_calib.npz",
    "transformer_decomposed_ln_op17.onnx": "text_calib.npz",
    "transformer_constants_op13.onnx": "text_calib.npz",
}
QUICK = {"max_samples": 8, "batch_size": 8, "min_probes": 6, "max_probes": 6,
         "use_cache": False}


@pytest.mark.parametrize("name", list(ZOO))
def test_analysis_runs_on_every_zoo_model(name: str) -> None:
    imported = load_model(MODELS / name)
    initializers = {t.name for t in imported.model.graph.initializer}
    expected = list(dict.fromkeys(
        layer.weight for layer in GraphView(imported.model).quantizable_layers()
        if layer.weight in initializers))
    calib = MODELS / ZOO[name]

    loop = analyze(imported, calib, per_layer=True, eigs=1, eig_max_iter=6,
                   activations=True, **QUICK)
    assert [layer.name for layer in loop.layers] == expected
    assert all(kind["kind"] == "kl" for kind in loop.losses)
    scale = max(abs(layer.trace) for layer in loop.layers)
    for layer in loop.layers:
        assert layer.params > 0 and np.isfinite(layer.trace)
        assert layer.trace >= -1e-5 * scale, layer.name  # quadratic forms of a PSD block
        assert layer.top_eigenvalue is not None and layer.top_eigenvalue >= -1e-5 * scale
    assert loop.activations, "no activation tensor was reached"
    assert all(np.isfinite(a.trace) for a in loop.activations)

    probe = analyze(imported, calib, **QUICK)
    for a, b in zip(probe.layers, loop.layers, strict=True):
        assert a.name == b.name
        assert abs(a.trace - b.trace) <= 5 * np.hypot(a.trace_se, b.trace_se) + 1e-6 * scale


def test_transformer_variants_have_the_same_curvature() -> None:
    """Fused LayerNorm, decomposed LayerNorm and Constant-node weights are one function with
    one set of weights: with the same seed the per-layer traces agree to rounding."""
    names = ["transformer_op17.onnx", "transformer_decomposed_ln_op17.onnx",
             "transformer_constants_op13.onnx"]
    results = [analyze(MODELS / name, MODELS / "text_calib.npz", **QUICK) for name in names]
    reference = [layer.trace for layer in results[0].layers]
    assert len(reference) == 15  # 2 embeddings, 2 × 6 MatMuls, the head Gemm
    for result in results[1:]:
        assert [layer.op for layer in result.layers] == [
            layer.op for layer in results[0].layers]
        np.testing.assert_allclose([layer.trace for layer in result.layers], reference,
                                   rtol=1e-3, atol=1e-6 * max(map(abs, reference)))
