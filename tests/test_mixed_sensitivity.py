"""Sensitivity tables: Ω from real traces and the exporter's Q_b, and the planted test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from hawq_onnx.analysis import analyze
from hawq_onnx.data import Dataset, input_specs
from hawq_onnx.mixed import AllocationProblem, Budget, solve
from hawq_onnx.mixed.sensitivity import (
    activation_sensitivity,
    weight_sensitivity,
    weight_spec_at,
    weight_sq_errors,
)
from hawq_onnx.mixed.ties import layer_choices
from hawq_onnx.quant.plan import ActSpec, QuantPlan, WeightSpec
from hawq_onnx.quantize import Quantizer
from tests.op_harness import IR_FOR_OPSET

BITS = [2, 3, 4, 6, 8]
DIMS = [16, 32, 32, 10]
FAST = {"min_probes": 16, "max_probes": 32, "use_cache": False}


def mlp(weights: list[np.ndarray], biases: list[np.ndarray], opset: int = 17
        ) -> onnx.ModelProto:
    """Gemm -> Relu -> Gemm -> Relu -> Gemm, weights [out, in] (transB=1)."""
    nodes, inits, x = [], [], "x"
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        inits += [numpy_helper.from_array(w.astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(b.astype(np.float32), f"b{i}")]
        nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [f"h{i}"], transB=1,
                                      name=f"gemm{i}"))
        x = f"h{i}"
        if i < len(weights) - 1:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"], name=f"relu{i}"))
            x = f"r{i}"
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", DIMS[0]])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", DIMS[-1]])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                             ir_version=IR_FOR_OPSET[opset])


def mlp_parts(seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    weights = [rng.standard_normal((DIMS[i + 1], DIMS[i])) / np.sqrt(DIMS[i]) for i in range(3)]
    biases = [rng.standard_normal(DIMS[i + 1]) * 0.1 for i in range(3)]
    x = rng.standard_normal((128, DIMS[0])).astype(np.float32)
    return weights, biases, x


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def dequantized_in_file(built: onnx.ModelProto, weight: str) -> np.ndarray:
    """The weight as the built model's own DequantizeLinear computes it (onnxruntime)."""
    inits = {t.name: t for t in built.graph.initializer}
    node = next(n for n in built.graph.node if n.op_type == "DequantizeLinear"
                and n.input[0] in inits and n.input[0].startswith(weight))
    graph = helper.make_graph([node], "dq", [], [helper.make_tensor_value_info(
        node.output[0], TensorProto.FLOAT, None)], [inits[t] for t in node.input if t])
    model = helper.make_model(graph, opset_imports=list(built.opset_import),
                              ir_version=built.ir_version)
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {})[0]


def test_omega_is_trace_over_n_times_the_exporters_error() -> None:
    weights, biases, x = mlp_parts()
    model = mlp(weights, biases)
    result = analyze(model, {"x": x}, **FAST)
    quantizer = Quantizer(model, target_opset=21)
    table = weight_sensitivity(result, quantizer, BITS)
    assert table.names == ["w0", "w1", "w2"]
    for r, name in enumerate(table.names):
        w = weights[r].astype(np.float32).astype(np.float64)
        layer = result.layer(name)
        for k, bits in enumerate(BITS):
            restored = quantizer.quantized_weight(name, WeightSpec(bits)).dequantize()
            error = float(np.square(restored.astype(np.float64) - w).sum())
            assert table.omega[r, k] == pytest.approx(layer.trace / w.size * error, rel=1e-12)
            built = quantizer.build(QuantPlan({name: WeightSpec(bits)}, {})).model
            np.testing.assert_array_equal(dequantized_in_file(built, name), restored)
    assert np.all(np.diff(table.omega, axis=1) < 0)  # more bits, less predicted loss
    upper, lower = table.omega_at(2.0), table.omega_at(-2.0)
    assert np.all(lower <= table.omega) and np.all(table.omega <= upper)
    choices = layer_choices(quantizer.view, quantizer.placement)
    np.testing.assert_array_equal(table.for_choices(choices), table.omega)


def test_error_follows_granularity_and_opset_fallback() -> None:
    weights, biases, _ = mlp_parts()
    old = Quantizer(mlp(weights, biases, opset=17))
    group = WeightSpec(4, "group", 8)
    assert weight_spec_at(group, 3, old.opset) == WeightSpec(3, "per_channel")
    per_channel = weight_sq_errors(old, ["w1"], [3], WeightSpec(4, "per_channel"))
    np.testing.assert_array_equal(weight_sq_errors(old, ["w1"], [3], group), per_channel)
    new = Quantizer(mlp(weights, biases, opset=21))
    blocked = weight_sq_errors(new, ["w1"], [3], group)
    tensor = weight_sq_errors(new, ["w1"], [3], WeightSpec(4, "per_tensor"))
    assert blocked[0, 0] < per_channel[0, 0] < tensor[0, 0]  # finer scales, smaller error
    # Q_b is scale-equivariant: scaling a weight by s scales its squared error by s².
    scaled = [w * (7.0 if i == 1 else 1.0) for i, w in enumerate(weights)]
    ratio = weight_sq_errors(Quantizer(mlp(scaled, biases)), ["w1"], BITS) \
        / weight_sq_errors(Quantizer(mlp(weights, biases)), ["w1"], BITS)
    np.testing.assert_allclose(ratio, 49.0, rtol=1e-4)


