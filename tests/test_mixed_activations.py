"""Activation widths as allocation candidates: the joint weight/activation ILP, the planted
activation, export of 16-bit activation quantizers, and the CLI (issue 5)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from hawq_onnx.cli import main
from hawq_onnx.mixed import ActUnit, AllocationProblem, Budget, InfeasibleBudgetError, solve
from hawq_onnx.mixed.costs import LatencySettings, joint_bops, joint_latency_table
from hawq_onnx.mixed.ilp import brute_force, largest_achievable, smallest_achievable
from hawq_onnx.mixed.interactions import fake_quantize_hook
from hawq_onnx.mixed.pipeline import MixedOptions, MixedSession, quantize_mixed
from hawq_onnx.mixed.problem import LayerChoice
from hawq_onnx.mixed.ties import LayerLink, PinError, activation_units, layer_choices
from hawq_onnx.quant.activations import ActQParams
from hawq_onnx.quantize import QuantizeOptions, Quantizer
from tests.conftest import MODELS, write_head
from tests.op_harness import IR_FOR_OPSET

FASHION = MODELS / "fashion_cnn_op17.onnx"
CALIB = MODELS / "fashion_calib.npz"
EVAL = MODELS / "fashion_eval.npz"
ACT_BITS = [8, 16]
FAST = {"interactions": "none", "eval_configs": 0, "analysis_samples": 64,
        "holdout_samples": 64, "max_probes": 16, "min_probes": 16, "use_cache": False}


# ---------------------------------------------------------------------- random instances
def _layers(rng: np.random.Generator, n_units: int, n_acts: int) -> list[LayerLink]:
    """Every unit read by at least one layer; some layers share an activation quantizer
    (tied readers), some read an input whose width is fixed (act None)."""
    links = [LayerLink(f"n{i}", i, int(rng.integers(0, n_acts)), int(rng.integers(1, 50)))
             for i in range(n_units)]
    for k in range(int(rng.integers(0, 3))):
        act = int(rng.integers(-1, n_acts))
        links.append(LayerLink(f"extra{k}", int(rng.integers(0, n_units)),
                               None if act < 0 else act, int(rng.integers(1, 50))))
    for j in range(n_acts):  # every activation unit has a reader
        if all(link.act != j for link in links):
            links.append(LayerLink(f"a{j}", int(rng.integers(0, n_units)), j,
                                   int(rng.integers(1, 50))))
    return links


def _latency(rng: np.random.Generator, links: list[LayerLink], bits: list[int]
             ) -> dict[str, np.ndarray]:
    """Per layer and (b_w, b_a): random, not monotone in bits (16-bit activations may be
    slower, 4-bit weights need not be faster)."""
    return {link.node: rng.uniform(0.1, 2.0, (len(bits), len(ACT_BITS))) for link in links}


def _problem(rng: np.random.Generator, pairs: bool) -> tuple[AllocationProblem, list[LayerLink],
                                                                dict[str, np.ndarray]]:
    n_units, n_acts = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    bits = sorted(rng.choice([2, 4, 6, 8], size=int(rng.integers(2, 4)), replace=False).tolist())
    links = _layers(rng, n_units, n_acts)
    params = rng.integers(10, 500, n_units)
    # Ω decreasing in bits; an activation's 8-bit Ω within three decades of the weights'
    # largest (as on the zoo models), its 16-bit Ω 4^8 times smaller
    omega = np.sort(rng.random((n_units, len(bits))) * rng.random((n_units, 1)), axis=1)
    omega = omega[:, ::-1] * 10.0 ** rng.uniform(-6, -2)
    act8 = rng.random(n_acts) * omega.max() * 10.0 ** rng.uniform(-3, 0, n_acts)
    act_omega = np.stack([act8, act8 * 4.0 ** -8], axis=1)
    pair_costs = {}
    if pairs and n_units > 1:
        for i, j in itertools.combinations(range(n_units), 2):
            if rng.random() < 0.7:
                pair_costs[(i, j)] = rng.normal(0, 0.3, (len(bits), len(bits))) * \
                    np.sqrt(np.outer(omega[i], omega[j]))
    unary_bops, joint = joint_bops(links, n_units, bits, ACT_BITS, fixed_act_bits=8)
    per_layer = _latency(rng, links, bits)
    unary_lat = np.zeros((n_units, len(bits)))
    joint_lat: dict[tuple[int, int], np.ndarray] = {}
    for link in links:
        if link.act is None:
            unary_lat[link.unit] += per_layer[link.node][:, 0]
        else:
            key = (link.unit, link.act)
            joint_lat[key] = joint_lat.get(key, 0) + per_layer[link.node]
    choices = [LayerChoice((f"w{i}",), int(params[i]), 1) for i in range(n_units)]
    pins = {0: bits[int(rng.integers(len(bits)))]} if rng.random() < 0.2 else {}
    act_pins = {n_acts - 1: 16} if rng.random() < 0.2 else {}
    problem = AllocationProblem(
        choices, bits, omega, pair_costs, bops=unary_bops, latency=unary_lat, pins=pins,
        act_units=[ActUnit(f"t{j}") for j in range(n_acts)], act_candidate_bits=ACT_BITS,
        act_omega=act_omega, joint={"bops": joint, "latency": joint_lat}, act_pins=act_pins)
    return problem, links, per_layer


def _direct(problem: AllocationProblem, links: list[LayerLink], per_layer: dict[str, np.ndarray],
            cols: tuple[int, ...], acts: tuple[int, ...]) -> dict[str, float]:
    """Objective and metrics of one configuration, summed over layers (not via the tables)."""
    bits = problem.candidate_bits
    objective = sum(problem.omega[i, k] for i, k in enumerate(cols))
    objective += sum(problem.act_omega[j, m] for j, m in enumerate(acts))
    objective += sum(c[cols[i], cols[j]] for (i, j), c in problem.pair_costs.items())
    bops = latency = 0.0
    for link in links:
        a_col = 0 if link.act is None else acts[link.act]
        a_bits = 8 if link.act is None else ACT_BITS[a_col]
        bops += link.macs * bits[cols[link.unit]] * a_bits
        latency += per_layer[link.node][cols[link.unit], a_col]
    params = problem.params
    w = np.asarray(bits, float)[list(cols)]
    return {"objective": objective, "bops": bops, "latency": latency,
            "avg_weight_bits": float(params @ w / params.sum()),
            "size_bytes": float(params @ w / 8)}


def _exhaustive(problem: AllocationProblem, links: list[LayerLink],
                per_layer: dict[str, np.ndarray]) -> list[tuple[tuple, tuple, dict]]:
    out = []
    for cols in itertools.product(range(problem.n_bits), repeat=problem.n_layers):
        if any(problem.candidate_bits[cols[i]] != b for i, b in problem.pins.items()):
            continue
        for acts in itertools.product(range(2), repeat=problem.n_acts):
            if any(ACT_BITS[acts[j]] != b for j, b in problem.act_pins.items()):
                continue
            out.append((cols, acts, _direct(problem, links, per_layer, cols, acts)))
    return out


@pytest.mark.parametrize("metric", ["bops", "latency", "size_bytes", "avg_weight_bits"])
@pytest.mark.parametrize("form", ["marginal", "mccormick"])
def test_joint_ilp_matches_brute_force(metric: str, form: str) -> None:
    """Random instances with tied readers, weight pairs, pins: the ILP's objective equals
    exhaustive search over (weight widths × activation widths), and its totals (recomputed
    layer by layer) respect the budget."""
    rng = np.random.default_rng(["bops", "latency", "size_bytes", "avg_weight_bits"].index(
        metric) * 7 + (form == "mccormick"))
    solved = infeasible = 0
    for trial in range(12):
        problem, links, per_layer = _problem(rng, pairs=trial % 2 == 0)
        space = _exhaustive(problem, links, per_layer)
        values = [v[metric] for _, _, v in space]
        assert smallest_achievable(problem, metric) == pytest.approx(min(values), rel=1e-9)
        assert largest_achievable(problem, metric) == pytest.approx(max(values), rel=1e-9)
        for limit in (min(values) * 0.99, *rng.uniform(min(values), max(values), 2)):
            feasible = [v["objective"] for _, _, v in space if v[metric] <= limit]
            budget = Budget(**{metric: float(limit)})
            if not feasible:
                with pytest.raises(InfeasibleBudgetError):
                    solve(problem, budget, pairs=form)
                infeasible += 1
                continue
            found = solve(problem, budget, pairs=form)
            direct = _direct(problem, links, per_layer, tuple(found.columns),
                             tuple(found.act_columns))
            assert direct[metric] <= limit
            assert found.objective == pytest.approx(min(feasible), rel=1e-9, abs=1e-15)
            assert direct["objective"] == pytest.approx(found.objective, rel=1e-12)
            assert found.bops == pytest.approx(direct["bops"], rel=1e-12)
            assert found.latency == pytest.approx(direct["latency"], rel=1e-12)
            assert found.act_bits == [ACT_BITS[m] for m in found.act_columns]
            for j, bits in problem.act_pins.items():
                assert found.act_bits[j] == bits
            reference = brute_force(problem, budget)
            assert reference is not None
            assert reference.objective == pytest.approx(found.objective, rel=1e-9, abs=1e-15)
            solved += 1
    assert solved >= 20 and infeasible >= 1


def test_two_budgets_together_and_activation_widths_are_free_under_size() -> None:
    """Size counts weights only: under a size budget alone every activation goes to 16
    bits (less loss, no cost); adding a BOPs budget brings them back down."""
    rng = np.random.default_rng(5)
    problem, links, per_layer = _problem(rng, pairs=False)
    problem.act_pins = {}
    sized = solve(problem, Budget(size_bytes=float(problem.size_bytes[:, 0].sum())))
    assert sized.act_bits == [16] * problem.n_acts
    space = _exhaustive(problem, links, per_layer)
    low = min(v["bops"] for _, _, v in space)
    both = Budget(size_bytes=float(problem.size_bytes[:, -1].sum()), bops=low * 1.2)
    found = solve(problem, both)
    best = min(v["objective"] for _, _, v in space if v["bops"] <= low * 1.2)
    assert found.objective == pytest.approx(best, rel=1e-9)
    assert found.bops <= low * 1.2


# ---------------------------------------------------------------------- small models
def _gemm_chain(weights: list[np.ndarray], biases: list[np.ndarray], branch: bool = False,
                opset: int = 17) -> onnx.ModelProto:
    """x -> Gemm0 -> Relu -> Gemm1 -> Relu -> Gemm2 (weights [out, in], transB=1); with
    ``branch`` Gemm0 and Gemm1 both read x and their ReLUs are added before Gemm2."""
    nodes, inits = [], []
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        inits += [numpy_helper.from_array(w.astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(b.astype(np.float32), f"b{i}")]
    if branch:
        for i in (0, 1):
            nodes += [helper.make_node("Gemm", ["x", f"w{i}", f"b{i}"], [f"h{i}"], transB=1,
                                       name=f"gemm{i}"),
                      helper.make_node("Relu", [f"h{i}"], [f"r{i}"], name=f"relu{i}")]
        nodes.append(helper.make_node("Add", ["r0", "r1"], ["r1s"], name="add"))
        last = "r1s"
    else:
        last = "x"
        for i in (0, 1):
            nodes += [helper.make_node("Gemm", [last, f"w{i}", f"b{i}"], [f"h{i}"], transB=1,
                                       name=f"gemm{i}"),
                      helper.make_node("Relu", [f"h{i}"], [f"r{i}"], name=f"relu{i}")]
            last = f"r{i}"
    nodes.append(helper.make_node("Gemm", [last, "w2", "b2"], ["y"], transB=1, name="gemm2"))
    width = weights[0].shape[1]
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", weights[-1].shape[0]])],
        inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                             ir_version=IR_FOR_OPSET[opset])


def _parts(seed: int, width: int = 16) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    weights = [rng.standard_normal((width, width)) / np.sqrt(width) for _ in range(3)]
    biases = [rng.standard_normal(width) * 0.1 for _ in range(3)]
    return weights, biases


def _save(tmp_path: Path, model: onnx.ModelProto, samples: int = 128, seed: int = 1
          ) -> tuple[Path, Path]:
    x = np.random.default_rng(seed).standard_normal((samples, 16)).astype(np.float32)
    model_path, calib = tmp_path / "m.onnx", tmp_path / "calib.npz"
    onnx.save(model, model_path)
    np.savez(calib, x=x)
    return model_path, calib


def _run(model: onnx.ModelProto | Path, x: np.ndarray) -> np.ndarray:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _activation_types(model: onnx.ModelProto, owner: str) -> set[int]:
    """Zero-point element types of the QuantizeLinear nodes using ``owner``'s parameters
    (the exporter names them ``<owner>_zero_point``)."""
    inits = {t.name: t.data_type for t in model.graph.initializer}
    return {inits[node.input[2]] for node in model.graph.node
            if node.op_type == "QuantizeLinear" and node.input[2].startswith(
                f"{owner}_zero_point")}


def test_readers_of_one_quantizer_share_its_width_but_not_their_weights(tmp_path: Path) -> None:
    """Gemm0 and Gemm1 both read x: one activation unit with two readers (tied), while their
    weights stay separate units that may take different widths. Exported: x's one Q/DQ pair
    is uint16 and feeds both."""
    weights, biases = _parts(0)
    weights[1] = weights[1] * 0.01  # a nearly silent branch: its weight can go low
    model = _gemm_chain(weights, biases, branch=True)
    quantizer = Quantizer(model, target_opset=21)
    choices = layer_choices(quantizer.view, quantizer.placement)
    units, links = activation_units(quantizer.view, quantizer.placement, choices)
    assert [u.name for u in units] == ["x", "r1s"]
    assert units[0].readers == ("gemm0", "gemm1") and len(choices) == 3
    assert [(link.unit, link.act) for link in links] == [(0, 0), (1, 0), (2, 1)]
    model_path, calib = _save(tmp_path, model)
    mixed = MixedOptions(candidate_bits=(2, 8), candidate_act_bits=(8, 16), avg_weight_bits=6,
                         act_pins=(("x", 16),), **FAST)
    result = quantize_mixed(model_path, tmp_path / "q.onnx", calib, QuantizeOptions(), mixed)
    report = result.report
    bits = {r["name"]: r["weight_bits"] for r in report["layers"]}
    assert bits["w1"] == 2 and bits["w0"] == 8  # the silent branch gives up its bits
    acts = {a["tensor"]: a["bits"] for a in report["mixed"]["activations"]}
    assert acts["x"] == 16 and report["mixed"]["act_pins"] == {"x": 16}
    rows = {r["node"]: r["act_bits"] for r in report["layers"]}
    assert rows["gemm0"] == rows["gemm1"] == 16 and rows["gemm2"] == acts["r1s"]
    written = onnx.load(tmp_path / "q.onnx")
    assert _activation_types(written, "x") == {TensorProto.UINT16}
    assert _activation_types(written, "r1s") == {TensorProto.UINT8 if acts["r1s"] == 8
                                                 else TensorProto.UINT16}
    dq = [n for n in written.graph.node if n.op_type == "DequantizeLinear"
          and n.input[0].startswith("x_quantized")]
    assert len(dq) == 1
    readers = [n.name for n in written.graph.node if dq[0].output[0] in n.input]
    assert sorted(readers) == ["gemm0", "gemm1"]
    x = np.random.default_rng(2).standard_normal((32, 16)).astype(np.float32)
    assert np.isfinite(_run(tmp_path / "q.onnx", x)).all()


def _planted(weights: list[np.ndarray], biases: list[np.ndarray], unit: int, factor: float
             ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Hidden unit ``unit`` of layer 1's output scaled up by ``factor`` (its row of w1, b1),
    the matching input column of w2 scaled down: ReLU is positively homogeneous, so the
    function is unchanged, but r1 (Gemm2's input) now has one channel ``factor`` times wider
    than the rest, and a per-tensor 8-bit grid spends its levels on it."""
    w, b = [x.copy() for x in weights], [x.copy() for x in biases]
    w[1][unit] *= factor
    b[1][unit] *= factor
    w[2][:, unit] /= factor
    return w, b


