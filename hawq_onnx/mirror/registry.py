"""The mirror's op registry: one ONNX op type -> one small torch function.

Each op function has the signature ``fn(ctx, inputs, attrs) -> Tensor | Sequence[Tensor]``:

* ``ctx`` (:class:`OpContext`) carries the model's opset for the op's domain, the compute
  dtype/device and a callback to run subgraphs (``If`` branches);
* ``inputs`` is the node's input list, with ``None`` for omitted optional inputs;
* ``attrs`` maps attribute names to Python values (ints, floats, strings (``str``),
  lists, numpy arrays for tensors, :class:`onnx.GraphProto` for subgraphs).

Opset differences (axes as attribute vs input and the like) are handled inside the one
function for the op, reading ``ctx.opset`` or whichever form the node actually carries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

OpFunction = Callable[["OpContext", list[Any], dict[str, Any]], Any]

_REGISTRY: dict[tuple[str, str], OpFunction] = {}


@dataclass
class OpContext:
    """What an op function may need beyond its inputs and attributes."""

    opset: int
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    node_name: str = ""
    # How many outputs the node declares (Split without sizes divides by it).
    n_outputs: int = 1
    # Runs a subgraph (GraphProto) with the outer scope's tensors visible; returns its outputs.
    run_subgraph: Callable[[Any], list[Any]] | None = None

    def float_dtype(self, onnx_float_type: torch.dtype) -> torch.dtype:
        """Float casts follow the mirror's compute dtype (so float64 checks stay float64),
        except that double stays double: models that compute in float64 need its range."""
        if not onnx_float_type.is_floating_point:
            return onnx_float_type
        return torch.float64 if onnx_float_type == torch.float64 else self.dtype


def register(*op_types: str, domain: str = "") -> Callable[[OpFunction], OpFunction]:
    """Register ``fn`` as the implementation of ``op_types`` in ``domain``."""

    def decorate(fn: OpFunction) -> OpFunction:
        for op_type in op_types:
            key = (domain, op_type)
            if key in _REGISTRY:
                raise RuntimeError(f"op {op_type!r} registered twice")
            _REGISTRY[key] = fn
        return fn

    return decorate


def lookup(op_type: str, domain: str = "") -> OpFunction | None:
    _load_ops()
    return _REGISTRY.get((_canonical_domain(domain), op_type))


def supported_ops(domain: str = "") -> list[str]:
    _load_ops()
    return sorted(op for dom, op in _REGISTRY if dom == _canonical_domain(domain))


def _canonical_domain(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain


def as_list(value: Any) -> list[Any]:
    """Normalize an op function's return value to a list of outputs."""
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def ints(value: Any) -> list[int]:
    """A tensor / array / sequence of integers as a Python list (for shapes, axes, ...)."""
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    if isinstance(value, Sequence):
        return [int(v) for v in value]
    return [int(v) for v in value.reshape(-1).tolist()]


_LOADED = False


def _load_ops() -> None:
    """Import the op modules once so their @register decorators run."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from hawq_onnx.mirror import ops  # noqa: F401
