"""Stream activation statistics through onnxruntime, one batch at a time.

The float model is copied with every tensor to calibrate added as a graph output, run batch
by batch, and each batch's values go straight into that tensor's
:class:`StreamingHistogram`. Peak memory is one batch's activations plus a fixed-size
histogram per tensor, whatever the number of calibration samples. ``max_tensors_per_run``
bounds the activations held at once further (each batch is then run several times, each run
returning a subset of the tensors).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from hawq_onnx.calibration.histogram import DEFAULT_BINS, StreamingHistogram
from hawq_onnx.calibration.session import make_session, run_session, session_options
from hawq_onnx.data import Dataset
from hawq_onnx.model_io import copy_model
from hawq_onnx.progress import progress


@dataclass
class CalibrationStats:
    """Histograms per tensor plus how much data produced them."""

    histograms: dict[str, StreamingHistogram]
    samples: int = 0
    batches: int = 0
    notes: list[str] = field(default_factory=list)


def _with_outputs(model: onnx.ModelProto, tensors: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs ``tensors`` (type-only value infos: declared
    intermediate shapes can be wrong, observed ones are what counts)."""
    out = copy_model(model)
    present = {o.name for o in out.graph.output}
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*out.graph.value_info, *out.graph.input, *out.graph.output)
             if v.type.HasField("tensor_type")}
    for name in tensors:
        if name not in present:
            out.graph.output.append(helper.make_tensor_value_info(
                name, types.get(name) or onnx.TensorProto.FLOAT, None))
            present.add(name)
    return out


def _chunks(names: Sequence[str], size: int | None) -> list[list[str]]:
    if not size or size >= len(names):
        return [list(names)]
    return [list(names[i:i + size]) for i in range(0, len(names), size)]


def collect_statistics(model: onnx.ModelProto, tensors: Sequence[str], dataset: Dataset, *,
                       batch_size: int = 32, bins: int = DEFAULT_BINS,
                       max_batches: int | None = None,
                       max_tensors_per_run: int | None = None) -> CalibrationStats:
    """Histograms of ``tensors`` (graph inputs or node outputs) over ``dataset``."""
    tensors = list(dict.fromkeys(tensors))
    histograms = {name: StreamingHistogram(bins) for name in tensors}
    stats = CalibrationStats(histograms)
    inputs = {spec.name for spec in dataset.specs}
    computed = [name for name in tensors if name not in inputs]
    session = make_session(_with_outputs(model, computed), session_options()) \
        if computed else None
    slices = dataset.batch_slices(batch_size)
    if max_batches is not None:
        slices = slices[:max_batches]
    feeds_iter = dataset.batches(batch_size)
    for part, feeds in progress(zip(slices, feeds_iter, strict=False), total=len(slices),
                                desc="calibrating"):
        for name in tensors:
            if name in inputs:
                histograms[name].update(feeds[name])
        if session is not None:
            for names in _chunks(computed, max_tensors_per_run):
                values = run_session(session, names, feeds, str(dataset.source))
                for name, value in zip(names, values, strict=True):
                    if np.issubdtype(np.asarray(value).dtype, np.floating):
                        histograms[name].update(value)
        stats.batches += 1
        stats.samples += part.stop - part.start
    return stats


__all__ = ["CalibrationStats", "collect_statistics"]
