"""Check the mirror's weight gradients against onnxruntime-training's gradient graph.

Why: the mirror's gradients feed every Hessian estimate, and the op-level parity tests only
compare forward values. onnxruntime-training derives gradients from its own C++ gradient
builders, an implementation that shares nothing with torch autograd, so agreement on the
zoo models is an independent end-to-end check of the backward pass.

For each zoo model (as :func:`hawq_onnx.importer.load_model` normalizes it, the form every
command works on) and a fixed batch of its eval samples, both sides compute the gradient of
the mean cross-entropy of the first graph output (the logits) with respect to every
quantizable weight; the relative error ``||g_ort - g_mirror|| / ||g_mirror||`` must be at
most 1e-4 (float32). A missing model file, or one onnxruntime-training cannot take (opset
above what it implements, no gradient builder for an op), is skipped with the reason printed.

onnxruntime-training installs the same ``onnxruntime`` module as the plain package, so this
runs in its own virtual environment: ``make check-ort-training`` (creates
``.venv-ort-training``). Exit status: 0 all checked models agree, 1 a gradient mismatch or
a mirror failure, 2 nothing could be checked.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from hawq_onnx.graph import GraphView
from hawq_onnx.importer import load_model
from hawq_onnx.mirror.module import Mirror

REPO = Path(__file__).resolve().parents[2]
# Highest default-domain opset onnxruntime-training 1.19 implements.
MAX_ORT_OPSET = 21
BATCH = 8
TOLERANCE = 1e-4


@dataclass(frozen=True)
class Case:
    model: str
    data: str


ZOO = [
    Case("fashion_cnn_op13.onnx", "fashion_eval.npz"),
    Case("fashion_cnn_op17.onnx", "fashion_eval.npz"),
    Case("digits_resnet_op17.onnx", "digits_eval.npz"),
    Case("mobilenet_op21.onnx", "fashion_eval.npz"),
    Case("transformer_op17.onnx", "text_eval.npz"),
    Case("transformer_decomposed_ln_op17.onnx", "text_eval.npz"),
    Case("transformer_constants_op13.onnx", "text_eval.npz"),
]


class Skip(Exception):
    """A model that cannot be checked for a reason outside the mirror."""


@dataclass(frozen=True)
class WeightResult:
    name: str
    shape: tuple[int, ...]
    grad_norm: float
    rel_error: float


@dataclass
class ModelResult:
    file: str
    status: str  # ok | mismatch | error | skipped
    reason: str = ""
    loss: tuple[float, float] | None = None  # (onnxruntime, mirror)
    weights: list[WeightResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def max_error(self) -> float:
        return max((w.rel_error for w in self.weights), default=0.0)


@dataclass(frozen=True)
class Batch:
    """Feeds in graph-input order, labels, and how many samples one call may take."""

    inputs: list[np.ndarray]
    labels: np.ndarray
    chunk: int

    def chunks(self) -> list[tuple[list[np.ndarray], np.ndarray]]:
        return [([x[i:i + self.chunk] for x in self.inputs], self.labels[i:i + self.chunk])
                for i in range(0, len(self.labels), self.chunk)]


def default_opset(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
               default=1)


def quantizable_weights(model: onnx.ModelProto) -> list[str]:
    """Distinct quantizable weight initializers (tied weights appear once)."""
    initializers = {t.name for t in model.graph.initializer}
    layers = GraphView(model).quantizable_layers()
    return list(dict.fromkeys(
        layer.weight for layer in layers if layer.weight is not None
        and layer.weight in initializers))


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The first input's batch size when the graph fixes it (e.g. exported for batch 1)."""
    initializers = {t.name for t in model.graph.initializer}
    first = next(i for i in model.graph.input if i.name not in initializers)
    dims = first.type.tensor_type.shape.dim
    return dims[0].dim_value if dims and dims[0].dim_value > 0 else None


