"""Stored unperturbed forward passes, so a pass that changes a few weights recomputes only
what depends on them.

Why: the mixed-precision search measures hundreds of losses with one or two layers
quantized. Every node upstream of the first changed weight computes exactly what the float
pass computed, so its outputs can be read back instead (on a chain of layers that is half
the work on average, more for the late layers). The stored tensors are bounded by a byte
budget shared by all micro-batches: what does not fit is recomputed, never approximated.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import torch

#: default bytes of stored activations per :class:`CleanPasses`.
DEFAULT_BUDGET_BYTES = 1 << 30


@dataclass
class CleanPasses:
    """Tensors of the float (unperturbed) forward pass, per micro-batch key."""

    budget_bytes: int = DEFAULT_BUDGET_BYTES
    used_bytes: int = 0
    _passes: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    #: tensors that did not fit the budget (recomputed on every reuse).
    dropped: int = 0

    def recorder(self, key: int) -> Recording:
        """Where the float pass of micro-batch ``key`` stores its tensors."""
        stored = self._passes.setdefault(key, {})
        return Recording(self, stored)

    def reuse(self, key: int, changed: Collection[str]) -> Reuse | None:
        """What a pass of micro-batch ``key`` with ``changed`` weights may read back (None
        when that batch was never recorded)."""
        stored = self._passes.get(key)
        return None if stored is None else Reuse(stored, frozenset(changed))

    def __len__(self) -> int:
        return len(self._passes)


@dataclass
class Recording:
    """One micro-batch's float pass being stored, within the owner's budget."""

    owner: CleanPasses
    stored: dict[str, torch.Tensor]

    def keep(self, name: str, value: object) -> None:
        if not isinstance(value, torch.Tensor) or name in self.stored:
            return
        size = value.numel() * value.element_size()
        if self.owner.used_bytes + size > self.owner.budget_bytes:
            self.owner.dropped += 1
            return
        self.stored[name] = value.detach()
        self.owner.used_bytes += size


@dataclass(frozen=True)
class Reuse:
    """A pass that may read back ``stored`` tensors of nodes no ``changed`` weight (nor any
    hooked tensor) reaches."""

    stored: Mapping[str, torch.Tensor]
    changed: frozenset[str]


__all__ = ["DEFAULT_BUDGET_BYTES", "CleanPasses", "Recording", "Reuse"]
