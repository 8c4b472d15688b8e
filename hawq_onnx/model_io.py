"""Writing models safely: atomic saves, an IR version onnxruntime can read, stable hashes.

Every command writes models through :func:`save_model`. onnx >= 1.23 stamps IR 14 on new
models while onnxruntime 1.31 reads at most IR 13, so the saver always sets the lowest IR the
model needs (:func:`required_ir_version`). Writes go to a temporary file in the destination
directory and are moved into place with ``os.replace``, so a crash or a full disk never leaves
a half-written model where a good one was.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import onnx
from onnx import TensorProto, helper

from hawq_onnx.errors import HawqError, InvalidModelError

#: protobuf refuses to serialize messages of 2 GiB or more; stay a little below.
PROTOBUF_LIMIT = 2**31 - 2**20
#: tensors at least this large move to the external data file when one is written.
DEFAULT_EXTERNAL_DATA_THRESHOLD = 1024
#: large tensors start at multiples of this in the data file so they can be memory-mapped
#: (64 KiB is the allocation granularity on Windows; it is a multiple of Linux's 4 KiB).
_ALIGNMENT = 64 * 1024
_ALIGN_FROM_BYTES = 1024 * 1024
_DEFAULT_DOMAINS = ("", "ai.onnx")
_HASH_CHUNK = 1 << 20

# Lowest IR that first defined each element type (onnx.proto's Version enum comments).
_TYPE_IR: dict[int, int] = {
    TensorProto.BFLOAT16: 4,
    TensorProto.FLOAT8E4M3FN: 9,
    TensorProto.FLOAT8E4M3FNUZ: 9,
    TensorProto.FLOAT8E5M2: 9,
    TensorProto.FLOAT8E5M2FNUZ: 9,
    TensorProto.UINT4: 10,
    TensorProto.INT4: 10,
}
for _name, _ir in (("FLOAT4E2M1", 11), ("FLOAT8E8M0", 12), ("UINT2", 13), ("INT2", 13),
                   ("FLOAT6E2M3", 14), ("FLOAT6E3M2", 14)):
    if hasattr(TensorProto, _name):
        _TYPE_IR[getattr(TensorProto, _name)] = _ir
# Node attributes that name an element type (Cast.to, QuantizeLinear.output_dtype, ...).
_DTYPE_ATTRIBUTES = ("to", "dtype", "output_dtype")
#: project policy: every model is written with at least IR 10 (what opset <= 22 needs).
MIN_IR_VERSION = 10


# --------------------------------------------------------------------------- traversal


def iter_graphs(model: onnx.ModelProto) -> Iterator[onnx.GraphProto]:
    """The main graph and every subgraph (If/Loop/Scan bodies), also inside functions."""

    def from_nodes(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.GraphProto]:
        for node in nodes:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from walk(attr.g)
                for sub in attr.graphs:
                    yield from walk(sub)

    def walk(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
        yield graph
        yield from from_nodes(graph.node)

    yield from walk(model.graph)
    for function in model.functions:
        yield from from_nodes(function.node)


def iter_nodes(model: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    """Every node of the model: main graph, subgraphs and model-local functions."""
    for graph in iter_graphs(model):
        yield from graph.node
    for function in model.functions:
        yield from function.node


def _attribute_tensors(nodes: Iterable[onnx.NodeProto]) -> Iterator[TensorProto]:
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield attr.sparse_tensor.values
                yield attr.sparse_tensor.indices
            for sparse in attr.sparse_tensors:
                yield sparse.values
                yield sparse.indices


def iter_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every TensorProto that can hold weight bytes, in a fixed order.

    Initializers, sparse initializers and tensors in node attributes (``Constant``), in the
    main graph, all subgraphs and all functions. The order is deterministic, which the
    external-data writer and :func:`model_sha256` rely on.
    """
    for graph in iter_graphs(model):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        yield from _attribute_tensors(graph.node)
    for function in model.functions:
        yield from _attribute_tensors(function.node)


def uses_external_data(tensor: TensorProto) -> bool:
    return tensor.data_location == TensorProto.EXTERNAL


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy; passes work on copies so their input stays untouched."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


# --------------------------------------------------------------------------- IR versions


@functools.lru_cache(maxsize=1)
def onnxruntime_max_ir_version() -> int:
    """The highest IR version the installed onnxruntime loads (probed once, ~ms each).

    onnxruntime has no public constant for this; loading a one-node model at decreasing IR
    versions finds it and stays right when onnxruntime is upgraded.
    """
    import onnxruntime as ort

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    options = ort.SessionOptions()
    options.log_severity_level = 4
    for ir_version in range(onnx.IR_VERSION, MIN_IR_VERSION - 1, -1):
        probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                                  ir_version=ir_version)
        try:
            ort.InferenceSession(probe.SerializeToString(), options,
                                 providers=["CPUExecutionProvider"])
        except Exception:  # any refusal means "too new"
            continue
        return ir_version
    return MIN_IR_VERSION


