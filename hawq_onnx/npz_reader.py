"""Lazy, safe reading of the ``.npy`` members of an ``.npz`` archive.

Why lazy: ``np.load`` materializes a whole member on access, so memory grew with the
calibration set. Opening an archive here reads only the small ``.npy`` headers; array data is
read when asked for, a range of samples at a time, with positional reads (``os.preadv``) into
a fresh buffer that the caller owns. Not ``np.memmap``: mapped file pages count in the
resident set once touched, so one pass over a memory-mapped file grows RSS by the whole file.

Members stored uncompressed (what ``np.savez`` writes) are read in place. Compressed members
(``np.savez_compressed``) are decompressed once, in chunks, into a private temporary file that
is then read the same way. Streaming the deflate data instead would only work front to back,
while reads here are not sequential: a slice of the data starts mid-member, an input batched
along an axis after the first (an RNN state ``[2, batch, 128]``) needs one range per outer
index, and every Hessian-vector product is a new pass from the start. The temporary file is
anonymous (``tempfile.TemporaryFile`` unlinks it at creation on POSIX, in the system temp
directory), so it disappears with the reader or the process, however that ends
(KeyboardInterrupt included); it costs disk space equal to the uncompressed member.

Why safe: pickles are never loaded (an object dtype is refused from the header alone, before
any data is read); headers go through numpy's own literal parser and its size limit; the
sizes a header declares are checked against the archive before anything is read; the CRC-32
of a stored member is checked by :meth:`NpzReader.scan` (of a compressed one by ``zipfile``
while decompressing). Every problem is one :class:`InvalidDataError` line naming the file and
the array.
"""

from __future__ import annotations

import math
import os
import struct
import tempfile
import threading
import weakref
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from hawq_onnx.errors import InvalidDataError

#: bytes per read of :meth:`NpzReader.scan` and of the decompression into a temporary file.
CHUNK_BYTES = 4 << 20
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, 22 bytes, name length, extra length
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0,
                   (2, 0): np.lib.format.read_array_header_2_0}


