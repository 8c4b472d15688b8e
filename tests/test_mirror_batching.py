"""Verified batch relaxation: the mirror is fed ``--batch-size`` samples at once on a model
that declares a fixed batch of 1, only when it computes the same thing as sample by sample."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from hawq_onnx.analysis import AnalysisSettings, _key_fields, analyze
from hawq_onnx.cli import main
from hawq_onnx.data import Dataset, InputSpec, input_specs, load_npz
from hawq_onnx.hessian.objective import Objective
from hawq_onnx.mirror.batching import relaxed_batch_size
from hawq_onnx.mirror.module import Mirror
from tests.conftest import MODELS
from tests.test_hessian_engine import block_slices, exact_hessian

WEIGHTS = ["conv1.w", "conv2.w", "fc.w"]
SAMPLES = 12


def conv_net(tail: str = "flatten", batch: int | str = 1) -> onnx.ModelProto:
    """x[batch,2,5,5] -Conv(3x3, pad 1)-> Tanh -Conv(1x1)-> Tanh -> tail -> Gemm -> logits.

    ``tail``: ``flatten`` (Flatten, batch-agnostic), ``reshape`` (Reshape to the constant
    ``[1, -1]``: the declared batch baked in, fails on a bigger batch), ``reshape_out``
    (the logits reshaped to ``[1, -1]``: a wrong shape, no error) or ``batch_sum`` (the sum
    over the batch added to the logits: right shape, wrong numbers)."""
    rng = np.random.default_rng(3)
    inits = {"conv1.w": rng.standard_normal((3, 2, 3, 3)) * 0.4,
             "conv1.b": rng.standard_normal(3) * 0.1,
             "conv2.w": rng.standard_normal((2, 3, 1, 1)) * 0.6,
             "fc.w": rng.standard_normal((4, 50)) * 0.2, "fc.b": rng.standard_normal(4) * 0.1}
    nodes = [helper.make_node("Conv", ["x", "conv1.w", "conv1.b"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Tanh", ["c1"], ["t1"]),
             helper.make_node("Conv", ["t1", "conv2.w"], ["c2"]),
             helper.make_node("Tanh", ["c2"], ["t2"])]
    if tail == "reshape":
        inits["flat_shape"] = np.array([1, -1])
        nodes.append(helper.make_node("Reshape", ["t2", "flat_shape"], ["f"]))
    else:
        nodes.append(helper.make_node("Flatten", ["t2"], ["f"], axis=1))
    nodes.append(helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["g"], transB=1))
    if tail == "reshape_out":
        inits["out_shape"] = np.array([1, -1])
        nodes.append(helper.make_node("Reshape", ["g", "out_shape"], ["logits"]))
    elif tail == "batch_sum":
        inits["axis0"] = np.array([0])
        nodes += [helper.make_node("ReduceSum", ["g", "axis0"], ["s"], keepdims=1),
                  helper.make_node("Add", ["g", "s"], ["logits"])]
    else:
        nodes.append(helper.make_node("Identity", ["g"], ["logits"]))
    graph = helper.make_graph(
        nodes, "fixed_batch_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 2, 5, 5])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 4])],
        [numpy_helper.from_array(a if a.dtype.kind == "i" else a.astype(np.float32), n)
         for n, a in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                             ir_version=10)


def conv_data(n: int = SAMPLES) -> np.ndarray:
    return np.random.default_rng(4).standard_normal((n, 2, 5, 5)).astype(np.float32)


def _dataset(model: onnx.ModelProto, x: np.ndarray) -> Dataset:
    return Dataset(Path("<arrays>"), input_specs(model), {"x": x})


def _mirror(model: onnx.ModelProto, dtype: torch.dtype = torch.float32) -> Mirror:
    return Mirror(model, weight_names=WEIGHTS, dtype=dtype)


FAST = {"min_probes": 8, "max_probes": 8, "seed": 5}


# ---------------------------------------------------------------------- the data side
def test_relaxed_batches_ignore_the_declared_batch_along_each_inputs_axis(tmp_path: Path
                                                                         ) -> None:
    """File-backed data: ``relax_fixed`` slices ``batch_size`` samples; onnxruntime's
    batches keep the declared 1. An input batched on axis 1 is sliced on axis 1."""
    x = conv_data(10)
    np.savez(tmp_path / "calib.npz", x=x)
    dataset = load_npz(tmp_path / "calib.npz", conv_net())
    assert [b["x"].shape[0] for b in dataset.batches(4)] == [1] * 10
    relaxed = dataset.batched(4, relax_fixed=True)
    assert len(relaxed) == 3 and len(dataset.batched(4)) == 10
    parts = list(relaxed)
    assert [b["x"].shape for b in parts] == [(4, 2, 5, 5), (4, 2, 5, 5), (2, 2, 5, 5)]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in parts]), x)
    np.testing.assert_array_equal(list(dataset.slice(3, 9).batches(4, True))[1]["x"], x[7:9])
    state = np.arange(2 * 6 * 3, dtype=np.float32).reshape(2, 6, 3)
    spec = InputSpec("state", np.dtype(np.float32), (2, 1, 3), batch_axis=1)
    on_axis1 = Dataset(Path("<arrays>"), [spec], {"state": state})
    assert on_axis1.fixed_batch == 1
    assert [b["state"].shape for b in on_axis1.batches(4)] == [(2, 1, 3)] * 6
    got = [b["state"] for b in on_axis1.batches(4, relax_fixed=True)]
    assert [g.shape for g in got] == [(2, 4, 3), (2, 2, 3)]
    np.testing.assert_array_equal(got[1], state[:, 4:6])


# ---------------------------------------------------------------------- accepted
def test_relaxation_is_accepted_and_traces_equal_the_batch_1_traces() -> None:
    """Same estimator, same data, same seed: the probes are drawn over the weights only, so
    the relaxed run (batches of 8) gives the batch-1 numbers up to summation order."""
    model, x = conv_net(), conv_data()
    assert relaxed_batch_size(_mirror(model), _dataset(model, x), 8) == (8, None)
    relaxed = analyze(model, {"x": x}, AnalysisSettings(batch_size=8, **FAST), use_cache=False)
    single = analyze(model, {"x": x}, AnalysisSettings(batch_size=1, **FAST), use_cache=False)
    assert (relaxed.mirror_batch, relaxed.mirror_batch_reason) == (8, None)
    assert (single.mirror_batch, single.mirror_batch_reason) == (1, None)
    assert relaxed.probes == single.probes == 8 and relaxed.samples == single.samples == 12
    for a, b in zip(relaxed.layers, single.layers, strict=True):
        assert a.trace > 0
        assert a.trace == pytest.approx(b.trace, rel=1e-4)
        assert a.trace_se == pytest.approx(b.trace_se, rel=1e-3)


def test_relaxed_objective_feeds_whole_batches_and_keeps_the_loss() -> None:
    """The mirror sees 3 batches of 5, 5, 2 instead of 12 of 1; the weighted loss and its
    gradient are the batch-1 ones."""
    model, x = conv_net(), conv_data()
    dataset = _dataset(model, x)
    size, _ = relaxed_batch_size(_mirror(model), dataset, 5)
    losses, grads = [], []
    for batches in (dataset.batched(size, relax_fixed=True), dataset.batched(size)):
        objective = Objective(_mirror(model, torch.float64), batches,
                              loss="mse")  # a non-zero loss at the float point: noise added
        sizes = [b.size for b in objective.batches]
        total = sum(objective.weight(b) * objective.loss(
            objective.mirror(x=b.feeds["x"] + 0.1), b) for b in objective.batches)
        losses.append(float(total))
        grads.append(torch.autograd.grad(total, list(objective.mirror.weights.values())))
        assert sizes == ([5, 5, 2] if len(sizes) == 3 else [1] * 12)
    assert losses[0] == pytest.approx(losses[1], rel=1e-12) and losses[0] > 0
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------- refused
@pytest.mark.parametrize(("tail", "why"), [
    ("reshape", "the mirror fails on a batch of 4: RuntimeError"),
    ("reshape_out", "output 'logits' on a batch of 4 differs from the outputs per batch of 1: "
                    "shape (1, 16), per batch [(1, 4), (1, 4), (1, 4), (1, 4)]"),
    ("batch_sum", "output 'logits' on a batch of 4 differs from the outputs per batch of 1: "
                  "max |difference|"),
])
def test_relaxation_is_refused_when_the_graph_bakes_in_the_batch(tail: str, why: str) -> None:
    model, x = conv_net(tail), conv_data()
    size, reason = relaxed_batch_size(_mirror(model), _dataset(model, x), 32)
    assert size == 1 and reason is not None and reason.startswith(why), reason


def test_refused_relaxation_keeps_batch_1_and_exact_traces() -> None:
    """Reshape to [1, -1]: the analysis falls back to batch 1, says why, and its traces are
    the exact Hessian's (float64, many probes) and the plain batch-1 run's, bit for bit."""
    model, x = conv_net("reshape"), conv_data(8)
    settings = AnalysisSettings(batch_size=8, dtype="float64", min_probes=256, max_probes=256,
                                seed=2, chunk=64)
    result = analyze(model, {"x": x}, settings, use_cache=False)
    assert result.mirror_batch == 1
    assert result.mirror_batch_reason.startswith("the mirror fails on a batch of 4")
    objective = Objective(_mirror(model, torch.float64), [{"x": x[i:i + 1]} for i in range(8)])
    hessian = exact_hessian(objective)
    for layer, block in zip(result.layers, block_slices(objective), strict=True):
        exact = float(np.trace(hessian[block, block]))
        assert exact > 0 and abs(layer.trace - exact) <= 3 * layer.trace_se
        assert abs(layer.trace - exact) <= 0.15 * exact
    quick = replace(settings, min_probes=8, max_probes=8)
    refused = analyze(model, {"x": x}, quick, use_cache=False)
    single = analyze(model, {"x": x}, replace(quick, batch_size=1), use_cache=False)
    assert refused.mirror_batch == single.mirror_batch == 1
    assert [a.trace for a in refused.layers] == [b.trace for b in single.layers]


# ---------------------------------------------------------------------- dynamic batch
def test_a_dynamic_batch_changes_nothing() -> None:
    """No check runs (not one forward pass), the batches and the cache key are as before."""
    model, x = conv_net(batch="N"), conv_data()
    mirror = _mirror(model)
    calls: list[tuple[int, ...]] = []
    mirror.add_hook("x", lambda name, value: calls.append(tuple(value.shape)))
    dataset = _dataset(model, x)
    assert relaxed_batch_size(mirror, dataset, 5) == (5, None) and calls == []
    assert [b["x"].shape[0] for b in dataset.batched(5, relax_fixed=True)] == [5, 5, 2]
    settings = AnalysisSettings(batch_size=5, **FAST)
    assert _key_fields(settings, dataset) == settings.key_fields()
    assert "mirror_batching" in _key_fields(settings, _dataset(conv_net(), x))
    result = analyze(model, {"x": x}, settings, use_cache=False)
    assert (result.mirror_batch, result.mirror_batch_reason) == (5, None)
    fixed = analyze(conv_net(), {"x": x}, settings, use_cache=False)  # same graph, batch 1
    for a, b in zip(result.layers, fixed.layers, strict=True):
        assert a.trace == pytest.approx(b.trace, rel=1e-5)


# ---------------------------------------------------------------------- the mixed CLI
def test_mixed_cli_on_fixed_batch_mobilenet_reports_the_mirror_batch(tmp_path: Path) -> None:
    with np.load(MODELS / "fashion_calib.npz") as arrays:
        np.savez(tmp_path / "calib.npz", **{k: arrays[k][:40] for k in arrays.files})
    out, report = tmp_path / "m.onnx", tmp_path / "r.json"
    code = main(["quantize", str(MODELS / "mobilenet_op21.onnx"), "-o", str(out),
                 "--calib", str(tmp_path / "calib.npz"), "--avg-weight-bits", "6",
                 "--batch-size", "8", "--analysis-samples", "24", "--holdout-samples", "16",
                 "--max-probes", "8", "--no-interactions", "--eval-configs", "0",
                 "--no-bias-correction", "--no-cache", "--report", str(report)])
    assert code == 0 and out.stat().st_size > 0
    data = json.loads(report.read_text())
    assert data["mixed"]["mirror_batch"] == {"batch_size": 8, "declared": 1, "reason": None}
    assert not any("mirror batch" in note for note in data["notes"])
    assert data["mixed"]["totals"]["avg_weight_bits"] <= 6 + 1e-9
    quantized = onnx.load(out)
    assert quantized.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1


def test_mixed_cli_notes_why_the_declared_batch_was_kept(tmp_path: Path) -> None:
    """Reshape to [1, -1]: the meters stay at batch 1, the report says why, the run
    completes."""
    model = conv_net("reshape")
    onnx.save(model, tmp_path / "net.onnx")
    np.savez(tmp_path / "calib.npz", x=conv_data(24))
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    code = main(["quantize", str(tmp_path / "net.onnx"), "-o", str(out), "--calib",
                 str(tmp_path / "calib.npz"), "--avg-weight-bits", "6", "--batch-size", "8",
                 "--analysis-samples", "16", "--holdout-samples", "8", "--max-probes", "8",
                 "--no-interactions", "--eval-configs", "0", "--no-cache",
                 "--report", str(report)])
    assert code == 0
    data = json.loads(report.read_text())
    entry = data["mixed"]["mirror_batch"]
    assert (entry["batch_size"], entry["declared"]) == (1, 1)
    assert entry["reason"].startswith("the mirror fails on a batch of 4: RuntimeError")
    assert any(note.startswith("mirror batch: kept the declared batch of 1 for the Hessian")
               for note in data["notes"])