def planted(weights: list[np.ndarray], biases: list[np.ndarray], s: float
            ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Scale every 4th output channel of layer 1 (rows and bias) up by s and the matching
    input columns of layer 2 down by 1/s: the same function (ReLU is positively
    homogeneous). A *uniform* rescaling would change nothing (Ω and Q_b are equivariant,
    see above); per-channel it does: each row of layer 2 keeps its grid for the unscaled
    columns, so the scaled-down inputs round away and layer 2 becomes truly sensitive."""
    channels = np.arange(0, DIMS[2], 4)
    w, b = [a.copy() for a in weights], [a.copy() for a in biases]
    w[1][channels] *= s
    b[1][channels] *= s
    w[2][:, channels] /= s
    return w, b


def measured_mse(model: onnx.ModelProto, weight: str, bits: int, x: np.ndarray) -> float:
    built = Quantizer(model).build(QuantPlan({weight: WeightSpec(bits)}, {})).model
    return float(np.square(run(model, x) - run(built, x)).mean())


def allocations(model: onnx.ModelProto, x: np.ndarray, budgets: list[float]) -> list[list[int]]:
    result = analyze(model, {"x": x}, **FAST)
    quantizer = Quantizer(model)
    table = weight_sensitivity(result, quantizer, BITS)
    choices = layer_choices(quantizer.view, quantizer.placement)
    problem = AllocationProblem(choices, BITS, table.for_choices(choices))
    return [solve(problem, Budget(avg_weight_bits=b)).bits for b in budgets]


def test_planted_sensitive_layer_gets_more_bits() -> None:
    weights, biases, x = mlp_parts()
    base = mlp(weights, biases)
    plant = mlp(*planted(weights, biases, 20.0))
    np.testing.assert_allclose(run(plant, x), run(base, x), rtol=1e-5, atol=1e-5)
    # the plant is real: quantizing layer 2 alone now hurts far more (onnxruntime outputs)
    for bits in (3, 4):
        assert measured_mse(plant, "w2", bits, x) > 5 * measured_mse(base, "w2", bits, x)
    budgets = [3.0, 4.0, 5.0]
    before, after = allocations(base, x, budgets), allocations(plant, x, budgets)
    for b_before, b_after in zip(before, after, strict=True):
        assert b_after[2] >= b_before[2]
    assert after[0][2] > before[0][2] and after[1][2] > before[1][2]


def test_activation_error_matches_the_built_qdq_model() -> None:
    weights, biases, x = mlp_parts()
    model = mlp(weights, biases)
    result = analyze(model, {"x": x}, activations=True, **FAST)
    quantizer = Quantizer(model, target_opset=21)
    dataset = Dataset(Path("<arrays>"), input_specs(quantizer.model), {"x": x})
    quantizer.calibrate(dataset)
    table = activation_sensitivity(result, quantizer, dataset, (8, 16), max_samples=128)
    assert table.names == ["x", "r0", "r1"]
    assert table.keys == [quantizer.placement.source(t) for t in table.names]
    for r, tensor in enumerate(table.names):
        trace = next(a.trace for a in result.activations if a.tensor == tensor)
        for k, bits in enumerate((8, 16)):
            plan = QuantPlan({}, {table.keys[r]: ActSpec(bits)})
            built = quantizer.build(plan).model
            fake = _reader_input(built, f"gemm{r}", x)
            reference = _tensor(model, tensor, x)
            per_sample = np.square(fake.astype(np.float64) - reference).sum() / len(x)
            assert table.sq_error[r, k] == pytest.approx(per_sample, rel=1e-6)
            assert table.omega[r, k] == pytest.approx(
                trace / reference[0].size * per_sample, rel=1e-6)
    assert np.all(table.omega[:, 1] < table.omega[:, 0] / 1000)  # 16 bits: ~256² less error
    units = layer_choices(quantizer.view, quantizer.placement, tie_activations=True)
    assert [u.act_names for u in units] == [("x",), ("r0",), ("r1",)]
    np.testing.assert_array_equal(table.for_choices(units), table.omega)


def _tensor(model: onnx.ModelProto, name: str, x: np.ndarray) -> np.ndarray:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    session = ort.InferenceSession(copy.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([name], {"x": x})[0].astype(np.float64)


def _reader_input(built: onnx.ModelProto, node_name: str, x: np.ndarray) -> np.ndarray:
    """What the QDQ model feeds into a layer (its activation's DequantizeLinear output)."""
    node = next(n for n in built.graph.node if n.name == node_name)
    producer = next(n for n in built.graph.node if node.input[0] in n.output)
    assert producer.op_type == "DequantizeLinear"
    copy = onnx.ModelProto()
    copy.CopyFrom(built)
    copy.graph.output.append(helper.make_tensor_value_info(node.input[0], TensorProto.FLOAT,
                                                           None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(copy.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run([node.input[0]], {"x": x})[0]
