"""The Hessian engine against exact Hessians of tiny models (torch.autograd.functional).

Every estimator is checked on models with fewer than 100 weights, where the full Hessian
of the same objective is cheap to form: HVPs exactly, traces within 3 SE and 5 %, top
eigenvalues within 1e-3 of numpy.linalg.eigh, SLQ moments, activation traces.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from hawq_onnx.errors import HawqError
from hawq_onnx.hessian.activations import activation_sampler, reached_tensors
from hawq_onnx.hessian.density import spectral_density
from hawq_onnx.hessian.eigen import top_eigenvalues
from hawq_onnx.hessian.hutchinson import (
    StoppingRule,
    global_probe_sampler,
    per_layer_sampler,
    run_hutchinson,
)
from hawq_onnx.hessian.hvp import HessianVectorProduct
from hawq_onnx.hessian.objective import Objective
from hawq_onnx.hessian.operators import random_starts
from hawq_onnx.mirror import Mirror

# ---------------------------------------------------------------------- tiny models


def _model(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray], x_shape: list,
           out: str, out_shape: list) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(a.astype(np.float32), n) for n, a in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                             ir_version=10)


def mlp_model(softmax: bool = False, seed: int = 0) -> onnx.ModelProto:
    """x[N,4] -Gemm(4x6)-> Tanh -MatMul(6x5)-> +b -> logits (or Softmax): 54 weights."""
    rng = np.random.default_rng(seed)
    inits = {"fc1.w": rng.standard_normal((4, 6)) * 0.8, "fc1.b": rng.standard_normal(6) * 0.1,
             "fc2.w": rng.standard_normal((6, 5)) * 0.8, "fc2.b": rng.standard_normal(5) * 0.1}
    nodes = [helper.make_node("Gemm", ["x", "fc1.w", "fc1.b"], ["h"]),
             helper.make_node("Tanh", ["h"], ["a"]),
             helper.make_node("MatMul", ["a", "fc2.w"], ["m"]),
             helper.make_node("Add", ["m", "fc2.b"], ["logits"])]
    out = "logits"
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=-1))
        out = "probs"
    return _model(nodes, inits, ["N", 4], out, ["N", 5])


def conv_model(seed: int = 1) -> onnx.ModelProto:
    """x[N,1,4,4] -Conv(2x1x3x3)-> Tanh -> Flatten -> Gemm(8x3, transB): 42 weights."""
    rng = np.random.default_rng(seed)
    inits = {"conv.w": rng.standard_normal((2, 1, 3, 3)) * 0.6,
             "conv.b": rng.standard_normal(2) * 0.1,
             "fc.w": rng.standard_normal((3, 8)) * 0.7, "fc.b": rng.standard_normal(3) * 0.1}
    nodes = [helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["c"]),
             helper.make_node("Tanh", ["c"], ["t"]),
             helper.make_node("Flatten", ["t"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], transB=1)]
    return _model(nodes, inits, ["N", 1, 4, 4], "logits", ["N", 3])


MLP_WEIGHTS = ["fc1.w", "fc2.w"]
CONV_WEIGHTS = ["conv.w", "fc.w"]


def mlp_data(n: int = 20, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)


def conv_data(n: int = 12, seed: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, 4, 4)).astype(np.float32)


def objective_for(model: onnx.ModelProto, weights: Sequence[str], x: np.ndarray,
                  loss: str = "auto", labels: np.ndarray | None = None,
                  dtype: torch.dtype = torch.float64, batch: int = 8) -> Objective:
    """Uneven micro-batches on purpose (20 = 8 + 8 + 4): the weighting must be right."""
    mirror = Mirror(model, weight_names=list(weights), dtype=dtype)
    batches = [{"x": x[i:i + batch]} for i in range(0, len(x), batch)]
    return Objective(mirror, batches, labels=labels, loss=loss)


def exact_hessian(objective: Objective) -> np.ndarray:
    """The full Hessian of Σ_b w_b loss_b w.r.t. the flattened weights (float64)."""
    mirror = objective.mirror
    params = list(mirror.weights.values())
    paths = {id(p): n for n, p in mirror.named_parameters()}
    names = [paths[id(p)] for p in params]
    sizes = [p.numel() for p in params]

    def loss(theta: torch.Tensor) -> torch.Tensor:
        parts = torch.split(theta, sizes)
        values = {n: t.view(p.shape) for n, t, p in zip(names, parts, params, strict=True)}
        total = theta.new_zeros(())
        for batch in objective.batches:
            out = torch.func.functional_call(mirror, values, kwargs=objective.feeds(batch))
            total = total + objective.weight(batch) * objective.loss(out, batch)
        return total

    theta = torch.cat([p.detach().reshape(-1) for p in params]).double()
    return torch.autograd.functional.hessian(loss, theta).numpy()


def block_slices(objective: Objective) -> list[slice]:
    sizes = [p.numel() for p in objective.mirror.weights.values()]
    offsets = np.cumsum([0, *sizes])
    return [slice(int(a), int(b)) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]


def top_by_magnitude(matrix: np.ndarray, k: int) -> np.ndarray:
    values = np.linalg.eigvalsh(matrix)
    return values[np.argsort(-np.abs(values))][:k]


LABELS = np.random.default_rng(7).integers(0, 5, 20)


def _objective(loss: str, dtype: torch.dtype = torch.float64) -> Objective:
    labels = LABELS if loss == "ce" else None
    return objective_for(mlp_model(), MLP_WEIGHTS, mlp_data(), loss, labels, dtype)


# ---------------------------------------------------------------------- HVPs


@pytest.mark.parametrize("loss", ["kl", "ce", "mse"])
@pytest.mark.parametrize("mode", ["double_backprop", "forward_over_reverse"])
def test_hvp_equals_exact_hessian_times_vector(loss: str, mode: str) -> None:
    objective = _objective(loss)
    hessian = exact_hessian(objective)
    hvp = HessianVectorProduct(objective, mode)
    rng = np.random.default_rng(3)
    v = rng.standard_normal(hessian.shape[0])
    blocks = hvp.layout.split(torch.from_numpy(v), [0, 1])
    (product,) = hvp.apply([blocks])
    got = hvp.layout.join(product, [0, 1]).numpy()
    np.testing.assert_allclose(got, hessian @ v, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("loss", ["kl", "mse"])
def test_gauss_newton_equals_the_hessian_at_the_float_point(loss: str) -> None:
    objective = _objective(loss)
    hessian = exact_hessian(objective)
    hvp = HessianVectorProduct(objective, "gauss_newton")
    v = np.random.default_rng(5).standard_normal((3, hessian.shape[0]))
    products = hvp.apply([hvp.layout.split(torch.from_numpy(x), [0, 1]) for x in v])
    got = np.stack([hvp.layout.join(p, [0, 1]).numpy() for p in products])
    np.testing.assert_allclose(got, v @ hessian, rtol=1e-9, atol=1e-12)
    assert HessianVectorProduct(objective).mode == "gauss_newton"  # what auto picks


def test_gauss_newton_is_refused_for_cross_entropy() -> None:
    objective = _objective("ce")
    assert HessianVectorProduct(objective).mode == "double_backprop"
    with pytest.raises(HawqError, match="gauss_newton"):
        HessianVectorProduct(objective, "gauss_newton")


@pytest.mark.parametrize("mode", ["forward_over_reverse", "gauss_newton"])
def test_all_modes_agree_in_float32_vmapped_or_not(mode: str) -> None:
    objective = objective_for(conv_model(), CONV_WEIGHTS, conv_data(), dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    vectors = [{0: torch.randn(2, 1, 3, 3, generator=generator),
                1: torch.randn(3, 8, generator=generator)} for _ in range(3)]
    reference = HessianVectorProduct(objective, "double_backprop").apply(vectors)
    vmapped = HessianVectorProduct(objective, mode)
    looped = HessianVectorProduct(objective, mode)
    looped.vectorize = False
    for hvp in (vmapped, looped):
        for x, y in zip(reference, hvp.apply(vectors), strict=True):
            for block in (0, 1):
                torch.testing.assert_close(y[block], x[block], rtol=1e-5, atol=1e-6)
    assert vmapped.vectorize and vmapped.vectorize_error is None


def test_vmap_failure_falls_back_to_one_pass_per_vector(monkeypatch) -> None:
    objective = objective_for(conv_model(), CONV_WEIGHTS, conv_data())
    vectors = [{1: torch.ones(3, 8, dtype=torch.float64) * i} for i in (1, 2)]
    want = HessianVectorProduct(objective, "double_backprop").apply(vectors)

    def broken_vmap(fn):
        raise RuntimeError("no batching rule for aten::something")

    monkeypatch.setattr(torch.func, "vmap", broken_vmap)
    hvp = HessianVectorProduct(objective, "forward_over_reverse")
    got = hvp.apply(vectors)
    assert not hvp.vectorize and "no batching rule" in hvp.vectorize_error
    for x, y in zip(want, got, strict=True):
        torch.testing.assert_close(y[0], x[0])
        torch.testing.assert_close(y[1], x[1])


def test_restricted_outputs_and_partial_vectors_give_diagonal_blocks() -> None:
    objective = _objective("kl")
    hessian = exact_hessian(objective)
    s0, s1 = block_slices(objective)
    v1 = np.random.default_rng(4).standard_normal(s1.stop - s1.start)
    hvp = HessianVectorProduct(objective)
    (product,) = hvp.apply([{1: torch.from_numpy(v1).view(6, 5)}], outputs=[[1]])
    assert set(product) == {1}
    np.testing.assert_allclose(product[1].reshape(-1).numpy(), hessian[s1, s1] @ v1,
                               rtol=1e-9, atol=1e-12)


def test_kl_hessian_is_psd_with_zero_gradient_at_the_float_point() -> None:
    objective = _objective("kl")
    hessian = exact_hessian(objective)
    values = np.linalg.eigvalsh(hessian)
    assert values.min() > -1e-10 * values.max()
    gradient = HessianVectorProduct(objective).gradient()
    assert max(float(g.abs().max()) for g in gradient.values()) < 1e-12


# ---------------------------------------------------------------------- Hutchinson


@pytest.mark.parametrize(("loss", "rel_tol"), [("kl", 0.01), ("ce", 0.02)])
def test_global_probe_traces_match_exact_per_layer_traces(loss: str, rel_tol: float) -> None:
    objective = _objective(loss)
    hessian = exact_hessian(objective)
    exact = [np.trace(hessian[s, s]) for s in block_slices(objective)]
    hvp = HessianVectorProduct(objective)
    rule = StoppingRule(rel_tol=rel_tol, min_probes=16, max_probes=4096, chunk=256)
    estimate = run_hutchinson(global_probe_sampler(hvp, torch.Generator().manual_seed(0)), 2,
                              rule)
    assert estimate.converged.all() and estimate.probes < 4096
    for mean, se, want in zip(estimate.mean, estimate.se, exact, strict=True):
        assert abs(mean - want) <= 3 * se
        assert abs(mean - want) <= 0.05 * abs(want)
    assert abs(estimate.total_mean - np.trace(hessian)) <= 3 * estimate.total_se


def test_per_layer_loop_matches_exact_traces() -> None:
    objective = objective_for(conv_model(), CONV_WEIGHTS, conv_data())
    hessian = exact_hessian(objective)
    exact = [np.trace(hessian[s, s]) for s in block_slices(objective)]
    hvp = HessianVectorProduct(objective)
    rule = StoppingRule(rel_tol=0.02, min_probes=16, max_probes=2048, chunk=128)
    estimate = run_hutchinson(per_layer_sampler(hvp, torch.Generator().manual_seed(1)), 2,
                              rule)
    assert estimate.converged.all()
    for mean, se, want in zip(estimate.mean, estimate.se, exact, strict=True):
        assert abs(mean - want) <= 3 * se
        assert abs(mean - want) <= 0.05 * abs(want)


def test_a_few_probes_stay_within_three_standard_errors() -> None:
    """The default rule (rel_tol 0.05, min 16) on the conv model: the SE it reports is
    honest at the point where it stops, not only in the limit."""
    objective = objective_for(conv_model(), CONV_WEIGHTS, conv_data())
    hessian = exact_hessian(objective)
    hvp = HessianVectorProduct(objective)
    estimate = run_hutchinson(global_probe_sampler(hvp, torch.Generator().manual_seed(2)), 2,
                              StoppingRule())
    assert 16 <= estimate.probes <= 256
    for s, mean, se in zip(block_slices(objective), estimate.mean, estimate.se, strict=True):
        assert abs(mean - np.trace(hessian[s, s])) <= 3 * se


def _masked(values: np.ndarray, active: np.ndarray) -> np.ndarray:
    return np.where(active, values, np.nan)


def test_stopping_rule_stops_at_min_when_exact_and_at_max_when_noisy() -> None:
    constant = run_hutchinson(lambda k, on: _masked(np.full((k, 3), 2.0), on), 3,
                              StoppingRule(chunk=5))
    assert constant.probes == 20  # chunks of 5 until >= min_probes (16)
    assert constant.converged.all() and np.all(constant.se == 0)
    rng = np.random.default_rng(0)
    noisy = run_hutchinson(
        lambda k, on: _masked(rng.standard_normal((k, 2)) + [0.0, 100.0], on), 2,
        StoppingRule(max_probes=64, chunk=16))
    assert noisy.probes == 64
    assert noisy.converged.tolist() == [False, True]
    assert noisy.counts.tolist() == [64, 16]  # the settled block left the probes at 16


def test_stopping_rule_draws_chunks_until_se_condition() -> None:
    calls: list[tuple[int, list[bool]]] = []
    rng = np.random.default_rng(1)

    def sample(k: int, active: np.ndarray) -> np.ndarray:
        calls.append((k, active.tolist()))
        return _masked(10 + rng.standard_normal((k, 1)) * 5.0, active)

    estimate = run_hutchinson(sample, 1, StoppingRule(rel_tol=0.05, chunk=8))
    # SE ≈ 5/sqrt(n) ≤ 0.5 needs n ≈ 100: several chunks, then a stop below the cap
    assert 64 <= estimate.probes < 256 and {k for k, _ in calls} == {8}
    assert all(active == [True] for _, active in calls)
    assert estimate.se[0] <= 0.05 * estimate.mean[0]
    before = estimate.samples[:-8, 0]  # one chunk earlier the rule did not hold yet
    assert before.std(ddof=1) / np.sqrt(len(before)) > 0.05 * before.mean()


def test_settled_layers_leave_the_probes_and_the_rest_stay_exact() -> None:
    """A big, well-determined layer next to a small one: once the big one settles, the
    small one's probes no longer carry the cross terms, and its estimate stays unbiased."""
    objective = objective_for(conv_model(), CONV_WEIGHTS, conv_data())
    hessian = exact_hessian(objective)
    hvp = HessianVectorProduct(objective)
    rule = StoppingRule(rel_tol=0.03, min_probes=16, max_probes=4096, chunk=16)
    estimate = run_hutchinson(global_probe_sampler(hvp, torch.Generator().manual_seed(0)), 2,
                              rule)
    counts = estimate.counts.tolist()
    assert estimate.converged.all() and counts[0] != counts[1]
    assert max(counts) == estimate.probes
    for s, mean, se in zip(block_slices(objective), estimate.mean, estimate.se, strict=True):
        assert abs(mean - np.trace(hessian[s, s])) <= 3 * se


