"""The calibration objective: micro-batches, float targets and the loss of a forward pass.

Why a separate object: every estimator (weight HVPs, activation traces, gradients for the
bench) needs the same thing: "for each micro-batch, the loss and its weight". Targets for KL
and MSE are the float model's outputs, computed once here.

Memory is bounded by one micro-batch whatever the number of samples: the batches are read
again from their source on every pass (a :class:`hawq_onnx.data.Batches` reads them from
the data file), and the float targets wait in an anonymous temporary file between passes
(outputs are usually small next to the inputs, but a dense-prediction model's are not).
"""

from __future__ import annotations

import tempfile
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO

import numpy as np
import torch

from hawq_onnx.errors import InvalidDataError
from hawq_onnx.hessian.losses import OutputLoss, output_loss, resolve_losses
from hawq_onnx.mirror.dtypes import to_torch
from hawq_onnx.mirror.module import Mirror

Feeds = Mapping[str, np.ndarray]


@dataclass
class MicroBatch:
    """One slice of calibration data, kept on the CPU until it is used."""

    feeds: dict[str, torch.Tensor]
    size: int
    labels: torch.Tensor | None = None
    targets: tuple[torch.Tensor | None, ...] = ()
    #: position in the pass (the key of anything stored per micro-batch).
    index: int = 0


class Objective:
    """``L(θ) = Σ_b (n_b / N) · loss_b(θ)`` over the calibration micro-batches.

    ``batches`` is iterated once per pass, so it should be re-iterable (a list, or a
    dataset's :meth:`~hawq_onnx.data.Dataset.batched` view that reads from disk); a one-shot
    iterator is kept as a list.
    """

    def __init__(
        self,
        mirror: Mirror,
        batches: Iterable[Feeds],
        labels: np.ndarray | None = None,
        loss: str = "auto",
        outputs: Sequence[str] | None = None,
        temperature: float = 1.0,
    ) -> None:
        self.mirror = mirror
        self.temperature = float(temperature)
        self.batches = MicroBatches(_reiterable(batches), mirror.input_names, labels)
        self.losses: list[OutputLoss] = []
        self.total = self._set_up(loss, outputs, labels is not None)

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

    def _set_up(self, loss: str, outputs: Sequence[str] | None, has_labels: bool) -> int:
        """One pass over the data: check it, resolve the losses on the first batch, and
        store the float targets the KL and MSE losses compare with. Returns the sample
        count."""
        needs_target: list[bool] = []
        total, count = 0, 0
        for index, batch in enumerate(self.batches):
            if index == 0:
                first = self._float_outputs(batch)
                self.losses = resolve_losses(loss, self.mirror.output_names, first, outputs,
                                             has_labels)
                needs_target = [spec.kind in ("kl", "mse") for spec in self.losses]
            if any(needs_target):
                values = first if index == 0 else self._float_outputs(batch)
                self.batches.store_targets(index, tuple(
                    values[spec.index].cpu() if need else None
                    for spec, need in zip(self.losses, needs_target, strict=True)))
            else:
                self.batches.store_targets(index, (None,) * len(self.losses))
            total, count = total + batch.size, count + 1
        if not count:
            raise InvalidDataError("no calibration samples")
        return total


class MicroBatches:
    """The micro-batches of an :class:`Objective`: every ``iter()`` is a new pass that reads
    the feeds from their source, slices the labels and fetches the stored targets, holding
    one micro-batch at a time."""

    def __init__(self, source: Iterable[Feeds], input_names: Sequence[str],
                 labels: np.ndarray | None) -> None:
        self._source = source
        self._names = list(input_names)
        self._labels = labels
        self._axes: Mapping[str, int | None] = getattr(source, "batch_axes", {})
        self._targets = _TargetStore()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[MicroBatch]:
        offset = 0
        for index, feeds in enumerate(self._source):
            batch = self._micro_batch(feeds, offset)
            batch.targets = self._targets.get(index)
            batch.index = index
            offset += batch.size
            yield batch
        if self._labels is not None and offset != len(self._labels):
            raise InvalidDataError(f"{len(self._labels)} labels for {offset} samples")

    def first(self) -> MicroBatch:
        """The first micro-batch (reads only it)."""
        for batch in self:
            return batch
        raise InvalidDataError("no calibration samples")

    def store_targets(self, index: int, targets: tuple[torch.Tensor | None, ...]) -> None:
        self._targets.put(index, targets)
        self._count = max(self._count, index + 1)

    def _micro_batch(self, feeds: Feeds, offset: int) -> MicroBatch:
        """Numpy feeds to CPU tensors; the labels of its samples, in order."""
        missing = [n for n in self._names if n not in feeds]
        if missing:
            raise InvalidDataError(f"calibration batch lacks model input(s) {missing}")
        tensors = {n: to_torch(np.asarray(feeds[n])) for n in self._names}
        size = _batch_size(tensors, self._axes)
        batch_labels = None
        if self._labels is not None:
            if offset + size > len(self._labels):
                raise InvalidDataError(
                    f"{len(self._labels)} labels for at least {offset + size} samples")
            batch_labels = torch.as_tensor(np.asarray(self._labels[offset:offset + size]))
        return MicroBatch(tensors, size, batch_labels)


class _TargetStore:
    """Float targets per micro-batch, in an anonymous temporary file (deleted with the store
    or the process): their total grows with the calibration set, one batch's does not."""

    def __init__(self) -> None:
        self._file: IO[bytes] | None = None
        self._size = 0
        self._entries: dict[int, tuple[tuple[int, torch.dtype, tuple[int, ...]] | None, ...]] = {}

    def put(self, index: int, targets: tuple[torch.Tensor | None, ...]) -> None:
        self._entries[index] = tuple(None if t is None else self._write(t) for t in targets)

    def get(self, index: int) -> tuple[torch.Tensor | None, ...]:
        return tuple(None if e is None else self._read(*e)
                     for e in self._entries.get(index, ()))

    def _write(self, tensor: torch.Tensor) -> tuple[int, torch.dtype, tuple[int, ...]]:
        if self._file is None:
            self._file = tempfile.TemporaryFile(prefix="hawq-targets-")  # noqa: SIM115
            weakref.finalize(self, self._file.close)
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        offset = self._size
        self._file.seek(offset)
        self._file.write(memoryview(data))
        self._size += data.nbytes
        return offset, tensor.dtype, tuple(tensor.shape)

    def _read(self, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
        buffer = np.empty(nbytes, np.uint8)
        if nbytes:
            assert self._file is not None
            self._file.seek(offset)
            if self._file.readinto(memoryview(buffer)) != nbytes:
                raise OSError("the temporary file of float targets is shorter than written")
        return torch.from_numpy(buffer).view(dtype).reshape(shape)


def _reiterable(batches: Iterable[Feeds]) -> Iterable[Feeds]:
    """Lists and views as they are; a one-shot iterator (a generator) becomes a list, since
    every pass iterates again."""
    return list(batches) if iter(batches) is batches else batches


def _batch_size(tensors: Mapping[str, torch.Tensor], axes: Mapping[str, int | None]) -> int:
    """Samples in a micro-batch: along the first input with a known sample axis (the data
    layer's), else axis 0 of the first non-scalar input (plain dicts of arrays)."""
    if axes:
        for name, tensor in tensors.items():
            axis = axes.get(name)
            if axis is not None and tensor.dim() > axis:
                return int(tensor.shape[axis])
        return 1
    for tensor in tensors.values():
        if tensor.dim() > 0:
            return int(tensor.shape[0])
    return 1