def test_planted_wide_activation_gets_16_bits(tmp_path: Path) -> None:
    weights, biases = _parts(3)
    base = _gemm_chain(weights, biases)
    plant = _gemm_chain(*_planted(weights, biases, unit=5, factor=200.0))
    x = np.random.default_rng(1).standard_normal((64, 16)).astype(np.float32)
    np.testing.assert_allclose(_run(plant, x), _run(base, x), rtol=1e-4, atol=1e-4)
    chosen, omegas = {}, {}
    for name, model in (("base", base), ("plant", plant)):
        folder = tmp_path / name
        folder.mkdir()
        model_path, calib = _save(folder, model)
        session = MixedSession(model_path, calib, QuantizeOptions(), MixedOptions(
            candidate_bits=(8,), candidate_act_bits=(8, 16), **FAST))
        # every Gemm has 16x16 MACs: one activation at 16 bits costs 256*8*8 more BOPs
        all8 = sum(link.macs for link in session.links) * 8 * 8
        session.mixed.bops_budget = all8 + 256 * 8 * 8
        session.omega()
        allocation = session.allocate(session.problem())
        assert allocation.bops <= session.mixed.bops_budget
        assert sorted(allocation.act_bits) == [8, 8, 16]
        chosen[name] = dict(zip([u.name for u in session.act_units], allocation.act_bits,
                                strict=True))
        omegas[name] = session.act_omega()
    assert chosen["plant"] == {"x": 8, "r0": 8, "r1": 16}
    # the plant is real: r1's 8-bit error grew by orders of magnitude, nothing else changed
    assert omegas["plant"][2, 0] > 100 * omegas["base"][2, 0]
    np.testing.assert_allclose(omegas["plant"][:2], omegas["base"][:2], rtol=0.05)


