"""Error types that map to the CLI's exit codes.

Every failure a user can cause (bad file, bad data, unsupported graph) raises a subclass of
:class:`HawqError`; the CLI prints its one-line message and exits with ``exit_code``. Anything
else is a bug and surfaces as a traceback only under ``--verbose``.
"""

from __future__ import annotations


class HawqError(Exception):
    """Base class for user-facing errors. ``str(err)`` is a single line."""

    exit_code: int = 2


class InvalidModelError(HawqError):
    """The file is not a usable ONNX model (garbage, truncated, fails the checker)."""


class UnsafeExternalDataError(InvalidModelError):
    """An external-data location is absolute or escapes the model's directory."""


class AlreadyQuantizedError(InvalidModelError):
    """The graph already contains quantization ops; quantizing again would be silent damage."""


class OpsetConversionError(InvalidModelError):
    """Upgrading the model's opset failed or produced a model onnxruntime cannot load."""


class UnsupportedOpError(HawqError):
    """The mirror has no implementation for one or more op types in the model."""

    def __init__(self, op_types: list[str]):
        self.op_types = sorted(set(op_types))
        super().__init__(
            "unsupported op type(s) in the model: " + ", ".join(self.op_types)
        )


class InvalidDataError(HawqError):
    """A data file (.npz) does not match the model's inputs."""


class GateFailedError(HawqError):
    """A quality gate failed; outputs were still written."""

    exit_code = 1
