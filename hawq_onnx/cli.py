"""The ``hawq-onnx`` command line: a thin wrapper over the Python API.

Each subcommand lives in ``hawq_onnx/commands/<name>.py`` and exposes
``add_parser(subparsers) -> argparse.ArgumentParser`` whose parser sets ``func`` to a
``run(args) -> int`` function. This module only dispatches and maps errors to exit codes:
0 ok, 1 a quality gate failed, 2 bad input or usage (one line on stderr, a traceback only
with ``--verbose``), 130 interrupted.

Two options exist for every subcommand: ``--config recipe.toml`` (see
:mod:`hawq_onnx.recipe`: the recipe becomes the parser's defaults, flags still win) and
``--json`` (one JSON object on stdout: ``command``, ``exit_code``, ``error`` and the
command's ``result``, which a command provides by setting ``args.json_summary``; its text
output is suppressed). A command with its own ``--json`` (inspect) prints its own object on
success.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import math
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hawq_onnx import __version__
from hawq_onnx.errors import HawqError
from hawq_onnx.paths import check_paths
from hawq_onnx.recipe import (
    CONFIG_OPTION,
    RecipeError,
    annotate,
    apply_recipe,
    find_config,
    read_recipe,
    recipe_values,
)

COMMANDS = ("inspect", "analyze", "quantize", "validate")


class _Parser(argparse.ArgumentParser):
    """argparse exits with 2 on usage errors already; keep its message to one line.

    The top-level parser also remembers each subcommand's parser (recipes are applied to it)
    and which subcommands print their own ``--json`` object."""

    subcommand_parsers: dict[str, argparse.ArgumentParser]
    native_json: set[str]

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"hawq-onnx: error: {message}\n")
        raise SystemExit(2)


def build_parser(only: str | None = None) -> _Parser:
    """The full parser; with ``only``, just that subcommand's module is imported (some pull in
    torch, which costs seconds a command like ``validate`` does not need to pay)."""
    parser = _Parser(prog="hawq-onnx", description="Hessian-aware mixed-precision post-training "
                     "quantization for ONNX models.")
    parser.add_argument("--version", action="version", version=f"hawq-onnx {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    parser.subcommand_parsers, parser.native_json = {}, set()
    for name in (only,) if only in COMMANDS else COMMANDS:
        try:
            module = importlib.import_module(f"hawq_onnx.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"hawq_onnx.commands.{name}":
                continue  # that command is not built yet
            raise
        sub = module.add_parser(subparsers)
        sub.add_argument("--verbose", "-v", action="store_true",
                         help="print details and a traceback on errors")
        sub.add_argument(CONFIG_OPTION, type=Path, metavar="RECIPE.toml",
                         help="read options from a TOML recipe (command-line flags win)")
        if any("--json" in action.option_strings for action in sub._actions):
            parser.native_json.add(name)
        else:
            sub.add_argument("--json", action="store_true",
                             help="print one JSON summary object on stdout")
        parser.subcommand_parsers[name] = sub
    return parser


def _load_recipe(parser: _Parser, argv: list[str]) -> None:
    """Turn ``--config`` into parser defaults before ``argv`` is parsed."""
    command = argv[0] if argv else ""
    sub = parser.subcommand_parsers.get(command)
    if sub is None:
        return
    config = find_config(argv[1:], sub)
    if config is None:
        return
    values = recipe_values(sub, command, read_recipe(config), config, COMMANDS)
    apply_recipe(sub, values, argv[1:])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(only=argv[0] if argv else None)
    try:
        _load_recipe(parser, argv)
    except RecipeError as exc:
        print(f"hawq-onnx: error: {exc}", file=sys.stderr)
        return exc.exit_code
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    annotate(args, parser.subcommand_parsers[args.command])
    capture = args.json and args.command not in parser.native_json
    with contextlib.redirect_stdout(io.StringIO()) if capture else contextlib.nullcontext():
        code, error = _dispatch(args)
    if args.json and (capture or error is not None):
        _print_json(args, code, error)
    return code


def _dispatch(args: argparse.Namespace) -> tuple[int, str | None]:
    """Run the command; map every outcome to (exit code, one-line error or None)."""
    try:
        check_paths(args)  # no output may overwrite an input; fail before the slow part
        return int(args.func(args)), None
    except HawqError as exc:
        if args.verbose:
            traceback.print_exc()
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"hawq-onnx: error: {message}", file=sys.stderr)
        return exc.exit_code, message
    except BrokenPipeError:  # e.g. `hawq-onnx inspect m.onnx | head`: not an error
        sys.stderr.close()
        return 0, None
    except KeyboardInterrupt:
        print("hawq-onnx: interrupted", file=sys.stderr)
        return 130, "interrupted"
    except OSError as exc:  # the environment (disk full, no permission), not the input or a bug
        if args.verbose:
            traceback.print_exc()
        where = f": {exc.filename}" if exc.filename else ""
        message = f"{exc.strerror or type(exc).__name__}{where}"
        print(f"hawq-onnx: error: {message}", file=sys.stderr)
        return 2, message
    except Exception as exc:  # a bug: still one line unless --verbose
        if args.verbose:
            traceback.print_exc()
        detail = str(exc).splitlines()[0] if str(exc) else ""
        message = f"internal error: {type(exc).__name__}: {detail}"
        print(f"hawq-onnx: {message} (rerun with --verbose for a traceback)", file=sys.stderr)
        return 2, message


def _json_ready(value: Any) -> Any:
    """JSON has no NaN/Infinity and no paths: such values become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _print_json(args: argparse.Namespace, code: int, error: str | None) -> None:
    summary = {"command": args.command, "exit_code": code, "error": error,
               "result": getattr(args, "json_summary", None)}
    print(json.dumps(_json_ready(summary), indent=2, allow_nan=False))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
