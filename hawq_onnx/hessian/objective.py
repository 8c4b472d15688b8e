"""The calibration objective: micro-batches, float targets and the loss of a forward pass.

Why a separate object: every estimator (weight HVPs, activation traces, gradients for the
bench) needs the same thing: "for each micro-batch, the loss and its weight". Targets for KL
and MSE are the float model's outputs, computed once here (outputs are small next to the
activations, which are never kept beyond one micro-batch).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hawq_onnx.errors import InvalidDataError
from hawq_onnx.hessian.losses import OutputLoss, output_loss, resolve_losses
from hawq_onnx.mirror.dtypes import to_torch
from hawq_onnx.mirror.module import Mirror


@dataclass
class MicroBatch:
    """One slice of calibration data, kept on the CPU until it is used."""

    feeds: dict[str, torch.Tensor]
    size: int
    labels: torch.Tensor | None = None
    targets: tuple[torch.Tensor | None, ...] = ()


class Objective:
    """``L(θ) = Σ_b (n_b / N) · loss_b(θ)`` over the calibration micro-batches."""

    def __init__(
        self,
        mirror: Mirror,
        batches: Iterable[Mapping[str, np.ndarray]],
        labels: np.ndarray | None = None,
        loss: str = "auto",
        outputs: Sequence[str] | None = None,
        temperature: float = 1.0,
    ) -> None:
        self.mirror = mirror
        self.temperature = float(temperature)
        self.batches = _micro_batches(mirror, batches, labels)
        if not self.batches:
            raise InvalidDataError("no calibration samples")
        self.total = sum(b.size for b in self.batches)
        first = self._float_outputs(self.batches[0])
        self.losses: list[OutputLoss] = resolve_losses(
            loss, mirror.output_names, first, outputs, labels is not None)
        self._fill_targets()

    def weight(self, batch: MicroBatch) -> float:
        return batch.size / self.total

    def device(self) -> torch.device:
        for tensor in self.mirror.parameters():
            return tensor.device
        for tensor in self.mirror.buffers():
            return tensor.device
        return torch.device("cpu")

    def feeds(self, batch: MicroBatch) -> dict[str, torch.Tensor]:
        device = self.device()
        return {k: v.to(device) for k, v in batch.feeds.items()}

    def loss(self, outputs: Sequence[torch.Tensor], batch: MicroBatch) -> torch.Tensor:
        """The batch's mean loss given the mirror's outputs."""
        device = outputs[self.losses[0].index].device
        labels = batch.labels.to(device) if batch.labels is not None else None
        total: torch.Tensor | None = None
        for spec, target in zip(self.losses, batch.targets, strict=True):
            value = output_loss(spec, outputs[spec.index],
                                target.to(device) if target is not None else None,
                                labels, self.temperature)
            total = value if total is None else total + value
        assert total is not None
        return total

    def batch_loss(self, batch: MicroBatch) -> torch.Tensor:
        """Forward through the mirror as it is (parameters, hooks) and return the loss."""
        return self.loss(self.mirror(**self.feeds(batch)), batch)

    # ------------------------------------------------------------------ set-up
    def _float_outputs(self, batch: MicroBatch) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            return tuple(o.detach() for o in self.mirror(**self.feeds(batch)))

    def _fill_targets(self) -> None:
        needs_target = [spec.kind in ("kl", "mse") for spec in self.losses]
        for batch in self.batches:
            outputs = self._float_outputs(batch) if any(needs_target) else ()
            batch.targets = tuple(
                outputs[spec.index].cpu() if need else None
                for spec, need in zip(self.losses, needs_target, strict=True))


def _micro_batches(mirror: Mirror, batches: Iterable[Mapping[str, np.ndarray]],
                   labels: np.ndarray | None) -> list[MicroBatch]:
    """Convert numpy batches; labels are sliced in order, batch by batch."""
    out: list[MicroBatch] = []
    offset = 0
    for feeds in batches:
        missing = [n for n in mirror.input_names if n not in feeds]
        if missing:
            raise InvalidDataError(f"calibration batch lacks model input(s) {missing}")
        tensors = {n: to_torch(np.asarray(feeds[n])) for n in mirror.input_names}
        size = _batch_size(tensors)
        batch_labels = None
        if labels is not None:
            if offset + size > len(labels):
                raise InvalidDataError(
                    f"{len(labels)} labels for at least {offset + size} samples")
            batch_labels = torch.as_tensor(np.asarray(labels[offset:offset + size]))
        offset += size
        out.append(MicroBatch(tensors, size, batch_labels))
    if labels is not None and offset != len(labels):
        raise InvalidDataError(f"{len(labels)} labels for {offset} samples")
    return out


def _batch_size(tensors: Mapping[str, torch.Tensor]) -> int:
    for tensor in tensors.values():
        if tensor.dim() > 0:
            return int(tensor.shape[0])
    return 1
