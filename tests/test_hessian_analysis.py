"""``hawq_onnx.analyze``: typed results, exactness through the API, the on-disk cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import helper, numpy_helper

import hawq_onnx
from hawq_onnx.analysis import AnalysisSettings, analyze
from hawq_onnx.errors import HawqError
from hawq_onnx.hessian.cache import CACHE_ENV, default_cache_dir
from hawq_onnx.hessian.result import AnalysisResult
from tests.test_hessian_engine import (
    MLP_WEIGHTS,
    block_slices,
    exact_hessian,
    mlp_data,
    mlp_model,
    objective_for,
    top_by_magnitude,
)

X = mlp_data()
LABELS = np.random.default_rng(7).integers(0, 5, len(X))
FAST = {"min_probes": 8, "max_probes": 8, "batch_size": 8}


def _exact(loss: str = "kl") -> np.ndarray:
    labels = LABELS if loss == "ce" else None
    return exact_hessian(objective_for(mlp_model(), MLP_WEIGHTS, X, loss, labels))


def _numbers(result: AnalysisResult) -> dict:
    data = result.to_dict()
    data.pop("timings")
    return data


def _entries(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "analysis").glob("*"))


def test_analyze_reports_exact_traces_eigenvalues_and_layer_facts(tmp_path: Path) -> None:
    hessian = _exact()
    result = hawq_onnx.analyze(mlp_model(), {"x": X}, cache_dir=tmp_path, batch_size=8,
                               rel_tol=0.02, max_probes=4096, chunk=128, eigs=2, dtype="float64")
    assert [(layer.name, layer.op, layer.params) for layer in result.layers] == [
        ("fc1.w", "Gemm", 24), ("fc2.w", "MatMul", 30)]
    assert result.converged and result.samples == 20 and result.hvp_mode == "gauss_newton"
    assert result.losses == [{"output": "logits", "kind": "kl"}]
    slices = block_slices(objective_for(mlp_model(), MLP_WEIGHTS, X))
    for layer, s in zip(result.layers, slices, strict=True):
        exact = np.trace(hessian[s, s])
        assert abs(layer.trace - exact) <= 3 * layer.trace_se
        assert abs(layer.trace - exact) <= 0.05 * exact
        assert layer.trace > 0  # PSD at the float point
        np.testing.assert_allclose(layer.eigenvalues, top_by_magnitude(hessian[s, s], 2),
                                   rtol=1e-3)
        assert layer.top_eigenvalue == layer.eigenvalues[0] and layer.eigen_converged
    np.testing.assert_allclose(result.eigenvalues, top_by_magnitude(hessian, 2), rtol=1e-3)


def test_labels_select_cross_entropy_and_its_hessian(tmp_path: Path) -> None:
    hessian = _exact("ce")
    result = analyze(mlp_model(), {"x": X, "y": LABELS}, cache_dir=tmp_path, labels_key="y",
                     batch_size=8, rel_tol=0.02, max_probes=4096, chunk=128)
    assert result.losses == [{"output": "logits", "kind": "ce"}]
    assert result.hvp_mode != "gauss_newton"
    slices = block_slices(objective_for(mlp_model(), MLP_WEIGHTS, X))
    for layer, s in zip(result.layers, slices, strict=True):
        assert abs(layer.trace - np.trace(hessian[s, s])) <= 3 * layer.trace_se


def test_second_run_comes_from_the_cache_unchanged(tmp_path: Path) -> None:
    first = analyze(mlp_model(), {"x": X}, cache_dir=tmp_path, **FAST)
    assert not first.cached and len(_entries(tmp_path)) == 1
    second = analyze(mlp_model(), {"x": X}, cache_dir=tmp_path, **FAST)
    assert second.cached and second.to_dict() == first.to_dict()
    assert [p.suffix for p in _entries(tmp_path)] == [".json"]  # no temporary files left


@pytest.mark.parametrize("change", ["seed", "data", "model", "setting"])
def test_anything_that_changes_the_numbers_misses_the_cache(tmp_path: Path, change: str) -> None:
    analyze(mlp_model(), {"x": X}, cache_dir=tmp_path, **FAST)
    model, data, options = mlp_model(), {"x": X}, dict(FAST)
    if change == "seed":
        options["seed"] = 1
    elif change == "data":
        data = {"x": X + np.float32(1e-3)}
    elif change == "model":
        model = mlp_model(seed=5)
    else:
        options["rel_tol"] = 0.1
    again = analyze(model, data, cache_dir=tmp_path, **options)
    assert not again.cached and len(_entries(tmp_path)) == 2


def test_cache_location_env_and_opt_out(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    assert default_cache_dir() == tmp_path / "env"
    analyze(mlp_model(), {"x": X}, **FAST)
    assert len(_entries(tmp_path / "env")) == 1
    analyze(mlp_model(), {"x": X}, cache_dir=tmp_path / "off", use_cache=False, **FAST)
    assert not (tmp_path / "off").exists()
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "hawq-onnx"


def test_a_corrupt_cache_entry_is_recomputed(tmp_path: Path) -> None:
    first = analyze(mlp_model(), {"x": X}, cache_dir=tmp_path, **FAST)
    (entry,) = _entries(tmp_path)
    entry.write_text("{ truncated")
    again = analyze(mlp_model(), {"x": X}, cache_dir=tmp_path, **FAST)
    assert not again.cached and _numbers(again) == _numbers(first)
    assert AnalysisResult.load(entry).to_dict() == again.to_dict()


def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path: Path) -> None:
    runs = [analyze(mlp_model(), {"x": X}, use_cache=False, seed=s, **FAST) for s in (0, 0, 1)]
    traces = [[layer.trace for layer in r.layers] for r in runs]
    assert traces[0] == traces[1] and traces[0] != traces[2]


def test_json_form_has_the_promised_fields_and_round_trips(tmp_path: Path) -> None:
    result = analyze(mlp_model(), {"x": X}, cache_dir=tmp_path, eigs=1, density="layers",
                     density_steps=8, density_runs=2, activations=True, **FAST)
    data = json.loads(result.to_json())
    assert data["probes"] == 8
    for entry in data["layers"]:
        assert {"name", "op", "params", "trace", "trace_se", "top_eigenvalue"} <= set(entry)
        assert entry["average_eigenvalue"] == pytest.approx(entry["trace"] / entry["params"])
    assert [d["scope"] for d in data["density"]] == ["fc1.w", "fc2.w"]
    assert [a["tensor"] for a in data["activations"]] == ["x", "a"]
    assert data["layers"][1]["activation"] == "a"
    assert AnalysisResult.from_json(result.to_json()).to_dict() == result.to_dict()


def test_density_trace_cross_checks_hutchinson(tmp_path: Path) -> None:
    result = analyze(mlp_model(), {"x": X}, cache_dir=tmp_path, batch_size=8,
                     density="global", density_steps=16, density_runs=48, rel_tol=0.02,
                     max_probes=2048, chunk=128)
    (density,) = result.density
    assert density.scope == "global" and density.dim == 54
    gap = abs(density.trace - result.total_trace)
    assert gap <= 3 * np.hypot(density.trace_se, result.total_trace_se)
    np.testing.assert_allclose(density.trace, np.trace(_exact()), rtol=0.15)


def test_constant_node_weights_are_lifted_and_analyzed_like_initializers(
        tmp_path: Path) -> None:
    model = mlp_model()
    graph = model.graph
    w1 = next(t for t in graph.initializer if t.name == "fc1.w")
    graph.node.insert(0, helper.make_node("Constant", [], ["fc1.w"],
                                          value=numpy_helper.from_array(
                                              numpy_helper.to_array(w1), "fc1.w")))
    graph.initializer.remove(w1)
    lifted = analyze(model, {"x": X}, use_cache=False, **FAST)
    plain = analyze(mlp_model(), {"x": X}, use_cache=False, **FAST)
    assert [layer.name for layer in lifted.layers] == ["fc1.w", "fc2.w"]
    assert [layer.trace for layer in lifted.layers] == [layer.trace for layer in plain.layers]


def test_bad_requests_are_one_line_user_errors(tmp_path: Path) -> None:
    with pytest.raises(HawqError, match="labels"):
        analyze(mlp_model(), {"x": X}, use_cache=False, loss="ce", **FAST)
    with pytest.raises(HawqError, match="unknown output"):
        analyze(mlp_model(), {"x": X}, use_cache=False, outputs=("nope",), **FAST)
    with pytest.raises(HawqError, match="loss must be"):
        AnalysisSettings(loss="hinge")
    with pytest.raises(HawqError, match="CUDA"):
        if torch.cuda.is_available():  # pragma: no cover - CPU-only test machines
            raise HawqError("CUDA present; nothing to check")
        analyze(mlp_model(), {"x": X}, use_cache=False, device="cuda", **FAST)


def test_max_samples_keeps_the_first_samples(tmp_path: Path) -> None:
    cut = analyze(mlp_model(), {"x": X}, use_cache=False, max_samples=12, **FAST)
    head = analyze(mlp_model(), {"x": X[:12]}, use_cache=False, **FAST)
    assert cut.samples == 12
    assert [layer.trace for layer in cut.layers] == [layer.trace for layer in head.layers]


def test_progress_reports_every_stage_in_its_units() -> None:
    calls: list[tuple[str, int, int]] = []
    result = analyze(mlp_model(), {"x": X}, use_cache=False, eigs=1, eig_max_iter=30,
                     density="global", density_steps=5, density_runs=2, activations=True,
                     progress=lambda stage, n, total: calls.append((stage, n, total)),
                     **FAST)
    done = {stage: sum(n for s, n, _ in calls if s == stage) for stage, _, _ in calls}
    assert done["traces"] == result.probes and done["activations"] == result.activation_probes
    assert done["density"] == 5 and 1 <= done["eigenvalues"] <= 30
    assert {total for s, _, total in calls if s == "traces"} == {FAST["max_probes"]}
