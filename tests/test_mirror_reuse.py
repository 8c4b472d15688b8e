"""Reading back a stored float pass: a pass with some weights changed must compute exactly what
a full pass computes, while running only the nodes those weights (or a hooked tensor) reach."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from hawq_onnx.hessian.objective import Objective
from hawq_onnx.importer import load_model
from hawq_onnx.mirror import Mirror
from hawq_onnx.mirror.reuse import CleanPasses
from hawq_onnx.mixed import interactions as inter
from hawq_onnx.quant.activations import ActQParams
from tests.conftest import MODELS
from tests.op_harness import IR_FOR_OPSET

WEIGHTS = ("w1", "w2", "w3")


def _chain() -> onnx.ModelProto:
    """x -> MatMul w1 -> Relu -> MatMul w2 -> Relu -> MatMul w3."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (5, 5)).astype(np.float32), n)
             for n in WEIGHTS]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="mm1"),
             helper.make_node("Relu", ["h1"], ["a1"], name="r1"),
             helper.make_node("MatMul", ["a1", "w2"], ["h2"], name="mm2"),
             helper.make_node("Relu", ["h2"], ["a2"], name="r2"),
             helper.make_node("MatMul", ["a2", "w3"], ["y"], name="mm3")]
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                             ir_version=IR_FOR_OPSET[17])


class _Counting:
    """Counts the nodes a mirror actually executes (read-back nodes are not executed)."""

    def __init__(self, mirror: Mirror, monkeypatch: pytest.MonkeyPatch) -> None:
        self.names: list[str] = []
        original = mirror._execute

        def execute(step, scope, env, device):  # type: ignore[no-untyped-def]
            self.names.append(step.node.name)
            return original(step, scope, env, device)

        monkeypatch.setattr(mirror, "_execute", execute)


def _feeds() -> dict[str, torch.Tensor]:
    return {"x": torch.as_tensor(np.random.default_rng(1).normal(size=(7, 5)), dtype=torch.float32)}


@pytest.mark.parametrize("changed, executed", [
    ((), []),
    (("w3",), ["mm3"]),
    (("w2",), ["mm2", "r2", "mm3"]),
    (("w1", "w3"), ["mm1", "r1", "mm2", "r2", "mm3"]),
])
def test_reused_pass_equals_full_pass_and_runs_only_downstream_nodes(
        changed: tuple[str, ...], executed: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    mirror = Mirror(_chain(), weight_names=WEIGHTS)
    store = CleanPasses()
    with torch.no_grad():
        mirror.run(_feeds(), record=store.recorder(0))
        for name in changed:
            mirror.weights[name].mul_(1.5)
        full = mirror.run(_feeds())
        counter = _Counting(mirror, monkeypatch)
        reused = mirror.run(_feeds(), reuse=store.reuse(0, changed))
    assert torch.equal(full[0], reused[0])
    assert counter.names == executed


def test_hooks_see_read_back_tensors_and_their_replacements_propagate(
        monkeypatch: pytest.MonkeyPatch) -> None:
    mirror = Mirror(_chain(), weight_names=WEIGHTS)
    store = CleanPasses()
    seen: list[torch.Tensor] = []
    with torch.no_grad():
        mirror.run(_feeds(), record=store.recorder(0))
        handle = mirror.add_hook("a1", lambda _, v: seen.append(v.clone()) or v * 0.5)
        full = mirror.run(_feeds())
        counter = _Counting(mirror, monkeypatch)
        reused = mirror.run(_feeds(), reuse=store.reuse(0, ()))
        handle.remove()
    assert torch.equal(full[0], reused[0])
    assert torch.equal(seen[0], seen[1])  # the hook got the stored a1, same as computed
    assert counter.names == ["mm2", "r2", "mm3"]


def test_budget_overflow_recomputes_instead_of_approximating() -> None:
    mirror = Mirror(_chain(), weight_names=WEIGHTS)
    store = CleanPasses(budget_bytes=7 * 5 * 4)  # room for one [7, 5] float tensor
    with torch.no_grad():
        mirror.run(_feeds(), record=store.recorder(0))
        mirror.weights["w3"].mul_(-1.0)
        full = mirror.run(_feeds())
        reused = mirror.run(_feeds(), reuse=store.reuse(0, ("w3",)))
    assert store.used_bytes == 7 * 5 * 4 and store.dropped == 4
    assert torch.equal(full[0], reused[0])


def test_recording_refuses_hooks_and_gradients() -> None:
    mirror = Mirror(_chain(), weight_names=WEIGHTS)
    store = CleanPasses()
    with pytest.raises(ValueError, match="no_grad"):
        mirror.run(_feeds(), record=store.recorder(0))
    handle = mirror.add_hook("a1", lambda _, v: None)
    with torch.no_grad(), pytest.raises(ValueError, match="without hooks"):
        mirror.run(_feeds(), record=store.recorder(0))
    handle.remove()
    assert store.reuse(1, ()) is None  # a batch never recorded: no read-back


def test_loss_meter_deltas_match_full_passes_on_the_fashion_cnn() -> None:
    """Every measurement kind the search makes (weights, output shifts, activation Q/DQ,
    channel means) gives bit-identical numbers with and without the stored float pass."""
    model = load_model(MODELS / "fashion_cnn_op17.onnx").model
    data = np.load(MODELS / "fashion_calib.npz")
    batches = [{"input": data["input"][i:i + 32]} for i in range(0, 96, 32)]
    mirror = Mirror(model)
    full = inter.LossMeter(Objective(mirror, batches), reuse_budget_bytes=0)
    fast = inter.LossMeter(Objective(mirror, batches))
    assert len(full.clean) == 0 and len(fast.clean) == 3 and fast.clean.dropped == 0
    assert full.base == fast.base
    names = list(mirror.weights)
    generator = torch.Generator().manual_seed(0)
    for b, name in enumerate(names):
        weight = mirror.weights[name].detach()
        noise = torch.randn(weight.shape, generator=generator)
        substitution = {b: weight + 0.05 * weight.abs().mean() * noise}
        assert full.delta(substitution) == fast.delta(substitution)
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    relu_in = conv.output[0]
    shift = {relu_in: (1, torch.full((mirror.weights[names[0]].shape[0],), 0.01))}
    act = {relu_in: ActQParams(scale=0.05, zero_point=128, bits=8, signed=False)}
    assert full.delta({}, shifts=shift) == fast.delta({}, shifts=shift) != 0.0
    assert full.delta({}, activations=act) == fast.delta({}, activations=act) != 0.0
    means_full = full.channel_means({relu_in: 1})
    means_fast = fast.channel_means({relu_in: 1})
    assert torch.equal(means_full[relu_in], means_fast[relu_in])
