"""The one entry point through which every command reads a model.

:func:`load_model` turns a path into a checked, normalized ``onnx.ModelProto``:

1. the file must exist, be a regular file and parse as an ONNX model;
2. external-data locations are validated before a single external byte is read: absolute
   paths and anything resolving (also through symlinks) outside the model's directory are
   refused with :class:`UnsafeExternalDataError`; then the data is read (sizes verified);
3. ``onnx.checker`` must pass; its strict shape check (``full_check``) may fail only if
   onnxruntime still loads the model (real exports do carry wrong declared output shapes);
4. the IR version is set to the lowest one the model needs (onnxruntime must read it);
5. normalization passes: reject_quantized, upgrade_opset, lift_constants, fold_batchnorm;
6. shape inference (non-strict, symbolic dims kept) fills ``graph.value_info``.

Every user-caused failure is an :class:`InvalidModelError` (or subclass) whose one-line
message starts with the file name.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import onnx
from onnx import TensorProto, helper

from hawq_onnx.errors import InvalidModelError, UnsafeExternalDataError
from hawq_onnx.model_io import (
    DEFAULT_EXTERNAL_DATA_THRESHOLD,
    detached_payloads,
    is_too_big_for_protobuf,
    iter_tensors,
    target_ir_version,
    uses_external_data,
)
from hawq_onnx.passes.base import GraphPass, PassReport, run_passes
from hawq_onnx.passes.fold_batchnorm import fold_batchnorm
from hawq_onnx.passes.lift_constants import lift_constants
from hawq_onnx.passes.reject_quantized import reject_quantized
from hawq_onnx.passes.upgrade_opset import default_opset, upgrade_opset

#: The normalization pipeline. upgrade_opset runs before lift_constants so the Constant nodes
#: the version converter creates (Clip bounds, Squeeze axes, Resize scales) are lifted too.
NORMALIZATION_PASSES: tuple[GraphPass, ...] = (
    reject_quantized,
    upgrade_opset,
    lift_constants,
    fold_batchnorm,
)

# Bits per element of types that are not whole bytes (everything else: numpy itemsize).
_SUB_BYTE_BITS = {TensorProto.INT4: 4, TensorProto.UINT4: 4}
for _name, _bits in (("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2),
                     ("FLOAT6E2M3", 6), ("FLOAT6E3M2", 6)):
    if hasattr(TensorProto, _name):
        _SUB_BYTE_BITS[getattr(TensorProto, _name)] = _bits


@dataclass
class ImportedModel:
    """A checked, normalized model plus what the import did to it."""

    model: onnx.ModelProto
    path: Path
    reports: list[PassReport] = field(default_factory=list)
    original_opset: int | None = None
    original_ir_version: int = 0
    sha256: str = ""  # of the .onnx file's bytes (external data files not included)
    external_data: bool = False  # whether the file referenced external data
    notes: list[str] = field(default_factory=list)  # IR changes, tolerated checker findings


@dataclass(frozen=True)
class _ExternalRef:
    """A validated external-data reference of one tensor."""

    tensor: TensorProto
    file: Path
    offset: int
    length: int | None


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# --------------------------------------------------------------------------- file and parse


def _check_path(path: str | os.PathLike[str]) -> Path:
    file = Path(path)
    if not file.exists():
        raise InvalidModelError(f"{file}: no such file")
    if file.is_dir():
        raise InvalidModelError(f"{file}: is a directory, not an ONNX model file")
    if not file.is_file():
        raise InvalidModelError(f"{file}: not a regular file")
    return file


def _read_bytes(file: Path) -> bytes:
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise InvalidModelError(f"{file}: cannot read ({exc.strerror or exc})") from exc
    if not data:
        raise InvalidModelError(f"{file}: empty file, not an ONNX model")
    return data


def _parse(file: Path, data: bytes) -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise InvalidModelError(
            f"{file}: not an ONNX model or truncated (protobuf parse failed: {_one_line(exc)})"
        ) from exc
    if not model.HasField("graph") or model.ir_version <= 0:
        raise InvalidModelError(f"{file}: not an ONNX model (no graph or no ir_version)")
    return model


# --------------------------------------------------------------------------- external data


def _is_absolute(location: str) -> bool:
    return (os.path.isabs(location) or PurePosixPath(location).is_absolute()
            or PureWindowsPath(location).is_absolute() or bool(PureWindowsPath(location).drive)
            or location.startswith(("/", "\\")))


def _inside(target: str, roots: Sequence[str]) -> bool:
    return any(os.path.commonpath([root, target]) == root for root in roots)


def _external_entries(file: Path, tensor: TensorProto) -> dict[str, str]:
    entries = {entry.key: entry.value for entry in tensor.external_data}
    if not entries.get("location"):
        raise InvalidModelError(f"{file}: tensor '{tensor.name}' has external data without a "
                                "location")
    return entries


def _resolve_location(file: Path, tensor: TensorProto, location: str) -> Path:
    """Where ``location`` points, refused unless it stays next to the model.

    Allowed directories are the model's directory and, when the model file is itself a
    symlink, the directory of the file it resolves to (hub caches link both the model and its
    data into a blob store). Paths are compared after ``realpath``, so a symlink inside the
    model's directory pointing elsewhere is refused too.
    """
    unsafe = f"{file}: tensor '{tensor.name}' has external data location '{location}'"
    if _is_absolute(location):
        raise UnsafeExternalDataError(f"{unsafe}, an absolute path; refusing to read it")
    normalized = os.path.normpath(location.replace("\\", "/"))
    if normalized == ".." or normalized.startswith("../"):
        raise UnsafeExternalDataError(f"{unsafe}, which leaves the model's directory")
    base = file.absolute().parent
    roots = [os.path.realpath(base), os.path.dirname(os.path.realpath(file))]
    target = os.path.realpath(base / normalized)
    if not _inside(target, roots):
        raise UnsafeExternalDataError(
            f"{unsafe}, which resolves outside the model's directory (to {target})")
    return Path(target)


def _int_entry(file: Path, tensor: TensorProto, entries: dict[str, str], key: str
               ) -> int | None:
    if key not in entries:
        return None
    try:
        value = int(entries[key])
    except ValueError:
        value = -1
    if value < 0:
        raise InvalidModelError(f"{file}: tensor '{tensor.name}' has an invalid external-data "
                                f"{key} '{entries[key]}'")
    return value


def _validate_external(file: Path, model: onnx.ModelProto) -> list[_ExternalRef]:
    """Check every external reference without reading any of its bytes."""
    refs: list[_ExternalRef] = []
    for tensor in iter_tensors(model):
        if not uses_external_data(tensor):
            continue
        entries = _external_entries(file, tensor)
        target = _resolve_location(file, tensor, entries["location"])
        refs.append(_ExternalRef(tensor, target, _int_entry(file, tensor, entries, "offset") or 0,
                                 _int_entry(file, tensor, entries, "length")))
    for ref in refs:
        try:
            mode = ref.file.stat().st_mode
        except OSError as exc:
            raise InvalidModelError(
                f"{file}: external data file '{ref.file.name}' of tensor '{ref.tensor.name}' "
                f"is missing ({exc.strerror or exc})") from exc
        if not stat.S_ISREG(mode):
            raise InvalidModelError(f"{file}: external data '{ref.file.name}' of tensor "
                                    f"'{ref.tensor.name}' is not a regular file")
    return refs


def external_data_files(path: str | os.PathLike[str]) -> list[tuple[str, Path]]:
    """``(location, file)`` of every external data file the model at ``path`` references,
    each once, sorted by location; checked like :func:`load_model` checks them (nothing of
    the data is read). For hashing a model's inputs (:func:`model_io.model_files_sha256`)."""
    file = _check_path(path)
    refs = _validate_external(file, _parse(file, _read_bytes(file)))
    files: dict[Path, str] = {}
    for ref in refs:
        files.setdefault(ref.file, _external_entries(file, ref.tensor)["location"])
    return sorted(((location, target) for target, location in files.items()),
                  key=lambda item: (item[0], str(item[1])))


