"""Which pair terms the ILP takes: every measured pair, then the largest others up to a cap, with
a bound on what the left-out ones can change; end to end on a 22-layer chain (231 pairs)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
import pytest

from hawq_onnx.errors import HawqError
from hawq_onnx.mixed.interactions import LossModel
from hawq_onnx.mixed.pair_pruning import ilp_pairs
from hawq_onnx.mixed.pipeline import MixedOptions, MixedSession
from hawq_onnx.mixed.report import mixed_report
from hawq_onnx.quantize import QuantizeOptions
from tests.tiny_models import chain_model


def _tables(units: int, seed: int = 0) -> dict[tuple[int, int], np.ndarray]:
    rng = np.random.default_rng(seed)
    scales = 10.0 ** rng.uniform(-6, 0, units * (units - 1) // 2)
    return {p: s * rng.standard_normal((3, 3))
            for p, s in zip(itertools.combinations(range(units), 2), scales, strict=True)}


def test_measured_pairs_stay_and_the_largest_others_fill_the_cap() -> None:
    tables = _tables(12)  # 66 pairs
    measured = {(0, 1), (5, 6), (10, 11)}
    kept = ilp_pairs(tables, measured, limit=20)
    assert len(kept.pairs) == 20 and measured <= set(kept.pairs) and kept.dropped == 46
    size = {p: float(np.abs(t).max()) for p, t in tables.items()}
    smallest_kept = min(size[p] for p in kept.pairs if p not in measured)
    left_out = [p for p in tables if p not in kept.pairs]
    assert max(size[p] for p in left_out) <= smallest_kept
    assert kept.dropped_bound == pytest.approx(sum(size[p] for p in left_out))
    # the bound holds for every configuration's prediction
    full, pruned = LossModel("full", np.zeros((12, 3)), tables), LossModel("ilp", np.zeros((12, 3)),
                                                                           kept.pairs)
    rng = np.random.default_rng(1)
    for _ in range(200):
        columns = list(rng.integers(0, 3, 12))
        assert abs(full.predict(columns) - pruned.predict(columns)) <= kept.dropped_bound
    # everything fits: nothing left out; more measured pairs than the cap: all measured kept
    assert ilp_pairs(tables, set(), limit=66).dropped == 0
    many = set(itertools.islice(tables, 30))
    assert set(ilp_pairs(tables, many, limit=20).pairs) == many


@pytest.fixture(scope="module")
def chain_session(tmp_path_factory: pytest.TempPathFactory) -> MixedSession:
    folder = tmp_path_factory.mktemp("chain")
    model_path = folder / "chain.onnx"
    onnx.save(chain_model(66, width=6, seed=3), model_path)  # 22 MatMul layers
    rng = np.random.default_rng(0)
    np.savez(folder / "calib.npz", x=rng.standard_normal((96, 6)).astype(np.float32))
    mixed = MixedOptions(avg_weight_bits=4.0, interactions="both", analysis_samples=48,
                         holdout_samples=48, min_probes=8, max_probes=8, eval_configs=0,
                         use_cache=False, max_ilp_pairs=CAP)
    return MixedSession(model_path, Path(folder / "calib.npz"), QuantizeOptions(), mixed)


CAP = 40  # 21 measured neighbour pairs + the 19 largest Hessian couplings; solves in < 1 s


def test_a_deep_model_gets_a_capped_ilp_and_the_report_says_what_was_left_out(
        chain_session: MixedSession) -> None:
    session = chain_session
    assert len(session.choices) == 22
    both = session.correct().models["both"]
    n_pairs = 22 * 21 // 2
    assert len(both.pairs) == n_pairs
    problem = session.problem(both)
    allocation = session.allocate(problem)
    assert allocation.status == "optimal" and len(problem.pair_costs) == CAP
    kept = session.ilp_pairs["both"]
    measured = set(session.corrections.measured.pairs)
    assert len(measured) == 21 and measured <= set(kept.pairs) == set(problem.pair_costs)
    assert kept.dropped == n_pairs - CAP
    assert any(f"{n_pairs - CAP} smallest of {n_pairs} pairwise" in n for n in session.notes)
    session.kept_model = both
    report = mixed_report(session, problem, allocation, [allocation], None, {})
    assert report["pairs"] == {"neighbours": 21, "in_ilp": CAP, "left_out": n_pairs - CAP,
                               "left_out_bound": pytest.approx(kept.dropped_bound, rel=1e-3)}
    # predictions in the report use every pair, not just the ILP's
    expected = both.predict(session._columns(allocation))
    assert report["totals"]["predicted_dl"] == pytest.approx(expected, rel=1e-3, abs=1e-9)
    assert report["pareto"]["points"][0]["predicted_dl"] == report["totals"]["predicted_dl"]
    # the ILP is exact on what it took: no configuration beats it under the pruned terms
    pruned = LossModel("pruned", both.unary, kept.pairs)
    rng = np.random.default_rng(2)
    best = pruned.predict(session._columns(allocation))
    budget = session.budget()
    for _ in range(300):
        columns = list(rng.integers(0, len(session.bits), 22))
        bits = [session.bits[c] for c in columns]
        params = [c.params for c in session.choices]
        if np.dot(bits, params) / sum(params) <= budget.avg_weight_bits:
            assert pruned.predict(columns) >= best - 1e-9


def test_max_ilp_pairs_is_validated() -> None:
    with pytest.raises(HawqError, match="max_ilp_pairs"):
        MixedOptions(max_ilp_pairs=-1)


def test_a_negative_predicted_loss_is_called_out(chain_session: MixedSession) -> None:
    """Planted: pair terms that over-compensate the singles make the model predict a loss
    decrease; the session says so and points at the held-out measurement."""
    both = chain_session.correct().models["both"]
    allocation = chain_session.allocate(chain_session.problem(both))
    before = list(chain_session.notes)
    chain_session.kept_model = both
    chain_session.note_implausible_prediction(allocation)
    assert chain_session.notes == before  # a plausible prediction: nothing to say
    over = LossModel("both", both.unary,
                     {p: t - 4 * both.unary.max() for p, t in both.pairs.items()})
    chain_session.kept_model = over
    try:
        assert over.predict(chain_session._columns(allocation)) < 0
        chain_session.note_implausible_prediction(allocation)
        added = [n for n in chain_session.notes if n not in before]
        measured = chain_session.measured_delta(allocation)
        assert len(added) == 1 and "predicts a loss decrease" in added[0]
        assert f"{measured:.3g}" in added[0]
    finally:
        chain_session.kept_model = None
        chain_session.notes[:] = before
