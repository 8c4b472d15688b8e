"""How well a loss model predicts the real loss increase: Spearman over random configurations.

Why: an allocator is only as good as the ranking its objective induces. For ``count``
random configurations (one candidate width per unit, drawn uniformly and independently;
pinned units keep their pin) the real loss increase is measured by forward passes on
*held-out* calibration samples (samples the Hessian and the interaction measurements never
saw), with every weight replaced by its exact quantized value, and compared with each loss
model's prediction by rank correlation (``scipy.stats.spearmanr``). The same configurations
and the same measurements are used for every model, so the numbers are directly comparable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from hawq_onnx.mixed.interactions import LossMeter, LossModel, Perturbations

#: the issue's minimum for a meaningful rank correlation.
MIN_CONFIGS = 50


def random_configurations(n_layers: int, n_bits: int, count: int, seed: int = 0,
                          pins: Mapping[int, int] | None = None) -> list[list[int]]:
    """``count`` distinct column choices (fewer when the space is smaller); ``pins`` maps a
    unit to the column it must take."""
    rng = np.random.default_rng(seed)
    pins = dict(pins or {})
    free = [i for i in range(n_layers) if i not in pins]
    space = n_bits ** len(free)
    wanted = min(count, space)
    seen: set[tuple[int, ...]] = set()
    configs: list[list[int]] = []
    while len(configs) < wanted:
        columns = [int(c) for c in rng.integers(0, n_bits, n_layers)]
        for i, k in pins.items():
            columns[i] = k
        key = tuple(columns)
        if key not in seen:
            seen.add(key)
            configs.append(columns)
    return configs


@dataclass
class ModelScore:
    """One loss model against the measurements."""

    name: str
    spearman: float
    pvalue: float
    median_ratio: float  # median predicted / measured (calibration of the scale)
    predicted: list[float] = field(default_factory=list)

    def to_dict(self, with_values: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"spearman": _round(self.spearman), "pvalue": _round(self.pvalue),
                               "median_ratio": _round(self.median_ratio)}
        if with_values:
            out["predicted"] = [_round(v) for v in self.predicted]
        return out


@dataclass
class Evaluation:
    """Measured ΔL of each configuration and every model's score."""

    candidate_bits: list[int]
    configs: list[list[int]]
    measured: list[float]
    scores: dict[str, ModelScore]
    samples: int

    def spearman(self, name: str) -> float:
        return self.scores[name].spearman

    def to_dict(self, with_values: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "configs": len(self.configs), "samples": self.samples,
            "spearman": {k: _round(v.spearman) for k, v in self.scores.items()},
            "models": {k: v.to_dict(with_values) for k, v in self.scores.items()},
        }
        if with_values:
            out["bits"] = [[self.candidate_bits[k] for k in c] for c in self.configs]
            out["measured"] = [_round(v) for v in self.measured]
        return out


def _round(value: float) -> float | None:
    return float(f"{value:.6g}") if np.isfinite(value) else None


def measure_configurations(meter: LossMeter, perturbations: Perturbations,
                           configs: Sequence[Sequence[int]]) -> list[float]:
    """Real ΔL of each configuration (one forward pass over the meter's data each)."""
    return [perturbations.delta(meter, dict(enumerate(c))) for c in configs]


def score(name: str, predicted: Sequence[float], measured: Sequence[float]) -> ModelScore:
    pred, real = np.asarray(predicted, dtype=np.float64), np.asarray(measured, dtype=np.float64)
    if len(pred) < 3 or np.ptp(pred) == 0 or np.ptp(real) == 0:
        rho, pvalue = float("nan"), float("nan")
    else:
        result = spearmanr(pred, real)
        rho, pvalue = float(result.statistic), float(result.pvalue)
    positive = real > 0
    ratio = float(np.median(pred[positive] / real[positive])) if positive.any() else float("nan")
    return ModelScore(name, rho, pvalue, ratio, [float(v) for v in pred])


def evaluate_models(models: Sequence[LossModel], meter: LossMeter,
                    perturbations: Perturbations, configs: Sequence[Sequence[int]]
                    ) -> Evaluation:
    """Score every model on the same configurations and held-out measurements."""
    measured = measure_configurations(meter, perturbations, configs)
    scores = {m.name: score(m.name, [m.predict(c) for c in configs], measured) for m in models}
    samples = meter.objective.total
    return Evaluation(list(perturbations.candidate_bits), [list(c) for c in configs], measured,
                      scores, samples)


__all__ = ["MIN_CONFIGS", "Evaluation", "ModelScore", "evaluate_models",
           "measure_configurations", "random_configurations", "score"]
