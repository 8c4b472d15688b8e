"""Cost tables: packed bytes, BOPs, and the latency measurement method and its cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from hawq_onnx.graph import GraphView
from hawq_onnx.importer import load_model
from hawq_onnx.mixed.costs import (
    LatencySettings,
    bops_table,
    concrete_model,
    cpu_model,
    latency_table,
    observed_shapes,
    one_layer_model,
    packed_bytes,
)
from hawq_onnx.mixed.problem import LayerChoice
from hawq_onnx.mixed.ties import layer_choices
from hawq_onnx.quantize import Quantizer

QUICK = LatencySettings(repeats=2, warmup=1, min_run_s=1e-4)


def test_bytes_and_bops_tables() -> None:
    choices = [LayerChoice(("a",), 1001, 10), LayerChoice(("b", "c"), 64, 7)]
    bits = [2, 3, 4, 6, 8]
    np.testing.assert_array_equal(packed_bytes(choices, bits), [
        [250.25, 375.375, 500.5, 750.75, 1001.0], [16.0, 24.0, 32.0, 48.0, 64.0]])
    # containers: 2 -> int2 (or int4 where onnxruntime cannot load int2), 3 -> int4, 6 -> int8
    np.testing.assert_array_equal(
        packed_bytes(choices, bits, storage="container", int2_allowed=True),
        [[251, 501, 501, 1001, 1001], [16, 32, 32, 64, 64]])
    np.testing.assert_array_equal(
        packed_bytes(choices, bits, storage="container", int2_allowed=False),
        [[501, 501, 501, 1001, 1001], [32, 32, 32, 64, 64]])
    np.testing.assert_array_equal(  # opset 13 has only int8: everything takes a byte
        packed_bytes(choices, [2, 4, 8], storage="container", max_opset=13),
        [[1001, 1001, 1001], [64, 64, 64]])
    np.testing.assert_array_equal(bops_table(choices, [4, 8]), [[320, 640], [224, 448]])
    np.testing.assert_array_equal(bops_table(choices, [8, 16], other_bits=[4, 2]),
                                  [[320, 640], [112, 224]])


@pytest.mark.parametrize("path", ["models/digits_resnet_op17.onnx",
                                  "models/transformer_constants_op13.onnx"])
def test_one_layer_model_computes_the_layer(path: str) -> None:
    """Each cut-out layer, fed the real intermediate input, reproduces the full model. The
    Constant-node transformer has layer inputs shape inference cannot size (computed
    Reshape targets): their shapes come from one observed run."""
    model = load_model(path).model
    concrete = concrete_model(model, 2)
    first = concrete.graph.input[0].type.tensor_type.shape.dim
    assert first[0].dim_value == 2 and all(d.dim_value > 0 for d in first)
    view = GraphView(concrete)
    layers = [layer for layer in view.quantizable_layers() if layer.weight]
    wanted = sorted({t for layer in layers for t in (*layer.inputs, layer.output)
                     if not view.is_constant(t)})
    observed = observed_shapes(concrete, wanted, types={t: view.elem_type(t) for t in wanted})
    unknown = [t for t in wanted if not all(isinstance(d, int) and d > 0
                                            for d in (view.shape(t) or [None]))]
    assert bool(unknown) == ("constants" in path)
    probe = onnx.ModelProto()
    probe.CopyFrom(concrete)
    for name in wanted:
        if name not in {o.name for o in probe.graph.output}:
            probe.graph.output.append(helper.make_tensor_value_info(
                name, view.elem_type(name) or onnx.TensorProto.FLOAT, None))
    spec = concrete.graph.input[0]
    shape = [d.dim_value for d in spec.type.tensor_type.shape.dim]
    rng = np.random.default_rng(0)
    feed = (rng.standard_normal(shape).astype(np.float32) if "digits" in path
            else rng.integers(0, 100, shape).astype(np.int64))
    values = dict(zip(wanted, ort.InferenceSession(
        probe.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            wanted, {spec.name: feed}), strict=True))
    for layer in layers:
        single = one_layer_model(view, layer, concrete.opset_import, observed)
        session = ort.InferenceSession(single.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        feeds = {i.name: values[i.name] for i in session.get_inputs()}
        assert [tuple(v.shape) for v in feeds.values()] == \
            [tuple(d.dim_value for d in i.type.tensor_type.shape.dim)
             for i in single.graph.input]
        np.testing.assert_allclose(session.run(None, feeds)[0], values[layer.output],
                                   rtol=1e-5, atol=1e-5)


def test_latency_is_measured_then_read_from_the_cache(tmp_path: Path) -> None:
    model = load_model("models/digits_resnet_op17.onnx").model
    quantizer = Quantizer(model)
    choices = layer_choices(quantizer.view, quantizer.placement)[:3]
    bits = [4, 8]
    first = latency_table(model, choices, bits, settings=QUICK, cache_dir=tmp_path)
    assert first.seconds.shape == (3, 2) and first.float_seconds.shape == (3,)
    assert np.all(np.isfinite(first.seconds)) and np.all(first.seconds >= 0)
    # per layer: float, run overhead and 2 widths; layers 2 and 3 have equal shapes, so the
    # third layer's four measurements come from the second layer's cache entries
    assert (first.measured, first.cached) == (8, 4)
    files = sorted((tmp_path / "latency").glob("*.json"))
    assert len(files) == 8
    entry = json.loads(files[0].read_text())
    assert entry["onnxruntime"] == ort.__version__ and entry["cpu"] == cpu_model()
    assert entry["provider"] == "CPUExecutionProvider" and entry["rounds"] == QUICK.repeats
    second = latency_table(model, choices, bits, settings=QUICK, cache_dir=tmp_path)
    assert (second.measured, second.cached) == (0, 12)
    np.testing.assert_array_equal(second.seconds, first.seconds)
    np.testing.assert_array_equal(second.float_seconds, first.float_seconds)
    other = latency_table(model, choices[:1], bits, settings=LatencySettings(
        batch=2, repeats=2, warmup=1, min_run_s=1e-4), cache_dir=tmp_path)
    assert other.measured == 4 and other.cached == 0  # another batch is another signature


def test_latency_of_embeddings_and_activation_widths(tmp_path: Path) -> None:
    """The transformer's embedding (Gather, int64 input) and a MatMul with a symbolic batch,
    at 8 vs 16-bit activations."""
    model = load_model("models/transformer_op17.onnx").model
    quantizer = Quantizer(model)
    choices = [c for c in layer_choices(quantizer.view, quantizer.placement)
               if c.names[0] in ("pos_emb.weight", "onnx::MatMul_254")]
    settings = LatencySettings(allocate="activation", weight_bits=8, repeats=2, warmup=1,
                               min_run_s=1e-4)
    table = latency_table(model, choices, [8, 16], settings=settings, cache_dir=tmp_path)
    assert table.seconds.shape == (2, 2) and np.all(table.seconds >= 0)
    assert table.measured == 8 and table.to_dict()["units"][0]["unit"] == "pos_emb.weight"
