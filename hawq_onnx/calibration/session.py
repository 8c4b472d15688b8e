"""onnxruntime sessions for in-memory models, also beyond protobuf's 2 GiB limit.

Calibration, validation and the exporter's kernel report all run models that exist only in
memory. Small ones are passed as bytes; larger ones are written (with external data) to a
temporary directory that is removed as soon as the session has loaded them.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from hawq_onnx.errors import HawqError, InvalidDataError, InvalidModelError
from hawq_onnx.model_io import is_too_big_for_protobuf, required_ir_version, save_model


def session_options(*, threads: int | None = None, level: str = "all",
                    optimized_path: str | Path | None = None) -> ort.SessionOptions:
    """Quiet session options; ``level``: disable | basic | extended | all."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return options


def make_session(model: onnx.ModelProto | str | Path,
                 options: ort.SessionOptions | None = None, *,
                 what: str | None = None) -> ort.InferenceSession:
    """A CPU session for a model object or a file path.

    A refusal is one line, "onnxruntime cannot load WHAT: reason", with ``what`` naming the
    model (default: its path, or "the model"); callers pass ``what`` instead of wrapping the
    error again, so the prefix appears once.
    """
    try:
        return _make_session(model, options or session_options())
    except HawqError:
        raise
    except Exception as exc:  # onnxruntime's exception types are not importable API
        if what is None:
            what = str(model) if isinstance(model, (str, Path)) else "the model"
        raise InvalidModelError(f"onnxruntime cannot load {what}: {_load_reason(exc)}") \
            from exc


def run_session(session: ort.InferenceSession, names: list[str] | None,
                feeds: dict[str, np.ndarray], where: str) -> list[np.ndarray]:
    """``session.run`` on user data; onnxruntime failing there (shapes only the graph
    constrains, a graph that is wrong only at run time) is one line naming the data."""
    try:
        return session.run(names, feeds)
    except Exception as exc:  # onnxruntime's exception types are not importable API
        raise InvalidDataError(f"{where}: onnxruntime cannot run the model on it: "
                               f"{_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _load_reason(exc: BaseException) -> str:
    """onnxruntime's first line without its own framing: "[ONNXRuntimeError] : 1 : FAIL :"
    and "Load model from PATH failed:" only repeat what the caller's message says."""
    reason = _first_line(exc)
    reason = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", reason)
    reason = re.sub(r"^Load model from .*? failed:\s*", "", reason)
    return reason or type(exc).__name__


def _make_session(model: onnx.ModelProto | str | Path,
                  options: ort.SessionOptions) -> ort.InferenceSession:
    providers = ["CPUExecutionProvider"]
    if isinstance(model, (str, Path)):
        return ort.InferenceSession(str(model), options, providers=providers)
    if not is_too_big_for_protobuf(model):
        if model.ir_version > required_ir_version(model) or model.ir_version < 3:
            model = _with_ir(model)
        return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    with tempfile.TemporaryDirectory(prefix="hawq-session-") as folder:
        path = save_model(model, Path(folder) / "model.onnx", external_data=True)
        return ort.InferenceSession(str(path), options, providers=providers)


def _with_ir(model: onnx.ModelProto) -> onnx.ModelProto:
    """A shallow fix for models built in memory with onnx's default (too new) IR version."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.ir_version = required_ir_version(model)
    return copy


__all__ = ["make_session", "run_session", "session_options"]
