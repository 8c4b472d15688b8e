"""The autograd mirror: an ONNX graph re-executed as PyTorch ops.

Why: onnxruntime gives outputs but no second derivatives. Running the same graph through
torch ops (one registry function per ONNX op) makes gradients and Hessian-vector products of
any loss w.r.t. the quantizable weights available, while onnxruntime parity tests keep the
mirror honest.

Design:
* quantizable weights are ``nn.Parameter`` (looked up by their ONNX initializer name in
  :attr:`Mirror.weights`); every other initializer is a buffer;
* nodes whose inputs are all constants (initializers that are not parameters, Constant
  nodes, and what is computed from them) are evaluated once at construction;
* hooks (:meth:`Mirror.add_hook`) can read or replace any tensor by name, including weights
  and graph inputs, which later stages use for fake quantization and activation Hessians;
* tensors are dropped from the environment after their last use, so memory stays bounded by
  what autograd itself keeps.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from hawq_onnx.errors import UnsupportedOpError
from hawq_onnx.mirror.dtypes import to_torch, torch_dtype
from hawq_onnx.mirror.registry import OpContext, as_list, lookup
from hawq_onnx.mirror.reuse import Recording, Reuse
from hawq_onnx.mirror.static import check_static_control_flow
from hawq_onnx.topology import node_reads, topological_order

Hook = Callable[[str, torch.Tensor], "torch.Tensor | None"]

# Ops whose results depend on more than their inputs' values; never folded at construction.
_NEVER_FOLD = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
               "Multinomial", "Bernoulli"}


class HookHandle:
    """Removes a hook when ``remove()`` is called (mirrors torch's RemovableHandle)."""

    def __init__(self, hooks: dict[str, list[Hook]], name: str, fn: Hook):
        self._hooks, self._name, self._fn = hooks, name, fn

    def remove(self) -> None:
        fns = self._hooks.get(self._name, [])
        if self._fn in fns:
            fns.remove(self._fn)


def attribute_value(attr: onnx.AttributeProto) -> Any:
    """An attribute as a Python value; strings decoded, tensors as numpy arrays."""
    value = onnx.helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return [v.decode("utf-8") for v in value]
    return value


def node_attributes(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: attribute_value(a) for a in node.attribute}


def unsupported_op_types(model: onnx.ModelProto) -> list[str]:
    """Op types (including inside subgraphs) that have no registry function."""

    missing: set[str] = set()

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            if lookup(node.op_type, node.domain) is None:
                label = node.op_type if node.domain in ("", "ai.onnx") else (
                    f"{node.domain}.{node.op_type}")
                missing.add(label)
            for attr in node.attribute:
                for sub in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                    visit(sub)

    visit(model.graph)
    return sorted(missing)


def _safe_key(name: str, taken: set[str]) -> str:
    key = re.sub(r"\W", "_", name) or "t"
    if key[0].isdigit():
        key = "t_" + key
    base, i = key, 1
    while key in taken:
        key, i = f"{base}_{i}", i + 1
    taken.add(key)
    return key


class Mirror(torch.nn.Module):
    """Executes an ONNX model with torch ops so autograd sees every operation."""

    def __init__(
        self,
        model: onnx.ModelProto,
        weight_names: Iterable[str] | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__()
        missing = unsupported_op_types(model)
        if missing:
            raise UnsupportedOpError(missing)
        check_static_control_flow(model.graph)
        graph = model.graph
        self.compute_dtype = dtype
        self._opsets = {e.domain: int(e.version) for e in model.opset_import}
        self._nodes = topological_order(graph)
        initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.input_names = [i.name for i in graph.input if i.name not in initializers]
        self.output_names = [o.name for o in graph.output]
        self._input_types = {
            i.name: i.type.tensor_type.elem_type for i in graph.input if i.name not in initializers
        }
        if weight_names is None:
            from hawq_onnx.graph import GraphView

            weight_names = [layer.weight for layer in GraphView(model).quantizable_layers()
                            if layer.weight in initializers]
        self.weight_names = [w for w in dict.fromkeys(weight_names)]
        unknown = [w for w in self.weight_names if w not in initializers]
        if unknown:
            raise KeyError(f"weights not among the initializers: {unknown}")

        taken: set[str] = set()
        self._keys: dict[str, str] = {}
        self._params = torch.nn.ParameterDict()
        for name in self.weight_names:
            key = _safe_key(name, taken)
            self._keys[name] = key
            self._params[key] = torch.nn.Parameter(self._convert(initializers[name]))
        self._buffer_keys: dict[str, str] = {}
        for name, array in initializers.items():
            if name not in self._keys:
                self._store_constant(name, self._convert(array), taken)
        self._hooks: dict[str, list[Hook]] = {}
        self._steps: dict[int, _Step] = {}
        self._fold_constants(taken)
        self._plan = self._build_plan()
        if device is not None:
            self.to(device)

    # ------------------------------------------------------------------ construction
    def _convert(self, array: np.ndarray) -> torch.Tensor:
        tensor = to_torch(array)
        return tensor.to(self._float_target(tensor.dtype)) if tensor.is_floating_point() else tensor

    def _float_target(self, dtype: torch.dtype) -> torch.dtype:
        """float16/32 compute in the mirror's dtype; float64 keeps its range and precision."""
        return torch.float64 if dtype == torch.float64 else self.compute_dtype

    def _store_constant(self, name: str, tensor: torch.Tensor, taken: set[str]) -> None:
        key = _safe_key("c_" + name, taken)
        self._buffer_keys[name] = key
        self.register_buffer(key, tensor, persistent=False)

    def _fold_constants(self, taken: set[str]) -> None:
        """Evaluate nodes fed only by constants once, and keep the rest to run per call."""
        constant = set(self._buffer_keys)
        remaining: list[onnx.NodeProto] = []
        for node in self._nodes:
            reads = node_reads(node)
            foldable = node.op_type not in _NEVER_FOLD and all(n in constant for n in reads)
            if not foldable:
                remaining.append(node)
                continue
            env: dict[str, Any] = {n: self._constant(n) for n in reads}
            with torch.no_grad():
                self._execute(self._step(node), env, env, torch.device("cpu"))
            for out_name in node.output:
                if out_name and isinstance(env.get(out_name), torch.Tensor):
                    self._store_constant(out_name, env[out_name], taken)
                    constant.add(out_name)
        self._nodes = remaining

    def _constant(self, name: str) -> torch.Tensor:
        return getattr(self, self._buffer_keys[name])

    def _build_plan(self) -> list[_Step]:
        """Steps for the nodes left after folding, each knowing which tensors die after it."""
        last: dict[str, int] = {}
        for index, node in enumerate(self._nodes):
            for name in node_reads(node):
                last[name] = index
        keep = set(self.output_names)
        plan = []
        for index, node in enumerate(self._nodes):
            step = self._step(node)
            step.release = tuple(n for n in dict.fromkeys(node_reads(node))
                                 if last.get(n) == index and n not in keep)
            plan.append(step)
        return plan

    # ------------------------------------------------------------------ public API
    @property
    def weights(self) -> dict[str, torch.nn.Parameter]:
        """Quantizable weights as parameters, keyed by ONNX initializer name."""
        return {name: self._params[key] for name, key in self._keys.items()}

    def add_hook(self, tensor_name: str, fn: Hook) -> HookHandle:
        """Call ``fn(name, tensor)`` whenever ``tensor_name`` is produced; a returned tensor
        replaces it for every consumer downstream."""
        self._hooks.setdefault(tensor_name, []).append(fn)
        return HookHandle(self._hooks, tensor_name, fn)

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Run the graph; inputs positionally (graph order) or by name; outputs in order."""
        feeds = dict(zip(self.input_names, args, strict=False))
        feeds.update(kwargs)
        return self.run(feeds)

    def run(self, feeds: Mapping[str, Any], *, record: Recording | None = None,
            reuse: Reuse | None = None) -> tuple[torch.Tensor, ...]:
        """Run the graph on ``feeds`` (by input name).

        ``record`` stores every node output of this pass (a float pass: no hooks allowed);
        ``reuse`` reads back a stored pass's outputs for each node that no changed weight and
        no hooked tensor reaches (hooks still see the read-back values). Both are for
        gradient-free passes: read-back tensors carry no autograd history.
        """
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise TypeError(f"missing model inputs: {missing}")
        if record is not None and any(self._hooks.values()):
            raise ValueError("a recorded pass must run without hooks")
        if (record is not None or reuse is not None) and torch.is_grad_enabled():
            raise ValueError("recorded and reused passes run under torch.no_grad()")
        device = self._device()
        env: dict[str, Any] = {}
        dirty: set[str] = set(reuse.changed) if reuse is not None else set()
        for name in self.input_names:
            value = feeds[name]
            if not isinstance(value, torch.Tensor):
                value = to_torch(np.asarray(value))
            value = value.to(device)
            if value.is_floating_point():
                value = value.to(self._float_target(value.dtype))
            env[name] = self._hooked(name, value, dirty)
        for name, key in self._keys.items():
            env[name] = self._hooked(name, self._params[key], dirty)
        scope = _Scope(env, self)
        for step in self._plan:
            if reuse is not None and self._can_reuse(step, reuse, dirty):
                for out_name in step.node.output:
                    if out_name:
                        env[out_name] = self._hooked(out_name, reuse.stored[out_name], dirty)
            else:
                self._execute(step, scope, env, device)
                if reuse is not None:
                    dirty.update(step.node.output)
            if record is not None:
                for out_name in step.node.output:
                    if out_name:
                        record.keep(out_name, env[out_name])
            for name in step.release:
                env.pop(name, None)
        return tuple(scope[name] for name in self.output_names)

    @staticmethod
    def _can_reuse(step: _Step, reuse: Reuse, dirty: set[str]) -> bool:
        return (dirty.isdisjoint(step.reads)
                and all(name in reuse.stored for name in step.node.output if name))

    def _hooked(self, name: str, value: Any, dirty: set[str]) -> Any:
        """The value after its hooks; a hooked tensor counts as changed for reuse."""
        if self._hooks.get(name):
            dirty.add(name)
            return self._apply_hooks(name, value)
        return value

    def run_numpy(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Convenience for parity checks: numpy in, numpy out, no autograd."""
        with torch.no_grad():
            outputs = self(**{k: to_torch(np.asarray(v)) for k, v in feeds.items()})
        return {n: o.detach().cpu().numpy() for n, o in zip(self.output_names, outputs,
                                                              strict=True)}

    def op_histogram(self) -> Counter[str]:
        return Counter(node.op_type for node in self._nodes)

    # ------------------------------------------------------------------ execution
    def _device(self) -> torch.device:
        for tensor in self._params.values():
            return tensor.device
        for tensor in self.buffers():
            return tensor.device
        return torch.device("cpu")

    def _apply_hooks(self, name: str, value: Any) -> Any:
        for fn in self._hooks.get(name, ()):
            replaced = fn(name, value)
            if replaced is not None:
                value = replaced
        return value

    def _step(self, node: onnx.NodeProto) -> _Step:
        """The node's function, attributes and opset, resolved once and reused every call."""
        step = self._steps.get(id(node))
        if step is None:
            fn = lookup(node.op_type, node.domain)
            assert fn is not None  # checked at construction
            domain = "" if node.domain in ("", "ai.onnx") else node.domain
            opset = self._opsets.get(domain, self._opsets.get("ai.onnx", 1))
            step = _Step(node, fn, node_attributes(node), opset,
                         reads=frozenset(node_reads(node)))
            self._steps[id(node)] = step
        return step

    def _execute(self, step: _Step, scope: Mapping[str, Any], env: dict[str, Any],
                 device: torch.device) -> None:
        """Run one node, writing its (hooked) outputs into ``env``."""
        node = step.node
        ctx = OpContext(opset=step.opset, dtype=self.compute_dtype, device=device,
                        node_name=node.name, n_outputs=len(node.output),
                        run_subgraph=lambda graph: self._run_subgraph(graph, scope, device))
        inputs = [scope[name] if name else None for name in node.input]
        try:
            outputs = as_list(step.fn(ctx, inputs, step.attrs))
        except Exception as exc:  # add the node to whatever went wrong inside an op
            note = getattr(exc, "add_note", None)  # Python >= 3.11
            if note is not None:
                note(f"while running {node.op_type} node {node.name or node.op_type!r}")
            raise
        for out_name, value in zip(node.output, outputs, strict=False):
            if out_name:
                env[out_name] = self._apply_hooks(out_name, value)

    def _run_subgraph(self, graph: onnx.GraphProto, outer: Mapping[str, Any],
                      device: torch.device) -> list[Any]:
        """Run an If branch (no formal inputs) with the outer scope visible."""
        local: dict[str, Any] = {}
        for init in graph.initializer:
            local[init.name] = self._convert(numpy_helper.to_array(init)).to(device)
        scope = _Scope(local, outer)
        for node in graph.node:
            self._execute(self._step(node), scope, local, device)
        return [scope[o.name] for o in graph.output]


@dataclass
class _Step:
    """A node ready to run: resolved op function, parsed attributes, its opset, and the
    tensors that are dead after it (freed so activations do not pile up)."""

    node: onnx.NodeProto
    fn: Any
    attrs: dict[str, Any]
    opset: int
    release: tuple[str, ...] = ()
    #: every tensor the node reads (subgraph captures included).
    reads: frozenset[str] = frozenset()


class _Scope(Mapping[str, Any]):
    """Local tensors first, then the enclosing scope (outer env or the mirror's constants)."""

    def __init__(self, local: dict[str, Any], outer: Mapping[str, Any] | Mirror):
        self._local, self._outer = local, outer

    def __getitem__(self, name: str) -> Any:
        if name in self._local:
            return self._local[name]
        if isinstance(self._outer, Mirror):
            return self._outer._constant(name)
        return self._outer[name]

    def __contains__(self, name: object) -> bool:
        return name in self._local or (
            name in self._outer._buffer_keys if isinstance(self._outer, Mirror)
            else name in self._outer)

    def __iter__(self):  # pragma: no cover - Mapping protocol, not used
        return iter(self._local)

    def __len__(self) -> int:  # pragma: no cover
        return len(self._local)


__all__ = ["Mirror", "HookHandle", "unsupported_op_types", "node_attributes", "torch_dtype"]
