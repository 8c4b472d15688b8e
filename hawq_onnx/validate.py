"""Validate a quantized model against its float original with onnxruntime.

Metrics, all streamed batch by batch (memory does not grow with the evaluation set):

* ``top1_float`` / ``top1_quant``: accuracy of the first output's predicted class
  (``argmax`` over the last axis; one score per sample is a binary decision, see
  :mod:`hawq_onnx.predictions` and ``decision``), when labels are given; ``drop`` is their
  difference (in [0, 1]);
* ``agreement``: how often the two models' top-1 predictions agree (no labels needed);
* ``sqnr_db``: output signal-to-quantization-noise ratio, ``10 log10(sum f^2 / sum (f-q)^2)``
  over every float output element; ``cosine``: cosine similarity of the flattened outputs;
* ``bytes_*``: file sizes;
* ``latency_*_ms``: median single-thread latency of one batch with onnxruntime's full
  optimizations, float and quantized runs interleaved so that machine noise (frequency
  scaling, other processes) hits both alike.

Without labels, ``drop`` is ``1 - agreement``: the share of predictions quantization changed.
"""

from __future__ import annotations

import math
import os
import statistics
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from hawq_onnx import predictions
from hawq_onnx.calibration.session import make_session, run_session, session_options
from hawq_onnx.data import LABELS_KEY, Dataset, load_npz
from hawq_onnx.errors import HawqError, InvalidDataError, InvalidModelError
from hawq_onnx.importer import load_model


@dataclass
class Metrics:
    samples: int
    outputs: list[str]
    top1_float: float | None
    top1_quant: float | None
    drop: float
    agreement: float | None
    #: how the first output became a class per sample (:mod:`hawq_onnx.predictions`)
    decision: str
    sqnr_db: float
    cosine: float
    bytes_float: int
    bytes_quant: int
    latency_float_ms: float | None = None
    latency_quant_ms: float | None = None

    @property
    def size_ratio(self) -> float:
        return self.bytes_quant / self.bytes_float if self.bytes_float else math.nan

    @property
    def speedup(self) -> float | None:
        if not self.latency_float_ms or not self.latency_quant_ms:
            return None
        return self.latency_float_ms / self.latency_quant_ms

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["size_ratio"] = round(self.size_ratio, 4)
        out["speedup"] = None if self.speedup is None else round(self.speedup, 3)
        for key in ("top1_float", "top1_quant", "drop", "agreement", "cosine", "sqnr_db",
                    "latency_float_ms", "latency_quant_ms"):
            if isinstance(out[key], float) and math.isfinite(out[key]):
                out[key] = round(out[key], 6)
            elif isinstance(out[key], float):
                out[key] = None if math.isnan(out[key]) else str(out[key])
        return out


class _Accumulator:
    """Running sums for SQNR, cosine, agreement and accuracy."""

    def __init__(self) -> None:
        self.signal = self.noise = self.dot = self.quant_energy = 0.0
        self.agree = self.correct_float = self.correct_quant = self.count = 0
        self._scores: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []

    def add_outputs(self, floats: list[np.ndarray], quants: list[np.ndarray]) -> None:
        for f, q in zip(floats, quants, strict=True):
            if not np.issubdtype(f.dtype, np.floating):
                continue
            f64, q64 = f.astype(np.float64).ravel(), q.astype(np.float64).ravel()
            self.signal += float(f64 @ f64)
            self.noise += float(np.square(f64 - q64).sum())
            self.dot += float(f64 @ q64)
            self.quant_energy += float(q64 @ q64)

    def add_predictions(self, first_float: np.ndarray, first_quant: np.ndarray,
                        labels: np.ndarray | None) -> None:
        if predictions.single_score(first_float):
            # one score per sample: the threshold needs every float score, so keep them
            # (8 bytes per sample per model) and decide in :meth:`finish`
            self._scores.append((predictions.scores(first_float),
                                 predictions.scores(first_quant), labels))
            return
        self._count(predictions.classes(first_float), predictions.classes(first_quant), labels)

    def _count(self, pred_f: np.ndarray, pred_q: np.ndarray, labels: np.ndarray | None) -> None:
        self.agree += int(np.sum(pred_f == pred_q))
        self.count += int(pred_f.size)
        if labels is not None:
            if labels.size != pred_f.size:  # found by fuzzing: reshape raised ValueError
                raise HawqError(f"the model's first output gives {pred_f.size} predictions "
                                f"for a batch with {labels.size} labels; cannot score top-1")
            labels = labels.reshape(pred_f.shape)
            self.correct_float += int(np.sum(pred_f == labels))
            self.correct_quant += int(np.sum(pred_q == labels))

    def finish(self) -> str:
        """Count the single-score batches under the float model's threshold; the rule used."""
        if not self._scores:
            return predictions.ARGMAX
        threshold = predictions.threshold_for([f for f, _, _ in self._scores])
        for float_scores, quant_scores, labels in self._scores:
            self._count(predictions.classes(float_scores, threshold),
                        predictions.classes(quant_scores, threshold), labels)
        self._scores = []
        return predictions.describe(threshold)

    def sqnr_db(self) -> float:
        if self.noise == 0:
            return math.inf
        return 10.0 * math.log10(self.signal / self.noise) if self.signal > 0 else -math.inf

    def cosine(self) -> float:
        denom = math.sqrt(self.signal * self.quant_energy)
        return self.dot / denom if denom else (1.0 if self.signal == self.quant_energy else 0.0)