# ---------------------------------------------------------------------- eigenvalues


@pytest.mark.parametrize("loss", ["kl", "ce"])
def test_lanczos_top_eigenvalues_match_eigh(loss: str) -> None:
    exact_objective = _objective(loss)
    hessian = exact_hessian(exact_objective)
    s0, s1 = block_slices(exact_objective)
    objective = _objective(loss, dtype=torch.float32)  # the engine in its working precision
    hvp = HessianVectorProduct(objective)
    estimates = top_eigenvalues(hvp, [[0], [1], [0, 1]], 3, torch.Generator().manual_seed(0))
    for estimate, block in zip(estimates, [hessian[s0, s0], hessian[s1, s1], hessian],
                               strict=True):
        assert estimate.converged and estimate.method == "lanczos"
        want = top_by_magnitude(block, 3)
        np.testing.assert_allclose(estimate.values, want, rtol=1e-3)
        assert estimate.products <= 54


def test_power_iteration_with_deflation_matches_eigh() -> None:
    objective = objective_for(conv_model(), CONV_WEIGHTS, conv_data())
    hessian = exact_hessian(objective)
    hvp = HessianVectorProduct(objective)
    estimates = top_eigenvalues(hvp, [[0, 1]], 2, torch.Generator().manual_seed(0),
                                method="power", tol=1e-7, max_iter=2000)
    assert estimates[0].converged
    np.testing.assert_allclose(estimates[0].values, top_by_magnitude(hessian, 2), rtol=1e-3)


