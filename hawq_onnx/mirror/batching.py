"""Verified batch relaxation: feed the autograd mirror bigger batches than a model declares.

Why: many exports declare a fixed batch of 1. onnxruntime must be fed exactly that, but the
mirror (torch ops) usually treats the samples of a batch independently whatever its size, and
at batch 1 every Hessian-vector product pays one Python-level walk of the graph per sample.
Whether a graph really keeps samples apart cannot be read from its declared shapes (a Reshape
to a constant ``[1, -1]``, a Shape folded from the declared dims at construction, an Expand to
a fixed shape all bake the batch in), so it is checked on the data: the mirror runs once on a
stack of a few samples and once per declared batch, and a bigger batch is used only when the
stacked outputs are the per-batch outputs, stacked.

The estimators do not change: every loss is a batch mean weighted by the batch's share of
the samples, so only the float summation order moves. Weight-trace probes are drawn over
the weights and are the same at any batch size; activation-trace probes are shaped like the
activations, so their draws (not what they estimate) follow the batch size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from hawq_onnx.data import Dataset
from hawq_onnx.mirror.module import Mirror

#: samples stacked for the check (at least two declared batches).
PROBE_SAMPLES = 4
#: allowed ``max |stacked − per batch|`` per output, relative to ``1 + max |per batch|``: the
#: float32 summation-order noise of batched kernels, far below what mixing samples does.
TOLERANCE = 1e-5


def relaxed_batch_size(mirror: Mirror, dataset: Dataset,
                       batch_size: int) -> tuple[int, str | None]:
    """The batch size to feed ``mirror`` with ``dataset.batched(size, relax_fixed=True)``,
    and why a declared batch size was kept although ``batch_size`` is bigger (None when
    nothing was refused).

    Without a declared batch size this is ``batch_size``. With one, ``batch_size`` when the
    mirror's outputs on a stack of the first samples equal its outputs per declared batch,
    else the declared size. Run it before any hook is added to the mirror.
    """
    declared = dataset.fixed_batch
    if declared is None:
        return batch_size, None
    count = min(len(dataset), max(PROBE_SAMPLES, 2 * declared)) // declared * declared
    if batch_size <= declared or count <= declared:
        return declared, None  # nothing to gain: every batch is one declared batch anyway
    reason = _disagreement(mirror, dataset, count, declared)
    return (declared, reason) if reason is not None else (batch_size, None)


def _disagreement(mirror: Mirror, dataset: Dataset, count: int, declared: int) -> str | None:
    """Why the mirror's outputs on samples ``[0, count)`` at once differ from its outputs
    per declared batch (None: they agree)."""
    parts = [mirror.run_numpy(dataset.read(slice(start, start + declared)))
             for start in range(0, count, declared)]
    try:
        stacked = mirror.run_numpy(dataset.read(slice(0, count)))
    except Exception as exc:  # any op may refuse the shape: that is the answer sought
        detail = (str(exc).splitlines() or [""])[0]
        return f"the mirror fails on a batch of {count}: {type(exc).__name__}: {detail}"
    for name in mirror.output_names:
        problem = _compare(stacked[name], [part[name] for part in parts], declared)
        if problem is not None:
            return (f"output {name!r} on a batch of {count} differs from the outputs per "
                    f"batch of {declared}: {problem}")
    return None


def _compare(got: np.ndarray, parts: Sequence[np.ndarray], declared: int) -> str | None:
    """Why ``got`` is not ``parts`` stacked along their batch axis (or, for an output that
    does not grow with the batch, equal to every part); None when it is."""
    axis = _stack_axis(got.shape, [p.shape for p in parts], declared)
    if axis is None:
        return f"shape {got.shape}, per batch {[p.shape for p in parts]}"
    expected = [np.concatenate(parts, axis=axis)] if axis >= 0 else list(parts)
    for reference in expected:
        error = _max_error(got, reference)
        if error is not None:
            return error
    return None


def _stack_axis(shape: tuple[int, ...], parts: Sequence[tuple[int, ...]],
                declared: int) -> int | None:
    """The batch axis along which ``shape`` is ``parts`` concatenated; -1 when ``shape`` is
    every part's shape (an output independent of the batch size); None otherwise.

    A batch axis has the declared size in each part and is not the last axis of a matrix
    or bigger (the losses reduce over the last axis: ``[1, 16]`` from four ``[1, 4]`` is
    one distribution over 16 classes, not four over 4)."""
    first = parts[0]
    if any(p != first for p in parts) or len(shape) != len(first):
        return None
    differ = [a for a, (have, one) in enumerate(zip(shape, first, strict=True)) if have != one]
    if not differ:
        return -1
    axis = differ[0]
    batch_like = first[axis] == declared and (axis < len(shape) - 1 or len(shape) == 1)
    if len(differ) == 1 and batch_like and shape[axis] == sum(p[axis] for p in parts):
        return axis
    return None


def _max_error(got: np.ndarray, reference: np.ndarray) -> str | None:
    """None when ``got`` matches ``reference`` within :data:`TOLERANCE` (NaN and infinities
    where the reference has them), else the largest difference."""
    have = np.asarray(got, dtype=np.float64)
    want = np.asarray(reference, dtype=np.float64)
    finite = np.isfinite(want)
    scale = 1.0 + (float(np.abs(want[finite]).max()) if finite.any() else 0.0)
    same = (have == want) | (np.isnan(have) & np.isnan(want))
    with np.errstate(invalid="ignore"):
        close = np.abs(have - want) <= TOLERANCE * scale
    wrong = ~(same | close)
    if not wrong.any():
        return None
    with np.errstate(invalid="ignore"):
        worst = float(np.abs(have - want)[wrong].max())
    return f"max |difference| {worst:.3g} (allowed {TOLERANCE * scale:.3g})"


def describe(batch: int, declared: int | None, reason: str | None) -> dict[str, object]:
    """The report entry ``mirror_batch``: the batch size the mirror was fed, the model's
    declared one, and why the declared one was kept (None when it was not)."""
    return {"batch_size": batch, "declared": declared, "reason": reason}


def relaxation_note(mirror_batch: Mapping[str, object]) -> str | None:
    """A one-line note for reports when a declared batch size had to be kept."""
    reason = mirror_batch.get("reason")
    if reason is None:
        return None
    return (f"mirror batch: kept the declared batch of {mirror_batch.get('declared')} for the "
            f"Hessian and loss passes ({reason})")


__all__ = ["PROBE_SAMPLES", "TOLERANCE", "describe", "relaxation_note", "relaxed_batch_size"]
