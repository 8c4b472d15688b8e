"""Quantizers and the quantization plan (weights, activations, biases, storage types)."""

from hawq_onnx.quant.activations import ActQParams, act_qparams
from hawq_onnx.quant.plan import ActSpec, QuantPlan, WeightSpec, uniform_plan
from hawq_onnx.quant.weights import (
    QuantizedWeight,
    WeightLayout,
    fake_quantize,
    quantize_bias,
    quantize_weight,
)

__all__ = ["ActQParams", "ActSpec", "QuantPlan", "QuantizedWeight", "WeightLayout",
           "WeightSpec", "act_qparams", "fake_quantize", "quantize_bias", "quantize_weight",
           "uniform_plan"]