def test_unconverged_eigenvalues_are_reported_as_such() -> None:
    objective = objective_for(conv_model(), CONV_WEIGHTS, conv_data())
    hvp = HessianVectorProduct(objective)
    (lanczos,) = top_eigenvalues(hvp, [[0, 1]], 3, torch.Generator().manual_seed(0),
                                 max_iter=2)
    (power,) = top_eigenvalues(hvp, [[0, 1]], 1, torch.Generator().manual_seed(0),
                               method="power", tol=1e-12, max_iter=3)
    assert not lanczos.converged and lanczos.products == 2
    assert not power.converged and power.products == 3


# ---------------------------------------------------------------------- density


def test_slq_moments_are_the_exact_quadratic_forms_of_its_start_vectors() -> None:
    objective = _objective("kl")
    hessian = exact_hessian(objective)
    hvp = HessianVectorProduct(objective)
    (density,) = spectral_density(hvp, [[0, 1]], torch.Generator().manual_seed(5),
                                  steps=12, runs=6)
    starts = random_starts(hvp, [[0, 1]], torch.Generator().manual_seed(5), count=6)
    d = hessian.shape[0]
    for nodes, weights, z in zip(density.nodes, density.weights, starts, strict=True):
        z = z.numpy()
        assert abs(sum(weights) - 1) < 1e-10
        assert abs(d * np.dot(weights, nodes) - z @ hessian @ z) < 1e-8 * np.abs(hessian).sum()
        frob = d * np.dot(weights, np.square(nodes))
        assert abs(frob - z @ hessian @ hessian @ z) < 1e-8 * (hessian ** 2).sum()


