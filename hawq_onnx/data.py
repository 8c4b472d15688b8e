"""Calibration and evaluation data: a .npz file checked against the model's inputs.

Why strict: quantization statistics computed from data that does not match what the model
expects (uint8 pixels for a float input, the wrong resolution, NaNs) are silently wrong, and
the damage only shows up as poor accuracy much later. Every mismatch is reported up front,
in one line naming the file and the problem.

Why lazy: a calibration set may be far larger than the memory a build step should use.
:func:`load_npz` checks everything once, chunk by chunk, and keeps only the archive's headers;
batches are read from the file when asked for (:mod:`hawq_onnx.npz_reader`), so a pass over
the data holds one batch whatever the number of samples. Only :attr:`Dataset.arrays` holds
everything, for the callers that really need it.

Layout of the archive: one array per graph input, keyed by input name, holding all samples
stacked along the input's *batch axis*, the data laid out like the input itself. The batch
axis is axis 0, except for an input whose axis 0 is a fixed number (an RNN state
``[2, batch, 128]``): there it is the axis that carries the dimension name other inputs use as
their batch dimension, or, when the model names no batch dimension (silero-vad's
``[2, ?, 128]`` next to ``input [?, ?]``), the input's one unnamed dynamic axis. Samples of
such a state are stored ``[2, N, 128]``, the same file for every export of the model. An
input declared as a scalar (shape ``()``) is stored as a scalar and fed unchanged with every
batch. An optional ``labels`` array (one entry per sample) is kept for accuracy gates; other
keys are ignored with a note. Archives are never unpickled: a data file never executes code.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from hawq_onnx.errors import InvalidDataError
from hawq_onnx.npz_reader import CHUNK_BYTES, NpzReader

LABELS_KEY = "labels"
# dim_params exporters write for "unknown" (paddle2onnx: "?"): they constrain nothing.
_ANONYMOUS_DIMS = frozenset({"?", "-1", "None", "none", "unknown"})
Dim = int | str | None


@dataclass(frozen=True)
class InputSpec:
    """What the model declares for one graph input."""

    name: str
    dtype: np.dtype
    dims: tuple[Dim, ...] | None  # None: rank unknown
    batch_axis: int | None  # None: a scalar input, fed whole with every batch

    @property
    def fixed_batch(self) -> int | None:
        """The declared batch size when it is a number (batches must have exactly it)."""
        if self.dims is None or self.batch_axis is None:
            return None
        dim = self.dims[self.batch_axis]
        return dim if isinstance(dim, int) and dim > 0 else None


# ---------------------------------------------------------------------- columns
@dataclass(frozen=True, eq=False)
class _ArrayColumn:
    """An input held in memory (arrays passed by API callers; scalar inputs)."""

    array: np.ndarray
    axis: int | None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    def read(self, start: int, stop: int) -> np.ndarray:
        if self.axis is None:
            return self.array
        index = [slice(None)] * self.array.ndim
        index[self.axis] = slice(start, stop)
        return np.ascontiguousarray(self.array[tuple(index)])


@dataclass(frozen=True, eq=False)
class _FileColumn:
    """An input read from the archive on demand and cast to the model's dtype batch by
    batch (the cast was checked on the whole array at load time)."""

    reader: NpzReader
    key: str
    axis: int
    dtype: np.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.reader.header(self.key).shape

    def read(self, start: int, stop: int) -> np.ndarray:
        rows = self.reader.read_rows(self.key, self.axis, start, stop)
        return rows.astype(self.dtype, copy=False)


_Column = _ArrayColumn | _FileColumn


# ---------------------------------------------------------------------- the dataset
class Dataset:
    """Validated model inputs (in the model's dtypes) plus optional labels.

    ``Dataset(source, specs, arrays, labels, notes)`` wraps arrays already in memory;
    :func:`load_npz` returns one that reads its batches from the file. Either way
    :meth:`batches`, :meth:`batched`, :meth:`chunks`, :meth:`slice` and :meth:`head` hold at
    most one batch, while :attr:`arrays` materializes every sample.
    """

    def __init__(self, source: Path, specs: list[InputSpec],
                 arrays: Mapping[str, np.ndarray] | None = None,
                 labels: np.ndarray | None = None, notes: list[str] | None = None) -> None:
        arrays = arrays or {}
        columns = {s.name: _ArrayColumn(np.asarray(arrays[s.name]), s.batch_axis)
                   for s in specs}
        self._init(source, specs, columns, labels, notes or [], None)

    def _init(self, source: Path, specs: list[InputSpec], columns: dict[str, _Column],
              labels: np.ndarray | None, notes: list[str], window: slice | None,
              reader: NpzReader | None = None) -> None:
        self.source = source
        self.specs = specs
        self.labels = labels
        self.notes = notes
        self._columns = columns
        self._reader = reader
        total = next((c.shape[c.axis] for c in columns.values() if c.axis is not None),
                     0 if labels is None else len(labels))
        self._window = window or slice(0, total)

    def _view(self, start: int, stop: int) -> Dataset:
        view = Dataset.__new__(Dataset)
        base = self._window.start
        labels = None if self.labels is None else self.labels[start:stop]
        view._init(self.source, self.specs, self._columns, labels, list(self.notes),
                   slice(base + start, base + stop), self._reader)
        return view

    def __len__(self) -> int:
        return self._window.stop - self._window.start

    def __repr__(self) -> str:
        return f"Dataset({str(self.source)!r}, {len(self)} samples, inputs {list(self._columns)})"

    # ------------------------------------------------------------------ shape of the data
    @property
    def fixed_batch(self) -> int | None:
        return next((s.fixed_batch for s in self.specs if s.fixed_batch is not None), None)

    def sample_counts(self) -> dict[str, int]:
        """Samples per batched input in the whole source (they must agree)."""
        return {name: c.shape[c.axis] for name, c in self._columns.items() if c.axis is not None}

    @property
    def sample_nbytes(self) -> int:
        """Bytes of one sample over all batched inputs, in the model's dtypes."""
        return sum(math.prod(c.shape) // max(1, c.shape[c.axis]) * c.dtype.itemsize
                   for c in self._columns.values() if c.axis is not None)

    # ------------------------------------------------------------------ access
    def batch_slices(self, batch_size: int, relax_fixed: bool = False) -> list[slice]:
        """Sample ranges of each batch; a batch size the model declares wins unless
        ``relax_fixed`` (feeds for the autograd mirror only, once
        :func:`hawq_onnx.mirror.batching.relaxed_batch_size` has verified that the mirror
        computes the same thing on bigger batches: onnxruntime rejects them)."""
        size = batch_size if relax_fixed else (self.fixed_batch or batch_size)
        if size < 1:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        return [slice(start, min(start + size, len(self))) for start in range(0, len(self), size)]

    def batches(self, batch_size: int,
                relax_fixed: bool = False) -> Iterator[dict[str, np.ndarray]]:
        """Feeds for the model, one dict per batch, in sample order, read as they are asked
        for (``relax_fixed``: see :meth:`batch_slices`)."""
        for part in self.batch_slices(batch_size, relax_fixed):
            yield self.read(part)

    def batched(self, batch_size: int, relax_fixed: bool = False) -> Batches:
        """The batches as a re-iterable: every pass reads them again (see :class:`Batches`)."""
        return Batches(self, batch_size, relax_fixed)

    def chunks(self, max_bytes: int = CHUNK_BYTES) -> Iterator[dict[str, np.ndarray]]:
        """All samples in order, in pieces of at most ``max_bytes`` (at least one sample),
        whatever batch size the model declares: for scans such as hashing."""
        size = max(1, max_bytes // max(1, self.sample_nbytes))
        for start in range(0, len(self), size):
            yield self.read(slice(start, min(start + size, len(self))))

    def read(self, part: slice) -> dict[str, np.ndarray]:
        """Samples ``part`` (a slice with positive bounds within ``len(self)``) of every
        input; scalar inputs whole."""
        base = self._window.start
        return {spec.name: self._columns[spec.name].read(base + part.start, base + part.stop)
                for spec in self.specs}

    def label_batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Labels split exactly like :meth:`batches`; requires labels."""
        if self.labels is None:
            raise InvalidDataError(f"{self.source}: no '{LABELS_KEY}' array in the data")
        for part in self.batch_slices(batch_size):
            yield self.labels[part]

    def slice(self, start: int, stop: int) -> Dataset:
        """Samples ``[start, stop)`` (clamped to the data) as a view: nothing is read."""
        start = max(0, min(start, len(self)))
        return self._view(start, max(start, min(stop, len(self))))

    def head(self, count: int) -> Dataset:
        """The first ``count`` samples (e.g. a quick calibration subset), as a view."""
        return self.slice(0, count)

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """Every sample of every input in memory (a new copy for file-backed data): only for
        callers that need everything at once; batch access keeps memory bounded."""
        return self.read(slice(0, len(self)))

    def labels_for(self, key: str) -> np.ndarray | None:
        """The labels stored under ``key`` for these samples (None when there are none):
        ``labels`` itself, or another array of the source archive."""
        if key == LABELS_KEY or self._reader is None:
            return self.labels if key == LABELS_KEY else None
        if key not in self._reader.keys:
            return None
        values = self._reader.read(key)
        if values.ndim == 0:
            raise InvalidDataError(f"{self.source}: '{key}' must hold one entry per sample")
        return values[self._window]


@dataclass(frozen=True, eq=False)
class Batches:
    """A dataset's batches as a re-iterable: ``iter()`` starts a new pass that reads them
    again, so an algorithm that needs many passes (a Hessian-vector product per pass) holds
    one batch at a time instead of a list of all of them."""

    dataset: Dataset
    batch_size: int
    relax_fixed: bool = False  # ignore a declared batch size (mirror feeds only)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self.dataset.batches(self.batch_size, self.relax_fixed)

    def __len__(self) -> int:
        return len(self.dataset.batch_slices(self.batch_size, self.relax_fixed))

    @property
    def batch_axes(self) -> dict[str, int | None]:
        """Each input's sample axis, so consumers count a batch's samples on the right axis
        (an RNN state ``[2, N, H]`` listed before the audio input)."""
        return {spec.name: spec.batch_axis for spec in self.dataset.specs}


# ---------------------------------------------------------------------- model side
def _dims(value: onnx.ValueInfoProto) -> tuple[Dim, ...] | None:
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    return tuple(int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or None)
                 for d in tensor_type.shape.dim)


def _np_dtype(value: onnx.ValueInfoProto) -> np.dtype:
    elem_type = value.type.tensor_type.elem_type
    if elem_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        raise InvalidDataError(f"model input '{value.name}' is not a numeric tensor "
                               f"({TensorProto.DataType.Name(elem_type)})")
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def _fixed(dim: Dim) -> bool:
    return isinstance(dim, int) and dim > 0


def _anonymous(dim: Dim) -> bool:
    return dim is None or (isinstance(dim, str) and dim in _ANONYMOUS_DIMS) or \
        (isinstance(dim, int) and dim <= 0)


def _batch_axis(shape: tuple[Dim, ...] | None, batch_names: set[str],
                anonymous_batch: bool) -> int | None:
    """See the module doc: axis 0, a named batch dim elsewhere, or the one unnamed dynamic
    axis of an input with a fixed axis 0 when the model's batch dimension has no name."""
    if shape is None:
        return 0
    if not shape:
        return None
    if not _fixed(shape[0]):
        return 0
    named = [i for i, d in enumerate(shape) if isinstance(d, str) and d in batch_names]
    if named:
        return named[0]
    dynamic = [i for i, d in enumerate(shape) if not _fixed(d)]
    if anonymous_batch and not batch_names and len(dynamic) == 1 and _anonymous(shape[dynamic[0]]):
        return dynamic[0]
    return 0


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """Specs for the inputs a caller feeds (initializers listed as inputs are not fed)."""
    initializers = {t.name for t in model.graph.initializer}
    values = [v for v in model.graph.input if v.name not in initializers]
    dims = {v.name: _dims(v) for v in values}
    batch_names = {d[0] for d in dims.values()
                   if d and isinstance(d[0], str) and d[0] not in _ANONYMOUS_DIMS}
    anonymous_batch = any(d and _anonymous(d[0]) for d in dims.values())
    return [InputSpec(v.name, _np_dtype(v), dims[v.name],
                      _batch_axis(dims[v.name], batch_names, anonymous_batch)) for v in values]


# ---------------------------------------------------------------------- checks
def _fmt(dims: tuple[Dim, ...]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in dims) + ")"


def _check_dtype(path: Path, spec: InputSpec, have: np.dtype) -> None:
    """Casts to the model's dtype are allowed where they lose nothing a user would care
    about; the values are checked by :func:`_check_values`."""
    want = spec.dtype
    where = f"{path}: input '{spec.name}'"
    if have.kind not in "biuf":
        raise InvalidDataError(f"{where} has dtype {have}, expected numeric data ({want})")
    if want.kind == "f" and have.kind != "f":
        raise InvalidDataError(f"{where} is {want} in the model but the data is {have}; convert "
                               "(and normalize) it to floating point first")
    if want.kind == "b" and have.kind != "b":
        raise InvalidDataError(f"{where} is bool in the model but the data is {have}")
    if want.kind in "iu" and have.kind not in "iu":
        raise InvalidDataError(f"{where} is {want} in the model but the data is {have}")


def _check_values(path: Path, spec: InputSpec, have: np.dtype,
                  chunks: Iterator[np.ndarray]) -> None:
    """No NaN/Inf (after the cast) in float inputs, integers that fit the model's type;
    one chunk at a time, so memory stays bounded whatever the size of the array."""
    want = spec.dtype
    bad, low, high = 0, None, None
    for chunk in chunks:
        if want.kind == "f":
            with np.errstate(over="ignore"):  # overflow becomes Inf, reported below
                converted = chunk.astype(want, copy=False)
            bad += int(converted.size - np.count_nonzero(np.isfinite(converted)))
        elif want.kind in "iu" and have != want and chunk.size:
            lo, hi = int(chunk.min()), int(chunk.max())
            low, high = (lo, hi) if low is None else (min(low, lo), max(high, hi))
    where = f"{path}: input '{spec.name}'"
    if bad:
        raise InvalidDataError(f"{where} has {bad} NaN/Inf value(s)"
                               + (f" after conversion to {want}" if have != want else ""))
    if low is not None and high is not None:
        info = np.iinfo(want)
        if low < info.min or high > info.max:
            raise InvalidDataError(f"{where}: values [{low}, {high}] do not fit {want}")


def _check_shape(path: Path, spec: InputSpec, shape: tuple[int, ...],
                 symbols: dict[str, tuple[str, int]]) -> None:
    """Rank and fixed per-sample dims must match; a symbolic dim must agree across inputs."""
    where = f"{path}: input '{spec.name}'"
    if spec.batch_axis is None:
        if spec.dims is not None and shape:
            raise InvalidDataError(f"{where} is a scalar in the model; store one value "
                                   f"(shape ()), not shape {shape}")
        return
    if spec.dims is None:
        if len(shape) <= spec.batch_axis:
            raise InvalidDataError(f"{where} holds a single value; store the samples stacked "
                                   f"along axis {spec.batch_axis}")
        return
    if len(shape) != len(spec.dims):
        raise InvalidDataError(
            f"{where} has {len(shape)} dims {shape}, the model declares "
            f"{len(spec.dims)} {_fmt(spec.dims)} (samples stacked along axis {spec.batch_axis})")
    per_sample = [(i, d) for i, d in enumerate(spec.dims) if i != spec.batch_axis]
    for axis, dim in per_sample:
        size = shape[axis]
        if isinstance(dim, int) and dim > 0 and size != dim:
            have = tuple(shape[i] for i, _ in per_sample)
            want = tuple(d for _, d in per_sample)
            raise InvalidDataError(f"{where}: per-sample shape {have} does not match the "
                                   f"model's {_fmt(want)}")
        if isinstance(dim, str) and dim not in _ANONYMOUS_DIMS:
            other = symbols.setdefault(dim, (spec.name, size))
            if other[1] != size:
                raise InvalidDataError(
                    f"{where}: dimension '{dim}' is {size} here but {other[1]} in input "
                    f"'{other[0]}'")


def _check_batching(path: Path, dataset: Dataset) -> None:
    """Same sample count everywhere, not empty, and divisible by a declared batch size."""
    counts = dataset.sample_counts()
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"{k}: {v}" for k, v in counts.items())
        raise InvalidDataError(f"{path}: inputs have different numbers of samples ({detail})")
    fixed = {s.name: s.fixed_batch for s in dataset.specs if s.fixed_batch is not None}
    if len(set(fixed.values())) > 1:
        detail = ", ".join(f"{k}: {v}" for k, v in fixed.items())
        raise InvalidDataError(f"{path}: the model declares different fixed batch sizes "
                               f"({detail}); cannot batch the data")
    total = len(dataset)
    if total == 0:
        raise InvalidDataError(f"{path}: the data holds no samples")
    batch = dataset.fixed_batch
    if batch is not None and total % batch:
        raise InvalidDataError(f"{path}: {total} samples is not a multiple of the model's "
                               f"fixed batch size {batch}")
    if dataset.labels is not None and len(dataset.labels) != total:
        raise InvalidDataError(f"{path}: '{LABELS_KEY}' has {len(dataset.labels)} entries "
                               f"for {total} samples")


def _column(path: Path, spec: InputSpec, reader: NpzReader,
            symbols: dict[str, tuple[str, int]]) -> _Column:
    """Check one input (header, then every value in chunks) and say how to read it."""
    header = reader.header(spec.name)
    _check_shape(path, spec, header.shape, symbols)
    _check_dtype(path, spec, header.dtype)
    if spec.batch_axis is None:  # a scalar: small, kept in memory
        value = reader.read(spec.name)
        _check_values(path, spec, header.dtype, iter([value.reshape(-1)]))
        return _ArrayColumn(value.astype(spec.dtype, copy=False), spec.batch_axis)
    _check_values(path, spec, header.dtype, reader.scan(spec.name))
    return _FileColumn(reader, spec.name, spec.batch_axis, spec.dtype)


def _load(path: Path, specs: list[InputSpec], reader: NpzReader) -> Dataset:
    names = {s.name for s in specs}
    missing = [s.name for s in specs if s.name not in reader.keys]
    if missing:
        found = ", ".join(sorted(reader.keys)) or "none"
        raise InvalidDataError(f"{path}: missing input '{missing[0]}' (keys found: {found})")
    symbols: dict[str, tuple[str, int]] = {}
    columns = {spec.name: _column(path, spec, reader, symbols) for spec in specs}
    labels = reader.read(LABELS_KEY) \
        if LABELS_KEY in reader.keys and LABELS_KEY not in names else None
    if labels is not None and labels.ndim == 0:
        raise InvalidDataError(f"{path}: '{LABELS_KEY}' must hold one entry per sample")
    dataset = Dataset.__new__(Dataset)
    dataset._init(path, specs, columns, labels, [], None, reader)
    extra = sorted(set(reader.keys) - names - {LABELS_KEY})
    if extra:
        dataset.notes.append(f"{path}: ignoring keys that are not model inputs: "
                             + ", ".join(extra))
    _check_batching(path, dataset)
    return dataset


def load_npz(path: str | Path, model: onnx.ModelProto) -> Dataset:
    """Open ``path`` and validate it against ``model``'s graph inputs (see module doc); the
    returned dataset reads its batches from the file."""
    path = Path(path)
    specs = input_specs(model)
    if not specs:
        raise InvalidDataError(f"{path}: the model has no inputs to feed")
    reader = NpzReader(path)
    try:
        return _load(path, specs, reader)
    except BaseException:
        reader.close()
        raise


__all__ = ["Batches", "Dataset", "InputSpec", "LABELS_KEY", "input_specs", "load_npz"]