def load_batch(model: onnx.ModelProto, data: Path, size: int) -> Batch:
    """The first ``size`` eval samples, matched to graph inputs by name (or the only one)."""
    initializers = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in initializers]
    with np.load(data) as arrays:
        features = [k for k in arrays.files if k != "labels"]
        if len(names) == 1 and names[0] not in arrays.files and len(features) == 1:
            arrays_by_name = {names[0]: arrays[features[0]]}
        else:
            arrays_by_name = {n: arrays[n] for n in names}
        inputs = [np.ascontiguousarray(arrays_by_name[n][:size]) for n in names]
        labels = np.ascontiguousarray(arrays["labels"][:size].astype(np.int64))
    chunk = fixed_batch(model) or size
    if size % chunk:
        raise Skip(f"batch {size} is not a multiple of the model's fixed batch {chunk}")
    return Batch(inputs, labels, chunk)


@dataclass(frozen=True)
class Prepared:
    model: onnx.ModelProto
    weights: list[str]
    batch: Batch
    notes: list[str]


def prepare(case: Case, models_dir: Path) -> Prepared:
    """Load, normalize and vet one zoo model; raises Skip with the reason when unusable.

    The notes say what the importer changed (IR version lowered to what this onnxruntime
    reads, BatchNormalization folded, Constants lifted), so no conversion goes unmentioned.
    """
    model_path, data_path = models_dir / case.model, models_dir / case.data
    for path in (model_path, data_path):
        if not path.is_file():
            raise Skip(f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path} "
                       "not found (not built yet?)")
    imported = load_model(model_path)
    model = imported.model
    notes = [f"importer: {n}" for n in imported.notes] + [
        f"importer: {r.name} changed {r.changed}" for r in imported.reports if r.changed]
    opset = default_opset(model)
    if opset > MAX_ORT_OPSET:
        raise Skip(f"opset {opset} > {MAX_ORT_OPSET}, the highest onnxruntime-training "
                   "1.19 implements")
    weights = quantizable_weights(model)
    if not weights:
        raise Skip("no quantizable weight initializers")
    batch = load_batch(model, data_path, BATCH)
    if batch.chunk < BATCH:
        notes.append(f"fixed batch {batch.chunk}: fed as {BATCH // batch.chunk} calls, "
                     "gradients accumulated on both sides")
    return Prepared(model, weights, batch, notes)


def _hardswish_as_relus(node: onnx.NodeProto, tag: str) -> list[onnx.NodeProto]:
    """HardSwish(x) = x * clip(x/6 + 1/2, 0, 1), the clip written as Relu(a) - Relu(a - 1)."""
    x, (y,) = node.input[0], node.output
    names = [f"{tag}/{part}" for part in ("a", "a_minus_1", "relu_a", "relu_b", "gate")]
    a, b, relu_a, relu_b, gate = names
    make = helper.make_node
    return [make("Mul", [x, f"{tag}/sixth"], [f"{tag}/x6"]),
            make("Add", [f"{tag}/x6", f"{tag}/half"], [a]),
            make("Sub", [a, f"{tag}/one"], [b]),
            make("Relu", [a], [relu_a]), make("Relu", [b], [relu_b]),
            make("Sub", [relu_a, relu_b], [gate]), make("Mul", [x, gate], [y])]


def _layernorm_with_stats(node: onnx.NodeProto, tag: str) -> list[onnx.NodeProto]:
    """The same LayerNormalization with its optional Mean/InvStdDev outputs named: the
    gradient builder reads them and fails on a node that does not declare them."""
    out = onnx.NodeProto()
    out.CopyFrom(node)
    for name in ("mean", "inv_std_dev")[len(out.output) - 1:]:
        out.output.append(f"{tag}/{name}")
    return [out]


