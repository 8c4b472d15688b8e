"""Block vectors: one tensor per quantizable weight, addressed by layer index.

Why: estimators work on flat vectors (dot products, Lanczos bases) while HVPs need tensors
shaped like the weights. A :class:`BlockLayout` converts between the two and lets a vector
cover only some layers (``{index: tensor}``), so per-layer products never materialize the
zero blocks of every other layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

BlockVector = dict[int, torch.Tensor]


@dataclass(frozen=True)
class BlockLayout:
    """Names and shapes of the weight blocks, in a fixed order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> BlockLayout:
        return cls(tuple(tensors), tuple(tuple(t.shape) for t in tensors.values()))

    def __len__(self) -> int:
        return len(self.names)

    @property
    def sizes(self) -> list[int]:
        return [_numel(s) for s in self.shapes]

    @property
    def dim(self) -> int:
        return sum(self.sizes)

    def size_of(self, blocks: Sequence[int]) -> int:
        sizes = self.sizes
        return sum(sizes[b] for b in blocks)

    def split(self, flat: torch.Tensor, blocks: Sequence[int]) -> BlockVector:
        """A flat vector over ``blocks`` (concatenated in that order) as shaped blocks."""
        sizes = self.sizes
        out: BlockVector = {}
        offset = 0
        for b in blocks:
            out[b] = flat[offset:offset + sizes[b]].view(self.shapes[b])
            offset += sizes[b]
        if offset != flat.numel():
            raise ValueError(f"flat vector has {flat.numel()} entries, blocks need {offset}")
        return out

    def join(self, vector: BlockVector, blocks: Sequence[int]) -> torch.Tensor:
        """The inverse of :meth:`split`."""
        return torch.cat([vector[b].reshape(-1) for b in blocks])


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def rademacher(generator: torch.Generator, shape: Sequence[int], dtype: torch.dtype,
               device: torch.device | str) -> torch.Tensor:
    """±1 entries drawn on the CPU generator (so CPU and CUDA runs see the same probes)."""
    bits = torch.randint(0, 2, tuple(shape), generator=generator, dtype=torch.int8)
    return (bits.to(dtype) * 2 - 1).to(device)
