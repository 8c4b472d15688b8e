"""The ``hawq-onnx`` command line: a thin wrapper over the Python API.

Each subcommand lives in ``hawq_onnx/commands/<name>.py`` and exposes
``add_parser(subparsers) -> argparse.ArgumentParser`` whose parser sets ``func`` to a
``run(args) -> int`` function. This module only dispatches and maps errors to exit codes:
0 ok, 1 a quality gate failed, 2 bad input or usage (one line on stderr, a traceback only
with ``--verbose``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Sequence

from hawq_onnx import __version__
from hawq_onnx.errors import HawqError

COMMANDS = ("inspect", "analyze", "quantize", "validate")


class _Parser(argparse.ArgumentParser):
    """argparse exits with 2 on usage errors already; keep its message to one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"hawq-onnx: error: {message}\n")
        raise SystemExit(2)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with ``only``, just that subcommand's module is imported (some pull in
    torch, which costs seconds a command like ``validate`` does not need to pay)."""
    parser = _Parser(prog="hawq-onnx", description="Hessian-aware mixed-precision post-training "
                     "quantization for ONNX models.")
    parser.add_argument("--version", action="version", version=f"hawq-onnx {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(only=argv[0] if argv else None)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args))
    except HawqError as exc:
        if args.verbose:
            traceback.print_exc()
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"hawq-onnx: error: {message}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # e.g. `hawq-onnx inspect m.onnx | head`: not an error
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("hawq-onnx: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: still one line unless --verbose
        if args.verbose:
            traceback.print_exc()
        detail = str(exc).splitlines()[0] if str(exc) else ""
        print(f"hawq-onnx: internal error: {type(exc).__name__}: {detail} "
              "(rerun with --verbose for a traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