def _labels(path: Path, dataset: Dataset, key: str) -> np.ndarray | None:
    if key == LABELS_KEY:
        return dataset.labels
    try:
        with np.load(path, allow_pickle=False) as archive:
            if key not in archive.files:
                raise InvalidDataError(f"{path}: no '{key}' array (keys: "
                                       f"{', '.join(sorted(archive.files))})")
            labels = archive[key]
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise InvalidDataError(f"{path}: cannot read '{key}' ({exc})") from exc
    if len(labels) != len(dataset):
        raise InvalidDataError(f"{path}: '{key}' has {len(labels)} entries for "
                               f"{len(dataset)} samples")
    return labels


def _quant_session(path: Path, threads: int | None = None) -> ort.InferenceSession:
    """The quantized model is read by onnxruntime alone (the importer would refuse its QDQ
    nodes); a refusal is make_session's one line, which names the path."""
    if not path.is_file():
        raise InvalidModelError(f"{path}: no such file")
    return make_session(path, session_options(threads=threads))


def _latency(float_path: Path, quant_path: Path, feeds: dict[str, np.ndarray],
             runs: int) -> tuple[float, float]:
    """Median ms of interleaved single-thread runs on one batch."""
    sessions = [make_session(float_path, session_options(threads=1)),
                _quant_session(quant_path, threads=1)]
    for session in sessions:  # warm-up: first runs allocate and page in
        for _ in range(3):
            session.run(None, feeds)
    times: list[list[float]] = [[], []]
    for _ in range(runs):
        for index, session in enumerate(sessions):
            start = time.perf_counter()
            session.run(None, feeds)
            times[index].append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times[0]), statistics.median(times[1])


def evaluate(float_path: str | os.PathLike[str], quant_path: str | os.PathLike[str],
             eval_path: str | os.PathLike[str], *, labels_key: str = LABELS_KEY,
             batch_size: int = 64, latency_runs: int = 20, max_samples: int | None = None
             ) -> Metrics:
    """Compare the quantized model with the float one on the evaluation data."""
    float_path, quant_path, eval_path = Path(float_path), Path(quant_path), Path(eval_path)
    float_model = load_model(float_path, normalize=False).model
    dataset = load_npz(eval_path, float_model)
    labels = _labels(eval_path, dataset, labels_key)
    float_session = make_session(float_path, session_options())
    quant_session = _quant_session(quant_path)
    _check_interfaces(float_session, quant_session, quant_path)
    names = [o.name for o in float_session.get_outputs()]
    acc = _Accumulator()
    seen = 0
    first_feeds: dict[str, np.ndarray] | None = None
    for part, feeds in zip(dataset.batch_slices(batch_size), dataset.batches(batch_size),
                           strict=True):
        if max_samples is not None and seen >= max_samples:
            break
        first_feeds = first_feeds or feeds
        floats = run_session(float_session, names, feeds, str(eval_path))
        quants = run_session(quant_session, names, feeds, str(eval_path))
        acc.add_outputs(floats, quants)
        acc.add_predictions(floats[0], quants[0], None if labels is None else labels[part])
        seen += part.stop - part.start
    decision = acc.finish()
    has_labels = labels is not None
    top1_f = acc.correct_float / acc.count if has_labels and acc.count else None
    top1_q = acc.correct_quant / acc.count if has_labels and acc.count else None
    agreement = acc.agree / acc.count if acc.count else None
    drop = (top1_f - top1_q) if top1_f is not None and top1_q is not None else (
        1.0 - agreement if agreement is not None else 0.0)
    metrics = Metrics(samples=seen, outputs=names, top1_float=top1_f, top1_quant=top1_q,
                      drop=drop, agreement=agreement, decision=decision,
                      sqnr_db=acc.sqnr_db(),
                      cosine=acc.cosine(), bytes_float=float_path.stat().st_size,
                      bytes_quant=quant_path.stat().st_size)
    if latency_runs > 0 and first_feeds is not None:
        metrics.latency_float_ms, metrics.latency_quant_ms = _latency(
            float_path, quant_path, first_feeds, latency_runs)
    return metrics


def _check_interfaces(float_session: ort.InferenceSession, quant_session: ort.InferenceSession,
                      quant_path: Path) -> None:
    """Same input and output names, or the comparison means nothing."""
    for kind in ("inputs", "outputs"):
        want = [v.name for v in getattr(float_session, f"get_{kind}")()]
        have = [v.name for v in getattr(quant_session, f"get_{kind}")()]
        if set(want) - set(have):
            raise HawqError(f"{quant_path}: {kind} {sorted(set(want) - set(have))} of the float "
                            "model are missing; is it a quantized version of that model?")


__all__ = ["Metrics", "evaluate"]
