"""Rebuild the whole model zoo, then rewrite the table in models/README.md.

``python -m models.build_all`` trains and exports every model (fashion_cnn first: it writes
the Fashion-MNIST data files mobilenet reuses). ``--table-only`` skips training and only
re-measures the committed files. The table's accuracies are onnxruntime top-1 on each
model's eval file; tests/test_zoo.py reads them back as floors.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

import onnx

from models import common, digits_resnet, fashion_cnn, mobilenet, transformer

TABLE_START, TABLE_END = "<!-- zoo-table:start -->", "<!-- zoo-table:end -->"


@dataclass(frozen=True)
class Entry:
    file: str
    what: str
    eval_file: str
    script: str


ENTRIES = [
    Entry("fashion_cnn_op13.onnx", "Fashion-MNIST CNN, BatchNormalization kept unfused",
          "fashion_eval.npz", "fashion_cnn"),
    Entry("fashion_cnn_op17.onnx", "Fashion-MNIST CNN, BN fused into Conv",
          "fashion_eval.npz", "fashion_cnn"),
    Entry("digits_resnet_op17.onnx", "ResNet-style (identity + 1x1-projection Add shortcuts), "
          "sklearn digits 8x8", "digits_eval.npz", "digits_resnet"),
    Entry("mobilenet_op21.onnx", "MobileNet-style (depthwise/pointwise, HardSwish, inverted "
          "residual Add, GlobalAveragePool), Fashion-MNIST, fixed batch 1",
          "fashion_eval.npz", "mobilenet"),
    Entry("transformer_op17.onnx", "2-layer transformer encoder, WordNet gloss -> 26 noun "
          "lexnames; LayerNormalization nodes", "text_eval.npz", "transformer"),
    Entry("transformer_decomposed_ln_op17.onnx", "same weights, LayerNorm decomposed "
          "(ReduceMean/Sub/Pow/.../Add, tf2onnx style)", "text_eval.npz", "transformer"),
    Entry("transformer_constants_op13.onnx", "same weights, opset 13, decomposed LayerNorm, "
          "all weights as Constant nodes (paddle2onnx/spox style)", "text_eval.npz",
          "transformer"),
]


def table() -> str:
    """Markdown rows measured from the files on disk (not from the training run)."""
    rows = ["| file | what | opset | params | eval file | onnxruntime top-1 | made by |",
            "|---|---|---|---|---|---|---|"]
    for entry in ENTRIES:
        path = common.MODELS_DIR / entry.file
        model = onnx.load(str(path))
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        acc = common.ort_accuracy(path, common.MODELS_DIR / entry.eval_file)
        rows.append(f"| `{entry.file}` | {entry.what} | {opset} | "
                    f"{common.count_params(model):,} | `{entry.eval_file}` | "
                    f"{100 * acc:.2f} % | `.venv/bin/python -m models.{entry.script}` |")
    return "\n".join(rows)


def rewrite_readme() -> None:
    readme = common.MODELS_DIR / "README.md"
    text = readme.read_text(encoding="utf-8")
    block = f"{TABLE_START}\n{table()}\n{TABLE_END}"
    pattern = re.compile(re.escape(TABLE_START) + ".*?" + re.escape(TABLE_END), re.DOTALL)
    if not pattern.search(text):
        raise RuntimeError(f"{readme} has no {TABLE_START} ... {TABLE_END} block")
    readme.write_text(pattern.sub(lambda _: block, text), encoding="utf-8")
    print(block)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table-only", action="store_true",
                        help="do not retrain; only re-measure the files and rewrite the table")
    args = parser.parse_args()
    if not args.table_only:
        for script in (fashion_cnn, digits_resnet, mobilenet, transformer):
            script.main()
    rewrite_readme()


if __name__ == "__main__":
    main()
