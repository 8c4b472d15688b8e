"""Whole held-out splits as evaluation files, for benchmarks that need small accuracy gaps.

Why: the committed evaluation files hold 2,000 samples (binomial SE ≈ 0.6 points at 90 %), so
accuracy differences between allocation strategies of a few tenths of a point are noise.
The full Fashion-MNIST test split (10,000) and the full WordNet held-out split (8,212) halve
that. They are too big to commit, so they are rebuilt here from the same Debian data the zoo
uses, with the zoo's own preprocessing (normalization, split, vocabulary).

Run:  .venv/bin/python -m models.full_eval [--out .cache/eval]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx

from models import common, transformer

DEFAULT_OUT = common.MODELS_DIR.parent / ".cache" / "eval"


def fashion_test() -> dict[str, np.ndarray]:
    """All 10,000 Fashion-MNIST test images, normalized as in ``fashion_eval.npz``."""
    _, _, x_test, y_test = common.load_fashion()
    return {"input": x_test, "labels": y_test}


def text_test() -> dict[str, np.ndarray]:
    """Every held-out gloss, encoded with the vocabulary stored in the transformer file."""
    texts, labels = transformer.read_glosses()
    train, test = transformer.split_indices(len(texts))
    vocab = transformer.build_vocab([texts[i] for i in train])
    model = onnx.load(common.MODELS_DIR / "transformer_op17.onnx", load_external_data=False)
    stored = json.loads({p.key: p.value for p in model.metadata_props}["vocab"])
    if stored != vocab:
        raise RuntimeError("the rebuilt vocabulary differs from the one in transformer_op17")
    tokens = transformer.encode([texts[i] for i in test], vocab)
    return {"tokens": tokens, "labels": labels[test]}


def text_calibration_draw(seed: int, count: int) -> dict[str, np.ndarray]:
    """``count`` training glosses drawn with ``seed`` (never a held-out one), encoded like
    ``text_calib.npz``: other calibration sets from the same distribution, for measuring how
    much a result depends on which samples calibrated it."""
    texts, labels = transformer.read_glosses()
    train, _ = transformer.split_indices(len(texts))
    vocab = transformer.build_vocab([texts[i] for i in train])
    rows = np.random.default_rng(seed).choice(train, count, replace=False)
    return {"tokens": transformer.encode([texts[i] for i in rows], vocab),
            "labels": labels[rows]}


BUILDERS = {"fashion": fashion_test, "text": text_test}


def path_for(folder: Path, kind: str) -> Path:
    return folder / f"{kind}_eval_full.npz"


def ensure(kind: str, folder: Path = DEFAULT_OUT) -> Path:
    """The full evaluation file for ``kind`` ('fashion' or 'text'), built once."""
    path = path_for(folder, kind)
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        common.write_npz(partial, BUILDERS[kind]())
        partial.replace(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    for kind in BUILDERS:
        path = ensure(kind, args.out)
        with np.load(path) as data:
            print(f"{path}: {len(data['labels'])} samples")


if __name__ == "__main__":
    main()