def _expected_nbytes(tensor: TensorProto) -> int | None:
    """Byte size of the tensor's raw data, None for types with no fixed size (strings)."""
    count = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
    if tensor.data_type in _SUB_BYTE_BITS:
        return (count * _SUB_BYTE_BITS[tensor.data_type] + 7) // 8
    if tensor.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        return None
    try:
        itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except Exception:  # a type this onnx cannot map: trust the stated length
        return None
    return count * itemsize


def _read_external(ref: _ExternalRef, model_file: Path) -> bytes:
    """The bytes of one external tensor, checked against the tensor's declared size."""
    expected = _expected_nbytes(ref.tensor)
    want = ref.length if ref.length is not None else expected
    with open(ref.file, "rb") as handle:
        handle.seek(ref.offset)
        data = handle.read() if want is None else handle.read(want)
    if (want is not None and len(data) != want) or (
            expected is not None and len(data) != expected):
        raise InvalidModelError(
            f"{model_file}: external data of tensor '{ref.tensor.name}' in "
            f"'{ref.file.name}' has {len(data)} bytes at offset {ref.offset}, "
            f"expected {expected if expected is not None else want}")
    return data


def _load_external(file: Path, refs: list[_ExternalRef]) -> None:
    """Read all validated external tensors into the model (in place, our own proto)."""
    for ref in refs:
        data = _read_external(ref, file)
        ref.tensor.raw_data = data
        del ref.tensor.external_data[:]
        ref.tensor.data_location = TensorProto.DEFAULT