def test_slq_density_moments_estimate_trace_and_frobenius() -> None:
    objective = objective_for(conv_model(), CONV_WEIGHTS, conv_data())
    hessian = exact_hessian(objective)
    hvp = HessianVectorProduct(objective)
    (density,) = spectral_density(hvp, [[0, 1]], torch.Generator().manual_seed(0),
                                  steps=20, runs=64)
    assert abs(density.trace - np.trace(hessian)) <= 3 * density.trace_se
    assert abs(density.trace - np.trace(hessian)) <= 0.1 * np.trace(hessian)
    frob = float((hessian ** 2).sum())
    assert abs(density.frobenius_sq - frob) <= 0.25 * frob
    grid = np.linspace(-0.5, 1.5 * np.linalg.eigvalsh(hessian).max(), 4001)
    mass = np.trapezoid(density.curve(grid), grid)
    assert abs(mass - 1.0) < 0.02


def test_full_length_slq_recovers_the_spectrum_per_layer() -> None:
    objective = objective_for(conv_model(), CONV_WEIGHTS, conv_data())
    hessian = exact_hessian(objective)
    s0, _ = block_slices(objective)
    hvp = HessianVectorProduct(objective)
    (density,) = spectral_density(hvp, [[0]], torch.Generator().manual_seed(0),
                                  steps=18, runs=1)
    want = np.linalg.eigvalsh(hessian[s0, s0])
    nodes = np.sort(density.nodes[0])
    # the Krylov space may close early on clustered zeros; every node is an eigenvalue
    scale = np.abs(want).max()
    assert all(np.min(np.abs(want - node)) < 1e-6 * scale for node in nodes)
    assert abs(nodes.max() - want.max()) < 1e-8 * scale


