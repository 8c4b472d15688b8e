"""The exact ILP allocator against brute force, budgets, ties, pins and the Pareto sweep."""

from __future__ import annotations

import itertools
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from hawq_onnx.graph import GraphView
from hawq_onnx.importer import load_model
from hawq_onnx.mixed import (
    AllocationProblem,
    AllocationProblemError,
    Budget,
    InfeasibleBudgetError,
    LayerChoice,
    pareto_front,
    solve,
)
from hawq_onnx.mixed.ilp import brute_force, flipped_layers, metric_total, objective_value
from hawq_onnx.mixed.ties import (
    PinError,
    first_last_pins,
    layer_choices,
    parse_pin,
    resolve_pins,
)
from hawq_onnx.quantize import Quantizer
from tests.op_harness import IR_FOR_OPSET

BITS = [2, 3, 4, 6, 8]


def random_problem(rng: np.random.Generator, n_layers: int, bits: list[int], *,
                   pairs: bool, pins: dict[int, int] | None = None) -> AllocationProblem:
    """Ω decreasing in bits (as real tables are), random sizes, BOPs and latencies."""
    layers = [LayerChoice((f"w{i}",), int(rng.integers(8, 5000)), int(rng.integers(0, 10**6)))
              for i in range(n_layers)]
    omega = np.sort(rng.random((n_layers, len(bits))) * rng.random((n_layers, 1)), axis=1)
    omega = omega[:, ::-1] * 10.0 ** rng.uniform(-6, -2)
    pair_costs = {}
    if pairs:
        for i, j in itertools.combinations(range(n_layers), 2):
            if rng.random() < 0.7:
                pair_costs[(i, j)] = rng.normal(size=(len(bits), len(bits))) * omega.mean()
    macs = np.array([c.macs for c in layers], dtype=float)
    bops = macs[:, None] * np.asarray(bits, float)[None, :] * 8
    latency = rng.uniform(1e-6, 1e-4, (n_layers, len(bits)))
    return AllocationProblem(layers, bits, omega, pair_costs=pair_costs, bops=bops,
                             latency=latency, pins=pins or {})


def budgets_for(problem: AllocationProblem, rng: np.random.Generator) -> list[Budget]:
    """Budgets at random points between the cheapest and dearest allocations."""
    out = []
    low_cols = [0] * problem.n_layers
    high_cols = [problem.n_bits - 1] * problem.n_layers
    for metric in ("avg_weight_bits", "size_bytes", "bops", "latency"):
        if metric == "latency":
            lo = problem.latency.min(axis=1).sum()
            hi = problem.latency.max(axis=1).sum()
        else:
            lo = metric_total(problem, metric, low_cols)
            hi = metric_total(problem, metric, high_cols)
        out.append(Budget(**{metric: float(lo + rng.uniform(0.1, 0.8) * (hi - lo))}))
    size_hi = metric_total(problem, "size_bytes", high_cols)
    lat_hi = problem.latency.max(axis=1).sum()
    out.append(Budget(size_bytes=0.7 * size_hi, latency=0.8 * lat_hi))
    return out


def assert_within(problem: AllocationProblem, alloc, budget: Budget) -> None:
    for metric, limit in budget.items():
        assert metric_total(problem, metric, alloc.columns) <= limit


@pytest.mark.parametrize("pairs", [False, True])
def test_ilp_matches_brute_force(pairs: bool) -> None:
    rng = np.random.default_rng(1234 + pairs)
    checked = infeasible = 0
    for _ in range(40):
        n_layers = int(rng.integers(1, 6))
        bits = sorted(rng.choice(BITS, size=int(rng.integers(2, 5)), replace=False).tolist())
        problem = random_problem(rng, n_layers, bits, pairs=pairs)
        for budget in budgets_for(problem, rng):
            exact = brute_force(problem, budget)
            if exact is None:
                with pytest.raises(InfeasibleBudgetError):
                    solve(problem, budget)
                infeasible += 1
                continue
            alloc = solve(problem, budget)
            assert alloc.status == "optimal"
            assert alloc.objective == pytest.approx(exact.objective, rel=1e-9, abs=1e-15)
            if pairs:  # the literal McCormick envelope and both together: same optimum
                for form in ("mccormick", "both"):
                    other = solve(problem, budget, pairs=form)
                    assert other.objective == pytest.approx(exact.objective, rel=1e-9,
                                                            abs=1e-15)
            assert alloc.objective == pytest.approx(objective_value(problem, alloc.columns))
            assert_within(problem, alloc, budget)
            checked += 1
    assert checked >= 150


