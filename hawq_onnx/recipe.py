"""Recipe files: a build step's options written down once, in TOML.

Why: a pipeline step should be reproducible from a file under version control, not from a
shell line someone edited. ``hawq-onnx quantize --config recipe.toml`` reads every option of
the subcommand from the recipe; flags on the command line still win. The recipe is generic:
any option of any subcommand's parser is a key, spelled as its long name (``weight-bits`` or
``weight_bits``) or its destination (``bias_correction = false`` for
``--no-bias-correction``); positional arguments go by their name (``model = "m.onnx"``).

Layout: top-level keys apply to the command being run; a table named after a command
(``[quantize]``, ``[analyze]``) applies only to that command, so one recipe can drive a whole
pipeline. Values are validated with the parser's own type functions and choices; an unknown
key or a bad value is a one-line error naming the key and the file (exit 2). Relative paths
are resolved against the recipe's directory (like Cargo or tsconfig), not the working
directory, so the recipe means the same wherever the build runs.

After parsing, :func:`annotate` puts on ``args`` the resolved recipe (every effective option)
and the SHA-256 of every input file; :func:`provenance` bundles them with the tool versions
for reports, which is what makes a build auditable and its cache keys explainable.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from hawq_onnx import __version__
from hawq_onnx.errors import HawqError

CONFIG_OPTION = "--config"
#: destinations that name files a command reads (hashed into the report).
INPUT_DESTS = ("model", "float_model", "quant_model", "calib", "eval", "check")
#: input destinations that name ONNX models (their external data is hashed with them).
_MODEL_DESTS = frozenset({"model", "float_model", "quant_model"})
#: options that change what is printed, not what is built (left out of the resolved recipe).
PRESENTATION_DESTS = frozenset({"help", "version", "config", "verbose", "json"})
#: packages whose versions can change the bytes a build produces.
_VERSIONED = ("onnx", "onnxruntime", "numpy", "torch")
_HASH_CHUNK = 1 << 20


class RecipeError(HawqError):
    """The recipe file is unreadable, or names an unknown option or a bad value."""


# ---------------------------------------------------------------------- reading
def _toml_module() -> Any:
    """stdlib ``tomllib`` (3.11+), else the ``tomli`` backport when installed."""
    try:
        import tomllib

        return tomllib
    except ModuleNotFoundError:
        try:
            import tomli  # type: ignore[import-not-found]

            return tomli
        except ModuleNotFoundError:
            raise RecipeError("--config needs Python >= 3.11 (tomllib) or the 'tomli' "
                              "package") from None


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The parsed TOML document; any failure is a one-line :class:`RecipeError`."""
    file = Path(path)
    toml = _toml_module()
    try:
        with open(file, "rb") as handle:
            return dict(toml.load(handle))
    except FileNotFoundError:
        raise RecipeError(f"{file}: no such recipe file") from None
    except IsADirectoryError:
        raise RecipeError(f"{file}: is a directory, not a recipe file") from None
    except OSError as exc:
        raise RecipeError(f"{file}: cannot read ({exc.strerror or exc})") from None
    except (toml.TOMLDecodeError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RecipeError(f"{file}: not valid TOML ({first})") from None


def find_config(argv: Sequence[str], parser: argparse.ArgumentParser) -> Path | None:
    """The ``--config`` value in ``argv`` (``--config X``, ``--config=X`` or an unambiguous
    abbreviation argparse would accept), before the recipe exists as parser defaults."""
    options = [opt for action in parser._actions for opt in action.option_strings]
    for index, token in enumerate(argv):
        if token == "--":
            break
        name, _, value = token.partition("=")
        if not name.startswith("--") or not CONFIG_OPTION.startswith(name) or len(name) < 3:
            continue
        if [opt for opt in options if opt.startswith(name)] != [CONFIG_OPTION]:
            continue
        if "=" in token:
            return Path(value)
        if index + 1 < len(argv):
            return Path(argv[index + 1])
    return None


# ---------------------------------------------------------------------- keys -> actions
def _normal(key: str) -> str:
    return key.strip().lstrip("-").replace("-", "_")


def _lookup(parser: argparse.ArgumentParser, key: str) -> tuple[argparse.Action, bool] | None:
    """The action a recipe key names, and whether it was named by a long option (as opposed
    to its destination). Long option names win over destinations."""
    wanted = _normal(key)
    for action in parser._actions:
        if any(_normal(opt) == wanted for opt in action.option_strings if opt.startswith("--")):
            return action, True
    for action in parser._actions:
        if action.dest == wanted and action.dest not in ("help", argparse.SUPPRESS):
            return action, False
    return None


def _is_flag(action: argparse.Action) -> bool:
    return action.nargs == 0


def _is_list(action: argparse.Action) -> bool:
    return isinstance(action, argparse._AppendAction) or action.nargs in ("*", "+")


def _text(value: Any) -> str:
    """A TOML scalar as the string argparse would have received on the command line."""
    if isinstance(value, bool):
        raise TypeError("expected a value, got true/false")
    if isinstance(value, (dict, list)):
        raise TypeError(f"expected a single value, got a {type(value).__name__}")
    return str(value)


def _convert_one(action: argparse.Action, value: Any, base: Path) -> Any:
    """One value through the parser's own type function and choices."""
    text = _text(value)
    converted: Any = text if action.type is None else action.type(text)  # type: ignore[misc]
    if action.choices is not None and converted not in action.choices:
        choices = ", ".join(str(c) for c in action.choices)
        raise ValueError(f"invalid choice {value!r} (choose from {choices})")
    if action.type is Path and not converted.is_absolute():
        converted = base / converted
    return converted


def _flag_value(action: argparse.Action, value: Any, by_option: bool) -> Any:
    """``--per-tensor``-style flags: true sets the flag; a destination key takes the value
    of the destination itself (``bias_correction = false``)."""
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {value!r}")
    if by_option:
        return action.const if value else action.default
    if isinstance(action.const, bool):
        return value
    raise TypeError("set it by its option name (true/false)")


def _convert(action: argparse.Action, value: Any, by_option: bool, base: Path) -> Any:
    if _is_flag(action):
        return _flag_value(action, value, by_option)
    if _is_list(action):
        items = value if isinstance(value, list) else [value]
        return [_convert_one(action, item, base) for item in items]
    if action.nargs == "?" and isinstance(value, bool):  # `--density` alone means its const
        return action.const if value else action.default
    return _convert_one(action, value, base)


def _section(document: Mapping[str, Any], command: str, commands: Sequence[str],
             source: Path) -> dict[str, Any]:
    """Top-level keys plus the ``[command]`` table; other commands' tables are skipped."""
    values: dict[str, Any] = {}
    for key, value in document.items():
        if key in commands and isinstance(value, dict):
            continue
        values[key] = value
    own = document.get(command)
    if isinstance(own, dict):
        values.update(own)
    elif own is not None and command in document:
        raise RecipeError(f"{source}: '{command}' must be a table ([{command}])")
    return values


def recipe_values(parser: argparse.ArgumentParser, command: str, document: Mapping[str, Any],
                  source: Path, commands: Sequence[str] = ()) -> dict[str, Any]:
    """Destination -> validated value for every key the recipe sets for ``command``."""
    values: dict[str, Any] = {}
    base = source.parent if str(source.parent) else Path(".")
    for key, raw in _section(document, command, commands, source).items():
        found = _lookup(parser, key)
        if found is None or _normal(key) in ("help", "config"):
            what = "recipes do not nest" if _normal(key) == "config" else \
                f"unknown option for 'hawq-onnx {command}'"
            raise RecipeError(f"{source}: '{key}': {what}")
        action, by_option = found
        try:
            values[action.dest] = _convert(action, raw, by_option, base)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
            raise RecipeError(f"{source}: '{key}' = {raw!r}: {exc}".splitlines()[0]) from None
    return values


def _given_on_command_line(action: argparse.Action, argv: Sequence[str]) -> bool:
    names = [opt for opt in action.option_strings if opt.startswith("--")]
    return any(token == name or token.startswith(name + "=") for token in argv
               for name in names) or any(token in action.option_strings for token in argv)


def apply_recipe(parser: argparse.ArgumentParser, values: Mapping[str, Any],
                 argv: Sequence[str]) -> None:
    """Make ``values`` the parser's defaults, so anything on the command line wins.

    Positionals and required options the recipe provides become optional. A repeatable
    option (``--exclude``) given on the command line replaces the recipe's list rather than
    appending to it.
    """
    for action in parser._actions:
        if action.dest not in values:
            continue
        if _is_list(action) and action.option_strings and _given_on_command_line(action, argv):
            continue
        action.default = values[action.dest]
        action.required = False
        if not action.option_strings:  # a positional argument
            action.nargs = "?"


# ---------------------------------------------------------------------- after parsing
def _plain(value: Any) -> Any:
    """JSON/TOML-friendly form of a parsed value."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def resolved_recipe(parser: argparse.ArgumentParser, args: argparse.Namespace
                    ) -> dict[str, Any]:
    """Every effective option of the command, keyed by destination (a valid recipe)."""
    resolved: dict[str, Any] = {}
    for action in parser._actions:
        dest = action.dest
        if dest in PRESENTATION_DESTS or dest == argparse.SUPPRESS or not hasattr(args, dest):
            continue
        resolved[dest] = _plain(getattr(args, dest))
    return resolved


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # JSON string escapes are valid TOML basic-string escapes


def dump_recipe(values: Mapping[str, Any], command: str | None = None) -> str:
    """A resolved recipe as TOML that :func:`read_recipe` reads back to the same options
    (unset options, which TOML cannot express, are left out: they take their defaults)."""
    lines = [f"[{command}]"] if command else []
    lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()
              if value is not None]
    return "\n".join(lines) + "\n"


def file_sha256(path: Path) -> str | None:
    """Hex SHA-256 of a regular file, None when it is not one (the command reports that)."""
    import hashlib

    try:
        if not path.is_file():
            return None
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
                digest.update(chunk)
        return digest.hexdigest()
    except OSError:
        return None


def _model_sha256(path: Path) -> str | None:
    """:func:`file_sha256` for an ONNX model: its external data files count too."""
    from hawq_onnx.model_io import model_files_sha256  # onnx only when a model is hashed

    try:
        return model_files_sha256(path) if path.is_file() else None
    except OSError:
        return None


def input_hashes(args: argparse.Namespace) -> dict[str, dict[str, str]]:
    """``{dest: {"path", "sha256"}}`` for every input file that exists; a model's digest
    covers the external data files it references (``model_io.model_files_sha256``)."""
    hashes: dict[str, dict[str, str]] = {}
    for dest in INPUT_DESTS:
        value = getattr(args, dest, None)
        if not isinstance(value, Path):
            continue
        digest = _model_sha256(value) if dest in _MODEL_DESTS else file_sha256(value)
        if digest is not None:
            hashes[dest] = {"path": str(value), "sha256": digest}
    return hashes


def annotate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Set ``args.resolved_recipe`` and ``args.input_hashes`` (what reports record)."""
    args.resolved_recipe = resolved_recipe(parser, args)
    args.input_hashes = input_hashes(args)


def tool_versions() -> dict[str, str]:
    """hawq-onnx, Python and the libraries that shape the output bytes (metadata only:
    nothing is imported)."""
    versions = {"hawq-onnx": __version__, "python": sys.version.split()[0]}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def provenance(args: argparse.Namespace) -> dict[str, Any]:
    """The ``build`` section of a report: command, resolved recipe, recipe file, input
    hashes and tool versions. Deterministic (no clock, no host name)."""
    config = getattr(args, "config", None)
    return {
        "command": getattr(args, "command", None),
        "tool": "hawq-onnx",
        "version": __version__,
        "versions": tool_versions(),
        "recipe_file": None if config is None else
        {"path": str(config), "sha256": file_sha256(Path(config))},
        "recipe": getattr(args, "resolved_recipe", {}),
        "inputs": getattr(args, "input_hashes", {}),
    }


__all__ = ["CONFIG_OPTION", "RecipeError", "annotate", "apply_recipe", "dump_recipe", "find_config",
           "input_hashes", "provenance", "read_recipe", "recipe_values", "resolved_recipe"]
