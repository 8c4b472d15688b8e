"""Progress bars for long loops, only where a person is watching.

Why: a tqdm bar on a terminal is helpful; in logs, CI output or when stderr is captured it is
noise (and the CLI promises one-line errors there). So the bar appears only when stderr is a
terminal.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")


def progress(iterable: Iterable[T], *, total: int | None = None,
             desc: str | None = None) -> Iterable[T]:
    """``iterable`` wrapped in a tqdm bar on an interactive stderr, else unchanged."""
    if not _interactive():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, leave=False)


def _interactive() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


__all__ = ["progress"]
