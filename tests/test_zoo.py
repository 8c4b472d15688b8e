"""The committed model zoo (models/): valid files, real accuracy, and the graph shapes the
quantizer's tests rely on (unfused BN, fixed batch, Constant weights, decomposed LN).

No training here: the files are read as committed. Accuracy floors are the README figures
minus half a point, so a regenerated file that silently got worse fails.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests.conftest import MODELS

EVAL_FILES = {
    "fashion_cnn_op13.onnx": "fashion_eval.npz",
    "fashion_cnn_op17.onnx": "fashion_eval.npz",
    "digits_resnet_op17.onnx": "digits_eval.npz",
    "mobilenet_op21.onnx": "fashion_eval.npz",
    "transformer_op17.onnx": "text_eval.npz",
    "transformer_decomposed_ln_op17.onnx": "text_eval.npz",
    "transformer_constants_op13.onnx": "text_eval.npz",
}
OPSETS = {name: int(re.search(r"_op(\d+)\.onnx$", name).group(1)) for name in EVAL_FILES}
CALIB_FILES = {"fashion_calib.npz": ("input", 512), "digits_calib.npz": ("input", 256),
               "text_calib.npz": ("tokens", 768)}
TRANSFORMERS = ["transformer_op17.onnx", "transformer_decomposed_ln_op17.onnx",
                "transformer_constants_op13.onnx"]
FLOOR_MARGIN = 0.005
ROW = re.compile(r"^\| `([\w.]+\.onnx)` \|.*\| ([\d.]+) % \|", re.MULTILINE)


@cache
def load(name: str) -> onnx.ModelProto:
    return onnx.load(str(MODELS / name))


@cache
def eval_data(npz: str) -> dict[str, np.ndarray]:
    with np.load(MODELS / npz) as data:
        return {k: data[k] for k in data.files}


def session(name: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(MODELS / name), options,
                                providers=["CPUExecutionProvider"])


@cache
def logits(name: str) -> np.ndarray:
    """Outputs on the whole eval file, fed in batches the model's declared shape allows."""
    sess = session(name)
    spec = sess.get_inputs()[0]
    inputs = eval_data(EVAL_FILES[name])[spec.name]
    step = spec.shape[0] if isinstance(spec.shape[0], int) else 500
    return np.concatenate([sess.run(None, {spec.name: inputs[i:i + step]})[0]
                           for i in range(0, len(inputs), step)])


def readme_accuracies() -> dict[str, float]:
    text = (MODELS / "README.md").read_text(encoding="utf-8")
    return {name: float(acc) / 100 for name, acc in ROW.findall(text)}


def default_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def op_types(model: onnx.ModelProto) -> set[str]:
    return {n.op_type for n in model.graph.node}


def test_every_model_is_listed_in_readme() -> None:
    on_disk = {p.name for p in MODELS.glob("*.onnx")}
    assert on_disk == set(EVAL_FILES)
    assert set(readme_accuracies()) == set(EVAL_FILES)


@pytest.mark.parametrize("name", sorted(EVAL_FILES))
def test_model_is_valid_at_its_opset(name: str) -> None:
    model = load(name)
    onnx.checker.check_model(model, full_check=True)
    assert default_opset(model) == OPSETS[name]
    assert model.ir_version == 10
    assert model.producer_name == "pytorch" and model.doc_string


@pytest.mark.parametrize("name", sorted(EVAL_FILES))
def test_accuracy_is_at_least_the_readme_figure(name: str) -> None:
    labels = eval_data(EVAL_FILES[name])["labels"]
    accuracy = float((logits(name).argmax(1) == labels).mean())
    floor = readme_accuracies()[name] - FLOOR_MARGIN
    assert accuracy >= floor, f"{name}: {accuracy:.4f} < {floor:.4f}"
    chance = 1.0 / logits(name).shape[1]
    assert accuracy > 5 * chance


@pytest.mark.parametrize("name", sorted(EVAL_FILES))
def test_class_names_metadata_matches_the_logits(name: str) -> None:
    meta = {p.key: p.value for p in load(name).metadata_props}
    classes = json.loads(meta["class_names"])
    assert len(classes) == logits(name).shape[1] == len(set(classes))


@pytest.mark.parametrize(("npz", "spec"), sorted(CALIB_FILES.items()))
def test_calibration_files(npz: str, spec: tuple[str, int]) -> None:
    key, rows = spec
    data = eval_data(npz)
    assert set(data) == {key, "labels"}
    assert data[key].shape[0] == data["labels"].shape[0] == rows
    assert data["labels"].dtype == np.int64
    assert len(np.unique(data["labels"])) >= 10