# --------------------------------------------------------------------------- checks

# Typed storage fields and how many entries one element takes (complex numbers take two).
_TYPED_FIELDS: dict[int, tuple[str, int]] = {
    TensorProto.FLOAT: ("float_data", 1), TensorProto.COMPLEX64: ("float_data", 2),
    TensorProto.DOUBLE: ("double_data", 1), TensorProto.COMPLEX128: ("double_data", 2),
    TensorProto.INT64: ("int64_data", 1), TensorProto.UINT32: ("uint64_data", 1),
    TensorProto.UINT64: ("uint64_data", 1), TensorProto.STRING: ("string_data", 1),
    **{t: ("int32_data", 1) for t in (TensorProto.INT32, TensorProto.INT16, TensorProto.INT8,
                                      TensorProto.UINT16, TensorProto.UINT8, TensorProto.BOOL,
                                      TensorProto.FLOAT16, TensorProto.BFLOAT16)},
}


def _check_tensor_sizes(file: Path, model: onnx.ModelProto) -> None:
    """Every stored tensor must hold exactly as many values as its dims say. onnx's checker
    does not look; numpy and onnxruntime would fail later with an unhelpful reshape error
    (found by fuzzing: an initializer whose dims were cleared)."""
    for tensor in iter_tensors(model):
        if uses_external_data(tensor):
            continue  # sizes of external data are checked when it is read
        count = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
        if tensor.HasField("raw_data"):
            want = _expected_nbytes(tensor)
            have, unit = len(tensor.raw_data), "bytes"
        elif tensor.data_type in _TYPED_FIELDS:
            name, per_element = _TYPED_FIELDS[tensor.data_type]
            have, want, unit = len(getattr(tensor, name)), count * per_element, "values"
        else:
            continue
        if want is not None and have != want:
            raise InvalidModelError(
                f"{file}: tensor '{tensor.name}' holds {have} {unit} but its shape "
                f"{list(tensor.dims)} needs {want}")



def _check(file: Path, model: onnx.ModelProto) -> None:
    """The structural checker, after external data is loaded (onnx's checker would look for
    external files relative to the working directory). Beyond protobuf's limit it checks the
    file itself, whose external references were validated already."""
    try:
        onnx.checker.check_model(str(file) if is_too_big_for_protobuf(model) else model)
    except Exception as exc:
        raise InvalidModelError(f"{file}: fails the ONNX checker: {_one_line(exc)}") from exc


def _strict_shape_check(file: Path, model: onnx.ModelProto, notes: list[str]) -> None:
    """``full_check``'s strict inference; disagreeing declared shapes pass if onnxruntime
    loads the model anyway (the note says so), anything else is refused."""
    try:
        _with_skeleton(model, lambda m: onnx.shape_inference.infer_shapes(
            m, check_type=True, strict_mode=True))
    except Exception as exc:
        message = _one_line(exc)
        try:
            _ort_loads(file, model)
        except Exception as ort_exc:
            raise InvalidModelError(
                f"{file}: fails ONNX shape/type checking: {message} "
                f"(onnxruntime: {_one_line(ort_exc)[:300]})") from exc
        notes.append(f"strict shape inference failed but onnxruntime loads the model: {message}")


