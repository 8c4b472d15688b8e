"""Mirror recurrent ops LSTM, GRU and RNN: parity with onnxruntime across directions,
layouts, optional inputs and activations; weight gradients and a Hessian-vector product."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from hawq_onnx.mirror import Mirror
from tests.op_harness import assert_matches_ort, run_ort, single_op_model
from tests.test_ops_nn import check_hessian_vector_product, check_weight_gradients, rand

SEQ, BATCH, INPUT, HIDDEN = 4, 3, 2, 3
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
# The node's input slots after X, W, R; LSTM has two more (initial_c, P).
SLOTS = {"LSTM": ["B", "sequence_lens", "initial_h", "initial_c", "P"],
         "GRU": ["B", "sequence_lens", "initial_h"],
         "RNN": ["B", "sequence_lens", "initial_h"]}


def _recurrent_model(op: str, case: tuple) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """``case`` = (opset, attrs, optional inputs present, number of outputs)."""
    opset, attrs, present, n_outputs = case
    attrs = {"hidden_size": HIDDEN, **attrs}
    dirs = 2 if attrs.get("direction") == "bidirectional" else 1
    layout = attrs.get("layout", 0)
    size = GATES[op] * HIDDEN
    # Layout 1 (batch-major) holds the very numbers of layout 0, transposed.
    state = {"initial_h": rand(4, dirs, BATCH, HIDDEN), "initial_c": rand(5, dirs, BATCH, HIDDEN)}
    x = rand(0, SEQ, BATCH, INPUT)
    if layout:
        state = {k: v.transpose(1, 0, 2).copy() for k, v in state.items()}
        x = x.transpose(1, 0, 2).copy()
    available = {
        "W": 0.6 * rand(1, dirs, size, INPUT), "R": 0.6 * rand(2, dirs, size, HIDDEN),
        "B": 0.3 * rand(3, dirs, 2 * size),
        "sequence_lens": np.array([SEQ, 2, 3], np.int32),
        **state, "P": 0.5 * rand(6, dirs, 3 * HIDDEN),
    }
    constants = {k: v for k, v in available.items() if k in {"W", "R", *present}}
    order = ["x", "W", "R"] + [s if s in present else "" for s in SLOTS[op]]
    while order[-1] == "":
        order.pop()
    feeds = {"x": x}
    model = single_op_model(op, feeds, attrs, opset=opset, n_outputs=n_outputs,
                            constants=constants, input_order=order)
    return model, feeds


BI = {"direction": "bidirectional"}
LSTM_CASES = {
    "forward-bias": (14, {}, {"B"}, 3),
    "forward-y-only": (22, {}, set(), 1),
    "reverse": (14, {"direction": "reverse"}, {"B", "initial_h", "initial_c"}, 3),
    "bidirectional-initial-state": (22, BI, {"B", "initial_h", "initial_c"}, 3),
    "peepholes": (14, {}, {"B", "P"}, 3),
    "peepholes-bidirectional": (14, BI, {"P", "initial_c"}, 3),
    "sequence-lens": (14, {}, {"B", "sequence_lens", "initial_h"}, 3),
    "sequence-lens-bidirectional": (13, BI, {"B", "sequence_lens", "P"}, 3),
    "clip": (14, {"clip": 0.4}, {"B"}, 3),
    "input-forget": (14, {"input_forget": 1}, {"B", "initial_c"}, 3),
    "activations-alpha-beta": (14, {
        "activations": ["HardSigmoid", "LeakyRelu", "Softsign"],
        "activation_alpha": [0.3, 0.2], "activation_beta": [0.4]}, {"B"}, 3),
    "activations-default-alpha": (14, {
        "activations": ["HardSigmoid", "Tanh", "Tanh", "Sigmoid", "Relu", "Tanh"],
        "direction": "bidirectional"}, {"B"}, 3),
}


@pytest.mark.parametrize("case", LSTM_CASES.values(), ids=LSTM_CASES.keys())
def test_lstm_matches_onnxruntime(case: tuple) -> None:
    model, feeds = _recurrent_model("LSTM", case)
    assert_matches_ort(model, feeds, rtol=1e-5, atol=1e-5)


GRU_CASES = {
    "forward-bias": (14, {}, {"B"}, 2),
    "linear-before-reset": (14, {"linear_before_reset": 1}, {"B", "initial_h"}, 2),
    "reverse": (22, {"direction": "reverse"}, {"B"}, 2),
    "bidirectional-linear-before-reset": (14, {**BI, "linear_before_reset": 1},
                                          {"B", "initial_h"}, 2),
    "no-bias-y-h-only": (14, {}, set(), 2),
    "sequence-lens-bidirectional": (14, {**BI, "linear_before_reset": 1},
                                    {"B", "sequence_lens", "initial_h"}, 2),
    "clip": (13, {"clip": 0.3, "linear_before_reset": 1}, {"B"}, 2),
    "activations": (14, {"activations": ["HardSigmoid", "Relu"], "activation_alpha": [0.3],
                         "activation_beta": [0.6], "linear_before_reset": 1}, {"B"}, 2),
}


@pytest.mark.parametrize("case", GRU_CASES.values(), ids=GRU_CASES.keys())
def test_gru_matches_onnxruntime(case: tuple) -> None:
    model, feeds = _recurrent_model("GRU", case)
    assert_matches_ort(model, feeds, rtol=1e-5, atol=1e-5)


RNN_CASES = {
    "forward": (14, {}, {"B"}, 2),
    "bidirectional-initial-h": (22, BI, {"B", "initial_h"}, 2),
    "relu-reverse": (14, {"activations": ["Relu"], "direction": "reverse"}, {"B"}, 2),
    "sequence-lens": (14, BI, {"B", "sequence_lens"}, 2),
    "clip-no-bias": (13, {"clip": 0.5}, set(), 2),
}


@pytest.mark.parametrize("case", RNN_CASES.values(), ids=RNN_CASES.keys())
def test_rnn_matches_onnxruntime(case: tuple) -> None:
    model, feeds = _recurrent_model("RNN", case)
    assert_matches_ort(model, feeds, rtol=1e-5, atol=1e-5)


# onnxruntime refuses layout=1, so batch-major runs are checked against ORT on the
# transposed sequence-major problem.
LAYOUT_CASES = {
    "lstm-bidirectional": ("LSTM", (14, BI, {"B", "initial_h", "initial_c", "P"}, 3)),
    "lstm-y-only": ("LSTM", (22, {}, {"B"}, 1)),
    "gru-linear-before-reset": ("GRU", (14, {**BI, "linear_before_reset": 1},
                                        {"B", "initial_h", "sequence_lens"}, 2)),
    "rnn": ("RNN", (14, {"direction": "reverse"}, {"initial_h"}, 2)),
}


@pytest.mark.parametrize("case", LAYOUT_CASES.values(), ids=LAYOUT_CASES.keys())
def test_layout_1_matches_onnxruntime_on_transposed_problem(case: tuple) -> None:
    op, (opset, attrs, present, n_outputs) = case
    seq_model, seq_feeds = _recurrent_model(op, (opset, attrs, present, n_outputs))
    batch_model, batch_feeds = _recurrent_model(op, (opset, {**attrs, "layout": 1}, present,
                                                     n_outputs))
    expected = run_ort(seq_model, seq_feeds)
    got = Mirror(batch_model, weight_names=[]).run_numpy(batch_feeds)
    assert len(got) == len(expected) == n_outputs
    # Y: [seq, dirs, batch, H] -> [batch, seq, dirs, H]; states: [dirs, batch, H] -> swap.
    transposes = [(2, 0, 1, 3), (1, 0, 2), (1, 0, 2)]
    for i, want in enumerate(expected):
        np.testing.assert_allclose(got[f"out{i}"], want.transpose(transposes[i]), rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize(
    ("op", "case", "weights"),
    [("LSTM", LSTM_CASES["peepholes-bidirectional"], ["W", "R", "P"]),
     ("LSTM", LSTM_CASES["sequence-lens"], ["W", "R", "B"]),
     ("GRU", GRU_CASES["bidirectional-linear-before-reset"], ["W", "R", "B"]),
     ("GRU", GRU_CASES["reverse"], ["W", "R", "B"])],
    ids=["lstm-peepholes-bidirectional", "lstm-sequence-lens", "gru-linear-before-reset",
         "gru-reverse"])
def test_recurrent_weight_gradients_match_finite_differences(op: str, case: tuple,
                                                              weights: list[str]) -> None:
    model, feeds = _recurrent_model(op, case)
    check_weight_gradients(model, feeds, weights)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize(
    ("op", "case", "weights"),
    [("LSTM", LSTM_CASES["bidirectional-initial-state"], ["W", "R"]),
     ("LSTM", LSTM_CASES["peepholes"], ["W", "R", "P"]),
     ("GRU", GRU_CASES["sequence-lens-bidirectional"], ["W", "R", "B"]),
     ("RNN", RNN_CASES["bidirectional-initial-h"], ["W", "R"])],
    ids=["lstm-bidirectional", "lstm-peepholes", "gru-sequence-lens", "rnn"])
def test_hessian_vector_product_through_recurrence(op: str, case: tuple,
                                                   weights: list[str]) -> None:
    model, feeds = _recurrent_model(op, case)
    check_hessian_vector_product(model, feeds, weights)
