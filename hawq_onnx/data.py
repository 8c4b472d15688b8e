"""Calibration and evaluation data: a .npz file checked against the model's inputs.

Why strict: quantization statistics computed from data that does not match what the model
expects (uint8 pixels for a float input, the wrong resolution, NaNs) are silently wrong, and
the damage only shows up as poor accuracy much later. Every mismatch is reported up front,
in one line naming the file and the problem.

Layout of the archive: one array per graph input, keyed by input name, holding all samples
stacked along the input's *batch axis* (axis 0, except when a named batch dimension such as
``batch`` sits elsewhere in an input, e.g. an RNN state declared ``[2, batch, 128]``). An
input declared as a scalar (shape ``()``) is stored as a scalar and fed unchanged with every
batch. An optional ``labels`` array (one entry per sample) is kept for accuracy gates; other
keys are ignored with a note. Archives are always read with ``allow_pickle=False``: a data
file never executes code.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from hawq_onnx.errors import InvalidDataError

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


@dataclass
class Dataset:
    """Validated model inputs (already in the model's dtypes) plus optional labels."""

    source: Path
    specs: list[InputSpec]
    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        for spec in self.specs:
            if spec.batch_axis is not None:
                return int(self.arrays[spec.name].shape[spec.batch_axis])
        return 0 if self.labels is None else len(self.labels)

    @property
    def fixed_batch(self) -> int | None:
        return next((s.fixed_batch for s in self.specs if s.fixed_batch is not None), None)

    def batch_slices(self, batch_size: int) -> list[slice]:
        """Sample ranges of each batch; a batch size the model declares wins."""
        size = self.fixed_batch or batch_size
        if size < 1:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        return [slice(start, min(start + size, len(self))) for start in range(0, len(self), size)]

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Feeds for the model, one dict per batch, in sample order."""
        for part in self.batch_slices(batch_size):
            yield {spec.name: self._take(spec, part) for spec in self.specs}

    def label_batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Labels split exactly like :meth:`batches`; requires labels."""
        if self.labels is None:
            raise InvalidDataError(f"{self.source}: no '{LABELS_KEY}' array in the data")
        for part in self.batch_slices(batch_size):
            yield self.labels[part]

    def head(self, count: int) -> Dataset:
        """The first ``count`` samples (e.g. a quick calibration subset)."""
        part = slice(0, min(count, len(self)))
        labels = None if self.labels is None else self.labels[part]
        arrays = {spec.name: self._take(spec, part) for spec in self.specs}
        return Dataset(self.source, self.specs, arrays, labels, list(self.notes))

    def _take(self, spec: InputSpec, part: slice) -> np.ndarray:
        array = self.arrays[spec.name]
        if spec.batch_axis is None:
            return array
        index = [slice(None)] * array.ndim
        index[spec.batch_axis] = part
        return np.ascontiguousarray(array[tuple(index)])


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


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """Specs for the inputs a caller feeds (initializers listed as inputs are not fed).

    The batch axis is axis 0, unless an input's axis 0 is a fixed number and a symbolic
    dimension used as another input's batch axis appears elsewhere in it.
    """
    initializers = {t.name for t in model.graph.initializer}
    values = [v for v in model.graph.input if v.name not in initializers]
    dims = {v.name: _dims(v) for v in values}
    batch_names = {d[0] for d in dims.values()
                   if d and isinstance(d[0], str) and d[0] not in _ANONYMOUS_DIMS}
    specs = []
    for value in values:
        shape = dims[value.name]
        axis: int | None = 0
        if shape is not None and not shape:
            axis = None
        elif shape is not None and isinstance(shape[0], int) and shape[0] > 0:
            named = [i for i, d in enumerate(shape) if isinstance(d, str) and d in batch_names]
            axis = named[0] if named else 0
        specs.append(InputSpec(value.name, _np_dtype(value), shape, axis))
    return specs


# ---------------------------------------------------------------------- checks
def _read_archive(path: Path) -> dict[str, np.ndarray]:
    """All arrays of an .npz, refusing pickled (object) arrays without unpickling them."""
    if not path.is_file():
        raise InvalidDataError(f"{path}: no such file")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:  # numpy's parsers raise many types on damaged files
        raise InvalidDataError(f"{path}: not a readable .npz archive ({_first_line(exc)})") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise InvalidDataError(f"{path}: a single .npy array, expected an .npz archive of "
                               "arrays keyed by input name")
    arrays: dict[str, np.ndarray] = {}
    with archive:
        for key in archive.files:
            try:
                arrays[key] = archive[key]
            except ValueError as exc:  # numpy refuses object arrays when allow_pickle=False
                if "allow_pickle" not in str(exc):
                    raise InvalidDataError(f"{path}: array '{key}' is unreadable "
                                           f"({_first_line(exc)})") from exc
                raise InvalidDataError(f"{path}: array '{key}' holds Python objects (pickled "
                                       "data), which is never loaded") from exc
            except Exception as exc:  # damaged headers reach numpy's tokenizer, zlib, ...
                raise InvalidDataError(f"{path}: array '{key}' is unreadable "
                                       f"({_first_line(exc)})") from exc
    return arrays


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _fmt(dims: tuple[Dim, ...]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in dims) + ")"


def _convert(path: Path, spec: InputSpec, array: np.ndarray) -> np.ndarray:
    """Cast to the model's dtype where that loses nothing a user would care about."""
    have, want = array.dtype, spec.dtype
    where = f"{path}: input '{spec.name}'"
    if have.kind not in "biuf":
        raise InvalidDataError(f"{where} has dtype {have}, expected numeric data ({want})")
    if want.kind == "f":
        if have.kind != "f":
            raise InvalidDataError(
                f"{where} is {want} in the model but the data is {have}; convert (and "
                "normalize) it to floating point first")
        with np.errstate(over="ignore"):  # overflow becomes Inf, reported just below
            converted = array.astype(want, copy=False)
        bad = int(np.size(converted) - np.count_nonzero(np.isfinite(converted)))
        if bad:
            raise InvalidDataError(f"{where} has {bad} NaN/Inf value(s)"
                                   + (f" after conversion to {want}" if have != want else ""))
        return converted
    if want.kind == "b":
        if have.kind != "b":
            raise InvalidDataError(f"{where} is bool in the model but the data is {have}")
        return array
    if have.kind not in "iu":  # integer input
        raise InvalidDataError(f"{where} is {want} in the model but the data is {have}")
    if array.size and have != want:
        info = np.iinfo(want)
        low, high = int(array.min()), int(array.max())
        if low < info.min or high > info.max:
            raise InvalidDataError(f"{where}: values [{low}, {high}] do not fit {want}")
    return array.astype(want, copy=False)


def _check_shape(path: Path, spec: InputSpec, array: np.ndarray,
                 symbols: dict[str, tuple[str, int]]) -> None:
    """Rank and fixed per-sample dims must match; a symbolic dim must agree across inputs."""
    where = f"{path}: input '{spec.name}'"
    if spec.dims is None:
        return
    if spec.batch_axis is None:
        if array.ndim != 0:
            raise InvalidDataError(f"{where} is a scalar in the model; store one value "
                                   f"(shape ()), not shape {array.shape}")
        return
    if array.ndim != len(spec.dims):
        raise InvalidDataError(
            f"{where} has {array.ndim} dims {array.shape}, the model declares "
            f"{len(spec.dims)} {_fmt(spec.dims)} (samples stacked along axis {spec.batch_axis})")
    per_sample = [(i, d) for i, d in enumerate(spec.dims) if i != spec.batch_axis]
    for axis, dim in per_sample:
        size = array.shape[axis]
        if isinstance(dim, int) and dim > 0 and size != dim:
            have = tuple(array.shape[i] for i, _ in per_sample)
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
    counts = {s.name: dataset.arrays[s.name].shape[s.batch_axis]
              for s in dataset.specs if s.batch_axis is not None}
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


def load_npz(path: str | Path, model: onnx.ModelProto) -> Dataset:
    """Read ``path`` and validate it against ``model``'s graph inputs (see module doc)."""
    path = Path(path)
    specs = input_specs(model)
    if not specs:
        raise InvalidDataError(f"{path}: the model has no inputs to feed")
    arrays = _read_archive(path)
    names = {s.name for s in specs}
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        found = ", ".join(sorted(arrays)) or "none"
        raise InvalidDataError(f"{path}: missing input '{missing[0]}' (keys found: {found})")
    symbols: dict[str, tuple[str, int]] = {}
    converted: dict[str, np.ndarray] = {}
    for spec in specs:
        _check_shape(path, spec, arrays[spec.name], symbols)
        converted[spec.name] = _convert(path, spec, arrays[spec.name])
    labels = arrays.get(LABELS_KEY) if LABELS_KEY not in names else None
    if labels is not None and labels.ndim == 0:
        raise InvalidDataError(f"{path}: '{LABELS_KEY}' must hold one entry per sample")
    dataset = Dataset(path, specs, converted, labels)
    extra = sorted(set(arrays) - names - {LABELS_KEY})
    if extra:
        dataset.notes.append(f"{path}: ignoring keys that are not model inputs: "
                             + ", ".join(extra))
    _check_batching(path, dataset)
    return dataset


__all__ = ["Dataset", "InputSpec", "LABELS_KEY", "input_specs", "load_npz"]