def test_mirror_fake_quantization_matches_the_exporters_grid() -> None:
    values = np.linspace(-3.0, 7.0, 1001, dtype=np.float32)
    for qp in (ActQParams(0.05, 60, 8, False), ActQParams(1.7e-4, 17000, 16, False),
               ActQParams(0.02, 0, 8, True)):
        hooked = fake_quantize_hook(qp)("t", torch.from_numpy(values)).numpy()
        np.testing.assert_array_equal(hooked, qp.fake_quantize(values))


def test_joint_latency_is_measured_per_weight_and_activation_width(tmp_path: Path) -> None:
    weights, biases = _parts(0)
    model = _gemm_chain(weights, biases)
    quantizer = Quantizer(model, target_opset=21)
    choices = layer_choices(quantizer.view, quantizer.placement)
    _, links = activation_units(quantizer.view, quantizer.placement, choices)
    quick = LatencySettings(repeats=2, warmup=1, min_run_s=1e-4, target_opset=21)
    links = [*links, LayerLink("gemm2", 2, None, 256)]  # a layer with a fixed input width
    table = joint_latency_table(model, links, 3, [4, 8], ACT_BITS, settings=quick,
                                cache_dir=tmp_path)
    assert sorted(table.joint) == [(0, 0), (1, 1), (2, 2)]
    assert all(t.shape == (2, 2) and np.all(t >= 0) for t in table.joint.values())
    assert table.unary.shape == (3, 2) and np.all(table.unary[:2] == 0)
    # three equal 16x16 Gemm layers: only the first is measured, the others hit its cache
    # entries; gemm2 at fixed activations needs nothing new either
    assert table.measured == 2 + 4 and table.cached == 2 * 6 + 4


