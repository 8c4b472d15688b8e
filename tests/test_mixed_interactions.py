"""Inter-layer corrections: Hessian cross terms against the exact Hessian, measured interactions
against onnxruntime forward passes, the layer graph, and the value of the corrections on the
Fashion CNN (Spearman over 50 held-out configurations, allocations vs uniform and random)."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from hawq_onnx.hessian.hvp import HessianVectorProduct
from hawq_onnx.importer import load_model
from hawq_onnx.mixed import interactions as inter
from hawq_onnx.mixed.ties import layer_choices
from hawq_onnx.quantize import Quantizer
from tests.conftest import MODELS
from tests.op_harness import IR_FOR_OPSET, run_ort

BITS = [2, 3, 4]


def _tiny_model(seed: int = 0) -> onnx.ModelProto:
    """x[N,6] -> MatMul 6x5 -> Tanh -> MatMul 5x4 -> Tanh -> Gemm 4x3 (+bias): 62 weights,
    small enough for the exact Hessian."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(0, 0.8, s).astype(np.float32), n)
             for n, s in (("w1", (6, 5)), ("w2", (5, 4)), ("w3", (4, 3)), ("b3", (3,)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="mm1"),
             helper.make_node("Tanh", ["h1"], ["a1"], name="t1"),
             helper.make_node("MatMul", ["a1", "w2"], ["h2"], name="mm2"),
             helper.make_node("Tanh", ["h2"], ["a2"], name="t2"),
             helper.make_node("Gemm", ["a2", "w3", "b3"], ["logits"], name="gemm")]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                             ir_version=IR_FOR_OPSET[17])


@pytest.fixture(scope="module")
def tiny() -> dict:
    model = _tiny_model()
    quantizer = Quantizer(model)
    choices = layer_choices(quantizer.view, quantizer.placement)
    names = inter.model_weights(quantizer.model, choices)
    x = np.random.default_rng(1).normal(size=(48, 6)).astype(np.float32)
    batches = [{"x": x[:20]}, {"x": x[20:]}]
    objective = inter.make_objective(quantizer, batches, names, dtype=torch.float64)
    perturbations = inter.Perturbations.build(quantizer, objective.mirror, choices, BITS)
    return {"model": model, "quantizer": quantizer, "choices": choices, "x": x,
            "batches": batches, "objective": objective, "perturbations": perturbations}


