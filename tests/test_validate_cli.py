"""`hawq-onnx validate`: metrics against direct computation, the --max-drop gate, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from hawq_onnx.cli import main
from hawq_onnx.quantize import QuantizeOptions, quantize
from hawq_onnx.validate import evaluate
from tests.conftest import MODELS

FASHION = MODELS / "fashion_cnn_op17.onnx"
CALIB = MODELS / "fashion_calib.npz"
EVAL = MODELS / "fashion_eval.npz"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An 8-bit and a (much worse) 2-bit version of the Fashion CNN, plus a small eval set."""
    folder = tmp_path_factory.mktemp("validate")
    with np.load(EVAL) as data:
        np.savez(folder / "eval.npz", input=data["input"][:400], labels=data["labels"][:400],
                 classes=data["labels"][:400])
    out = {"eval": folder / "eval.npz"}
    for bits in (8, 2):
        out[f"w{bits}"] = folder / f"w{bits}.onnx"
        quantize(FASHION, out[f"w{bits}"], CALIB,
                 QuantizeOptions(weight_bits=bits, max_calib_samples=128))
    return out


def _outputs(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def test_metrics_equal_a_direct_computation(models: dict[str, Path]) -> None:
    metrics = evaluate(FASHION, models["w8"], models["eval"], batch_size=64, latency_runs=3)
    with np.load(models["eval"]) as data:
        x, labels = data["input"], data["labels"]
    want, have = _outputs(FASHION, x).astype(np.float64), _outputs(models["w8"], x)
    assert metrics.samples == 400
    assert metrics.top1_float == pytest.approx(np.mean(want.argmax(1) == labels))
    assert metrics.top1_quant == pytest.approx(np.mean(have.argmax(1) == labels))
    assert metrics.agreement == pytest.approx(np.mean(want.argmax(1) == have.argmax(1)))
    sqnr = 10 * np.log10(np.square(want).sum() / np.square(want - have).sum())
    assert metrics.sqnr_db == pytest.approx(sqnr, rel=1e-6)
    cosine = (want.ravel() @ have.ravel()) / np.linalg.norm(want) / np.linalg.norm(have)
    assert metrics.cosine == pytest.approx(cosine, rel=1e-6)
    assert metrics.bytes_quant == models["w8"].stat().st_size
    assert metrics.latency_float_ms > 0 and metrics.latency_quant_ms > 0


def test_identical_models_agree_fully(models: dict[str, Path]) -> None:
    metrics = evaluate(FASHION, FASHION, models["eval"], latency_runs=0)
    assert metrics.agreement == 1.0 and metrics.drop == 0.0 and metrics.sqnr_db == float("inf")
    assert metrics.to_dict()["sqnr_db"] == "inf"


def test_gate_passes_and_fails(models: dict[str, Path], tmp_path: Path,
                              capsys: pytest.CaptureFixture) -> None:
    report = tmp_path / "r.json"
    args = ["validate", str(FASHION), "--eval", str(models["eval"]), "--latency-runs", "0"]
    assert main([args[0], args[1], str(models["w8"]), *args[2:], "--max-drop", "0.01",
                 "--report", str(report)]) == 0
    payload = json.loads(report.read_text())
    assert payload["passed"] is True and payload["max_drop"] == 0.01
    assert main([args[0], args[1], str(models["w2"]), *args[2:], "--max-drop", "0.01",
                 "--report", str(report)]) == 1
    assert "exceeds --max-drop" in capsys.readouterr().err
    payload = json.loads(report.read_text())  # the report is still written
    assert payload["passed"] is False and payload["drop"] > 0.01


def test_labels_key_and_drop_without_labels(models: dict[str, Path], tmp_path: Path) -> None:
    by_key = evaluate(FASHION, models["w2"], models["eval"], labels_key="classes",
                      latency_runs=0)
    default = evaluate(FASHION, models["w2"], models["eval"], latency_runs=0)
    assert by_key.top1_quant == default.top1_quant
    with np.load(models["eval"]) as data:
        np.savez(tmp_path / "unlabelled.npz", input=data["input"])
    unlabelled = evaluate(FASHION, models["w2"], tmp_path / "unlabelled.npz", latency_runs=0)
    assert unlabelled.top1_float is None
    assert unlabelled.drop == pytest.approx(1 - unlabelled.agreement)


@pytest.mark.parametrize("case", ["missing_model", "bad_key", "wrong_data", "not_onnx"])
def test_bad_input_exits_2(models: dict[str, Path], tmp_path: Path, case: str,
                           capsys: pytest.CaptureFixture) -> None:
    quant, data, extra = models["w8"], models["eval"], []
    if case == "missing_model":
        quant = tmp_path / "missing.onnx"
    elif case == "bad_key":
        extra = ["--labels-key", "nope"]
    elif case == "wrong_data":
        data = MODELS / "digits_eval.npz"
    else:
        quant = tmp_path / "garbage.onnx"
        quant.write_bytes(b"not a model")
    assert main(["validate", str(FASHION), str(quant), "--eval", str(data), *extra]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def _scorer(path: Path, weight: np.ndarray, sigmoid: bool) -> Path:
    """x[N, 4] -> MatMul -> [N, 1] (-> Sigmoid): one score per sample, like a VAD."""
    from onnx import TensorProto, helper, numpy_helper, save

    nodes = [helper.make_node("MatMul", ["x", "w"], ["logit" if sigmoid else "y"])]
    if sigmoid:
        nodes.append(helper.make_node("Sigmoid", ["logit"], ["y"]))
    graph = helper.make_graph(
        nodes, "scorer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1])],
        [numpy_helper.from_array(weight.astype(np.float32), "w")])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10),
         path)
    return path