def test_latency_budget_with_activation_candidates(tmp_path: Path) -> None:
    weights, biases = _parts(0)
    model_path, calib = _save(tmp_path, _gemm_chain(weights, biases))
    mixed = MixedOptions(candidate_bits=(4, 8), candidate_act_bits=(8, 16),
                         latency_budget=1.0, cache_dir=str(tmp_path / "cache"),
                         **{**FAST, "use_cache": True})
    session = MixedSession(model_path, calib, QuantizeOptions(), mixed)
    session.omega()
    problem = session.problem()
    assert set(problem.joint) == {"bops", "latency"}
    low = smallest_achievable(problem, "latency")
    high = largest_achievable(problem, "latency")
    session.mixed.latency_budget = (low + high) / 2
    allocation = session.allocate(problem)
    assert low <= allocation.latency <= (low + high) / 2


def test_accuracy_target_along_the_joint_bops_frontier(tmp_path: Path) -> None:
    """--max-drop with activation candidates: bisection over a frontier whose points differ
    in activation widths too; the written model is the chosen point."""
    weights, biases = _parts(4)
    model_path, calib = _save(tmp_path, _gemm_chain(weights, biases), samples=160)
    x = np.random.default_rng(9).standard_normal((300, 16)).astype(np.float32)
    np.savez(tmp_path / "eval.npz", x=x)
    mixed = MixedOptions(candidate_bits=(2, 8), candidate_act_bits=(8, 16), max_drop=0.02,
                         minimize="bops", **FAST)
    result = quantize_mixed(model_path, tmp_path / "q.onnx", calib, QuantizeOptions(), mixed,
                            eval_path=tmp_path / "eval.npz")
    target = result.report["mixed"]["target"]
    assert result.target_met and target["drop"] <= 0.02 + 1e-12
    points = result.report["mixed"]["pareto"]["points"]
    assert len({tuple(p["act_bits"]) for p in points}) >= 2
    assert all("act_bits" in probe for probe in target["probes"])
    chosen = next(p for p in target["probes"] if p["index"] == target["chosen"])
    acts = [a["bits"] for a in result.report["mixed"]["activations"]]
    assert chosen["act_bits"] == acts
    written = onnx.load(tmp_path / "q.onnx")
    for name, bits in zip(("x", "r0", "r1"), acts, strict=True):
        want = TensorProto.UINT16 if bits == 16 else TensorProto.UINT8
        assert _activation_types(written, name) == {want}