def _ort_loads(file: Path, model: onnx.ModelProto) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    source: str | bytes
    source = str(file) if is_too_big_for_protobuf(model) else model.SerializeToString()
    ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _with_skeleton(model: onnx.ModelProto,
                   fn: Callable[[onnx.ModelProto], onnx.ModelProto]) -> onnx.ModelProto:
    """Run a protobuf-bound onnx tool on the model, on its skeleton when it exceeds 2 GiB."""
    if not is_too_big_for_protobuf(model):
        return fn(model)
    with detached_payloads(model, DEFAULT_EXTERNAL_DATA_THRESHOLD):
        return fn(model)


# --------------------------------------------------------------------------- normalization


def _set_ir_version(file: Path, model: onnx.ModelProto, notes: list[str]) -> None:
    try:
        wanted = target_ir_version(model)
    except InvalidModelError as exc:
        raise InvalidModelError(f"{file}: {exc}") from exc
    if wanted != model.ir_version:
        notes.append(f"ir_version {model.ir_version} -> {wanted}")
        model.ir_version = wanted


def _drop_ir3_initializer_inputs(model: onnx.ModelProto, notes: list[str]) -> None:
    """IR < 4 required every initializer to be listed as a graph input. That was a format
    rule, not a wish to make weights overridable; once the IR is raised such inputs would
    make weights look variable, so they are removed from ``graph.input``."""
    inits = {init.name for init in model.graph.initializer}
    kept = [inp for inp in model.graph.input if inp.name not in inits]
    dropped = len(model.graph.input) - len(kept)
    if dropped:
        del model.graph.input[:]
        model.graph.input.extend(kept)
        notes.append(f"IR < 4: removed {dropped} initializer(s) from graph inputs")


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Non-strict shape inference keeping symbolic dims; the model is returned unchanged
    (without new value_info) when inference itself crashes."""
    if is_too_big_for_protobuf(model):
        try:
            with detached_payloads(model, DEFAULT_EXTERNAL_DATA_THRESHOLD):
                inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        except Exception:  # inference is advisory; the graph itself was already checked
            return model
        del model.graph.value_info[:]
        model.graph.value_info.extend(inferred.graph.value_info)
        return model
    for data_prop in (True, False):  # data propagation finds more shapes but is less robust
        try:
            return onnx.shape_inference.infer_shapes(model, strict_mode=False,
                                                     data_prop=data_prop)
        except Exception:
            continue
    return model


def _normalize(file: Path, model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[PassReport]]:
    try:
        return run_passes(model, NORMALIZATION_PASSES)
    except InvalidModelError as exc:
        raise type(exc)(f"{file}: {exc}") from exc


def load_model(path: str | os.PathLike[str], *, normalize: bool = True) -> ImportedModel:
    """Read, check and (by default) normalize the model at ``path``.

    ``normalize=False`` skips the graph passes (the model is as exported, external data
    loaded, IR version readable by onnxruntime, shapes inferred).
    """
    file = _check_path(path)
    data = _read_bytes(file)
    digest = hashlib.sha256(data).hexdigest()
    model = _parse(file, data)
    del data
    refs = _validate_external(file, model)
    _load_external(file, refs)
    _check_tensor_sizes(file, model)
    _check(file, model)
    imported = ImportedModel(model=model, path=file, original_opset=default_opset(model),
                             original_ir_version=model.ir_version, sha256=digest,
                             external_data=bool(refs))
    _set_ir_version(file, model, imported.notes)
    _strict_shape_check(file, model, imported.notes)
    if normalize:
        if imported.original_ir_version < 4:
            _drop_ir3_initializer_inputs(model, imported.notes)
        model, imported.reports = _normalize(file, model)
        _set_ir_version(file, model, imported.notes)
    imported.model = infer_shapes(model)
    return imported