@dataclass(frozen=True)
class NpyHeader:
    """What one member's ``.npy`` header declares."""

    dtype: np.dtype
    shape: tuple[int, ...]
    fortran_order: bool
    size: int  # bytes of the header itself (magic, length field, dict, padding)

    @property
    def count(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.count * self.dtype.itemsize


@dataclass(frozen=True)
class _Member:
    info: zipfile.ZipInfo
    header: NpyHeader


class _Handles:
    """Open files of one reader, closed together (explicitly or when the reader is
    collected): kept apart from the reader so that ``weakref.finalize`` can hold it."""

    def __init__(self) -> None:
        self.files: list[Any] = []

    def close(self) -> None:
        while self.files:
            self.files.pop().close()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class NpzReader:
    """The arrays of one ``.npz`` file, read on demand (see the module doc).

    ``keys`` lists every member as ``np.load`` names it (``.npy`` suffix dropped), arrays and
    other files alike; :meth:`header` refuses members that are not ``.npy`` arrays.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._handles = _Handles()
        self._finalizer = weakref.finalize(self, self._handles.close)
        self._lock = threading.Lock()
        self._locations: dict[str, tuple[IO[bytes], int]] = {}
        try:
            self._file = self._open_file()
            self._zip = self._open_zip()
            self._members, self.keys = self._parse_members()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Close the archive and delete temporary files (idempotent)."""
        self._finalizer()

    def __enter__(self) -> NpzReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ opening
    def _open_file(self) -> IO[bytes]:
        if not self.path.is_file():
            raise InvalidDataError(f"{self.path}: no such file")
        handle = open(self.path, "rb")  # noqa: SIM115 - closed by self._handles
        self._handles.files.append(handle)
        start = handle.read(len(_NPY_MAGIC))
        if start == _NPY_MAGIC:
            raise InvalidDataError(f"{self.path}: a single .npy array, expected an .npz archive "
                                   "of arrays keyed by input name")
        if start[:4] not in _ZIP_MAGIC:
            raise InvalidDataError(f"{self.path}: not a readable .npz archive (not a zip file)")
        return handle

    def _open_zip(self) -> zipfile.ZipFile:
        try:
            archive = zipfile.ZipFile(self._file)
        except Exception as exc:  # zipfile raises many types on damaged directories
            raise InvalidDataError(f"{self.path}: not a readable .npz archive "
                                   f"({_first_line(exc)})") from exc
        self._handles.files.append(archive)
        return archive

    def _parse_members(self) -> tuple[dict[str, _Member], list[str]]:
        members: dict[str, _Member] = {}
        keys: list[str] = []
        for info in self._zip.infolist():
            key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            keys.append(key)
            with self._guard(key):
                header = self._read_header(info)
            if header is None:  # not an array (np.load would return its bytes)
                members.pop(key, None)
                continue
            if header.dtype.hasobject:
                raise InvalidDataError(f"{self.path}: array '{key}' holds Python objects "
                                       "(pickled data), which is never loaded")
            available = info.file_size - header.size
            if available < header.nbytes:
                raise self._unreadable(key, f"truncated: {max(available, 0)} data bytes for "
                                            f"shape {header.shape} {header.dtype} "
                                            f"({header.nbytes} needed)")
            members[key] = _Member(info, header)
        return members, list(dict.fromkeys(keys))

    def _read_header(self, info: zipfile.ZipInfo) -> NpyHeader | None:
        with self._zip.open(info) as stream:
            magic = stream.read(len(_NPY_MAGIC) + 2)
            if not magic.startswith(_NPY_MAGIC):
                return None
            version = (magic[-2], magic[-1])
            if version not in _HEADER_READERS:
                raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
            shape, fortran_order, dtype = _HEADER_READERS[version](stream)
            return NpyHeader(np.dtype(dtype), tuple(int(d) for d in shape),
                             bool(fortran_order), stream.tell())

    # ------------------------------------------------------------------ errors
    def _unreadable(self, key: str, reason: str) -> InvalidDataError:
        return InvalidDataError(f"{self.path}: array '{key}' is unreadable ({reason})")

    @contextmanager
    def _guard(self, key: str) -> Iterator[None]:
        """Library errors on damaged data (zipfile, zlib, numpy's header parser) become one
        line naming the array."""
        try:
            yield
        except InvalidDataError:
            raise
        except Exception as exc:
            raise self._unreadable(key, _first_line(exc)) from exc

    # ------------------------------------------------------------------ metadata
    def header(self, key: str) -> NpyHeader:
        """The header of array ``key`` (KeyError when absent)."""
        return self._member(key).header

    def _member(self, key: str) -> _Member:
        if key not in self._members:
            if key in self.keys:
                raise self._unreadable(key, "not a .npy array")
            raise KeyError(key)
        return self._members[key]

    # ------------------------------------------------------------------ data
    def read(self, key: str) -> np.ndarray:
        """The whole array through zipfile (CRC-checked): for small arrays (labels,
        scalars); large ones are read with :meth:`read_rows`."""
        member = self._member(key)
        header = member.header
        with self._guard(key), self._zip.open(member.info) as stream:
            stream.read(header.size)
            data = stream.read()  # to the end, so zipfile checks the CRC-32
        if len(data) < header.nbytes:
            raise self._unreadable(key, f"truncated: {len(data)} of {header.nbytes} bytes")
        flat = np.frombuffer(data, header.dtype, header.count).copy()
        return flat.reshape(header.shape, order="F" if header.fortran_order else "C")

    def read_rows(self, key: str, axis: int, start: int, stop: int) -> np.ndarray:
        """Entries ``start:stop`` along ``axis`` as a C-ordered array in the file's dtype.

        One positional read per index of the axes before ``axis`` in storage order (a single
        read for axis 0 of a C-ordered array); Fortran-ordered arrays are read correctly but
        with one read per index of the other axes."""
        header = self.header(key)
        ndim = len(header.shape)
        if not 0 <= axis < ndim or not 0 <= start <= stop <= header.shape[axis]:
            raise IndexError(f"rows {start}:{stop} of axis {axis} of {key} {header.shape}")
        fortran = header.fortran_order and ndim > 1
        storage = header.shape[::-1] if fortran else header.shape
        axis_s = ndim - 1 - axis if fortran else axis
        outer, inner = math.prod(storage[:axis_s]), math.prod(storage[axis_s + 1:])
        row = inner * header.dtype.itemsize
        block, count = storage[axis_s] * row, stop - start
        out = np.empty(outer * count * inner, header.dtype)
        target = out.view(np.uint8)
        handle, base = self._location(key)
        piece = count * row
        if count == storage[axis_s]:  # whole blocks: one contiguous range
            self._read_into(key, handle, base, target)
        elif piece:
            for index in range(outer):
                self._read_into(key, handle, base + index * block + start * row,
                                target[index * piece:(index + 1) * piece])
        rows = out.reshape(storage[:axis_s] + (count,) + storage[axis_s + 1:])
        return np.ascontiguousarray(rows.transpose()) if fortran else rows

    def scan(self, key: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[np.ndarray]:
        """The array's elements in storage order, as flat chunks of about ``chunk_bytes``;
        checks a stored member's CRC-32 once the last chunk has been read."""
        member = self._member(key)
        header = member.header
        handle, base = self._location(key)
        stored = member.info.compress_type == zipfile.ZIP_STORED
        crc = zlib.crc32(self._raw(key, handle, base - header.size, header.size)) if stored \
            else None
        step = max(1, chunk_bytes // max(1, header.dtype.itemsize))
        for first in range(0, header.count, step):
            chunk = np.empty(min(step, header.count - first), header.dtype)
            self._read_into(key, handle, base + first * header.dtype.itemsize,
                            chunk.view(np.uint8))
            if crc is not None:
                crc = zlib.crc32(chunk.view(np.uint8), crc)
            yield chunk
        if crc is not None:
            trailing = member.info.file_size - header.size - header.nbytes
            for offset in range(0, trailing, chunk_bytes):
                crc = zlib.crc32(self._raw(key, handle, base + header.nbytes + offset,
                                           min(chunk_bytes, trailing - offset)), crc)
            if crc != member.info.CRC:
                raise self._unreadable(key, "CRC-32 mismatch: the archive is damaged")

    # ------------------------------------------------------------------ positional reads
    def _location(self, key: str) -> tuple[IO[bytes], int]:
        """(file, offset of the array data) for positional reads of ``key``."""
        if key not in self._locations:
            member = self._member(key)
            if member.info.compress_type == zipfile.ZIP_STORED:
                start = self._data_start(key, member.info)
                self._locations[key] = (self._file, start + member.header.size)
            else:
                self._locations[key] = (self._decompress(key, member), 0)
        return self._locations[key]

    def _data_start(self, key: str, info: zipfile.ZipInfo) -> int:
        """Where a stored member's bytes begin: after its local header, whose name and extra
        fields may differ in length from the central directory's."""
        raw = self._raw(key, self._file, info.header_offset, _LOCAL_HEADER.size)
        signature, name_length, extra_length = _LOCAL_HEADER.unpack(raw)
        if signature != _ZIP_MAGIC[0]:
            raise self._unreadable(key, "bad local zip header")
        start = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
        if start + info.file_size > os.fstat(self._file.fileno()).st_size:
            raise self._unreadable(key, "truncated: the archive ends inside the array")
        return start

    def _decompress(self, key: str, member: _Member) -> IO[bytes]:
        """A compressed member's data in an anonymous temporary file (see the module doc)."""
        temp = tempfile.TemporaryFile(prefix="hawq-npz-")  # noqa: SIM115 - closed by handles
        self._handles.files.append(temp)
        remaining = member.header.nbytes
        with self._guard(key), self._zip.open(member.info) as stream:
            stream.read(member.header.size)
            while remaining:
                block = stream.read(min(CHUNK_BYTES, remaining))
                if not block:
                    raise self._unreadable(key, "truncated compressed data")
                temp.write(block)
                remaining -= len(block)
            while stream.read(CHUNK_BYTES):  # to the end, so zipfile checks the CRC-32
                pass
        temp.flush()
        return temp

    def _raw(self, key: str, handle: IO[bytes], offset: int, size: int) -> bytes:
        buffer = bytearray(size)
        self._read_into(key, handle, offset, memoryview(buffer))
        return bytes(buffer)

    def _read_into(self, key: str, handle: IO[bytes], offset: int, target: Any) -> None:
        """Fill ``target`` (a writable byte buffer) from ``offset``; a short file is an
        error, never a silently short array."""
        view = memoryview(target).cast("B")
        done = 0
        while done < len(view):
            count = self._pread(handle, view[done:], offset + done)
            if count <= 0:
                raise self._unreadable(key, "truncated: the file ended early")
            done += count

    def _pread(self, handle: IO[bytes], view: memoryview, offset: int) -> int:
        if hasattr(os, "preadv"):
            return os.preadv(handle.fileno(), [view], offset)
        with self._lock:  # platforms without preadv: seek + read, one reader at a time
            handle.seek(offset)
            return handle.readinto(view) or 0  # type: ignore[attr-defined]


__all__ = ["CHUNK_BYTES", "NpyHeader", "NpzReader"]
