"""Raise the default-domain opset to 13 with ``onnx.version_converter``.

Per-channel ``QuantizeLinear``/``DequantizeLinear`` (``axis``) exist only from opset 13, so
older models (opset 7-12 exports are common) are converted first. The converted model must
load in onnxruntime; when the converter fails, or its result does not load, the pass raises
:class:`OpsetConversionError` naming the op type(s) responsible instead of a C++ assertion.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import onnx
from onnx import version_converter

from hawq_onnx.errors import HawqError, OpsetConversionError
from hawq_onnx.model_io import (
    DEFAULT_EXTERNAL_DATA_THRESHOLD,
    copy_model,
    detached_payloads,
    is_too_big_for_protobuf,
    save_model,
    target_ir_version,
)
from hawq_onnx.passes.base import PassReport

TARGET_OPSET = 13
_DEFAULT_DOMAINS = ("", "ai.onnx")
_MODEL_FIELDS = ("doc_string", "producer_name", "producer_version", "model_version", "domain")


def default_opset(model: onnx.ModelProto) -> int | None:
    """The model's default-domain (ai.onnx) opset version, None if it imports none."""
    versions = [o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS]
    return max(versions) if versions else None


def _first_line(text: object) -> str:
    """First line of an error, without the converter's C++ file/assertion prefixes."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    line = lines[0] if lines else ""
    line = re.sub(r"^\S+\.(?:h|cc|cpp):\d+: [\w:<>~]+\(\): ", "", line)
    return re.sub(r"^Assertion `.*?` failed: ", "", line)


def _convert(model: onnx.ModelProto) -> onnx.ModelProto:
    """Run the converter, working on a skeleton when the weights exceed protobuf's 2 GiB."""
    if not is_too_big_for_protobuf(model):
        return version_converter.convert_version(model, TARGET_OPSET)
    # only initializers are set aside: they keep their names through the conversion
    names = [init.name for init in model.graph.initializer]
    with detached_payloads(model, DEFAULT_EXTERNAL_DATA_THRESHOLD,
                           model.graph.initializer) as payloads:
        converted = version_converter.convert_version(copy_model(model), TARGET_OPSET)
    by_name = {names[index]: payload for index, payload in payloads}
    for init in converted.graph.initializer:
        if init.name in by_name and init.data_location == onnx.TensorProto.EXTERNAL:
            init.data_location = onnx.TensorProto.DEFAULT
            init.raw_data = by_name.pop(init.name)
    if by_name:
        raise OpsetConversionError(
            f"opset conversion lost {len(by_name)} large tensor(s) of a > 2 GiB model "
            f"(e.g. '{next(iter(by_name))}')"
        )
    return converted


def _channel_slopes_for_legacy_prelu(model: onnx.ModelProto) -> int:
    """Before opset 7 a 1-D PRelu slope of size C applied per channel (axis 1); from 7 on it
    broadcasts from the right, and the converter does not rewrite it. Reshape such slopes to
    [C, 1, ...] so the upgraded model computes what the original did. Returns the count."""
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    typed = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
    ranks = {info.name: len(info.type.tensor_type.shape.dim)
             for info in (*typed.input, *typed.value_info) if info.type.HasField("tensor_type")}
    fixed = 0
    for node in graph.node:
        if node.op_type != "PRelu":
            continue
        slope, rank = inits.get(node.input[1]), ranks.get(node.input[0], 0)
        if slope is None or len(slope.dims) != 1 or slope.dims[0] <= 1 or rank <= 2:
            continue
        slope.dims[:] = [slope.dims[0]] + [1] * (rank - 2)
        for info in graph.input:  # IR < 4 models also list initializers as inputs
            if info.name == slope.name:
                shape = info.type.tensor_type.shape
                del shape.dim[:]
                for size in slope.dims:
                    shape.dim.add().dim_value = size
        fixed += 1
    return fixed


