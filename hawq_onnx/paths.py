"""Checks on a command's file arguments before any work starts.

Why: a build step must never destroy its own inputs (``--report model.onnx`` would replace the
model with JSON; ``-o calib.npz`` the calibration data) and should not spend minutes on a
build whose report cannot be written. So before a command runs, every output path is checked
against every input path (same file, also through symlinks and hard links) and against the
other outputs, and must sit in an existing directory. Each failure is one line, exit 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hawq_onnx.errors import HawqError
from hawq_onnx.model_io import same_file
from hawq_onnx.recipe import INPUT_DESTS

#: destinations of files a command writes.
OUTPUT_DESTS = ("output", "report", "report_html", "plot")
#: inputs beyond the data and models: the recipe itself must survive too.
_PROTECTED = (*INPUT_DESTS, "config")


def _flag(dest: str) -> str:
    return "-o/--output" if dest == "output" else "--" + dest.replace("_", "-")


def _paths(args: argparse.Namespace, dests: tuple[str, ...]) -> list[tuple[str, Path]]:
    return [(dest, value) for dest in dests
            if isinstance(value := getattr(args, dest, None), Path)]


def check_paths(args: argparse.Namespace) -> None:
    """Refuse outputs that overwrite an input or another output, or have no directory."""
    inputs = _paths(args, _PROTECTED)
    outputs = _paths(args, OUTPUT_DESTS)
    for index, (dest, path) in enumerate(outputs):
        for source, original in inputs:
            if same_file(path, original):
                raise HawqError(f"refusing to overwrite the input {original} ({_flag(source)}) "
                                f"with {_flag(dest)}; choose another path")
        for other, other_path in outputs[:index]:
            if same_file(path, other_path):
                raise HawqError(f"{_flag(other)} and {_flag(dest)} are the same file "
                                f"{path}; choose different paths")
        parent = path.parent if str(path.parent) else Path(".")
        if path.is_dir():
            raise HawqError(f"cannot write {_flag(dest)} {path}: it is a directory")
        if not parent.is_dir():
            raise HawqError(f"cannot write {_flag(dest)} {path}: directory {parent} does not "
                            "exist")


__all__ = ["OUTPUT_DESTS", "check_paths"]
