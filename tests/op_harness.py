"""Build one-node ONNX models and compare the mirror with onnxruntime on them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from hawq_onnx.mirror import Mirror

IR_FOR_OPSET = {o: 10 for o in range(7, 22)} | {22: 10, 23: 11, 24: 11, 25: 11}


def single_op_model(
    op_type: str,
    inputs: Mapping[str, np.ndarray],
    attrs: Mapping[str, object] | None = None,
    *,
    opset: int,
    n_outputs: int = 1,
    constants: Mapping[str, np.ndarray] | None = None,
    input_order: Sequence[str] | None = None,
    domain: str = "",
) -> onnx.ModelProto:
    """A model with one ``op_type`` node. ``inputs`` become graph inputs, ``constants``
    initializers; ``input_order`` gives the node's input list ('' for an omitted input)."""
    constants = dict(constants or {})
    order = list(input_order) if input_order is not None else [*inputs, *constants]
    outputs = [f"out{i}" for i in range(n_outputs)]
    node = helper.make_node(op_type, order, outputs, domain=domain, **dict(attrs or {}))
    graph = helper.make_graph(
        [node],
        f"{op_type}_test",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
         for n, a in inputs.items()],
        [helper.make_value_info(o, onnx.TypeProto()) for o in outputs],
        [numpy_helper.from_array(np.asarray(a), n) for n, a in constants.items()],
    )
    opsets = [helper.make_opsetid("", opset)]
    if domain:
        opsets.append(helper.make_opsetid(domain, 1))
    return helper.make_model(graph, opset_imports=opsets, ir_version=IR_FOR_OPSET[opset])


def run_ort(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, dict(feeds))


def assert_matches_ort(
    model: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    *,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    weight_names: Sequence[str] = (),
) -> list[np.ndarray]:
    """Run both engines and assert every output agrees in dtype, shape and value."""
    expected = run_ort(model, feeds)
    mirror = Mirror(model, weight_names=list(weight_names))
    got = mirror.run_numpy(feeds)
    for name, want in zip(mirror.output_names, expected, strict=True):
        have = got[name]
        assert have.shape == want.shape, f"{name}: shape {have.shape} != {want.shape}"
        assert have.dtype == want.dtype, f"{name}: dtype {have.dtype} != {want.dtype}"
        if want.dtype == bool or np.issubdtype(want.dtype, np.integer):
            np.testing.assert_array_equal(have, want, err_msg=name)
        else:
            np.testing.assert_allclose(have, want, rtol=rtol, atol=atol, err_msg=name)
    return [got[n] for n in mirror.output_names]


def assert_gradients_match_finite_differences(
    model: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    *,
    second_order: bool = True,
) -> None:
    """First (and second) derivatives of a float64 mirror w.r.t. every float input match
    central finite differences (torch.autograd.gradcheck / gradgradcheck); integer and bool
    inputs are held fixed and non-float outputs ignored."""
    import torch

    mirror = Mirror(model, weight_names=[], dtype=torch.float64)
    fixed = {n: torch.from_numpy(np.array(feeds[n])) for n in mirror.input_names}
    wrt = [n for n in mirror.input_names if fixed[n].is_floating_point()]
    variables = tuple(fixed[n].double().requires_grad_() for n in wrt)

    def run(*values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = mirror(**(fixed | dict(zip(wrt, values, strict=True))))
        return tuple(o for o in outputs if o.is_floating_point())

    assert torch.autograd.gradcheck(run, variables, eps=1e-6, atol=1e-5, rtol=1e-4)
    if second_order:
        assert torch.autograd.gradgradcheck(run, variables, eps=1e-6, atol=1e-5, rtol=1e-4)