def _single_node_model(model: onnx.ModelProto, node: onnx.NodeProto) -> onnx.ModelProto:
    """``node`` alone, with its known input types and constant inputs, for blame-finding."""
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    infos = {info.name: info for info in (*graph.input, *graph.value_info, *graph.output)}
    inputs, initializers = [], []
    for name in dict.fromkeys(n for n in node.input if n):
        if name in inits:
            initializers.append(inits[name])
        else:
            inputs.append(infos.get(name) or onnx.helper.make_value_info(name, onnx.TypeProto()))
    outputs = [infos.get(n) or onnx.helper.make_value_info(n, onnx.TypeProto())
               for n in node.output if n]
    sub = onnx.helper.make_graph([node], "blame", inputs, outputs, initializers)
    return onnx.helper.make_model(sub, opset_imports=list(model.opset_import),
                                  ir_version=model.ir_version)


def _blame_converter(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """Convert each distinct main-graph node alone; return (op_type, error) of the failures."""
    try:
        typed = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # inference is only a help for typing the one-node models
        typed = model
    failures: dict[str, str] = {}
    seen: set[bytes] = set()
    for node in typed.graph.node:
        key = node.SerializeToString(deterministic=True)
        if node.op_type in failures or key in seen:
            continue
        seen.add(key)
        try:
            version_converter.convert_version(_single_node_model(typed, node), TARGET_OPSET)
        except Exception as exc:  # the converter raises RuntimeError/ValueError/...
            failures[node.op_type] = _first_line(exc)
    return list(failures.items())


def _blame_message(model: onnx.ModelProto, message: str) -> list[str]:
    """Op types of the model that an error message mentions (by op type or node name)."""
    named = set(re.findall(r"Op \((\w+)\)|op_type[:=]\s*'?(\w+)", message))
    found = {op for pair in named for op in pair if op}
    for node in model.graph.node:
        if node.op_type in message.split() or (node.name and f"({node.name})" in message):
            found.add(node.op_type)
    return sorted(found)


def _ort_check(model: onnx.ModelProto) -> None:
    """Create an onnxruntime session for ``model``; raises whatever onnxruntime raises."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    providers = ["CPUExecutionProvider"]
    if not is_too_big_for_protobuf(model):
        ort.InferenceSession(model.SerializeToString(), options, providers=providers)
        return
    with tempfile.TemporaryDirectory(prefix="hawq-opset-") as tmp:
        path = save_model(model, Path(tmp) / "converted.onnx", external_data=True)
        ort.InferenceSession(str(path), options, providers=providers)


def _restore_model_fields(converted: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """Put back model-level metadata the converter may drop or rewrite."""
    for field in _MODEL_FIELDS:
        setattr(converted, field, getattr(original, field))
    del converted.metadata_props[:]
    converted.metadata_props.extend(original.metadata_props)
    if not converted.functions and original.functions:
        converted.functions.extend(original.functions)


def upgrade_opset(model: onnx.ModelProto) -> tuple[onnx.ModelProto, PassReport]:
    """Convert a default-domain opset below 13 to 13 and prove onnxruntime loads the result."""
    report = PassReport("upgrade_opset")
    source = default_opset(model)
    if source is None or source >= TARGET_OPSET:
        return model, report
    if source < 7:
        model = copy_model(model)
        if fixed := _channel_slopes_for_legacy_prelu(model):
            report.note(f"reshaped {fixed} legacy per-channel PRelu slope(s) for opset >= 7")
    try:
        converted = _convert(model)
    except OpsetConversionError:
        raise
    except Exception as exc:  # the converter's C++ assertions arrive as RuntimeError
        failures = _blame_converter(model)
        detail = _first_line(exc)
        if failures:
            ops = ", ".join(op for op, _ in failures)
            detail = "; ".join(f"{op}: {msg}" for op, msg in failures)
        else:
            ops = ", ".join(_blame_message(model, str(exc))) or "unknown op"
        raise OpsetConversionError(
            f"cannot convert opset {source} to {TARGET_OPSET}: failed for op type(s) {ops} "
            f"({detail})"
        ) from exc
    _restore_model_fields(converted, model)
    try:
        converted.ir_version = target_ir_version(converted)
        _ort_check(converted)
    except HawqError:
        raise
    except Exception as exc:
        ops = ", ".join(_blame_message(converted, str(exc))) or "unknown op"
        raise OpsetConversionError(
            f"the model converted from opset {source} to {TARGET_OPSET} does not load in "
            f"onnxruntime (op type(s) {ops}): {_first_line(exc)}"
        ) from exc
    report.note(f"converted default-domain opset {source} -> {TARGET_OPSET}")
    return converted, report
