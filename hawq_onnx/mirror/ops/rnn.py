"""Mirror ops: the ONNX recurrent layers LSTM, GRU and RNN, unrolled over time.

The input projection of every time step is one matmul up front; the loop only does the
recurrent product and gate algebra, all out-of-place so double backward and forward-mode AD
work. ``sequence_lens`` is honoured with masks (a batch entry's state stops changing and its
output is zero past its length), which needs no host round-trip. Gate orders follow ONNX:
LSTM ``i, o, f, c``; GRU ``z, r, h``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from hawq_onnx.mirror.registry import OpContext, register

Activation = Callable[[torch.Tensor], torch.Tensor]
State = tuple[torch.Tensor, ...]


# ---------------------------------------------------------------------------- activations
def _hard_sigmoid(x: torch.Tensor, a: float, b: float) -> torch.Tensor:
    return torch.clamp(a * x + b, 0.0, 1.0)


def _thresholded_relu(x: torch.Tensor, a: float, b: float) -> torch.Tensor:
    return torch.where(x > a, x, torch.zeros_like(x))


# name -> (fn(x, alpha, beta), uses alpha, uses beta, default alpha, default beta)
_ACTIVATIONS: dict[str, tuple[Callable[[torch.Tensor, float, float], torch.Tensor], bool, bool,
                              float, float]] = {
    "sigmoid": (lambda x, a, b: torch.sigmoid(x), False, False, 0.0, 0.0),
    "tanh": (lambda x, a, b: torch.tanh(x), False, False, 0.0, 0.0),
    "relu": (lambda x, a, b: torch.relu(x), False, False, 0.0, 0.0),
    "softsign": (lambda x, a, b: x / (1 + x.abs()), False, False, 0.0, 0.0),
    "softplus": (lambda x, a, b: F.softplus(x), False, False, 0.0, 0.0),
    "affine": (lambda x, a, b: a * x + b, True, True, 1.0, 0.0),
    "leakyrelu": (lambda x, a, b: F.leaky_relu(x, a), True, False, 0.01, 0.0),
    "thresholdedrelu": (_thresholded_relu, True, False, 1.0, 0.0),
    "scaledtanh": (lambda x, a, b: a * torch.tanh(b * x), True, True, 1.0, 1.0),
    "hardsigmoid": (_hard_sigmoid, True, True, 0.2, 0.5),
    "elu": (lambda x, a, b: F.elu(x, a), True, False, 1.0, 0.0),
}


def _activations(attrs: dict[str, Any], defaults: Sequence[str],
                 num_directions: int) -> list[list[Activation]]:
    """Per direction, the gate activations; alpha/beta values are consumed in order by the
    functions that take them (falling back to each function's default), as onnxruntime does."""
    names = list(attrs.get("activations") or [])
    if not names:
        names = list(defaults) * num_directions
    elif len(names) == len(defaults) and num_directions == 2:
        names = names * 2
    if len(names) != len(defaults) * num_directions:
        raise ValueError(f"expected {len(defaults) * num_directions} activations, got {names}")
    alphas = iter(float(a) for a in attrs.get("activation_alpha") or [])
    betas = iter(float(b) for b in attrs.get("activation_beta") or [])
    funcs: list[Activation] = []
    for name in names:
        key = name.lower()
        if key not in _ACTIVATIONS:
            raise NotImplementedError(f"recurrent activation {name!r} is not supported")
        fn, uses_alpha, uses_beta, alpha, beta = _ACTIVATIONS[key]
        alpha = next(alphas, alpha) if uses_alpha else alpha
        beta = next(betas, beta) if uses_beta else beta
        funcs.append(lambda x, fn=fn, a=alpha, b=beta: fn(x, a, b))
    per = len(defaults)
    return [funcs[d * per:(d + 1) * per] for d in range(num_directions)]


# ---------------------------------------------------------------------------- shared set-up
@dataclass
class _Recurrence:
    """A recurrent node's inputs normalized to sequence-major layout."""

    x: torch.Tensor  # [seq, batch, input]
    w: torch.Tensor  # [dirs, gates*H, input]
    r: torch.Tensor  # [dirs, gates*H, H]
    w_bias: torch.Tensor | None  # [dirs, gates*H]
    r_bias: torch.Tensor | None  # [dirs, gates*H]
    lengths: torch.Tensor | None  # [batch]
    reverse: list[bool]  # per direction
    layout: int
    clip: float | None
    hidden: int

    def initial(self, value: torch.Tensor | None) -> torch.Tensor:
        """initial_h / initial_c as [dirs, batch, H] (zeros when omitted)."""
        if value is None:
            return self.x.new_zeros(len(self.reverse), self.x.shape[1], self.hidden)
        return value.transpose(0, 1) if self.layout == 1 else value

    def clipped(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.clip is None else torch.clamp(x, -self.clip, self.clip)

    def projected(self, d: int, with_r_bias: bool = True) -> torch.Tensor:
        """X W^T (+ biases) for every time step of direction ``d``: [seq, batch, gates*H]."""
        y = torch.matmul(self.x, self.w[d].transpose(0, 1))
        if self.w_bias is not None:
            y = y + self.w_bias[d]
        if with_r_bias and self.r_bias is not None:
            y = y + self.r_bias[d]
        return y


def _opt(inputs: list[Any], index: int) -> Any:
    return inputs[index] if len(inputs) > index else None


def _recurrence(inputs: list[Any], attrs: dict[str, Any], gates: int) -> _Recurrence:
    x, w, r = inputs[0], inputs[1], inputs[2]
    bias, lengths = _opt(inputs, 3), _opt(inputs, 4)
    layout = int(attrs.get("layout", 0))
    if layout == 1:
        x = x.transpose(0, 1)
    direction = attrs.get("direction", "forward")
    reverse = {"forward": [False], "reverse": [True], "bidirectional": [False, True]}.get(
        direction)
    if reverse is None:
        raise ValueError(f"unknown direction {direction!r}")
    hidden = int(attrs.get("hidden_size", r.shape[-1]))
    clip = attrs.get("clip")
    size = gates * hidden
    return _Recurrence(
        x=x, w=w, r=r,
        w_bias=None if bias is None else bias[:, :size],
        r_bias=None if bias is None else bias[:, size:],
        lengths=lengths, reverse=reverse, layout=layout,
        clip=None if clip is None else float(clip), hidden=hidden)


def _scan(rec: _Recurrence, step: Callable[[int, State], State], state: State,
          reverse: bool) -> tuple[torch.Tensor, State]:
    """Run ``step(t, state) -> state`` over time; returns the stacked hidden states (state[0])
    [seq, batch, H] and the final state. Past a batch entry's length the state is held and
    the output is zero."""
    seq = rec.x.shape[0]
    outputs: list[torch.Tensor] = [rec.x.new_zeros(0)] * seq
    for t in (range(seq - 1, -1, -1) if reverse else range(seq)):
        new = step(t, state)
        if rec.lengths is not None:
            valid = (rec.lengths.to(rec.x.device) > t).unsqueeze(1)
            new = tuple(torch.where(valid, n, s) for n, s in zip(new, state, strict=True))
            outputs[t] = torch.where(valid, new[0], torch.zeros_like(new[0]))
        else:
            outputs[t] = new[0]
        state = new
    return torch.stack(outputs), state


def _outputs(rec: _Recurrence, ys: list[torch.Tensor],
             finals: Sequence[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Y [seq, dirs, batch, H] and the final states [dirs, batch, H], in the node's layout."""
    y = torch.stack(ys, dim=1)
    states = [torch.stack(f) for f in finals]
    if rec.layout == 1:
        return [y.permute(2, 0, 1, 3)] + [s.transpose(0, 1) for s in states]
    return [y, *states]


# ---------------------------------------------------------------------------- LSTM
@register("LSTM")
def lstm(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> list[torch.Tensor]:
    """Outputs Y, Y_h, Y_c."""
    rec = _recurrence(inputs, attrs, gates=4)
    h0, c0 = rec.initial(_opt(inputs, 5)), rec.initial(_opt(inputs, 6))
    peep = _opt(inputs, 7)
    acts = _activations(attrs, ("Sigmoid", "Tanh", "Tanh"), len(rec.reverse))
    input_forget = bool(attrs.get("input_forget", 0))
    ys, hs, cs = [], [], []
    for d, reverse in enumerate(rec.reverse):
        f, g, h = acts[d]
        gx, rt = rec.projected(d), rec.r[d].transpose(0, 1)
        p_i, p_o, p_f = (None, None, None) if peep is None else peep[d].chunk(3)

        def step(t: int, state: State, gx=gx, rt=rt, f=f, g=g, h=h, p_i=p_i, p_o=p_o,
                 p_f=p_f) -> State:
            h_prev, c_prev = state
            a_i, a_o, a_f, a_c = (gx[t] + h_prev @ rt).chunk(4, dim=-1)
            if p_i is not None:
                a_i, a_f = a_i + p_i * c_prev, a_f + p_f * c_prev
            i = f(rec.clipped(a_i))
            forget = 1 - i if input_forget else f(rec.clipped(a_f))
            c = forget * c_prev + i * g(rec.clipped(a_c))
            if p_o is not None:
                a_o = a_o + p_o * c
            return f(rec.clipped(a_o)) * h(c), c

        y, (h_last, c_last) = _scan(rec, step, (h0[d], c0[d]), reverse)
        ys.append(y)
        hs.append(h_last)
        cs.append(c_last)
    return _outputs(rec, ys, (hs, cs))


# ---------------------------------------------------------------------------- GRU
@register("GRU")
def gru(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> list[torch.Tensor]:
    """Outputs Y, Y_h. ``linear_before_reset`` applies the reset gate after R_h's product."""
    rec = _recurrence(inputs, attrs, gates=3)
    h0 = rec.initial(_opt(inputs, 5))
    acts = _activations(attrs, ("Sigmoid", "Tanh"), len(rec.reverse))
    linear_before_reset = bool(attrs.get("linear_before_reset", 0))
    size = rec.hidden
    ys, hs = [], []
    for d, reverse in enumerate(rec.reverse):
        f, g = acts[d]
        gx = rec.projected(d, with_r_bias=False)
        r_zr, r_h = rec.r[d][:2 * size].transpose(0, 1), rec.r[d][2 * size:].transpose(0, 1)
        rb = rec.r_bias[d] if rec.r_bias is not None else gx.new_zeros(3 * size)
        rb_zr, rb_h = rb[:2 * size], rb[2 * size:]

        def step(t: int, state: State, gx=gx, r_zr=r_zr, r_h=r_h, rb_zr=rb_zr, rb_h=rb_h,
                 f=f, g=g) -> State:
            (h_prev,) = state
            x_zr, x_h = gx[t][:, :2 * size], gx[t][:, 2 * size:]
            z, r = f(rec.clipped(x_zr + h_prev @ r_zr + rb_zr)).chunk(2, dim=-1)
            if linear_before_reset:
                a_h = x_h + r * (h_prev @ r_h + rb_h)
            else:
                a_h = x_h + (r * h_prev) @ r_h + rb_h
            return ((1 - z) * g(rec.clipped(a_h)) + z * h_prev,)

        y, (h_last,) = _scan(rec, step, (h0[d],), reverse)
        ys.append(y)
        hs.append(h_last)
    return _outputs(rec, ys, (hs,))


# ---------------------------------------------------------------------------- RNN
@register("RNN")
def rnn(ctx: OpContext, inputs: list[Any], attrs: dict[str, Any]) -> list[torch.Tensor]:
    """Outputs Y, Y_h of the simple recurrence H_t = f(X_t W^T + H_{t-1} R^T + biases)."""
    rec = _recurrence(inputs, attrs, gates=1)
    h0 = rec.initial(_opt(inputs, 5))
    acts = _activations(attrs, ("Tanh",), len(rec.reverse))
    ys, hs = [], []
    for d, reverse in enumerate(rec.reverse):
        (f,) = acts[d]
        gx, rt = rec.projected(d), rec.r[d].transpose(0, 1)

        def step(t: int, state: State, gx=gx, rt=rt, f=f) -> State:
            return (f(rec.clipped(gx[t] + state[0] @ rt)),)

        y, (h_last,) = _scan(rec, step, (h0[d],), reverse)
        ys.append(y)
        hs.append(h_last)
    return _outputs(rec, ys, (hs,))