def test_exact_on_omega_spanning_many_decades() -> None:
    """Realistic Ω: 4^-b per bit times traces spread over ~10^4 (lognormal σ=3). The
    decisive differences are ~1e-7 of the largest entry; HiGHS' default tolerances return
    sub-optimal allocations here (2 % of the cases), the allocator's settings none."""
    rng = np.random.default_rng(5)
    checked = 0
    for _ in range(60):
        layers = [LayerChoice((f"w{i}",), int(rng.integers(100, 10**6)), 0) for i in range(5)]
        errors = 4.0 ** -np.array(BITS, dtype=float)
        omega = rng.lognormal(0, 3, 5)[:, None] * errors * rng.uniform(0.8, 1.2, (5, 5))
        problem = AllocationProblem(layers, BITS, np.sort(omega, axis=1)[:, ::-1])
        for request in (2.5, 3.5, 4.5, 5.5, 6.5, 7.5):
            budget = Budget(avg_weight_bits=request)
            exact = brute_force(problem, budget)
            if exact is None:
                continue
            assert solve(problem, budget).objective == pytest.approx(exact.objective, rel=1e-9)
            checked += 1
    assert checked >= 300


def test_pair_costs_change_the_optimum() -> None:
    """A strong interaction between layers 0 and 1 at low width moves one of them up."""
    layers = [LayerChoice((f"w{i}",), 100, 100) for i in range(3)]
    omega = np.array([[4.0, 1.0], [4.0, 1.0], [5.0, 1.0]]) * 1e-4
    budget = Budget(avg_weight_bits=(2 * 2 + 8) / 3)  # one layer at 8 bits
    plain = solve(AllocationProblem(layers, [2, 8], omega), budget)
    assert plain.bits == [2, 2, 8]
    pair = np.array([[5e-4, 0.0], [0.0, 0.0]])  # extra loss only when both are at 2 bits
    coupled = solve(AllocationProblem(layers, [2, 8], omega, pair_costs={(0, 1): pair}),
                    budget)
    assert coupled.bits in ([8, 2, 2], [2, 8, 2])
    assert coupled.objective == pytest.approx(4e-4 + 1e-4 + 5e-4)


def test_avg_bits_budget_never_exceeded_on_large_layers() -> None:
    """Parameter counts in the millions: solver tolerances must not leak into the totals."""
    rng = np.random.default_rng(7)
    for trial in range(12):
        layers = [LayerChoice((f"w{i}",), int(rng.integers(10**5, 5 * 10**7)), 0)
                  for i in range(12)]
        omega = np.sort(rng.random((12, 5)), axis=1)[:, ::-1] * 1e-3
        problem = AllocationProblem(layers, BITS, omega)
        for request in (2.0, 3.0, 3.37, 4.0, 5.5, 7.999):
            alloc = solve(problem, Budget(avg_weight_bits=request))
            params = np.array([c.params for c in layers], dtype=np.int64)
            exact_sum = int(np.dot(params, np.array(alloc.bits, dtype=np.int64)))
            assert exact_sum <= request * int(params.sum()), (trial, request)
            assert alloc.avg_weight_bits <= request
            assert alloc.size_bytes == pytest.approx(exact_sum / 8)


def test_configuration_one_bit_over_a_huge_budget_is_refused() -> None:
    """(4, 2) exceeds the budget by 1 bit in 3e9 (inside HiGHS' feasibility tolerance) and
    has the lowest Ω; the allocator must still return the feasible optimum (2, 4)."""
    layers = [LayerChoice(("a",), 500_000_001, 0), LayerChoice(("b",), 500_000_000, 0)]
    problem = AllocationProblem(layers, [2, 4], np.array([[1.0, 0.0], [0.5, 0.4]]))
    budget = Budget(avg_weight_bits=3.0)
    assert metric_total(problem, "avg_weight_bits", [1, 0]) > 3.0
    alloc = solve(problem, budget)
    assert alloc.bits == [2, 4] == brute_force(problem, budget).bits
    assert 2 * 500_000_001 + 4 * 500_000_000 <= 3 * 1_000_000_001


