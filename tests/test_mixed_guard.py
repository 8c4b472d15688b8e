"""The default allocation is guarded by the Hessian-only one on held-out loss.

Corrections fitted on the analysis samples can extrapolate badly; the session solves the ILP
under both loss models and keeps the allocation with the lower held-out ΔL. Planted: the
corrected model is replaced by one that inverts the sensitivities (it asks for the narrowest
widths where the Hessian says they hurt most), so it must lose and be replaced.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hawq_onnx.mixed.interactions import LossModel
from hawq_onnx.mixed.pipeline import MixedOptions, MixedSession
from hawq_onnx.mixed.report import mixed_report
from hawq_onnx.quantize import QuantizeOptions
from tests.conftest import MODELS, write_head

FASHION = MODELS / "fashion_cnn_op17.onnx"


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> MixedSession:
    folder = tmp_path_factory.mktemp("guard")
    calib = write_head(MODELS / "fashion_calib.npz", folder / "calib.npz", 160)
    mixed = MixedOptions(avg_weight_bits=3.0, interactions="measured", analysis_samples=96,
                         holdout_samples=64, max_probes=16, eval_configs=0, use_cache=False)
    session = MixedSession(FASHION, calib, QuantizeOptions(), mixed)
    session.correct()
    return session


def test_a_worse_correction_model_is_replaced_by_the_hessian_allocation(
        session: MixedSession) -> None:
    models = session.corrections.models
    honest = models["measured"]
    hessian = models["hessian"]
    # inverted priorities: cheap to quantize where the Hessian says it is most expensive
    inverted = hessian.unary.max() - hessian.unary + hessian.unary.min()
    models["measured"] = LossModel("measured", inverted)
    try:
        problem, allocation = session.allocate_guarded()
        bad = session.allocate(session.problem(models["measured"]))
        good = session.allocate(session.problem(hessian))
        assert session._columns(bad) != session._columns(good)
        assert session.measured_delta(good) < session.measured_delta(bad)
        assert allocation.bits == good.bits and session.kept_model is hessian
        assert session.selection["kept"] == "hessian"
        kept_dl = session.selection["held_out_dl"]
        assert kept_dl["hessian"] < kept_dl["measured"]
        assert any("Hessian-only allocation" in note for note in session.notes)
        report = mixed_report(session, problem, allocation, [], None, {})
        assert report["loss_model"] == "hessian" and report["guard"]["kept"] == "hessian"
        assert report["totals"]["measured_dl"] == pytest.approx(kept_dl["hessian"], rel=1e-5)
    finally:
        models["measured"] = honest
        session.notes[:] = [n for n in session.notes if "Hessian-only allocation" not in n]


def test_the_chosen_model_is_kept_when_it_is_not_worse(session: MixedSession) -> None:
    problem, allocation = session.allocate_guarded()
    chosen = session.allocate(session.problem(session.chosen_model()))
    assert session.selection is not None
    if session.selection["same_allocation"]:
        assert allocation.bits == chosen.bits
        return
    dl = session.selection["held_out_dl"]
    kept = session.selection["kept"]
    assert dl[kept] == min(dl.values())
    assert session.measured_delta(allocation) == pytest.approx(dl[kept], rel=1e-5)
    avg = allocation.avg_weight_bits
    assert avg <= session.budget().avg_weight_bits + 1e-9


def test_hessian_only_requests_skip_the_guard(tmp_path: Path, session: MixedSession) -> None:
    saved = session.mixed.interactions
    session.mixed.interactions = "none"
    try:
        _, allocation = session.allocate_guarded()
        assert session.selection is None and session.kept_model.name == "hessian"
        plain = session.allocate(session.problem(session.corrections.models["hessian"]))
        assert allocation.bits == plain.bits
    finally:
        session.mixed.interactions = saved
