"""Error-feedback (GPTQ) rounding: the algebra, the input moments, the end-to-end effect."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from hawq_onnx.calibration.input_gram import _Unfold, _unfold_for, collect_input_grams
from hawq_onnx.cli import main
from hawq_onnx.data import load_npz
from hawq_onnx.graph import GraphView
from hawq_onnx.quant.gptq import error_feedback_round, output_error, refine_rounding
from hawq_onnx.quant.plan import WeightSpec
from hawq_onnx.quant.weights import QuantizedWeight, WeightLayout, qrange, quantize_weight
from hawq_onnx.quantize import Quantizer
from tests.conftest import MODELS, write_head

FASHION = MODELS / "fashion_cnn_op17.onnx"
TRANSFORMER = MODELS / "transformer_op17.onnx"


def _correlated_inputs(rows: int, size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(size, size)) * 0.3
    return rng.normal(size=(rows, size)) @ mixing + rng.normal(size=(rows, size))


def _nearest(weight: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    low, high = qrange(bits)
    return np.clip(np.rint(weight / scale), low, high)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_error_feedback_lowers_the_output_error_of_correlated_inputs(bits: int) -> None:
    inputs = _correlated_inputs(4000, 48)
    gram = inputs.T @ inputs / len(inputs)
    weight = np.random.default_rng(1).normal(size=(24, 48))
    scale = np.abs(weight).max(axis=1, keepdims=True) / qrange(bits)[1]
    values = error_feedback_round(weight, scale, *qrange(bits), gram)
    assert values.dtype == np.int64 and values.min() >= qrange(bits)[0]
    assert values.max() <= qrange(bits)[1]
    nearest = output_error(weight, _nearest(weight, scale, bits) * scale, gram)
    feedback = output_error(weight, values * scale, gram)
    assert feedback < 0.85 * nearest
    # the layer outputs on the data themselves, not only the quadratic form
    out_nearest = np.square(inputs @ (_nearest(weight, scale, bits) * scale - weight).T).mean()
    out_feedback = np.square(inputs @ (values * scale - weight).T).mean()
    assert out_feedback < 0.85 * out_nearest


def test_uncorrelated_inputs_leave_nothing_to_feed_back() -> None:
    """With H diagonal every error is orthogonal to the other inputs: plain rounding."""
    weight = np.random.default_rng(2).normal(size=(6, 10))
    scale = np.full((6, 1), 0.21)
    gram = np.diag(np.linspace(0.5, 3.0, 10))
    values = error_feedback_round(weight, scale, *qrange(3), gram)
    np.testing.assert_array_equal(values, _nearest(weight, scale, 3))


def test_two_inputs_match_the_closed_form_compensation() -> None:
    """After rounding input 0, the best continuous correction of input 1 is
    w1 − (H01 / H11)(q0 − w0) (minimize δᵀHδ with δ0 fixed); error feedback rounds that."""
    gram = np.array([[2.0, 1.2], [1.2, 1.0]])
    weight = np.array([[0.37, -0.52], [0.11, 0.74], [-0.66, 0.05]])
    scale = np.full((3, 2), 0.25)
    values = error_feedback_round(weight, scale, -8, 7, gram, damping=0.0, act_order=False)
    q0 = np.rint(weight[:, 0] / 0.25)
    corrected = weight[:, 1] - gram[0, 1] / gram[1, 1] * (q0 * 0.25 - weight[:, 0])
    np.testing.assert_array_equal(values[:, 0], q0)
    np.testing.assert_array_equal(values[:, 1], np.rint(corrected / 0.25))


def test_refine_rounding_keeps_scales_and_layout_and_never_loses() -> None:
    rng = np.random.default_rng(3)
    weight = rng.normal(size=(16, 8)).astype(np.float32)  # MatMul [K=16, N=8]
    inputs = _correlated_inputs(2000, 16, seed=4)
    gram = inputs.T @ inputs / len(inputs)
    plain = quantize_weight(weight, WeightSpec(3), WeightLayout((1,), 0))
    refined = refine_rounding(weight, plain, 1, gram)
    assert refined is not plain
    np.testing.assert_array_equal(refined.scale, plain.scale)
    assert refined.values.shape == weight.shape and refined.axis == plain.axis
    before = output_error(weight.T, plain.dequantize().T, gram)
    after = output_error(weight.T, refined.dequantize().T, gram)
    assert after < before
    # a gram whose damped inverse feeds nothing back keeps the very same object
    identity = refine_rounding(weight, plain, 1, np.eye(16))
    assert identity is plain


def _one_node_model(op: str, weight: np.ndarray, size: int, **attrs: list[int]
                    ) -> onnx.ModelProto:
    """``y = op(x, w)`` with ``x`` of 3 channels and ``size`` along each spatial axis."""
    node = helper.make_node(op, ["x", "w"], ["y"], **attrs)
    spatial = weight.ndim - 2
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, *([size] * spatial)])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([node], op.lower(), [x], [y],
                              [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def _conv_model(spatial: int, pads: list[int], strides: list[int], dilations: list[int]
                ) -> tuple[onnx.ModelProto, np.ndarray]:
    weight = np.random.default_rng(5).normal(size=[4, 3, *([3] * spatial)]).astype(np.float32)
    return _one_node_model("Conv", weight, 9, pads=pads, strides=strides,
                           dilations=dilations), weight


@pytest.mark.parametrize(("spatial", "pads", "strides", "dilations"), [
    (2, [1, 0, 2, 1], [2, 1], [1, 2]),
    (2, [0, 0, 0, 0], [1, 1], [1, 1]),
    (1, [2, 1], [2], [1]),
])
def test_patches_reproduce_onnxruntime_convolution(spatial: int, pads: list[int],
                                                   strides: list[int],
                                                   dilations: list[int]) -> None:
    """Rows unfolded in the weight's (C, k...) order: patches @ W_rowsᵀ is the Conv output."""
    model, weight = _conv_model(spatial, pads, strides, dilations)
    x = np.random.default_rng(6).normal(size=(2, 3, *([9] * spatial))).astype(np.float32)
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    unfold = _Unfold("w", "x", "conv", tuple(weight.shape[2:]), tuple(strides), tuple(pads),
                     tuple(dilations))
    rows = unfold.rows(x)
    out = rows @ weight.reshape(4, -1).T.astype(np.float64)  # [N*L, C_out]
    positions = int(np.prod(expected.shape[2:]))
    rebuilt = out.reshape(2, positions, 4).transpose(0, 2, 1).reshape(expected.shape)
    np.testing.assert_allclose(rebuilt, expected, rtol=1e-5, atol=1e-5)