# ---------------------------------------------------------------------- activations


def _captured(mirror: Mirror, tensor: str, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
    seen: dict[str, torch.Tensor] = {}
    handle = mirror.add_hook(tensor, lambda n, t: seen.setdefault(n, t.detach()))
    with torch.no_grad():
        mirror(**feeds)
    handle.remove()
    return seen[tensor]


def exact_activation_trace(objective: Objective, tensor: str) -> float:
    """Σ_b w_b Tr(∂²loss_b/∂a_b²) by replacing the tensor with a free variable."""
    mirror = objective.mirror
    total = 0.0
    for batch in objective.batches:
        base = _captured(mirror, tensor, objective.feeds(batch))

        def loss(flat: torch.Tensor, base: torch.Tensor = base, batch=batch) -> torch.Tensor:
            handle = mirror.add_hook(tensor, lambda n, t: flat.view(base.shape))
            try:
                return objective.batch_loss(batch)
            finally:
                handle.remove()

        hessian = torch.autograd.functional.hessian(loss, base.reshape(-1).clone())
        total += objective.weight(batch) * float(torch.trace(hessian))
    return total


@pytest.mark.parametrize("loss", ["kl", "ce"])
def test_activation_traces_match_exact(loss: str) -> None:
    objective = _objective(loss)
    for p in objective.mirror.parameters():
        p.requires_grad_(False)  # the exact reference differentiates activations only
    exact = [exact_activation_trace(objective, t) for t in ("x", "a")]
    for p in objective.mirror.parameters():
        p.requires_grad_(True)
    tensors = reached_tensors(objective, ["x", "a", "no_such_tensor"])
    assert tensors == ["x", "a"]
    rule = StoppingRule(rel_tol=0.01, max_probes=4096, chunk=256)
    estimate = run_hutchinson(activation_sampler(objective, tensors,
                                                 torch.Generator().manual_seed(0)), 2, rule)
    assert estimate.converged.all()
    for mean, se, want in zip(estimate.mean, estimate.se, exact, strict=True):
        assert abs(mean - want) <= 3 * se
        assert abs(mean - want) <= 0.05 * abs(want)


def test_probabilities_output_gives_the_same_kl_hessian_as_logits() -> None:
    """A model ending in Softmax is read as a distribution, not re-softmaxed."""
    with_softmax = objective_for(mlp_model(softmax=True), MLP_WEIGHTS, mlp_data(), "auto")
    assert with_softmax.losses[0].kind == "kl" and with_softmax.losses[0].probabilities
    plain = objective_for(mlp_model(), MLP_WEIGHTS, mlp_data(), "kl")
    np.testing.assert_allclose(exact_hessian(with_softmax), exact_hessian(plain),
                               rtol=1e-6, atol=1e-9)


def test_identical_seeds_give_identical_numbers() -> None:
    def run(seed: int) -> np.ndarray:
        objective = objective_for(conv_model(), CONV_WEIGHTS, conv_data(),
                                  dtype=torch.float32)
        hvp = HessianVectorProduct(objective)
        generator = torch.Generator().manual_seed(seed)
        return run_hutchinson(global_probe_sampler(hvp, generator), 2,
                              StoppingRule(min_probes=8, max_probes=8)).samples

    first, again, other = run(3), run(3), run(4)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def _sequence_softmax_model() -> onnx.ModelProto:
    """x[N, 4] -> MatMul(4x6) -> Reshape [N, 2, 3] -> Softmax(last axis): one distribution
    per position, like a CTC text recognizer's [N, steps, classes] output."""
    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 6)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([-1, 2, 3], dtype=np.int64), "shape")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Reshape", ["h", "shape"], ["r"]),
             helper.make_node("Softmax", ["r"], ["probs"], axis=-1)]
    graph = helper.make_graph(
        nodes, "seq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["n", 2, 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                             ir_version=10)


def test_per_position_distributions_get_kl_and_gauss_newton_is_exact() -> None:
    """auto picks KL per position for a [N, steps, classes] softmax (it picked MSE on the
    probabilities before), the value is the mean KL over samples and positions, and the
    Gauss–Newton products equal the exact Hessian's at the float point."""
    x = mlp_data(20)
    objective = objective_for(_sequence_softmax_model(), ["w"], x)
    (spec,) = objective.losses
    assert spec.kind == "kl" and spec.probabilities
    q_logits = x.astype(np.float64) @ (numpy_helper.to_array(
        _sequence_softmax_model().graph.initializer[0]).astype(np.float64) * 1.1)
    q = torch.softmax(torch.from_numpy(q_logits.reshape(-1, 2, 3)), dim=-1)
    p = torch.softmax(torch.from_numpy(q_logits.reshape(-1, 2, 3) / 1.1), dim=-1)
    batch = next(iter(objective.batches))
    manual = (p[:8] * (p[:8].log() - q[:8].log())).sum(-1).mean()
    got = objective.loss([q[:8]], batch)
    assert float(got) == pytest.approx(float(manual), rel=1e-6)
    hessian = exact_hessian(objective)
    hvp = HessianVectorProduct(objective, "gauss_newton")
    v = np.random.default_rng(9).standard_normal((2, hessian.shape[0]))
    products = hvp.apply([hvp.layout.split(torch.from_numpy(r), [0]) for r in v])
    got_h = np.stack([hvp.layout.join(prod, [0]).numpy() for prod in products])
    np.testing.assert_allclose(got_h, v @ hessian, rtol=1e-7, atol=1e-10)
    assert np.trace(hessian) > 0
