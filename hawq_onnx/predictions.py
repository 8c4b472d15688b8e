"""One predicted class per sample from a model's first output, for top-1 and agreement.

Why a rule and not just ``argmax``: a detector, voice-activity or binary classifier often
emits one score per sample (``[N]`` or ``[N, 1]``). ``argmax`` over a single column is always
0, so two such models would "agree" on 100 % of samples whatever quantization did. A single
score is a binary decision instead: ``score > 0.5`` when every float score lies in [0, 1]
(probabilities, e.g. after a Sigmoid), ``score > 0`` otherwise (logits). The threshold comes
from the float model's scores over the whole evaluation set, so both models are judged by the
same rule.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ARGMAX = "argmax"


def single_score(output: np.ndarray) -> bool:
    """True when the output holds one floating score per sample."""
    return (np.issubdtype(output.dtype, np.floating)
            and (output.ndim <= 1 or output.shape[-1] == 1))


def scores(output: np.ndarray) -> np.ndarray:
    """The per-sample scores of a single-score output, flat."""
    return np.asarray(output, dtype=np.float64).reshape(-1)


def threshold_for(float_scores: Sequence[np.ndarray] | np.ndarray) -> float:
    """0.5 when the float model's scores are all probabilities, 0 otherwise."""
    values = np.concatenate([np.ravel(s) for s in float_scores]) if isinstance(
        float_scores, list | tuple) else np.ravel(float_scores)
    if values.size and float(values.min()) >= 0.0 and float(values.max()) <= 1.0:
        return 0.5
    return 0.0


def describe(threshold: float | None) -> str:
    """The decision rule as the report states it."""
    return ARGMAX if threshold is None else f"score > {threshold:g}"


def classes(output: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Predicted classes: ``argmax`` over the last axis, or ``score > threshold`` for a single
    score per sample (``threshold`` None there: 0, the logit rule). Integer outputs of rank
    ≤ 1 are taken as class ids already."""
    if output.ndim == 0:
        return output.reshape(1)
    if single_score(output):
        return (scores(output) > (0.0 if threshold is None else threshold)).astype(np.int64)
    if output.ndim == 1:
        return output
    return np.argmax(output, axis=-1)


__all__ = ["ARGMAX", "classes", "describe", "scores", "single_score", "threshold_for"]
