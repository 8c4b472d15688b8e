"""Nearest rounding (MSE-searched scales) vs GPTQ error-feedback rounding, uniform widths.

Same scales, same activations (uint8), same bias correction: only the weight integers
differ, so the table isolates what rounding through each layer's input moments buys.
Evaluated in onnxruntime on the whole held-out splits (``models/full_eval.py``).

    .venv/bin/python bench/bench_rounding.py [--models ...] [--bits 4 3] [--markdown F]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MODELS = REPO / "models"
DATA = {"fashion_cnn_op17": "fashion", "digits_resnet_op17": "digits",
        "mobilenet_op21": "fashion", "transformer_op17": "text"}


def eval_file(model: str) -> Path:
    if DATA[model] in ("fashion", "text"):
        from models.full_eval import ensure

        return ensure(DATA[model])
    return MODELS / f"{DATA[model]}_eval.npz"


def run(model: str, bits: int, rounding: str, folder: Path) -> dict[str, float]:
    from hawq_onnx.quantize import QuantizeOptions, quantize

    out = folder / f"{model}_{bits}_{rounding}.onnx"
    start = time.perf_counter()
    result = quantize(MODELS / f"{model}.onnx", out, MODELS / f"{DATA[model]}_calib.npz",
                      QuantizeOptions(weight_bits=bits, rounding=rounding),
                      eval_path=eval_file(model))
    metrics = result.report["metrics"]
    return {"top1": 100 * metrics["top1_quant"], "agreement": 100 * metrics["agreement"],
            "sqnr": metrics["sqnr_db"], "seconds": time.perf_counter() - start,
            "samples": metrics["samples"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(DATA))
    parser.add_argument("--bits", nargs="*", type=int, default=[4, 3])
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    lines = ["| model | bits | rounding | top-1 % | agrees with float % | SQNR dB | wall s |",
             "|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for bits in args.bits:
                for rounding in ("mse", "gptq"):
                    r = run(model, bits, rounding, Path(tmp))
                    name = "nearest (mse scales)" if rounding == "mse" else "GPTQ (default)"
                    lines.append(f"| {model} ({r['samples']}) | {bits} | {name} | "
                                 f"{r['top1']:.2f} | {r['agreement']:.2f} | {r['sqnr']:.2f} | "
                                 f"{r['seconds']:.1f} |")
                    print(lines[-1], flush=True)
    if args.markdown:
        args.markdown.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
