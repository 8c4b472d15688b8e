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
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from hawq_onnx import __version__
from hawq_onnx.hessian.result import SCHEMA_VERSION, AnalysisResult

CACHE_ENV = "HAWQ_ONNX_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$HAWQ_ONNX_CACHE_DIR``, else ``$XDG_CACHE_HOME/hawq-onnx``, else
    ``~/.cache/hawq-onnx``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hawq-onnx"


def arrays_sha256(arrays: Mapping[str, np.ndarray | None]) -> str:
    """A hash of named arrays: names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = arrays[name]
        if array is None:
            digest.update(f"{name}:none;".encode())
            continue
        array = np.ascontiguousarray(array)
        digest.update(f"{name}:{array.dtype.str}:{array.shape};".encode())
        digest.update(array.tobytes())
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
        """Write atomically; returns the entry's path."""
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(result.to_json())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, target)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        return target