def test_eval_files_shapes() -> None:
    fashion, digits, text = (eval_data(f) for f in
                             ("fashion_eval.npz", "digits_eval.npz", "text_eval.npz"))
    assert fashion["input"].shape == (2000, 1, 28, 28) and fashion["input"].dtype == np.float32
    assert digits["input"].shape[1:] == (1, 8, 8) and len(digits["input"]) >= 400
    assert text["tokens"].shape == (2000, 32) and text["tokens"].dtype == np.int64
    # Normalized images: roughly zero-mean, unit-variance over the eval set.
    assert abs(float(fashion["input"].mean())) < 0.1
    assert 0.8 < float(fashion["input"].std()) < 1.2


def test_transformer_variants_agree() -> None:
    reference = logits(TRANSFORMERS[0])
    for name in TRANSFORMERS[1:]:
        np.testing.assert_allclose(logits(name), reference, atol=1e-4, rtol=0)


def test_constants_variant_stores_weights_as_constant_nodes() -> None:
    model = load("transformer_constants_op13.onnx")
    assert len(model.graph.initializer) == 0
    constant_elems = sum(int(np.prod(a.t.dims)) for n in model.graph.node
                         if n.op_type == "Constant" for a in n.attribute if a.name == "value")
    reference = sum(int(np.prod(t.dims)) for t in load("transformer_op17.onnx").graph.initializer)
    assert constant_elems >= reference > 100_000
    assert "MatMul" in op_types(model) and "LayerNormalization" not in op_types(model)


def test_decomposed_variant_has_no_layernorm_node() -> None:
    fused = op_types(load("transformer_op17.onnx"))
    decomposed = load("transformer_decomposed_ln_op17.onnx")
    assert "LayerNormalization" in fused
    assert "LayerNormalization" not in op_types(decomposed)
    assert {"ReduceMean", "Pow", "Sqrt", "Div"} <= op_types(decomposed)
    n_ln = sum(n.op_type == "LayerNormalization" for n in load("transformer_op17.onnx").graph.node)
    assert sum(n.op_type == "Sqrt" for n in decomposed.graph.node) == n_ln


def test_transformer_has_attention_and_embedding_gathers() -> None:
    model = load("transformer_op17.onnx")
    ops = [n.op_type for n in model.graph.node]
    assert {"Softmax", "MatMul", "Erf"} <= set(ops)
    inits = {t.name for t in model.graph.initializer}
    gathers_on_tables = [n for n in model.graph.node
                         if n.op_type == "Gather" and n.input[0] in inits]
    assert len(gathers_on_tables) == 2  # token and position embeddings


def test_fashion_cnn_op13_keeps_batchnorm() -> None:
    assert "BatchNormalization" in op_types(load("fashion_cnn_op13.onnx"))
    assert "BatchNormalization" not in op_types(load("fashion_cnn_op17.onnx"))


def test_mobilenet_has_fixed_batch_of_one() -> None:
    model = load("mobilenet_op21.onnx")
    (inp,) = model.graph.input
    dims = [d.dim_value if d.HasField("dim_value") else d.dim_param
            for d in inp.type.tensor_type.shape.dim]
    assert dims == [1, 1, 28, 28]
    assert {"HardSwish", "GlobalAveragePool", "Add"} <= op_types(model)
    depthwise = [n for n in model.graph.node if n.op_type == "Conv" and any(
        a.name == "group" and a.i > 1 for a in n.attribute)]
    assert len(depthwise) >= 3


def test_digits_resnet_has_residual_adds_and_projection_shortcut() -> None:
    model = load("digits_resnet_op17.onnx")
    assert sum(n.op_type == "Add" for n in model.graph.node) == 2
    inits = {t.name: t for t in model.graph.initializer}
    one_by_one = [n for n in model.graph.node if n.op_type == "Conv"
                  and list(inits[n.input[1]].dims[2:]) == [1, 1]]
    assert len(one_by_one) == 1


def test_dynamic_batch_models_accept_other_batch_sizes() -> None:
    for name in ("fashion_cnn_op17.onnx", "digits_resnet_op17.onnx", "transformer_op17.onnx"):
        sess = session(name)
        spec = sess.get_inputs()[0]
        inputs = eval_data(EVAL_FILES[name])[spec.name][:3]
        out = sess.run(None, {spec.name: inputs})[0]
        np.testing.assert_allclose(out, logits(name)[:3], atol=1e-5, rtol=0)


def test_models_stay_small() -> None:
    sizes = {p.name: p.stat().st_size for p in Path(MODELS).iterdir() if p.is_file()}
    assert all(size < 2_500_000 for name, size in sizes.items() if name.endswith(".onnx"))
    assert sum(sizes.values()) < 25_000_000
