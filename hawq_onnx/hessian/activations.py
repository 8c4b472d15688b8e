"""Hessian traces w.r.t. activation tensors (HAWQ-V2's activation sensitivity).

A mirror hook adds a zero perturbation variable δ to each activation tensor as it is
produced; the HVP is taken w.r.t. the δs, so one Rademacher probe over all activations gives
every tensor's trace (the same block trick as for weights). The loss is a batch mean, so the
trace over the whole calibration set equals the mean per-sample trace
``(1/N) Σ_n Tr(∂²ℓ_n/∂a_n²)``, the quantity the activation sensitivity multiplies with the
per-sample quantization error. A perturbed tensor is perturbed for all of its consumers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from hawq_onnx.hessian.blocks import rademacher
from hawq_onnx.hessian.hutchinson import Sampler
from hawq_onnx.hessian.hvp import only_requires_grad
from hawq_onnx.hessian.objective import MicroBatch, Objective
from hawq_onnx.mirror.module import Mirror


def activation_sampler(objective: Objective, tensor_names: Sequence[str],
                       generator: torch.Generator) -> Sampler:
    """``sample(k, active)`` → [k, tensors] Hutchinson samples of each activation Hessian's
    trace (NaN for tensors not in ``active``)."""
    names = list(tensor_names)

    def sample(k: int, active: np.ndarray) -> np.ndarray:
        chosen = [n for n, on in zip(names, active, strict=True) if on]
        totals = np.zeros((k, len(chosen)))
        for batch in objective.batches:
            rows = _batch_samples(objective, batch, chosen, k, generator)
            totals += objective.weight(batch) * rows
        out = np.full((k, len(names)), np.nan)
        out[:, np.flatnonzero(active)] = totals
        return out

    return sample


def reached_tensors(objective: Objective, tensor_names: Sequence[str]) -> list[str]:
    """The names among ``tensor_names`` that a forward pass produces as float tensors
    (constants folded at construction never reach a hook)."""
    deltas = _perturb_and_run(objective, objective.batches.first(), list(tensor_names))[1]
    return [n for n in tensor_names if n in deltas]


def _batch_samples(objective: Objective, batch: MicroBatch, names: list[str], k: int,
                   generator: torch.Generator) -> np.ndarray:
    rows = np.zeros((k, len(names)))
    loss, deltas = _perturb_and_run(objective, batch, names)
    present = [n for n in names if n in deltas]
    if not present or not loss.requires_grad:
        return rows
    leaves = [deltas[n] for n in present]
    grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
    columns = [names.index(n) for n in present]
    for j in range(k):
        probes = [rademacher(generator, d.shape, d.dtype, d.device) for d in leaves]
        terms = [(g * z).sum() for g, z in zip(grads, probes, strict=True)
                 if g is not None and g.requires_grad]
        if not terms:
            continue
        hz = torch.autograd.grad(torch.stack(terms).sum(), leaves,
                                 retain_graph=j < k - 1, allow_unused=True)
        for col, z, h in zip(columns, probes, hz, strict=True):
            if h is not None:
                rows[j, col] = float((z.double() * h.double()).sum())
    return rows


def _perturb_and_run(objective: Objective, batch: MicroBatch,
                     names: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward with ``a + δ`` on each named float tensor; weights are treated as constants."""
    mirror: Mirror = objective.mirror
    deltas: dict[str, torch.Tensor] = {}

    def hook(name: str, tensor: torch.Tensor) -> torch.Tensor | None:
        if not (isinstance(tensor, torch.Tensor) and tensor.is_floating_point()):
            return None
        delta = torch.zeros_like(tensor, requires_grad=True)
        deltas[name] = delta
        return tensor + delta

    handles = [mirror.add_hook(n, hook) for n in names]
    try:
        with only_requires_grad(mirror, []):
            loss = objective.batch_loss(batch)
    finally:
        for handle in handles:
            handle.remove()
    return loss, deltas
