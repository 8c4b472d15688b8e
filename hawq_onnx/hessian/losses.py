"""Losses whose curvature the analysis measures, one per selected model output.

Why label-free by default: post-training quantization usually has no labels. The KL
divergence from the float model's own output distribution has zero gradient at the float
weights and a positive semi-definite Hessian there (the Gauss–Newton/Fisher matrix), so its
traces are non-negative and layer rankings are stable. Outputs that are not class scores
(embeddings, maps, regressions) use the mean squared error to the float outputs, which has
the same two properties. With labels, the task loss (cross-entropy) is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hawq_onnx.errors import HawqError, InvalidDataError

LOSS_KINDS = ("auto", "kl", "ce", "mse")


@dataclass(frozen=True)
class OutputLoss:
    """How one model output enters the loss."""

    index: int  # position among the mirror's outputs
    name: str
    kind: str  # "kl", "ce" or "mse"
    probabilities: bool = False  # the output is already a distribution (ends in Softmax)


def looks_like_class_scores(output: torch.Tensor) -> bool:
    """A floating [batch, classes] tensor with at least two classes."""
    return output.is_floating_point() and output.dim() == 2 and output.shape[-1] >= 2


def looks_like_probabilities(output: torch.Tensor) -> bool:
    """Non-negative rows along the last axis summing to one: the model already applied a
    softmax. Any rank ≥ 2: ``[batch, classes]``, or one distribution per position
    (``[batch, steps, classes]`` of a CTC text recognizer, channels-last segmentation)."""
    if (not output.is_floating_point() or output.dim() < 2 or output.shape[-1] < 2
            or output.numel() == 0):
        return False
    sums = output.sum(dim=-1)
    return bool((output >= 0).all() and torch.allclose(sums, torch.ones_like(sums), atol=1e-3))


def resolve_losses(
    kind: str,
    output_names: Sequence[str],
    float_outputs: Sequence[torch.Tensor],
    selected: Sequence[str] | None,
    has_labels: bool,
) -> list[OutputLoss]:
    """Choose the loss for each selected output from the float outputs of one batch.

    ``auto`` means cross-entropy when labels are given, otherwise KL for class scores and
    MSE for everything else; an output of rank ≥ 3 that holds a distribution per position
    gets KL per position (labels, one per sample, do not fit it). Why not MSE there: on
    probabilities it barely sees a confident prediction losing mass to the other classes.
    """
    if kind not in LOSS_KINDS:
        raise HawqError(f"unknown loss {kind!r}; choose one of {', '.join(LOSS_KINDS)}")
    names = _selected_outputs(output_names, float_outputs, selected)
    losses: list[OutputLoss] = []
    for name in names:
        index = list(output_names).index(name)
        out = float_outputs[index]
        chosen = kind
        if kind == "auto":
            if looks_like_class_scores(out):
                chosen = "ce" if has_labels else "kl"
            elif looks_like_probabilities(out):
                chosen = "kl"
            else:
                chosen = "mse"
        losses.append(OutputLoss(index, name, chosen, looks_like_probabilities(out)))
    ce = [loss for loss in losses if loss.kind == "ce"]
    if ce and not has_labels:
        raise HawqError("--loss ce needs labels (--labels-key)")
    if len(ce) > 1:
        raise HawqError("labels fit one output; choose it with --outputs")
    return losses


def _selected_outputs(
    output_names: Sequence[str], float_outputs: Sequence[torch.Tensor],
    selected: Sequence[str] | None,
) -> list[str]:
    if selected:
        unknown = [n for n in selected if n not in output_names]
        if unknown:
            raise HawqError(f"unknown output(s) {unknown}; the model has {list(output_names)}")
        return list(dict.fromkeys(selected))
    names = [n for n, o in zip(output_names, float_outputs, strict=True)
             if isinstance(o, torch.Tensor) and o.is_floating_point()]
    if not names:
        raise HawqError("the model has no floating-point output to build a loss on")
    return names


def output_loss(
    spec: OutputLoss,
    output: torch.Tensor,
    target: torch.Tensor | None,
    labels: torch.Tensor | None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The mean loss of one output over the batch (and any positions within a sample)."""
    if spec.kind == "mse":
        assert target is not None
        # written out: F.mse_loss's backward trips forward-mode AD (immutable ZeroTensor)
        return (output - target).square().mean()
    log_q = _log_distribution(output, spec.probabilities, temperature)
    if spec.kind == "kl":
        assert target is not None
        log_p = _log_distribution(target, spec.probabilities, temperature)
        kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
        return kl.mean()
    assert labels is not None
    classes = log_q.shape[-1]
    if labels.numel() * classes != log_q.numel():
        raise HawqError(f"labels of shape {tuple(labels.shape)} do not fit output "
                        f"{spec.name!r} of shape {tuple(output.shape)}")
    _check_class_indices(labels, classes, spec.name)
    return F.nll_loss(log_q.reshape(-1, classes), labels.reshape(-1).long())


def _check_class_indices(labels: torch.Tensor, classes: int, name: str) -> None:
    """Labels must be whole numbers in [0, classes): torch's nll_loss would raise an
    IndexError on anything else (or read garbage for fractional labels)."""
    flat = labels.reshape(-1)
    if not flat.numel():
        return
    fractional = flat.is_floating_point() and not bool(torch.equal(flat, flat.round()))
    low, high = float(flat.min()), float(flat.max())
    if fractional or low < 0 or high >= classes:
        raise InvalidDataError(f"labels must be class indices in [0, {classes}) for output "
                               f"{name!r}; found values in [{low:g}, {high:g}]"
                               + (" (not whole numbers)" if fractional else ""))


def _log_distribution(values: torch.Tensor, probabilities: bool,
                      temperature: float) -> torch.Tensor:
    if probabilities:
        log_p = values.clamp_min(1e-12).log()
        return log_p if temperature == 1.0 else torch.log_softmax(log_p / temperature, dim=-1)
    return torch.log_softmax(values / temperature, dim=-1)
