"""Shared test set-up: deterministic, CPU-only, repository paths."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"
WHEELS = REPO / ".cache" / "wheels"

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Small ops are dominated by thread-pool overhead on a 2-core machine; one thread is faster.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
    np.random.seed(0)


def write_head(src: Path, dest: Path, count: int) -> Path:
    """The first ``count`` samples of every array of ``src`` (labels included) as ``dest``:
    small calibration/evaluation files that keep CLI tests fast."""
    with np.load(src) as arrays:
        np.savez(dest, **{k: arrays[k][:count] for k in arrays.files})
    return dest