def differentiable_for_ort(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy that onnxruntime-training 1.19 can differentiate: HardSwish (no gradient
    builder) written as Relus, LayerNormalization given its statistics outputs. The function
    is the same, so the gradients must still agree; the mirror runs the original graph."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    counts = {"HardSwish": 0, "LayerNormalization": 0}
    for index, node in enumerate(model.graph.node):
        tag = f"ort_check/{node.op_type}_{index}"
        if node.op_type == "HardSwish":
            out.graph.node.extend(_hardswish_as_relus(node, tag))
            for suffix, value in (("sixth", 1.0 / 6.0), ("half", 0.5), ("one", 1.0)):
                out.graph.initializer.append(
                    numpy_helper.from_array(np.array(value, np.float32), f"{tag}/{suffix}"))
        elif node.op_type == "LayerNormalization" and len(node.output) < 3:
            out.graph.node.extend(_layernorm_with_stats(node, tag))
        else:
            out.graph.node.append(node)
            continue
        counts[node.op_type] += 1
    notes = []
    if counts["HardSwish"]:
        notes.append(f"onnxruntime-training side: {counts['HardSwish']} HardSwish node(s) "
                     "rewritten as x*(Relu(x/6+1/2) - Relu(x/6-1/2)) (no HardSwish gradient "
                     "builder in onnxruntime-training 1.19)")
    if counts["LayerNormalization"]:
        notes.append(f"onnxruntime-training side: {counts['LayerNormalization']} "
                     "LayerNormalization node(s) given their optional Mean/InvStdDev outputs "
                     "(its gradient builder needs them)")
    return out, notes


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Discard what C++ code writes to fd 2: the gradient graph builder logs INFO lines
    through a logger that ``set_default_logger_severity`` does not reach."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def ort_gradients(model: onnx.ModelProto, weights: list[str], batch: Batch
                  ) -> tuple[float, dict[str, np.ndarray]]:
    """(summed loss, gradients) from onnxruntime-training's generated training graph.

    The training graph accumulates gradients across calls until reset, so a model with a
    fixed batch size is fed chunk by chunk and the sum of chunk-mean losses is differentiated.
    """
    import onnxruntime
    from onnxruntime.training import api, artifacts

    with tempfile.TemporaryDirectory(prefix="ort-training-") as tmp:
        try:
            with _native_stderr_silenced():
                artifacts.generate_artifacts(
                    model, requires_grad=weights, loss=artifacts.LossType.CrossEntropyLoss,
                    artifact_directory=tmp, loss_input_names=[model.graph.output[0].name])
        except Exception as exc:  # e.g. a gradient builder onnxruntime-training lacks
            raise Skip(f"onnxruntime-training cannot build the gradient graph: "
                       f"{_builder_error(exc)}") from exc
        state = api.CheckpointState.load_checkpoint(str(Path(tmp) / "checkpoint"))
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # the training session logs every graph pass at INFO
        module = api.Module(str(Path(tmp) / "training_model.onnx"), state,
                            session_options=options)
        module.train()
        module.lazy_reset_grad()
        loss = sum(float(module(*inputs, labels)) for inputs, labels in batch.chunks())
        grads = {name: np.array(state.parameters[name].grad, copy=True) for name in weights}
    return loss, grads


def mirror_gradients(model: onnx.ModelProto, weights: list[str], batch: Batch
                     ) -> tuple[float, dict[str, np.ndarray]]:
    """(summed loss, gradients) of the same loss through the torch mirror."""
    mirror = Mirror(model, weight_names=weights, dtype=torch.float32)
    total = torch.zeros((), dtype=torch.float32)
    for inputs, labels in batch.chunks():
        logits = mirror(*(torch.from_numpy(x) for x in inputs))[0]
        total = total + torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels))
    total.backward()
    total = total.detach()
    grads = {}
    for name, param in mirror.weights.items():
        grad = param.grad
        grads[name] = np.zeros(tuple(param.shape), np.float32) if grad is None else (
            grad.detach().numpy())
    return float(total), grads


def relative_error(reference: np.ndarray, other: np.ndarray) -> float:
    """||other - reference|| / ||reference||; the absolute error when the reference is 0."""
    diff = float(np.linalg.norm((other.astype(np.float64) - reference).ravel()))
    scale = float(np.linalg.norm(reference.astype(np.float64).ravel()))
    return diff / scale if scale > 0 else diff