def test_moments_of_the_fashion_cnn(tmp_path: Path) -> None:
    """The first Conv reads the graph input: its H is the mean outer product of the patches;
    the transformer's MatMuls get H over d_model rows; embeddings and shared weights none."""
    calib = write_head(MODELS / "fashion_calib.npz", tmp_path / "c.npz", 40)
    model = onnx.load(FASHION)
    quantizer = Quantizer(model)
    dataset = load_npz(calib, quantizer.model)
    moments = collect_input_grams(quantizer.model, quantizer.placement.layers, dataset,
                                  batch_size=16, max_samples=40)
    assert moments.batches == 3 and not moments.skipped
    first = quantizer.placement.layers[0]
    node = GraphView(quantizer.model).node(first.node)
    assert node.input[0] == dataset.specs[0].name
    with np.load(calib) as data:
        images = data[node.input[0]].astype(np.float64)
    attrs = {a.name: list(a.ints) for a in node.attribute}
    unfold = _Unfold(first.weight or "", node.input[0], "conv", (3, 3),
                     tuple(attrs.get("strides", [1, 1])), tuple(attrs.get("pads", [0] * 4)),
                     tuple(attrs.get("dilations", [1, 1])))
    rows = unfold.rows(images)
    np.testing.assert_allclose(moments.grams[first.weight or ""], rows.T @ rows / len(rows),
                               rtol=1e-9)
    assert set(moments.grams) == {layer.weight for layer in quantizer.placement.layers}

    text = Quantizer(onnx.load(TRANSFORMER))
    data = load_npz(write_head(MODELS / "text_calib.npz", tmp_path / "t.npz", 16),
                    text.model)
    grams = collect_input_grams(text.model, text.placement.layers, data, batch_size=8,
                                max_samples=16)
    assert set(grams.skipped) == {"tok_emb.weight", "pos_emb.weight"}
    assert all("embedding" in why for why in grams.skipped.values())
    inits = GraphView(text.model).initializers
    assert len(grams.grams) == 13
    for weight, gram in grams.grams.items():
        dims = list(inits[weight].dims)  # MatMul [K, N]; the head Gemm (transB) [N, K]
        assert gram.shape == ((dims[1],) * 2 if weight == "head.weight" else (dims[0],) * 2)
        np.testing.assert_allclose(gram, gram.T)
        assert np.linalg.eigvalsh(gram).min() > -1e-8


