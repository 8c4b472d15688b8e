"""Restrictions of the Hessian to groups of blocks, as flat-vector operators.

A group is a list of layer indices: ``[l]`` is the layer's diagonal block ``H_ll``, and all
indices is the whole Hessian. :func:`group_apply` turns the block-vector HVP into the
``apply(problems, vectors)`` callback the Lanczos and power-iteration loops expect.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hawq_onnx.hessian.blocks import rademacher
from hawq_onnx.hessian.hvp import HessianVectorProduct
from hawq_onnx.hessian.lanczos import ApplyFn


def group_apply(hvp: HessianVectorProduct, groups: Sequence[Sequence[int]]) -> ApplyFn:
    """``apply(problems, flats)``: problem p's vector lives on ``groups[p]``'s blocks."""
    layout = hvp.layout

    def apply(problems: list[int], flats: list[torch.Tensor]) -> list[torch.Tensor]:
        vectors = [layout.split(flat, groups[p]) for p, flat in zip(problems, flats,
                                                                    strict=True)]
        products = hvp.apply(vectors, outputs=[list(groups[p]) for p in problems])
        return [layout.join(prod, groups[p]) for p, prod in zip(problems, products,
                                                                strict=True)]

    return apply


def random_starts(hvp: HessianVectorProduct, groups: Sequence[Sequence[int]],
                  generator: torch.Generator, count: int = 1) -> list[torch.Tensor]:
    """``count`` Rademacher start vectors per group, group by group."""
    return [rademacher(generator, (hvp.layout.size_of(g),), hvp.dtype, hvp.device)
            for g in groups for _ in range(count)]