# ---------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("mixed_acts")
    return {"calib": write_head(CALIB, folder / "calib.npz", 160),
            "eval": write_head(EVAL, folder / "eval.npz", 400), "dir": folder}


_SMALL = ["--analysis-samples", "96", "--holdout-samples", "64", "--max-probes", "16",
          "--no-interactions", "--eval-configs", "0", "--no-cache"]


@pytest.mark.parametrize(("args", "message"), [
    (["--candidate-act-bits", "8,12", "--bops-budget", "100M"], "--candidate-act-bits"),
    (["--candidate-act-bits", "8,16"], "--candidate-act-bits needs a mixed-precision budget"),
    (["--pin-act", "input=16", "--bops-budget", "100M"], "--pin-act needs --candidate-act"),
    (["--candidate-act-bits", "8,16", "--act-bits", "none", "--bops-budget", "100M"],
     "needs quantized activations"),
    (["--candidate-act-bits", "8,16", "--bops-budget", "100M", "--pin-act", "nothing=16"],
     "no activation quantizer"),
    (["--candidate-act-bits", "8,16", "--bops-budget", "1M"], "infeasible"),
])
def test_bad_activation_requests_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture,
                                        data: dict[str, Path], args: list[str],
                                        message: str) -> None:
    out = tmp_path / "q.onnx"
    try:
        code = main(["quantize", str(FASHION), "-o", str(out), "--calib", str(data["calib"]),
                     *_SMALL, *args])
    except SystemExit as exc:  # argparse type errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not out.exists()


