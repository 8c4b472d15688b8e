"""Reproducible builds and concurrency-safe caches.

Same model + data + recipe + seed -> byte-identical quantized model and identical report
numbers, also across processes with different hash seeds (set and dict iteration order) and
when two builds run at the same time. The analysis cache is keyed by content hashes and is
written atomically, so concurrent writers and readers never see a partial entry.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from hawq_onnx.analysis import AnalysisSettings, analyze
from hawq_onnx.hessian.cache import ResultCache
from tests.conftest import MODELS
from tests.tiny_models import save_data, save_mlp

FASHION = MODELS / "fashion_cnn_op17.onnx"
CALIB = MODELS / "fashion_calib.npz"
_VOLATILE = {"timings", "total_s"}  # wall-clock times: the only fields allowed to differ


def _launch(argv: list[str], hash_seed: int, cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONHASHSEED": str(hash_seed), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "hawq_onnx.cli", *argv], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run_together(commands: list[tuple[list[str], int]], cwd: Path) -> list[str]:
    """Start all commands at once; wait; each must exit 0. Returns their stdout."""
    procs = [_launch(argv, seed, cwd) for argv, seed in commands]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        outputs.append(out)
    return outputs


def _stable(value: Any) -> Any:
    """The report without wall-clock timings."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in _VOLATILE}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def test_two_simultaneous_builds_are_byte_identical(tmp_path: Path) -> None:
    """One recipe, two processes started together with different PYTHONHASHSEED."""
    (tmp_path / "recipe.toml").write_text(f"""
[quantize]
model = "{FASHION}"
calib = "{CALIB}"
weight-bits = 4
max-calib-samples = 128
calib-method = "mse"
""")
    commands = [(["quantize", "--config", "recipe.toml", "-o", f"q{i}.onnx", "--report",
                  f"r{i}.json"], seed) for i, seed in enumerate((1, 2))]
    _run_together(commands, tmp_path)
    first, second = (tmp_path / "q0.onnx").read_bytes(), (tmp_path / "q1.onnx").read_bytes()
    assert first == second and len(first) > 10_000
    reports = [json.loads((tmp_path / f"r{i}.json").read_text()) for i in range(2)]
    for report in reports:
        report["build"]["recipe"].pop("output")
        report["build"]["recipe"].pop("report")
    assert _stable(reports[0]) == _stable(reports[1])
    assert reports[0]["build"]["inputs"]["model"]["path"] == str(FASHION)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "q0.onnx", "q1.onnx", "r0.json", "r1.json", "recipe.toml"]


def test_analysis_is_deterministic_across_processes(tmp_path: Path) -> None:
    """Every section (traces, eigenvalues, density, activation traces): the two report
    files are byte-identical except the top-level ``timings``, the one wall-clock field."""
    model, calib = save_mlp(tmp_path / "mlp.onnx"), save_data(tmp_path / "calib.npz")
    argv = ["analyze", str(model), "--calib", str(calib), "--no-cache", "--seed", "7",
            "--min-probes", "8", "--max-probes", "32", "--eigs", "1", "--density",
            "--activations"]
    _run_together([([*argv, "--report", "a.json"], 1), ([*argv, "--report", "b.json"], 2)],
                  tmp_path)
    texts = [(tmp_path / n).read_text() for n in ("a.json", "b.json")]
    a, b = (json.loads(text) for text in texts)
    for text, report in zip(texts, (a, b), strict=True):  # canonical: bytes follow from data
        assert text == json.dumps(report, indent=2) + "\n"
    assert set(a["timings"]) == {"traces", "eigenvalues", "density", "activations"}
    del a["timings"], b["timings"]
    assert json.dumps(a, indent=2) == json.dumps(b, indent=2) and a["probes"] >= 8
    assert a["layers"][0]["trace"] > 0 and a["layers"][0]["top_eigenvalue"] > 0
    assert a["density"] and a["activations"]
    other = analyze(model, calib, AnalysisSettings(seed=8, min_probes=8, max_probes=32),
                    use_cache=False)
    assert other.layers[0].trace != a["layers"][0]["trace"]  # the seed does matter