def _exact_hessian(objective) -> torch.Tensor:
    """``torch.autograd.functional.hessian`` of the calibration objective (KL)."""
    mirror = objective.mirror
    paths = {id(p): n for n, p in mirror.named_parameters()}
    params = list(mirror.weights.values())
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]

    def loss(flat: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(flat, sizes)
        values = {paths[id(p)]: c.reshape(s) for p, c, s in zip(params, chunks, shapes,
                                                                  strict=True)}
        total = flat.new_zeros(())
        for batch in objective.batches:
            out = torch.func.functional_call(mirror, values, kwargs=objective.feeds(batch))
            total = total + objective.weight(batch) * objective.loss(out, batch)
        return total

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    return torch.autograd.functional.hessian(loss, flat)


def _flat(vector: dict, sizes: list[int]) -> torch.Tensor:
    parts = [vector[b].reshape(-1) if b in vector else torch.zeros(n, dtype=torch.float64)
             for b, n in enumerate(sizes)]
    return torch.cat(parts)


def test_quantized_weights_are_the_exporters(tiny: dict) -> None:
    quantizer, pert = tiny["quantizer"], tiny["perturbations"]
    from hawq_onnx.quant.plan import WeightSpec

    for i, choice in enumerate(pert.layers):
        (name,) = choice.names
        block = pert.blocks[i][0]
        for k, bits in enumerate(BITS):
            expected = quantizer.quantized_weight(name, WeightSpec(bits)).dequantize()
            got = pert.quantized[i][k][block].numpy()
            np.testing.assert_array_equal(got.astype(np.float32), expected.astype(np.float32))
            original = numpy_helper.to_array(quantizer.view.initializers[name])
            np.testing.assert_allclose(pert.deltas[i][k][block].numpy(),
                                       expected - original, atol=1e-6)
    norms = pert.sq_norms()
    assert norms.shape == (3, 3) and np.all(norms[:, 0] > norms[:, 2])  # 2 bits > 4 bits


@pytest.mark.parametrize("route", ["output_gram", "hvp"])
def test_cross_terms_match_the_exact_hessian(tiny: dict, route: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Both routes to the couplings (output-space Gram of Gauss–Newton tangents; one HVP per
    unit and width when the Gram would not fit its budget) give the exact Hessian's."""
    objective, pert = tiny["objective"], tiny["perturbations"]
    hvp = HessianVectorProduct(objective)
    assert hvp.mode == "gauss_newton"  # equals the Hessian for KL at the float weights
    hessian = _exact_hessian(objective)
    sizes = hvp.layout.sizes
    budget = inter.GRAM_BUDGET_BYTES if route == "output_gram" else 0
    applied: list[int] = []
    apply = hvp.apply
    monkeypatch.setattr(hvp, "apply", lambda v, **kw: applied.append(len(v)) or apply(v, **kw))
    tables = inter.hessian_couplings(hvp, pert, gram_budget_bytes=budget)
    assert hvp.products == 9 and sum(applied) == (0 if route == "output_gram" else 9)
    monkeypatch.undo()
    assert tables.hvps == 9 and sorted(tables.pairs) == [(0, 1), (0, 2), (1, 2)]
    for i, k in itertools.product(range(3), range(3)):
        d = _flat(pert.deltas[i][k], sizes)
        assert tables.quadratic[i, k] == pytest.approx(0.5 * float(d @ hessian @ d), rel=1e-6)
    for (i, j), table in tables.pairs.items():
        for a, b in itertools.product(range(3), range(3)):
            di = _flat(pert.deltas[i][a], sizes)
            dj = _flat(pert.deltas[j][b], sizes)
            assert table[a, b] == pytest.approx(float(di @ hessian @ dj), rel=1e-6, abs=1e-12)
    # a whole configuration: one HVP gives ½δᵀHδ, split into augmented per-layer shares,
    # and the pairwise model with all pairs reproduces it exactly
    model = inter.with_cross_terms(tables)
    for columns in ([0, 1, 2], [2, 0, 1], [1, 1, 1]):
        full = inter.second_order(hvp, pert, columns)
        d = _flat(pert.vector(columns), sizes)
        assert full.total == pytest.approx(0.5 * float(d @ hessian @ d), rel=1e-6)
        assert full.contributions.sum() == pytest.approx(full.total, rel=1e-9)
        assert model.predict(columns) == pytest.approx(full.total, rel=1e-6)
        np.testing.assert_allclose(model.per_unit(columns), full.contributions, rtol=1e-6)


def _kl(reference: np.ndarray, logits: np.ndarray) -> float:
    def log_softmax(v: np.ndarray) -> np.ndarray:
        v = v.astype(np.float64) - v.max(axis=-1, keepdims=True)
        return v - np.log(np.exp(v).sum(axis=-1, keepdims=True))

    log_p, log_q = log_softmax(reference), log_softmax(logits)
    return float((np.exp(log_p) * (log_p - log_q)).sum(axis=-1).mean())


def _ort_delta(tiny: dict, replaced: dict[str, np.ndarray]) -> float:
    """ΔL of the model with initializers replaced, run by onnxruntime."""
    model = onnx.ModelProto()
    model.CopyFrom(tiny["model"])
    for init in model.graph.initializer:
        if init.name in replaced:
            init.CopyFrom(numpy_helper.from_array(replaced[init.name].astype(np.float32),
                                                  init.name))
    total, count = 0.0, 0
    for batch in tiny["batches"]:
        reference = run_ort(tiny["model"], batch)[0]
        n = len(batch["x"])
        total += n * _kl(reference, run_ort(model, batch)[0])
        count += n
    return total / count


def test_measured_interactions_are_real_forward_passes(tiny: dict) -> None:
    objective, pert = tiny["objective"], tiny["perturbations"]
    meter = inter.LossMeter(objective)
    assert meter.base == pytest.approx(0.0, abs=1e-12)  # KL of the float model to itself

    def q(i: int, k: int) -> dict[str, np.ndarray]:
        (name,) = pert.layers[i].names
        return {name: pert.quantized[i][k][pert.blocks[i][0]].numpy()}

    tables = inter.measured_interactions(meter, pert, [(0, 1), (1, 2)], measure_bits=[2, 4])
    assert tables.measured_bits == [2, 4]
    for i, k in itertools.product(range(3), range(3)):
        assert tables.single[i, k] == pytest.approx(_ort_delta(tiny, q(i, k)), rel=1e-4)
    for (i, j), table in tables.pairs.items():
        for a, b in ((0, 0), (0, 2), (2, 2)):  # measured widths: exact definition
            both = _ort_delta(tiny, {**q(i, a), **q(j, b)})
            expected = both - tables.single[i, a] - tables.single[j, b]
            assert table[a, b] == pytest.approx(expected, rel=1e-3, abs=1e-7)
        # 3 bits was not run: extrapolated from the nearest measured width (2 bits here, a
        # tie broken towards the lower width) by the ratio of error norms
        norms = np.sqrt(pert.sq_norms())
        ratio = norms[i, 1] / norms[i, 0]
        assert table[1, 2] == pytest.approx(table[0, 2] * ratio, rel=1e-9)
    assert tables.forwards == 9 + 2 * 4
    assert set(tables.pairs) == {(0, 1), (1, 2)}
    # the loss model built from them adds singles and pairs
    model = inter.with_measured(tables)
    columns = [0, 2, 1]
    expected = (tables.single[0, 0] + tables.single[1, 2] + tables.single[2, 1]
                + tables.pairs[(0, 1)][0, 2] + tables.pairs[(1, 2)][2, 1])
    assert model.predict(columns) == pytest.approx(expected, rel=1e-12)
    assert model.per_unit(columns).sum() == pytest.approx(expected, rel=1e-12)
    # weights are restored after every measurement
    for b, p in enumerate(objective.mirror.weights.values()):
        original = numpy_helper.to_array(tiny["quantizer"].view.initializers[
            list(objective.mirror.weights)[b]])
        np.testing.assert_array_equal(p.detach().numpy(), original.astype(np.float64))



def test_rescaled_couplings_keep_the_sign_and_never_predict_a_gain() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        # couplings of a random PSD matrix between two random error blocks per width
        a = rng.normal(size=(8, 8))
        hessian = a @ a.T
        di, dj = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
        quad_i = 0.5 * np.einsum("ap,pq,aq->a", di, hessian[:4, :4], di)
        quad_j = 0.5 * np.einsum("bp,pq,bq->b", dj, hessian[4:, 4:], dj)
        table = np.einsum("ap,pq,bq->ab", di, hessian[:4, 4:], dj)
        single_i, single_j = rng.uniform(0, 2, 3), rng.uniform(0, 2, 3)
        pair = inter.rescaled_coupling(table, quad_i, quad_j, single_i, single_j)
        assert np.all(np.sign(pair) == np.sign(table))
        total = single_i[:, None] + single_j[None, :] + pair
        assert np.all(total >= (np.sqrt(single_i)[:, None] - np.sqrt(single_j)[None, :]) ** 2
                      - 1e-12)
        # unchanged where the measured singles equal the quadratics
        same = inter.rescaled_coupling(table, quad_i, quad_j, quad_i, quad_j)
        np.testing.assert_allclose(same, table, rtol=1e-9)
    zero = inter.rescaled_coupling(np.ones((2, 2)), np.zeros(2), np.ones(2), np.ones(2),
                                   np.ones(2))
    np.testing.assert_array_equal(zero, 0.0)

def _pairs_by_name(path: str, hops: int) -> set[tuple[str, str]]:
    quantizer = Quantizer(load_model(MODELS / path).model)
    choices = layer_choices(quantizer.view, quantizer.placement)
    pairs = inter.neighbour_pairs(quantizer.view, choices, hops)
    return {(choices[i].label, choices[j].label) for i, j in pairs}


def test_neighbour_pairs_follow_the_data_flow() -> None:
    chain = ["onnx::Conv_40", "onnx::Conv_43", "onnx::Conv_46", "classifier.1.weight",
             "classifier.3.weight"]
    adjacent = set(zip(chain, chain[1:], strict=False))
    assert _pairs_by_name("fashion_cnn_op17.onnx", 1) == adjacent
    two = _pairs_by_name("fashion_cnn_op17.onnx", 2)
    assert two == adjacent | set(zip(chain, chain[2:], strict=False))
    pairs = _pairs_by_name("transformer_op17.onnx", 1)
    q, k, v, out = "onnx::MatMul_254", "onnx::MatMul_258", "onnx::MatMul_262", "onnx::MatMul_268"
    mlp_in, mlp_out, q1 = "onnx::MatMul_269", "onnx::MatMul_270", "onnx::MatMul_271"
    for pair in ((q, out), (k, out), (v, out), (out, mlp_in), (mlp_in, mlp_out),
                 (mlp_out, q1), ("tok_emb.weight", q), ("pos_emb.weight", v)):
        assert pair in pairs
    assert (q, k) not in pairs and (q, mlp_in) not in pairs  # siblings: two hops apart
    assert (q, k) in _pairs_by_name("transformer_op17.onnx", 2)
    assert inter.neighbour_pairs(Quantizer(_tiny_model()).view,
                                 layer_choices(Quantizer(_tiny_model()).view), 0) == []



# ---------------------------------------------------------------------- value on the zoo
@pytest.fixture(scope="module")
def fashion(tmp_path_factory: pytest.TempPathFactory):
    """A mixed-precision session on the Fashion CNN with small data (192 samples for the
    analysis, 192 held out) and every correction built."""
    from hawq_onnx.mixed.pipeline import MixedOptions, MixedSession
    from hawq_onnx.quantize import QuantizeOptions

    folder = tmp_path_factory.mktemp("fashion_mixed")
    with np.load(MODELS / "fashion_calib.npz") as arrays:
        np.savez(folder / "calib.npz", **{k: arrays[k][:384] for k in arrays.files})
    session = MixedSession(MODELS / "fashion_cnn_op17.onnx", folder / "calib.npz",
                           QuantizeOptions(),
                           MixedOptions(avg_weight_bits=4.0, analysis_samples=192,
                                        holdout_samples=192, max_probes=32,
                                        cache_dir=str(folder / "cache")))
    session.correct("both")
    return session


def test_corrections_rank_configurations_better_than_the_hessian_alone(fashion) -> None:
    evaluation = fashion.evaluate(50)
    assert len(evaluation.configs) == 50 and evaluation.samples == 192
    rho = {name: evaluation.spearman(name) for name in evaluation.scores}
    assert set(rho) == {"hessian", "cross_terms", "measured", "both"}
    assert rho["both"] > 0.95
    assert rho["both"] > rho["hessian"] + 0.03
    assert rho["cross_terms"] > rho["hessian"]  # HVP cross terms alone also help


def _random_allocation(session, seed: int):
    from hawq_onnx.mixed.ilp import solve

    rng = np.random.default_rng(seed)
    weights = 10.0 ** rng.uniform(-3, 3, len(session.choices))
    unary = weights[:, None] * 4.0 ** -np.asarray(session.bits, dtype=np.float64)[None, :]
    return solve(session.problem(inter.LossModel("random", unary)), session.budget())


@pytest.mark.parametrize("budget", [4.0, 3.0])
def test_hessian_allocation_beats_uniform_and_random_in_held_out_loss(fashion,
                                                                      budget: float) -> None:
    from hawq_onnx.mixed.ilp import make_allocation

    fashion.mixed.avg_weight_bits = budget
    models = fashion.corrections.models
    uniform = make_allocation(fashion.problem(models["hessian"]),
                              [fashion.bits.index(int(budget))] * len(fashion.choices), "u")
    uniform_dl = fashion.measured_delta(uniform)
    random_dl = np.mean([fashion.measured_delta(_random_allocation(fashion, seed))
                         for seed in range(5)])
    for name in ("hessian", "both"):
        allocation = fashion.allocate(fashion.problem(models[name]))
        assert allocation.avg_weight_bits <= budget + 1e-9
        measured = fashion.measured_delta(allocation)
        assert measured < 0.8 * uniform_dl, (name, allocation.bits, measured, uniform_dl)
        assert measured < 0.8 * random_dl, (name, allocation.bits, measured, random_dl)


def test_a_gram_too_big_for_one_micro_batch_runs_on_smaller_ones(
        fashion, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the output tangents of one micro-batch exceed the Gram's budget, the couplings
    come from the same objective over smaller micro-batches (still no HVP), with the tables
    of the full-batch Gram; below one sample's worth the meters' engine (HVPs) is kept."""
    base = fashion._hvp
    jobs = len(fashion.choices) * len(fashion.bits)
    full = base.gram_bytes(jobs)
    size = base.objective.batches.first().size
    engine = fashion._coupling_engine(full // 3)
    assert engine is not base and engine.mode == base.mode == "gauss_newton"
    assert engine.objective.batches.first().size == size // 3
    assert engine.gram_bytes(jobs) <= full // 3
    _, _, pert = fashion.meters()
    hvps: list[int] = []
    for hvp in (engine, base):
        apply = hvp.apply
        monkeypatch.setattr(hvp, "apply", lambda v, _a=apply, **kw: hvps.append(len(v))
                            or _a(v, **kw))
    before = base.products
    split = inter.hessian_couplings(engine, pert, gram_budget_bytes=full // 3)
    whole = inter.hessian_couplings(base, pert, gram_budget_bytes=full)
    monkeypatch.undo()
    assert hvps == [] and base.products - before == engine.products == jobs  # Gram, no HVP
    np.testing.assert_allclose(split.quadratic, whole.quadratic, rtol=1e-4)
    scale = max(np.abs(t).max() for t in whole.pairs.values())
    for key, table in whole.pairs.items():
        np.testing.assert_allclose(split.pairs[key], table, rtol=1e-4, atol=1e-6 * scale)
    assert fashion._coupling_engine(full // (size + 1)) is base  # under one sample: HVPs
    assert fashion._coupling_engine(full) is base  # fits already