def _cli(data: dict[str, Path], out: Path, report: Path, *args: str) -> dict:
    assert main(["quantize", str(FASHION), "-o", str(out), "--calib", str(data["calib"]),
                 "--eval", str(data["eval"]), "--report", str(report), *_SMALL, *args]) == 0
    return json.loads(report.read_text())


def test_cli_bops_budget_with_activation_widths(tmp_path: Path, data: dict[str, Path],
                                                capsys: pytest.CaptureFixture) -> None:
    """Fashion CNN, weights from 4/8 bits, activations from 8/16, given by a recipe: the BOPs
    budget holds exactly, some activations get 16 bits and the exported zero points say so,
    onnxruntime runs the model, and its SQNR against the float model is at least that of the
    same weight widths with all activations at 8 bits."""
    budget = 140e6
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[quantize]\ncandidate-bits = "4,8"\ncandidate-act-bits = "8,16"\n'
                      f'bops-budget = "{budget:.0f}"\n')
    out, report_path = tmp_path / "q.onnx", tmp_path / "r.json"
    html = tmp_path / "r.html"
    report = _cli(data, out, report_path, "--config", str(recipe), "--report-html", str(html))
    assert report["build"]["recipe"]["candidate_act_bits"] == [8, 16]
    assert "activation widths" in capsys.readouterr().out
    page = html.read_text()
    assert "candidate activation bits" in page and "activation input" in page
    mixed = report["mixed"]
    assert report["opset"] == 21  # upgraded from 17 for uint16 Q/DQ
    assert mixed["candidate_act_bits"] == [8, 16]
    acts = {a["tensor"]: a for a in mixed["activations"]}
    assert len(acts) == 5 and {a["bits"] for a in acts.values()} == {8, 16}
    for act in acts.values():
        assert act["trace"] > 0 and act["omega"]["8"] > act["omega"]["16"] > 0
    # BOPs from the layer rows: MACs · weight bits · input activation bits
    rows = report["layers"]
    bops = sum(r["macs"] * r["weight_bits"] * r["act_bits"] for r in rows)
    assert mixed["totals"]["bops"] == pytest.approx(bops, rel=1e-5) and bops <= budget
    readers = {n: a["bits"] for a in acts.values() for n in a["readers"]}
    assert {r["node"]: r["act_bits"] for r in rows} == readers
    # the exported activation widths: zero-point types of every quantizer's Q nodes
    model = onnx.load(out)
    for name, act in acts.items():
        want = TensorProto.UINT16 if act["bits"] == 16 else TensorProto.UINT8
        assert _activation_types(model, name) == {want}, name
    with np.load(data["eval"]) as arrays:
        x = arrays["input"][:64]
    assert np.isfinite(ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(
        None, {"input": x})[0]).all()
    # same weight widths, every activation at 8 bits
    pins = [a for r in rows for a in ("--pin", f"{r['name']}={r['weight_bits']}")]
    base = _cli(data, tmp_path / "b.onnx", tmp_path / "b.json", "--candidate-bits", "4,8",
                "--bops-budget", "1G", *pins)
    assert [r["weight_bits"] for r in base["layers"]] == [r["weight_bits"] for r in rows]
    assert {r["act_bits"] for r in base["layers"]} == {8}
    assert report["metrics"]["sqnr_db"] >= base["metrics"]["sqnr_db"]
    # top-1 on 400 samples: a single sample may flip either way
    assert report["metrics"]["top1_quant"] >= base["metrics"]["top1_quant"] - 1 / 400