def test_two_analyses_share_one_cache_entry(tmp_path: Path) -> None:
    """Two processes on the same cache directory at once: both succeed, one entry, no
    temporary files; a third run is answered from the cache with the same numbers."""
    model, calib = save_mlp(tmp_path / "mlp.onnx"), save_data(tmp_path / "calib.npz")
    cache = tmp_path / "cache"
    argv = ["analyze", str(model), "--calib", str(calib), "--cache-dir", str(cache),
            "--min-probes", "64", "--max-probes", "256", "--rel-tol", "0.001"]
    _run_together([([*argv, "--report", "a.json"], 3), ([*argv, "--report", "b.json"], 4)],
                  tmp_path)
    entries = sorted((cache / "analysis").iterdir())
    assert len(entries) == 1 and entries[0].suffix == ".json"
    assert [p for p in cache.rglob("*") if p.name.startswith(".")] == []
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert _stable(a) == _stable(b)
    again = analyze(model, calib, AnalysisSettings(min_probes=64, max_probes=256,
                                                   rel_tol=0.001), cache_dir=cache)
    assert again.cached and again.layers[0].trace == a["layers"][0]["trace"]


def _hammer(directory: str, key: str, text: str, rounds: int, queue: Any) -> None:
    """Alternate writes and reads of one cache key; report any read that is not whole."""
    from hawq_onnx.hessian.result import AnalysisResult

    cache = ResultCache(directory)
    result = AnalysisResult.from_json(text)
    bad = 0
    for _ in range(rounds):
        cache.put(key, result)
        got = cache.get(key)
        if got is None or got.to_json() != result.to_json():
            bad += 1
    queue.put(bad)


def test_cache_writes_are_atomic_under_contention(tmp_path: Path) -> None:
    model, calib = save_mlp(tmp_path / "mlp.onnx"), save_data(tmp_path / "calib.npz")
    result = analyze(model, calib, AnalysisSettings(min_probes=4, max_probes=4),
                     use_cache=False)
    result.layers[0].eigenvalues = list(np.linspace(0, 1, 5000))  # a ~100 kB entry
    context = multiprocessing.get_context("fork")  # the workers only do file I/O
    queue = context.Queue()
    workers = [context.Process(target=_hammer, args=(str(tmp_path / "cache"), "k" * 64,
                                                     result.to_json(), 100, queue))
               for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
        assert worker.exitcode == 0
    assert [queue.get(timeout=5) for _ in workers] == [0, 0, 0]
    assert sorted(p.name for p in (tmp_path / "cache" / "analysis").iterdir()) == [
        "k" * 64 + ".json"]


def test_cache_key_follows_content_not_paths(tmp_path: Path) -> None:
    """A renamed copy of the same model and data hits the entry; changed data misses."""
    model, calib = save_mlp(tmp_path / "mlp.onnx"), save_data(tmp_path / "calib.npz")
    cache = tmp_path / "cache"
    settings = AnalysisSettings(min_probes=4, max_probes=4)
    first = analyze(model, calib, settings, cache_dir=cache)
    (tmp_path / "copy").mkdir()
    moved_model = tmp_path / "copy" / "renamed.onnx"
    moved_model.write_bytes(model.read_bytes())
    moved_calib = tmp_path / "copy" / "data.npz"
    moved_calib.write_bytes(calib.read_bytes())
    hit = analyze(moved_model, moved_calib, settings, cache_dir=cache)
    assert hit.cached and hit.total_trace == first.total_trace
    assert hit.model == str(moved_model)  # the model analyzed now, not the entry's first one
    assert {**hit.to_dict(), "model": ""} == {**first.to_dict(), "model": ""}
    changed = save_data(tmp_path / "copy" / "other.npz", seed=5)
    miss = analyze(moved_model, changed, settings, cache_dir=cache)
    assert not miss.cached and miss.data_sha256 != first.data_sha256
    assert len(list((cache / "analysis").iterdir())) == 2