def _opset_ir_version(domain: str, version: int) -> int:
    """IR needed by one opset import (project policy up to opset 25, onnx's table after)."""
    if domain in _DEFAULT_DOMAINS:
        if version <= 22:
            return MIN_IR_VERSION
        if version <= 25:
            return 11
    elif domain not in ("ai.onnx.ml", "ai.onnx.training", "ai.onnx.preview.training"):
        return MIN_IR_VERSION  # vendor domains (com.microsoft, ...) carry no IR requirement
    try:
        return helper.find_min_ir_version_for([helper.make_opsetid(domain, version)])
    except Exception:  # an opset newer than this onnx knows
        return onnx.IR_VERSION


def _type_elem_types(type_proto: onnx.TypeProto) -> Iterator[int]:
    kind = type_proto.WhichOneof("value")
    if kind in ("tensor_type", "sparse_tensor_type"):
        yield getattr(type_proto, kind).elem_type
    elif kind in ("sequence_type", "optional_type"):
        yield from _type_elem_types(getattr(type_proto, kind).elem_type)
    elif kind == "map_type":
        yield type_proto.map_type.key_type
        yield from _type_elem_types(type_proto.map_type.value_type)


def used_element_types(model: onnx.ModelProto) -> set[int]:
    """Every element type the model declares: tensors, value infos and dtype attributes."""
    types = {tensor.data_type for tensor in iter_tensors(model)}
    for graph in iter_graphs(model):
        for info in (*graph.input, *graph.output, *graph.value_info):
            types.update(_type_elem_types(info.type))
    for node in iter_nodes(model):
        if node.domain not in _DEFAULT_DOMAINS:
            continue  # a vendor op's "to" attribute need not be an element type
        for attr in node.attribute:
            if attr.name in _DTYPE_ATTRIBUTES and attr.type == onnx.AttributeProto.INT:
                types.add(attr.i)
    return types


def required_ir_version(model: onnx.ModelProto) -> int:
    """The lowest IR version the model's opsets and element types need (at least 10).

    Default-domain opsets up to 22 need IR 10 and 23-25 IR 11 (the project's table); newer
    opsets and the ``ai.onnx.ml``/training domains follow onnx's release table. Element types
    add their own minimum: int4/uint4 10, float4e2m1 11, float8e8m0 12, int2/uint2 13.
    """
    needed = MIN_IR_VERSION
    for opset in model.opset_import:
        needed = max(needed, _opset_ir_version(opset.domain, opset.version))
    for elem_type in used_element_types(model):
        needed = max(needed, _TYPE_IR.get(elem_type, MIN_IR_VERSION))
    return needed


def target_ir_version(model: onnx.ModelProto) -> int:
    """:func:`required_ir_version`, refused when the installed onnxruntime cannot read it."""
    needed = required_ir_version(model)
    limit = onnxruntime_max_ir_version()
    if needed > limit:
        raise InvalidModelError(
            f"the model needs ONNX IR version {needed} (its opsets or element types), but the "
            f"installed onnxruntime reads at most IR {limit}"
        )
    return needed


# --------------------------------------------------------------------------- payloads


@contextlib.contextmanager
def detached_payloads(
    model: onnx.ModelProto, threshold: int, tensors: Iterable[TensorProto] | None = None
) -> Iterator[list[tuple[int, bytes]]]:
    """Temporarily take ``raw_data`` of at least ``threshold`` bytes out of ``model``.

    ``tensors`` limits this to some of the model's tensors (default: :func:`iter_tensors`).
    Yields ``[(tensor_index, bytes)]`` in that iteration order while the model holds only
    its small skeleton (the moved tensors are marked EXTERNAL so nothing mistakes them for
    empty). Everything is put back on exit, also after an exception. This lets models above
    the 2 GiB protobuf limit be serialized, hashed or shape-inferred piece by piece without
    holding a second copy of the weights.
    """
    taken: list[tuple[int, bytes, TensorProto]] = []
    try:
        for index, tensor in enumerate(iter_tensors(model) if tensors is None else tensors):
            if uses_external_data(tensor) or not tensor.HasField("raw_data"):
                continue
            if len(tensor.raw_data) < threshold:
                continue
            payload = tensor.raw_data
            tensor.ClearField("raw_data")
            tensor.data_location = TensorProto.EXTERNAL
            taken.append((index, payload, tensor))
        yield [(index, payload) for index, payload, _ in taken]
    finally:
        for _, payload, tensor in taken:
            tensor.data_location = TensorProto.DEFAULT
            tensor.raw_data = payload