def _sqnr(reference: np.ndarray, quantized: np.ndarray) -> float:
    return float(10 * np.log10(np.square(reference).sum()
                               / np.square(reference - quantized).sum()))


def test_gptq_rounding_end_to_end_on_the_fashion_cnn(tmp_path: Path) -> None:
    """3-bit weights, float activations: GPTQ beats MSE-scaled nearest rounding on held-out
    images by a wide margin, reports which weights it re-rounded, and is deterministic."""
    calib = write_head(MODELS / "fashion_calib.npz", tmp_path / "c.npz", 256)
    with np.load(MODELS / "fashion_eval.npz") as data:
        name = next(k for k in data.files if k != "labels")
        images = data[name][:500]
    reference = ort.InferenceSession(str(FASHION)).run(None, {name: images})[0]
    sqnr = {}
    for rounding in ("mse", "gptq", "gptq"):
        out, report = tmp_path / f"{rounding}.onnx", tmp_path / f"{rounding}.json"
        first = out.read_bytes() if out.exists() else None
        assert main(["quantize", str(FASHION), "-o", str(out), "--calib", str(calib),
                     "--weight-bits", "3", "--act-bits", "none", "--rounding", rounding,
                     "--report", str(report)]) == 0
        if first is not None:
            assert out.read_bytes() == first
        quantized = ort.InferenceSession(str(out)).run(None, {name: images})[0]
        sqnr[rounding] = _sqnr(reference, quantized)
        rows = json.loads(report.read_text())["layers"]
        expected = "error_feedback" if rounding == "gptq" else "nearest"
        assert {row["rounding"] for row in rows} == {expected}
    assert sqnr["gptq"] > sqnr["mse"] + 2.0, sqnr


def test_gptq_needs_calibration_data(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(FASHION), "-o", str(out), "--act-bits", "none",
                 "--weight-bits", "4", "--rounding", "gptq"]) == 2
    err = capsys.readouterr().err
    assert "needs calibration data" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_sensitivity_quantizer_matches_the_exported_gptq_integers(tmp_path: Path) -> None:
    """The Q_b of the sensitivity tables is the exported weight, GPTQ included."""
    calib = write_head(MODELS / "fashion_calib.npz", tmp_path / "c.npz", 64)
    quantizer = Quantizer(onnx.load(FASHION))
    quantizer.dataset = load_npz(calib, quantizer.model)
    spec = WeightSpec(3, method="gptq")
    plan = quantizer.uniform_plan(spec, None)
    built = quantizer.build(plan)
    inits = {t.name: t for t in built.model.graph.initializer}
    for weight in plan.weights:
        qw: QuantizedWeight = quantizer.quantized_weight(weight, spec)
        stored = numpy_helper.to_array(inits[f"{weight}_quantized"]).astype(np.int64)
        np.testing.assert_array_equal(stored, qw.values)
    assert built.record.error_feedback == set(plan.weights)


