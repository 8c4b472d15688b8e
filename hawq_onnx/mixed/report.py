"""The report's ``mixed`` section, the per-layer annotations and the Pareto figure.

Why apart from the pipeline: the session decides and measures; this module only turns a
finished session and its allocation into JSON-ready rows and a PNG, so report changes never
touch the allocation code.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hawq_onnx.errors import HawqError
from hawq_onnx.mixed.problem import Allocation, AllocationProblem
from hawq_onnx.mixed.target import TargetResult

if TYPE_CHECKING:
    from hawq_onnx.mixed.interactions import LossModel
    from hawq_onnx.mixed.pipeline import MixedSession

#: bits a float (unquantized) weight counts for in the parameter-weighted average.
FLOAT_BITS = 32


def rounded(value: float | None, digits: int = 6) -> float | None:
    if value is None or not np.isfinite(value):
        return None
    return float(f"{value:.{digits}g}")


def _allocation_row(session: MixedSession, allocation: Allocation, predicted: float,
                    drops: Mapping[Any, Mapping[str, Any]]) -> dict[str, Any]:
    row: dict[str, Any] = {"bits": list(allocation.bits)}
    if session.act_units:
        row["act_bits"] = list(allocation.act_bits)
    row.update({"avg_weight_bits": rounded(allocation.avg_weight_bits),
                "size_bytes": rounded(allocation.size_bytes), "bops": rounded(allocation.bops),
                "latency_s": rounded(allocation.latency), "predicted_dl": rounded(predicted),
                "measured_dl": rounded(session.measured_delta(allocation))})
    measured = drops.get(allocation.key)
    if measured is not None:
        row["drop"] = rounded(measured["drop"])
    return row


def mixed_report(session: MixedSession, problem: AllocationProblem, allocation: Allocation,
                 frontier: Sequence[Allocation], target: TargetResult | None,
                 drops: Mapping[Any, Mapping[str, Any]]) -> dict[str, Any]:
    """The report's ``mixed`` section."""
    mixed = session.mixed
    model = session.kept_model or session.chosen_model()
    float_params = session.float_params()
    params = sum(c.params for c in session.choices)
    out: dict[str, Any] = {
        "candidate_bits": session.bits,
        "interactions": mixed.interactions,
        "loss_model": model.name,
        "request": {k: v for k, v in asdict(mixed).items()
                    if k in ("avg_weight_bits", "size_budget", "bops_budget", "latency_budget",
                             "max_drop", "minimize", "hops", "pin_first_last")},
        "budget_ilp": dict(session.budget().items()),
        "pins": {session.choices[i].label: b for i, b in session.pins.items()},
        "status": allocation.status,
        "totals": {
            "weight_bytes": rounded(allocation.size_bytes),
            "avg_weight_bits": rounded((allocation.avg_weight_bits * params
                                       + FLOAT_BITS * float_params) / (params + float_params)),
            "bops": rounded(allocation.bops), "latency_s": rounded(allocation.latency),
            "predicted_dl": rounded(_predicted(session, model, allocation)),
            "measured_dl": rounded(session.measured_delta(allocation)),
        },
        "units": [{"names": list(c.names), "params": c.params, "macs": c.macs,
                   "bits": b} for c, b in zip(session.choices, allocation.bits, strict=True)],
        "pareto": {"metric": mixed.primary_metric(),
                   "points": [_allocation_row(session, a, _predicted(session, model, a), drops)
                              for a in frontier]},
        "pairs": _pairs_entry(session, model.name, problem),
        "mirror_batch": session.mirror_batch,
    }
    if session.selection is not None:
        out["guard"] = session.selection
    if session.act_bits:
        _add_activations(out, session, allocation)
    if session.evaluation is not None:
        out["spearman"] = session.evaluation.to_dict()
    if target is not None:
        out["target"] = target.to_dict()
    return out


def _predicted(session: MixedSession, model: LossModel, allocation: Allocation) -> float:
    """The loss model's prediction with every pair term (the ILP may have taken fewer)."""
    return model.predict(session._columns(allocation)) + _act_predicted(session, allocation)


def _pairs_entry(session: MixedSession, model_name: str, problem: AllocationProblem
                 ) -> dict[str, Any]:
    """Neighbour pairs measured, pair terms in the ILP, and what was left out of it."""
    entry: dict[str, Any] = {
        "neighbours": len(session.corrections.pairs) if session.corrections else 0,
        "in_ilp": len(problem.pair_costs)}
    kept = session.ilp_pairs.get(model_name)
    if kept is not None and kept.dropped:
        entry.update(left_out=kept.dropped, left_out_bound=rounded(kept.dropped_bound))
    return entry


def _act_predicted(session: MixedSession, allocation: Allocation) -> float:
    """The allocated activation quantizers' share of the predicted ΔL."""
    if not session.act_units:
        return 0.0
    unary = session.act_unary()
    return float(sum(unary[j, m] for j, m in enumerate(session._act_columns(allocation))))