def skeleton_copy(model: onnx.ModelProto, threshold: int = DEFAULT_EXTERNAL_DATA_THRESHOLD
                  ) -> onnx.ModelProto:
    """A copy without the large tensor bytes: small enough for protobuf-bound onnx tools."""
    with detached_payloads(model, threshold):
        return copy_model(model)


def is_too_big_for_protobuf(model: onnx.ModelProto) -> bool:
    try:
        return model.ByteSize() >= PROTOBUF_LIMIT
    except Exception:  # upb (protobuf >= 4) refuses to even size a message of 2 GiB or more
        return True


# --------------------------------------------------------------------------- serialization


def serialize(model: onnx.ModelProto) -> bytes:
    """Deterministic bytes: the same model always serializes to the same file."""
    try:
        return model.SerializeToString(deterministic=True)
    except Exception as exc:  # protobuf raises several types for oversize
        raise HawqError(f"cannot serialize the model: {exc}".splitlines()[0]) from exc


def _write_bytes(handle: BinaryIO, data: bytes) -> None:
    """The one place bytes hit the disk (tests inject write failures here)."""
    handle.write(data)


def _umask() -> int:
    """The process umask. Linux shows it in /proc; elsewhere reading it means setting it,
    which changes it for a moment for every thread, so that is only the fallback."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def output_mode(dest: Path) -> int:
    """The permissions ``open(dest, "w")`` would leave: an existing file keeps its mode, a
    new one gets ``0o666 & ~umask``. Why: ``mkstemp`` creates 0600 files, and a model or
    report written through it would be unreadable to the rest of a team or a web server."""
    try:
        return stat.S_IMODE(os.stat(dest).st_mode)
    except OSError:
        return 0o666 & ~_umask()


def _write_temp(directory: Path, name: str, fill: Callable[[BinaryIO], None],
                mode: int) -> Path:
    """Write a new temporary file next to the destination with ``mode``; removed again on
    any failure."""
    fd, temp_name = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    temp = Path(temp_name)
    try:
        with open(temp, "wb") as handle:
            fill(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, mode)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return temp


def write_atomic(path: str | os.PathLike[str], data: bytes | str) -> Path:
    """Write a whole file (reports, HTML, JSON) the way every output is written: a temporary
    file in the destination directory, fsynced, given :func:`output_mode`, then renamed into
    place, so a crash never leaves half a file where a good one was. ``str`` is UTF-8."""
    dest = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    temp = _write_temp(dest.parent, dest.name, lambda h: _write_bytes(h, payload),
                       output_mode(dest))
    _replace_all([(temp, dest)])
    return dest


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (symlinks, hard links, ``..``), for refusing to
    overwrite an input."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _check_destination(dest: Path, source: str | os.PathLike[str] | None) -> None:
    if source is not None and same_file(dest, Path(source)):
        raise HawqError(f"refusing to overwrite the input model {source}; choose another output")
    if dest.is_dir():
        raise HawqError(f"cannot write the model to {dest}: it is a directory")
    if not dest.parent.is_dir():
        raise HawqError(f"cannot write the model to {dest}: directory {dest.parent} does not exist")


def _externalize(skeleton: onnx.ModelProto, payloads: list[tuple[int, bytes]],
                 location: str) -> Callable[[BinaryIO], None]:
    """Point the skeleton's tensors at ``location``; return the writer of that data file."""
    by_index = dict(payloads)
    layout: list[tuple[int, bytes]] = []
    offset = 0
    for index, tensor in enumerate(iter_tensors(skeleton)):
        if index not in by_index:
            continue
        payload = by_index[index]
        if len(payload) >= _ALIGN_FROM_BYTES and offset % _ALIGNMENT:
            offset += _ALIGNMENT - offset % _ALIGNMENT
        tensor.ClearField("raw_data")
        del tensor.external_data[:]
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", str(offset)),
                           ("length", str(len(payload)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        layout.append((offset, payload))
        offset += len(payload)

    def fill(handle: BinaryIO) -> None:
        position = 0
        for start, payload in layout:
            if start > position:
                _write_bytes(handle, b"\0" * (start - position))
            _write_bytes(handle, payload)
            position = start + len(payload)

    return fill


def _refuse_unloaded_external(model: onnx.ModelProto) -> None:
    for tensor in iter_tensors(model):
        if uses_external_data(tensor):
            raise HawqError(
                f"tensor '{tensor.name}' still refers to external data that was never loaded; "
                "load models with hawq_onnx.importer.load_model before saving"
            )


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    source: str | os.PathLike[str] | None = None,
    external_data: bool | None = None,
    external_data_threshold: int = DEFAULT_EXTERNAL_DATA_THRESHOLD,
) -> Path:
    """Write ``model`` to ``path`` atomically with an IR version onnxruntime reads.

    ``source``: the model's input path; writing onto it is refused (a failed run must never
    destroy its input). ``external_data``: ``None`` writes one file unless the model exceeds
    the 2 GiB protobuf limit, then tensors of at least ``external_data_threshold`` bytes go to
    ``<name>.data`` next to the model. The input proto is not changed; the bytes are
    deterministic. Returns the written path.
    """
    dest = Path(path)
    _check_destination(dest, source)
    _refuse_unloaded_external(model)
    ir_version = target_ir_version(model)
    if external_data is None:
        external_data = is_too_big_for_protobuf(model)
    if not external_data:
        out = copy_model(model)
        out.ir_version = ir_version
        data = serialize(out)
        _replace_all([(_write_temp(dest.parent, dest.name, lambda h: _write_bytes(h, data),
                                   output_mode(dest)), dest)])
        return dest
    data_path = dest.with_name(dest.name + ".data")
    if source is not None and same_file(data_path, Path(source)):
        raise HawqError(f"refusing to overwrite the input model {source}; choose another output")
    with detached_payloads(model, external_data_threshold) as payloads:
        skeleton = copy_model(model)
    if not payloads:  # nothing reaches the threshold: one self-contained file
        return save_model(model, dest, source=source, external_data=False)
    skeleton.ir_version = ir_version
    fill_data = _externalize(skeleton, payloads, data_path.name)
    # the large tensors are still referenced by ``payloads``; the skeleton holds none of them.
    model_bytes = serialize(skeleton)
    temps: list[tuple[Path, Path]] = []
    try:
        temps.append((_write_temp(dest.parent, data_path.name, fill_data,
                                  output_mode(data_path)), data_path))
        temps.append((_write_temp(dest.parent, dest.name, lambda h: _write_bytes(h, model_bytes),
                                  output_mode(dest)), dest))
    except BaseException:
        for temp, _ in temps:
            temp.unlink(missing_ok=True)
        raise
    _replace_all(temps)
    return dest


def _replace_all(moves: list[tuple[Path, Path]]) -> None:
    """Move finished temporary files into place, data before the model that refers to it."""
    try:
        for temp, final in moves:
            os.replace(temp, final)
    finally:
        for temp, _ in moves:
            temp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- hashing


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (models can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_and_find(path: Path, needle: bytes) -> tuple[str, bool]:
    """One streamed pass over a file: its SHA-256 and whether ``needle`` occurs in it."""
    digest, found, tail = hashlib.sha256(), False, b""
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
            if not found:
                found = needle in tail + chunk
                tail = chunk[-(len(needle) - 1):]
    return digest.hexdigest(), found


def model_files_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a model file together with the external data files it references.

    Why: a model's weights may live in ``.data`` files; a hash of the ``.onnx`` bytes alone
    would not change when they do. A model without external data hashes to its file's
    SHA-256. With external data it is the SHA-256 of the ``sha256sum``-style listing
    ``"<hex>  <model file name>\n"`` followed by one such line per data file (named by its
    location, sorted): ``(sha256sum m.onnx m.onnx.data) | sha256sum`` in the model's folder.
    Every file is streamed in 1 MiB chunks. The data files are the ones the importer
    accepts (its path-safety check); a file it refuses, or one that is no ONNX model, hashes
    as its own bytes, and the command reading it reports the problem.
    """
    model_file = Path(path)
    digest, maybe_external = _sha256_and_find(model_file, b"location")
    if not maybe_external:  # every external reference needs a "location" entry
        return digest
    from hawq_onnx.importer import external_data_files  # the importer imports this module

    try:
        data_files = external_data_files(model_file)
    except InvalidModelError:
        return digest
    if not data_files:
        return digest
    listing = [f"{digest}  {model_file.name}"]
    listing += [f"{file_sha256(file)}  {location}" for location, file in data_files]
    return hashlib.sha256(("\n".join(listing) + "\n").encode("utf-8")).hexdigest()


def model_sha256(model: onnx.ModelProto) -> str:
    """Hex SHA-256 of the model's deterministic serialization (a cache key).

    Models above the protobuf limit hash their skeleton followed by each large tensor's bytes,
    so no 2 GiB buffer is ever built; the result is still a pure function of the model.
    """
    if not is_too_big_for_protobuf(model):
        return hashlib.sha256(serialize(model)).hexdigest()
    digest = hashlib.sha256()
    with detached_payloads(model, DEFAULT_EXTERNAL_DATA_THRESHOLD) as payloads:
        digest.update(serialize(model))
        for index, payload in payloads:
            digest.update(f"{index}:{len(payload)}:".encode())
            digest.update(payload)
    return digest.hexdigest()