@pytest.mark.parametrize("groups", [2, 6])
def test_grouped_convolution_gets_one_moment_matrix_per_group(tmp_path: Path,
                                                              groups: int) -> None:
    """Group g's output channels read only input channels of group g: its patch columns
    rebuild those outputs, and GPTQ per group beats nearest rounding in that metric."""
    rng = np.random.default_rng(7)
    weight = rng.normal(size=(6, 6 // groups, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], group=groups)
    graph = helper.make_graph(
        [node], "grouped", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                          ["n", 6, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    noise = rng.normal(size=(40, 6, 8, 8)) + rng.normal(size=(40, 1, 8, 8))
    x = (np.cumsum(noise, axis=3) / 3).astype(np.float32)  # neighbouring pixels correlate
    np.savez(tmp_path / "c.npz", x=x)
    quantizer = Quantizer(model)
    moments = collect_input_grams(quantizer.model, quantizer.placement.layers,
                                  load_npz(tmp_path / "c.npz", quantizer.model),
                                  batch_size=16, max_samples=40)
    size = 6 // groups * 9
    gram = moments.grams["w"]
    assert gram.shape == (groups, size, size) and not moments.skipped
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    rows = _Unfold("w", "x", "conv", (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), groups).rows(x)
    per_group = 6 // groups
    for group in range(groups):
        block = rows[:, group * size:(group + 1) * size]
        np.testing.assert_allclose(gram[group], block.T @ block / len(block), rtol=1e-9)
        out = block @ weight[group * per_group:(group + 1) * per_group].reshape(per_group, -1).T
        channels = expected[:, group * per_group:(group + 1) * per_group]
        np.testing.assert_allclose(out.reshape(40, 64, per_group).transpose(0, 2, 1),
                                   channels.reshape(40, per_group, 64), rtol=1e-4, atol=1e-4)
    plain = quantize_weight(weight, WeightSpec(3), WeightLayout((0,), None))
    refined = refine_rounding(weight, plain, 0, gram)
    assert refined is not plain
    for group in range(groups):
        part = slice(group * per_group, (group + 1) * per_group)
        matrix = weight[part].reshape(per_group, -1)
        assert output_error(matrix, refined.dequantize()[part].reshape(per_group, -1),
                            gram[group]) <= output_error(
            matrix, plain.dequantize()[part].reshape(per_group, -1), gram[group]) + 1e-12


def test_mixed_search_keeps_gptq_moments_apart_from_measured_losses() -> None:
    """Spare calibration samples after the analysis and held-out parts feed GPTQ's input
    moments; without spare samples the analysis part does, and the report says so."""
    from hawq_onnx.mixed.pipeline import MixedOptions, MixedSession
    from hawq_onnx.quantize import QuantizeOptions

    calib = MODELS / "fashion_calib.npz"  # 512 samples
    spare = MixedSession(FASHION, calib, QuantizeOptions(),
                         MixedOptions(avg_weight_bits=4.0, analysis_samples=128,
                                      holdout_samples=128, use_cache=False))
    moments = spare.quantizer.moment_data
    assert moments is not None and len(moments) == 256
    with np.load(calib) as data:
        np.testing.assert_array_equal(next(iter(moments.batches(256)))["input"],
                                      data["input"][256:])
    assert not any("GPTQ" in note for note in spare.notes)
    full = MixedSession(FASHION, calib, QuantizeOptions(),
                        MixedOptions(avg_weight_bits=4.0, use_cache=False))
    assert full.quantizer.moment_data is None
    assert any("fits its input moments on the 256 analysis samples" in note
               for note in full.notes)
    plain = MixedSession(FASHION, calib, QuantizeOptions(rounding="mse"),
                         MixedOptions(avg_weight_bits=4.0, use_cache=False))
    assert not any("GPTQ" in note for note in plain.notes)


def test_default_rounding_without_data_is_nearest_and_says_so(tmp_path: Path) -> None:
    """Weight-only 4-bit without --calib: the default cannot run GPTQ; it rounds to nearest
    (the same integers as --rounding mse) and the report says why."""
    outputs = {}
    for rounding in (None, "mse"):
        out, report = tmp_path / f"{rounding}.onnx", tmp_path / f"{rounding}.json"
        extra = ["--rounding", rounding] if rounding else []
        assert main(["quantize", str(FASHION), "-o", str(out), "--act-bits", "none",
                     "--weight-bits", "4", "--report", str(report), *extra]) == 0
        outputs[rounding] = out.read_bytes()
        data = json.loads(report.read_text())
        assert {row["rounding"] for row in data["layers"]} == {"nearest"}
        assert any("no calibration data" in note for note in data["notes"]) == (rounding is None)
    assert outputs[None] == outputs["mse"]


def _conv_transpose_model(spatial: int, attrs: dict[str, list[int]]
                          ) -> tuple[onnx.ModelProto, np.ndarray]:
    rng = np.random.default_rng(8)
    weight = rng.normal(size=[3, 4, *([3] * spatial)]).astype(np.float32)  # [C_in, C_out, k]
    return _one_node_model("ConvTranspose", weight, 5, **attrs), weight


@pytest.mark.parametrize(("spatial", "attrs"), [
    (2, {"strides": [2, 2], "pads": [1, 0, 1, 2], "output_padding": [1, 0]}),
    (2, {"strides": [2, 1], "pads": [0, 0, 0, 0], "dilations": [2, 1]}),
    (2, {"strides": [1, 1], "pads": [3, 3, 3, 3]}),  # pads beyond the kernel: a crop
    (1, {"strides": [3], "pads": [1, 2], "output_padding": [2]}),
])
def test_transposed_patches_reproduce_onnxruntime(spatial: int,
                                                  attrs: dict[str, list[int]]) -> None:
    """ConvTranspose rows in the weight's (C_in, k...) order: rows @ W[:, o] is output o."""
    model, weight = _conv_transpose_model(spatial, attrs)
    x = np.random.default_rng(9).normal(size=(2, 3, *([5] * spatial))).astype(np.float32)
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    found = _unfold_for(GraphView(model).quantizable_layers()[0], model.graph.node[0],
                        list(weight.shape))
    assert isinstance(found, _Unfold) and found.kind == "conv_transpose"
    rows = found.rows(x)
    out = rows @ np.moveaxis(weight, 1, 0).reshape(4, -1).T.astype(np.float64)
    positions = int(np.prod(expected.shape[2:]))
    rebuilt = out.reshape(2, positions, 4).transpose(0, 2, 1).reshape(expected.shape)
    np.testing.assert_allclose(rebuilt, expected, rtol=1e-5, atol=1e-5)


def test_conv_transpose_gets_gptq_rounding_and_grouped_ones_say_why(tmp_path: Path) -> None:
    """End to end through the quantizer: the ConvTranspose weight is re-rounded (lower output
    error than nearest on its own moments); a grouped one keeps nearest, with the reason."""
    model, weight = _conv_transpose_model(2, {"strides": [2, 2], "pads": [1, 1, 1, 1]})
    rng = np.random.default_rng(10)
    noise = rng.normal(size=(48, 3, 5, 5)) + rng.normal(size=(48, 1, 5, 5))
    np.savez(tmp_path / "c.npz", x=(np.cumsum(noise, axis=3) / 2).astype(np.float32))
    quantizer = Quantizer(model)
    moments = collect_input_grams(quantizer.model, quantizer.placement.layers,
                                  load_npz(tmp_path / "c.npz", quantizer.model),
                                  batch_size=16, max_samples=48)
    gram = moments.grams["w"]
    assert gram.shape == (27, 27) and not moments.skipped
    plain = quantize_weight(weight, WeightSpec(3), WeightLayout((1,), None))
    refined = refine_rounding(weight, plain, 1, gram)
    assert refined is not plain and np.array_equal(refined.scale, plain.scale)
    rows_of = lambda w: np.moveaxis(w, 1, 0).reshape(4, -1)  # noqa: E731
    assert output_error(rows_of(weight), rows_of(refined.dequantize()), gram) < \
        0.9 * output_error(rows_of(weight), rows_of(plain.dequantize()), gram)
    grouped, _ = _conv_transpose_model(2, {"strides": [2, 2]})
    grouped.graph.node[0].attribute.append(helper.make_attribute("group", 3))
    grouped.graph.initializer[0].CopyFrom(numpy_helper.from_array(
        weight[:, :1].copy(), "w"))  # [C_in=3, C_out/group=1, 3, 3]
    quantizer = Quantizer(grouped)
    skipped = collect_input_grams(quantizer.model, quantizer.placement.layers,
                                  load_npz(tmp_path / "c.npz", quantizer.model),
                                  batch_size=16, max_samples=48).skipped
    assert skipped == {"w": "grouped ConvTranspose"}
