"""The one pass interface shared by every graph rewrite."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import onnx


@dataclass
class PassReport:
    """What a pass did: how many rewrites and a line per notable change."""

    name: str
    changed: int = 0
    details: list[str] = field(default_factory=list)

    def note(self, message: str) -> None:
        self.changed += 1
        self.details.append(message)

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "changed": self.changed, "details": list(self.details)}


class GraphPass(Protocol):
    """A graph pass: ``model -> (model, report)``; the input model is left untouched."""

    def __call__(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, PassReport]: ...


def run_passes(
    model: onnx.ModelProto, passes: Iterable[GraphPass]
) -> tuple[onnx.ModelProto, list[PassReport]]:
    """Apply passes in order, collecting their reports."""
    reports: list[PassReport] = []
    for graph_pass in passes:
        model, report = graph_pass(model)
        reports.append(report)
    return model, reports
