"""Where top-1 differences between quantized models come from: paired flips vs the float model.

Why: two quantized models whose accuracies differ by a few samples may differ only by luck.
For each quantized model this prints its accuracy, its agreement with the float model, how many
samples it turned from right to wrong and from wrong to right, and, against the first
quantized model, the paired difference in accuracy with its standard error
(√discordant / N, the normal approximation behind McNemar's test).

Run:  .venv/bin/python bench/compare_predictions.py FLOAT.onnx EVAL.npz QUANT.onnx [QUANT.onnx ...]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

BATCH = 512


def predictions(model: Path, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """Arg-max of the first output, in batches, on the CPU provider."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    count = len(next(iter(inputs.values())))
    parts = [session.run(None, {n: inputs[n][s:s + BATCH] for n in names})[0].argmax(-1)
             for s in range(0, count, BATCH)]
    return np.concatenate(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("float_model", type=Path)
    parser.add_argument("eval", type=Path)
    parser.add_argument("quant", type=Path, nargs="+")
    parser.add_argument("--labels-key", default="labels")
    args = parser.parse_args(argv)
    with np.load(args.eval, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    labels = arrays.pop(args.labels_key)
    reference = predictions(args.float_model, arrays)
    right = reference == labels
    print(f"float: top-1 {100 * right.mean():.2f} % on {len(labels)} samples")
    first: np.ndarray | None = None
    for path in args.quant:
        predicted = predictions(path, arrays)
        correct = predicted == labels
        line = (f"{path.name}: top-1 {100 * correct.mean():.2f} %, agrees with float "
                f"{100 * (predicted == reference).mean():.2f} %, "
                f"right->wrong {int((right & ~correct).sum())}, "
                f"wrong->right {int((~right & correct).sum())}")
        if first is None:
            first = correct
        else:
            discordant = int((first != correct).sum())
            diff = 100 * (correct.mean() - first.mean())
            se = 100 * math.sqrt(discordant) / len(labels)
            line += f"; vs {args.quant[0].name}: {diff:+.2f} ± {se:.2f} points"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