def test_budget_at_an_exact_configuration_is_reached() -> None:
    """A budget equal to some allocation's cost admits it (no spurious tightening)."""
    layers = [LayerChoice(("a",), 300, 0), LayerChoice(("b",), 700, 0)]
    omega = np.array([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
    problem = AllocationProblem(layers, [2, 4, 8], omega)
    alloc = solve(problem, Budget(avg_weight_bits=(300 * 8 + 700 * 4) / 1000))
    assert alloc.bits == [8, 4]
    assert alloc.avg_weight_bits == pytest.approx(5.2)
    uniform = solve(problem, Budget(avg_weight_bits=4.0))
    assert uniform.bits == [4, 4] and uniform.avg_weight_bits == 4.0


def test_infeasible_budget_names_the_smallest_achievable_value() -> None:
    layers = [LayerChoice(("a",), 100, 10), LayerChoice(("b",), 300, 10)]
    omega = np.ones((2, 3))
    problem = AllocationProblem(layers, [2, 4, 8], omega, pins={1: 8})
    with pytest.raises(InfeasibleBudgetError) as info:
        solve(problem, Budget(avg_weight_bits=4.0))
    message = str(info.value)
    assert "\n" not in message
    assert "6.5000 bits" in message  # (100*2 + 300*8) / 400 with the pin kept
    with pytest.raises(InfeasibleBudgetError, match=r"smallest achievable is 325 bytes"):
        solve(problem, Budget(size_bytes=300))  # 100*2/8 + 300*8/8
    with pytest.raises(AllocationProblemError, match="bops"):
        solve(problem, Budget(bops=1.0))  # no BOPs table


def test_jointly_infeasible_budgets() -> None:
    """Size alone and latency alone are feasible, together they are not."""
    layers = [LayerChoice(("a",), 800, 0), LayerChoice(("b",), 800, 0)]
    latency = np.array([[5.0, 1.0], [5.0, 1.0]]) * 1e-3  # low width is slow: both need 8
    problem = AllocationProblem(layers, [4, 8], np.ones((2, 2)), latency=latency)
    solve(problem, Budget(size_bytes=800))
    solve(problem, Budget(latency=2e-3))
    with pytest.raises(InfeasibleBudgetError) as info:
        solve(problem, Budget(size_bytes=800, latency=2e-3))
    assert re.search(r"smallest achievable is 1600 bytes", str(info.value))


def test_pins_and_tied_groups_hold() -> None:
    rng = np.random.default_rng(3)
    for _ in range(10):
        pins = {0: 8, 3: 2}
        problem = random_problem(rng, 5, BITS, pairs=True, pins=pins)
        problem.layers[1] = LayerChoice(("w1a", "w1b", "w1c"), 600, 10)
        for budget in budgets_for(problem, rng)[:3]:
            exact = brute_force(problem, budget)
            if exact is None:
                continue
            alloc = solve(problem, budget)
            assert alloc.bits[0] == 8 and alloc.bits[3] == 2
            assert alloc.objective == pytest.approx(exact.objective, rel=1e-9)
            by_name = alloc.by_name(problem)
            assert by_name["w1a"] == by_name["w1b"] == by_name["w1c"] == alloc.bits[1]


def test_pareto_front_is_monotone_and_non_dominated() -> None:
    rng = np.random.default_rng(11)
    for pairs in (False, True):
        problem = random_problem(rng, 5, BITS, pairs=pairs, pins={4: 8})
        for metric in ("size_bytes", "avg_weight_bits", "latency", "bops"):
            front = pareto_front(problem, metric, points=10)
            assert len(front) >= 2
            values = [getattr(a, metric) for a in front]
            objectives = [a.objective for a in front]
            assert all(a < b for a, b in zip(values, values[1:], strict=False))
            assert all(a > b for a, b in zip(objectives, objectives[1:], strict=False))
            assert all(a.bits[4] == 8 for a in front)
            for point in front:  # each point is the exact optimum at its own cost
                exact = brute_force(problem, Budget(**{metric: getattr(point, metric)}))
                assert exact is not None
                assert point.objective == pytest.approx(exact.objective, rel=1e-9)
            everything = brute_force(problem, Budget())
            assert objectives[-1] == pytest.approx(everything.objective, rel=1e-9)


def test_flipped_layers_under_trace_uncertainty() -> None:
    """Layers 0 and 1 are near-ties (Ω differs by 1 %), layer 2 is clearly most sensitive:
    only 0 and 1 trade places when the Ω tables move within their error bars."""
    layers = [LayerChoice((f"w{i}",), 100, 0) for i in range(3)]
    omega = np.array([[1.00, 0.1], [1.01, 0.1], [9.0, 0.1]])
    problem = AllocationProblem(layers, [2, 8], omega)
    budget = Budget(avg_weight_bits=(2 * 8 + 2) / 3)  # two layers at 8 bits
    assert solve(problem, budget).bits == [2, 8, 8]
    low = omega * np.array([[1.03], [0.98], [0.9]])
    assert flipped_layers(problem, budget, [omega * 1.1, low]) == [0, 1]
    assert flipped_layers(problem, budget, [omega * 0.5]) == []


def test_problem_validation() -> None:
    layers = [LayerChoice(("a",), 10, 0)]
    with pytest.raises(AllocationProblemError, match="shape"):
        AllocationProblem(layers, [2, 4], np.ones((1, 3)))
    with pytest.raises(AllocationProblemError, match="pin"):
        AllocationProblem(layers, [2, 4], np.ones((1, 2)), pins={0: 3})
    with pytest.raises(AllocationProblemError, match="pair"):
        AllocationProblem(layers * 2, [2, 4], np.ones((2, 2)), pair_costs={(1, 0): np.ones((2, 2))})


# --------------------------------------------------------------------- ties on real graphs
def shared_weight_model() -> onnx.ModelProto:
    """x -> MatMul(W) -> Relu -> MatMul(W) -> MatMul(V): W is read twice."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "V")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "W"], ["h2"], name="mm2"),
             helper.make_node("MatMul", ["h2", "V"], ["y"], name="mm3")]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [2, 8])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [2, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                             ir_version=IR_FOR_OPSET[17])


def test_shared_weight_is_one_unit_and_stays_tied() -> None:
    quantizer = Quantizer(shared_weight_model())
    choices = layer_choices(quantizer.view, quantizer.placement)
    assert [c.names for c in choices] == [("W",), ("V",)]
    assert choices[0].params == 64 and choices[0].macs == 2 * 2 * 8 * 8
    omega = np.array([[1.0, 0.1], [1.0, 0.1]])
    problem = AllocationProblem(choices, [4, 8], omega)
    alloc = solve(problem, Budget(avg_weight_bits=(64 * 8 + 32 * 4) / 96))
    assert alloc.by_name(problem) == {"W": 8, "V": 4}


def test_activation_ties_and_user_ties_on_the_resnet() -> None:
    model = load_model("models/digits_resnet_op17.onnx").model
    quantizer = Quantizer(model)
    view, placement = quantizer.view, quantizer.placement
    plain = layer_choices(view, placement)
    tied = layer_choices(view, placement, tie_activations=True)
    assert len(plain) == 7 and len(tied) == 6
    merged = [c for c in tied if len(c.names) == 2]
    assert len(merged) == 1
    readers = [layer for layer in placement.layers if layer.weight in merged[0].names]
    sources = {placement.source(t) for layer in readers for t in layer.inputs
               if not view.is_constant(t)}
    assert sources == set(merged[0].act_names) and len(sources) == 1
    assert merged[0].params == sum(c.params for c in plain if c.names[0] in merged[0].names)
    first, last = plain[0].names[0], plain[-1].names[0]
    user = layer_choices(view, placement, ties=[[first, last]])
    assert len(user) == 6 and any(set(c.names) == {first, last} for c in user)


def test_pins_by_weight_or_node_name() -> None:
    model = load_model("models/digits_resnet_op17.onnx").model
    quantizer = Quantizer(model)
    view, placement = quantizer.view, quantizer.placement
    choices = layer_choices(view, placement)
    layers = [layer for layer in placement.layers if layer.weight]
    pins = first_last_pins(choices, view, 8, placement)
    assert pins == {layers[0].weight: 8, layers[-1].weight: 8}
    name, bits = parse_pin(f"{layers[2].node}=4")
    resolved = resolve_pins(choices, view, [*pins.items(), (name, bits)], BITS, placement)
    assert resolved == {0: 8, len(choices) - 1: 8, 2: 4}
    problem = AllocationProblem(choices, BITS, np.tile(np.linspace(1, 0, 5), (7, 1)),
                                pins=resolved)
    alloc = solve(problem, Budget(avg_weight_bits=3.0))
    assert alloc.bits[0] == 8 and alloc.bits[-1] == 8 and alloc.bits[2] == 4
    with pytest.raises(PinError, match="no quantizable weight"):
        resolve_pins(choices, view, {"nope": 4}, BITS, placement)
    with pytest.raises(PinError, match="not among the candidate"):
        resolve_pins(choices, view, {layers[0].weight: 5}, BITS, placement)
    with pytest.raises(PinError, match="conflicts"):
        resolve_pins(choices, view, [(layers[1].weight, 4), (layers[1].node, 8)], BITS,
                     placement)
    with pytest.raises(PinError, match="NAME=BITS"):
        parse_pin("conv8")
    assert parse_pin("a=b=3") == ("a=b", 3)
    assert isinstance(GraphView(model), GraphView)