def test_16_bit_candidates_refused_when_opset_21_is_out_of_reach(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """uint16 Q/DQ needs opset 21: an opset-17 model is upgraded; when the upgrade fails
    the request is refused before any analysis (a HawqError: exit 2)."""
    from hawq_onnx import quantize as quantize_module
    from hawq_onnx.errors import HawqError, InvalidModelError

    weights, biases = _parts(0)
    model_path, calib = _save(tmp_path, _gemm_chain(weights, biases))
    options = MixedOptions(candidate_bits=(8,), candidate_act_bits=(8, 16), bops_budget=1e9,
                           **FAST)
    assert MixedSession(model_path, calib, QuantizeOptions(), options).quantizer.opset == 21

    def refuse(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
        raise InvalidModelError(f"cannot upgrade the model from opset 17 to {opset}: test")

    monkeypatch.setattr(quantize_module, "upgrade_to", refuse)
    with pytest.raises(HawqError, match="need opset 21.*at opset 17"):
        MixedSession(model_path, calib, QuantizeOptions(), options)
    only8 = MixedOptions(candidate_bits=(8,), candidate_act_bits=(8,), bops_budget=1e9, **FAST)
    assert MixedSession(model_path, calib, QuantizeOptions(), only8).quantizer.opset == 17


def test_pin_act_resolves_layer_inputs_and_conflicts(tmp_path: Path) -> None:
    weights, biases = _parts(0)
    model_path, calib = _save(tmp_path, _gemm_chain(weights, biases))
    session = MixedSession(model_path, calib, QuantizeOptions(), MixedOptions(
        candidate_bits=(8,), candidate_act_bits=(8, 16), bops_budget=1e9,
        act_pins=(("r0", 16),), **FAST))
    assert session.act_pins == {1: 16}
    with pytest.raises(PinError, match="conflicts"):
        MixedSession(model_path, calib, QuantizeOptions(), MixedOptions(
            candidate_bits=(8,), candidate_act_bits=(8, 16), bops_budget=1e9,
            act_pins=(("r0", 16), ("r0", 8)), **FAST))