def _add_activations(out: dict[str, Any], session: MixedSession,
                     allocation: Allocation) -> None:
    """``candidate_act_bits`` and one ``activations`` row per activation quantizer: its
    tensor, the layer inputs it quantizes and their readers, the summed Hessian trace of
    those inputs (mean per sample), Ω per candidate, the chosen width, predicted and
    measured (held-out, that quantizer alone) ΔL."""
    out["candidate_act_bits"] = list(session.act_bits)
    if session.mixed.act_pins or session.act_pins:
        out["act_pins"] = {session.act_units[j].name: b for j, b in session.act_pins.items()}
    table = session.act_sensitivity
    omega = session.act_omega()
    unary = session.act_unary()
    measured = session.act_deltas(allocation)
    rows = []
    for j, (unit, bits) in enumerate(zip(session.act_units, allocation.act_bits, strict=True)):
        traced = [r for r, key in enumerate(table.keys) if key == unit.name] if table else []
        m = session.act_bits.index(bits)
        rows.append({
            "tensor": unit.name, "inputs": list(unit.tensors), "readers": list(unit.readers),
            "trace": rounded(float(sum(table.trace[r] for r in traced))) if traced else None,
            "trace_se": (rounded(float(np.sqrt(sum(np.nan_to_num(table.trace_se[r]) ** 2
                                                  for r in traced)))) if traced else None),
            "omega": {str(b): rounded(float(v)) for b, v in zip(session.act_bits, omega[j],
                                                               strict=True)},
            "bits": bits, "predicted_dl": rounded(float(unary[j, m])),
            "measured_dl": rounded(measured[j])})
    out["activations"] = rows


def annotate_layers(report: dict[str, Any], session: MixedSession,
                     allocation: Allocation) -> None:
    """Per layer row: trace, trace_se, Ω per candidate, predicted and measured ΔL."""
    table = session.sensitivity
    model = session.chosen_model()
    columns = session._columns(allocation)
    shares = model.per_unit(columns)
    measured = session.layer_deltas(allocation)
    unit_of = {name: i for i, c in enumerate(session.choices) for name in c.names}
    for row in report["layers"]:
        unit = unit_of.get(row["name"])
        if unit is None or table is None:
            continue
        r = table.row(row["name"])
        row["trace"] = rounded(float(table.trace[r]))
        row["trace_se"] = rounded(float(table.trace_se[r]))
        row["omega"] = {str(b): rounded(float(v)) for b, v in zip(session.bits,
                                                                 table.omega[r], strict=True)}
        row["unit"] = unit
        row["predicted_dl"] = rounded(float(shares[unit]))
        row["measured_dl"] = rounded(measured[unit])


# ---------------------------------------------------------------------- figure
_METRIC_LABELS = {"size_bytes": "packed weight bytes", "avg_weight_bits": "average weight bits",
                  "bops": "BOPs", "latency": "latency (s)"}


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise HawqError("--pareto-plot needs matplotlib: pip install 'hawq-onnx[plot]'") from exc
    return plt


def write_pareto_plot(path: str | os.PathLike[str], mixed: Mapping[str, Any]) -> Path:
    """Predicted and measured (held-out) ΔL along the frontier, the chosen point marked;
    a second panel with the measured accuracy drops when a target search ran."""
    plt = _pyplot()
    pareto = mixed["pareto"]
    metric = pareto["metric"]
    key = "latency_s" if metric == "latency" else metric
    points = [p for p in pareto["points"] if p.get(key) is not None]
    drops = [p for p in points if p.get("drop") is not None]
    fig, axes = plt.subplots(2 if drops else 1, 1, figsize=(6.4, 7.0 if drops else 4.0),
                             squeeze=False)
    ax = axes[0][0]
    x = [p[key] for p in points]
    for field_name, style, label in (("predicted_dl", "o-", "predicted ΔL"),
                                     ("measured_dl", "s--", "measured ΔL (held out)")):
        ax.plot(x, [max(p[field_name] or 0.0, 1e-12) for p in points], style, label=label)
    totals = mixed["totals"]
    chosen = totals.get("weight_bytes" if metric == "size_bytes" else key)
    if chosen is not None and totals.get("measured_dl") is not None:
        ax.plot([chosen], [max(totals["measured_dl"], 1e-12)], "r*", markersize=14,
                label="chosen")
    ax.set_yscale("log")
    ax.set_xlabel(_METRIC_LABELS.get(metric, metric))
    ax.set_ylabel("loss increase")
    ax.set_title(f"Pareto front ({mixed['loss_model']} loss model)")
    ax.legend()
    if drops:
        low = axes[1][0]
        low.plot([p[key] for p in drops], [100 * p["drop"] for p in drops], "o", label="measured")
        target = mixed.get("target", {}).get("max_drop")
        if target is not None:
            low.axhline(100 * target, color="r", linestyle=":", label="max drop")
        low.set_xlabel(_METRIC_LABELS.get(metric, metric))
        low.set_ylabel("accuracy drop (points)")
        low.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["FLOAT_BITS", "annotate_layers", "mixed_report", "rounded", "write_pareto_plot"]