def check(case: Case, models_dir: Path, tolerance: float) -> ModelResult:
    """Both gradients for one zoo model, compared weight by weight."""
    notes: list[str] = []
    try:
        prepared = prepare(case, models_dir)
        notes = list(prepared.notes)
        ort_model, rewrites = differentiable_for_ort(prepared.model)
        notes += rewrites
        ort_loss, ort_grads = ort_gradients(ort_model, prepared.weights, prepared.batch)
    except Skip as exc:
        return ModelResult(case.model, "skipped", str(exc), notes=notes)
    weights = prepared.weights
    try:
        mirror_loss, mirror_grads = mirror_gradients(prepared.model, weights, prepared.batch)
    except Exception as exc:  # the mirror is ours: any failure is a failed check
        return ModelResult(case.model, "error", f"mirror failed: {_first_line(exc)}",
                           notes=notes)
    rows = [WeightResult(name, tuple(mirror_grads[name].shape),
                         float(np.linalg.norm(mirror_grads[name])),
                         relative_error(mirror_grads[name], ort_grads[name]))
            for name in weights]
    bad = [r for r in rows if not r.rel_error <= tolerance]  # NaN counts as a mismatch
    return ModelResult(case.model, "mismatch" if bad else "ok",
                       f"{len(bad)} weight(s) above {tolerance:g}" if bad else "",
                       (ort_loss, mirror_loss), rows, notes)


def _builder_error(exc: BaseException) -> str:
    """The useful part of onnxruntime's C++ message (which starts with a long signature)."""
    found = re.search(r"gradient builder has not been registered: .*", str(exc))
    return found.group(0).strip() if found else _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def report(result: ModelResult, tolerance: float) -> None:
    """One model's per-weight table (or its skip/error reason)."""
    print(f"\n== {result.file}: {result.status.upper()}"
          + (f" ({result.reason})" if result.reason else ""))
    for note in result.notes:
        print(f"   note: {note}")
    if not result.weights:
        return
    assert result.loss is not None
    print(f"   loss: onnxruntime-training {result.loss[0]:.7g}, mirror {result.loss[1]:.7g}")
    width = max(len(w.name) for w in result.weights)
    print(f"   {'weight':<{width}}  {'shape':<16} {'|grad|':>10}  {'rel error':>9}")
    for w in result.weights:
        flag = "" if w.rel_error <= tolerance else "  <-- MISMATCH"
        print(f"   {w.name:<{width}}  {str(w.shape):<16} {w.grad_norm:>10.4g}  "
              f"{w.rel_error:>9.2e}{flag}")
    print(f"   max rel error {result.max_error:.2e} (tolerance {tolerance:g})")


def summary(results: list[ModelResult]) -> int:
    """Print the per-model overview; the exit status it implies."""
    print("\nmodel                                  status    max rel error")
    for r in results:
        err = f"{r.max_error:.2e}" if r.weights else "-"
        print(f"{r.file:<38} {r.status:<9} {err}")
    failed = [r for r in results if r.status in ("mismatch", "error")]
    checked = [r for r in results if r.status != "skipped"]
    print(f"gradient check: {len(checked) - len(failed)} model(s) agree, "
          f"{len(failed)} disagree or failed, {len(results) - len(checked)} skipped")
    if failed:
        return 1
    return 0 if checked else 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE)
    parser.add_argument("models", nargs="*", help="zoo file names (default: the whole zoo)")
    args = parser.parse_args(argv)
    import onnxruntime

    print(f"onnxruntime {onnxruntime.__version__}, onnx {onnx.__version__}, "
          f"torch {torch.__version__}, batch {BATCH}")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cases = [c for c in ZOO if not args.models or c.model in args.models]
    unknown = sorted(set(args.models) - {c.model for c in ZOO})
    if unknown:
        parser.error(f"not zoo models: {unknown}")
    results = []
    for case in cases:
        results.append(check(case, args.models_dir, args.tolerance))
        report(results[-1], args.tolerance)
    return summary(results)


if __name__ == "__main__":
    sys.exit(main())
