"""An on-disk cache of analysis results keyed by (model hash, data hash, settings).

Why: the analysis is the slow step of a build pipeline; a second run on the same model,
data and settings should be instant. Entries are JSON files written to a temporary file in
the cache directory and moved into place with ``os.replace``, so a crash or a concurrent
run never leaves (or reads) a half-written entry. Unreadable entries count as misses.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hawq_onnx import __version__
from hawq_onnx.hessian.result import SCHEMA_VERSION, AnalysisResult
from hawq_onnx.model_io import write_atomic

if TYPE_CHECKING:
    from hawq_onnx.data import Dataset

CACHE_ENV = "HAWQ_ONNX_CACHE_DIR"
_CHUNK_BYTES = 4 << 20


def default_cache_dir() -> Path:
    """``$HAWQ_ONNX_CACHE_DIR``, else ``$XDG_CACHE_HOME/hawq-onnx``, else
    ``~/.cache/hawq-onnx``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hawq-onnx"


def arrays_sha256(arrays: Mapping[str, np.ndarray | None]) -> str:
    """A hash of named arrays: names, dtypes, shapes and C-order bytes, in name order.

    The bytes are hashed in row chunks, never copied whole (``tobytes``), so hashing a large
    array costs one chunk of memory."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = arrays[name]
        if array is None:
            digest.update(f"{name}:none;".encode())
            continue
        array = np.asarray(array)
        shape = array.shape or (1,)  # a scalar hashes as shape (1,), as it always has
        digest.update(f"{name}:{array.dtype.str}:{shape};".encode())
        for chunk in _row_chunks(array):
            digest.update(chunk)
    return digest.hexdigest()


def _row_chunks(array: np.ndarray, max_bytes: int = _CHUNK_BYTES) -> Iterator[np.ndarray]:
    """C-contiguous pieces of ``array`` along axis 0 whose bytes, concatenated, are its
    C-order bytes."""
    if array.size == 0:
        return
    if array.ndim == 0 or array.flags.c_contiguous:
        flat = np.ascontiguousarray(array).reshape(-1)
        step = max(1, max_bytes // max(1, array.dtype.itemsize))
        for start in range(0, flat.size, step):
            yield flat[start:start + step]
        return
    rows = max(1, max_bytes // max(1, array[0].nbytes))
    for start in range(0, len(array), rows):
        yield np.ascontiguousarray(array[start:start + rows])


def dataset_sha256(dataset: Dataset, labels: np.ndarray | None) -> str:
    """A hash of a dataset's samples (every input, in sample order) and ``labels``.

    One streaming pass in chunks of bounded size (:meth:`Dataset.chunks`): a file-backed
    dataset is hashed without being loaded. Each input gets its own digest over its samples
    in order (batch axis first), so the result does not depend on how the pass is chunked."""
    inputs: dict[str, Any] = {}  # name -> its running sha256
    layouts: dict[str, tuple[str, tuple[int, ...]]] = {}
    axes = {spec.name: spec.batch_axis for spec in dataset.specs}
    for chunk in dataset.chunks():
        for name, array in chunk.items():
            if name not in inputs:
                shape = list(array.shape)
                if axes[name] is not None:
                    shape[axes[name]] = len(dataset)
                inputs[name] = hashlib.sha256()
                layouts[name] = (array.dtype.str, tuple(shape))
            elif axes[name] is None:
                continue  # an unbatched input, the same in every chunk: hashed once
            if axes[name] is None:
                inputs[name].update(np.ascontiguousarray(array).tobytes())
                continue
            for piece in _row_chunks(np.moveaxis(array, axes[name], 0)):
                inputs[name].update(piece)
    digest = hashlib.sha256()
    for name in sorted(inputs):
        dtype, shape = layouts[name]
        digest.update(f"input:{name}:{dtype}:{shape}:{inputs[name].hexdigest()};".encode())
    digest.update(arrays_sha256({"labels": labels}).encode())
    return digest.hexdigest()


def cache_key(model_sha256: str, data_sha256: str, settings: Mapping[str, Any]) -> str:
    payload = json.dumps({"model": model_sha256, "data": data_sha256,
                          "settings": dict(settings), "version": __version__,
                          "schema": SCHEMA_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


class ResultCache:
    """Analysis results stored as ``<dir>/analysis/<key>.json``."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_cache_dir()

    def path(self, key: str) -> Path:
        return self.directory / "analysis" / f"{key}.json"

    def get(self, key: str) -> AnalysisResult | None:
        try:
            result = AnalysisResult.load(self.path(key))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        result.cached = True
        return result

    def put(self, key: str, result: AnalysisResult) -> Path:
        """Write atomically (the project's one writer: fsync, rename, ordinary file mode);
        returns the entry's path. Concurrent builds writing one key each rename a complete
        file, so a reader sees one of them whole."""
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        return write_atomic(target, result.to_json())