@pytest.mark.parametrize("sigmoid", [True, False])
def test_one_score_per_sample_is_a_binary_decision(tmp_path: Path, sigmoid: bool) -> None:
    """argmax over a [N, 1] output is always 0: two such models "agreed" on every sample
    whatever their scores. A single score is now thresholded (0.5 for probabilities, 0 for
    logits) and agreement and top-1 follow the decisions."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 4)).astype(np.float32)
    w = rng.standard_normal((4, 1))
    labels = (x @ w > 0.3).astype(np.int64).ravel()
    np.savez(tmp_path / "eval.npz", x=x, labels=labels)
    float_path = _scorer(tmp_path / "f.onnx", w, sigmoid)
    other = _scorer(tmp_path / "q.onnx", w + 0.4 * rng.standard_normal((4, 1)), sigmoid)
    metrics = evaluate(float_path, other, tmp_path / "eval.npz", latency_runs=0,
                       batch_size=64)
    decide_f, decide_q = (x @ w).ravel() > 0, (x @ _weight(other)).ravel() > 0
    assert metrics.decision == ("score > 0.5" if sigmoid else "score > 0")
    assert metrics.agreement == pytest.approx(np.mean(decide_f == decide_q))
    assert 0.5 < metrics.agreement < 0.99  # the perturbation flips some decisions
    assert metrics.top1_float == pytest.approx(np.mean(decide_f == labels))
    assert metrics.top1_quant == pytest.approx(np.mean(decide_q == labels))
    # the accuracy-target search measures drops by the same rule
    import onnx

    from hawq_onnx.mixed.pipeline import DropMeter

    meter = DropMeter(onnx.load(float_path), tmp_path / "eval.npz", batch_size=64)
    measured = meter(onnx.load(other))
    assert measured["agreement"] == pytest.approx(metrics.agreement)
    assert measured["drop"] == pytest.approx(metrics.drop)


def _weight(path: Path) -> np.ndarray:
    import onnx
    from onnx import numpy_helper

    return numpy_helper.to_array(onnx.load(path).graph.initializer[0]).astype(np.float64)
