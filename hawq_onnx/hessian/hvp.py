"""Hessian-vector products of the calibration objective w.r.t. the quantizable weights.

Two ways to the same product ``Hv = Σ_b w_b ∇²loss_b · v``:

* ``double_backprop``: ``g = ∇loss`` with ``create_graph=True``, then ``∇(gᵀv)``. The
  forward pass and first backward are shared by every vector applied to the same micro-batch,
  so a chunk of k probes costs one forward + one backward + k double-backward passes.
* ``forward_over_reverse``: ``torch.func.jvp`` of ``torch.func.grad`` through
  ``torch.func.functional_call`` on the mirror; one forward-mode pass through the gradient
  computation per vector.
* ``gauss_newton``: ``Jᵀ H_out J v`` (a forward-mode ``J v``, the loss's small Hessian in
  output space, one backward). It equals the Hessian wherever the loss's gradient w.r.t. the
  outputs is zero, which is the case for the label-free KL and MSE losses at the float
  weights, the point the analysis runs at; it never differentiates a backward pass (PyTorch
  differentiates grouped/depthwise convolution backwards group by group, which makes the
  two exact modes very slow on MobileNet-like models). Refused for cross-entropy.

``auto`` picks ``gauss_newton`` when it is exact, else ``double_backprop`` (the faster
exact mode in the bench). Memory is bounded by one micro-batch: graphs are released
before the next batch is loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from hawq_onnx.errors import HawqError
from hawq_onnx.hessian.blocks import BlockLayout, BlockVector
from hawq_onnx.hessian.objective import MicroBatch, Objective

HVP_MODES = ("double_backprop", "forward_over_reverse", "gauss_newton")
DEFAULT_MODE = "auto"
EXACT_DEFAULT = "double_backprop"


def resolve_mode(mode: str, objective: Objective) -> str:
    """``auto`` → ``gauss_newton`` where it equals the Hessian, else the exact default."""
    if mode == "auto":
        return "gauss_newton" if gauss_newton_is_exact(objective) else EXACT_DEFAULT
    if mode not in HVP_MODES:
        raise ValueError(f"unknown HVP mode {mode!r}; choose auto or one of {HVP_MODES}")
    if mode == "gauss_newton" and not gauss_newton_is_exact(objective):
        raise HawqError("--hvp gauss_newton is the Hessian only for the kl and mse losses "
                        "(zero output gradient at the float weights); use another mode")
    return mode


def gauss_newton_is_exact(objective: Objective) -> bool:
    return all(spec.kind in ("kl", "mse") for spec in objective.losses)


class HessianVectorProduct:
    """Applies the objective's Hessian (w.r.t. the mirror's weights) to block vectors."""

    def __init__(self, objective: Objective, mode: str = DEFAULT_MODE) -> None:
        self.objective = objective
        self.mode = resolve_mode(mode, objective)
        self.mirror = objective.mirror
        self.params = list(self.mirror.weights.values())
        self.layout = BlockLayout.from_tensors(self.mirror.weights)
        paths = {id(p): name for name, p in self.mirror.named_parameters()}
        self._paths = [paths[id(p)] for p in self.params]
        self.products = 0  # vectors applied so far (for cost accounting)
        # torch.func modes push up to ``vmap_size`` tangents through one vmapped pass; a
        # graph with an op that has no batching rule falls back to one pass per vector.
        self.vectorize = True
        self.vmap_size = 8
        self.vectorize_error: str | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype if self.params else torch.float32

    @property
    def device(self) -> torch.device:
        return self.objective.device()

    def apply(
        self,
        vectors: Sequence[BlockVector],
        outputs: Sequence[Sequence[int]] | None = None,
    ) -> list[BlockVector]:
        """``H v`` for each vector (only its non-zero blocks given), restricted to the blocks
        in ``outputs[j]`` (default: every block)."""
        if not vectors:
            return []
        everything = list(range(len(self.layout)))
        outs = [list(o) for o in outputs] if outputs is not None else [everything] * len(vectors)
        sums: list[BlockVector] = [
            {b: torch.zeros_like(self.params[b]) for b in out} for out in outs]
        step = {"double_backprop": self._batch_double_backprop,
                "forward_over_reverse": self._batch_forward_over_reverse,
                "gauss_newton": self._batch_gauss_newton}[self.mode]
        for batch in self.objective.batches:
            products = step(batch, vectors, outs)
            weight = self.objective.weight(batch)
            for total, product in zip(sums, products, strict=True):
                for b, value in product.items():
                    total[b].add_(value, alpha=weight)
        self.products += len(vectors)
        return sums

    def gradient(self) -> BlockVector:
        """``∇L`` over the same data (the unit the bench measures probe costs in)."""
        sums = {b: torch.zeros_like(p) for b, p in enumerate(self.params)}
        for batch in self.objective.batches:
            loss = self.objective.batch_loss(batch)
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
            for b, g in enumerate(grads):
                if g is not None:
                    sums[b].add_(g, alpha=self.objective.weight(batch))
        return sums

    # ------------------------------------------------------------------ one micro-batch
    def _batch_double_backprop(
        self, batch: MicroBatch, vectors: Sequence[BlockVector], outs: Sequence[list[int]],
    ) -> list[BlockVector]:
        contract = sorted({b for v in vectors for b in v})
        needed = sorted(set(contract).union(*map(set, outs)))
        with only_requires_grad(self.mirror, [self.params[b] for b in needed]):
            loss = self.objective.batch_loss(batch)
            grads = dict(zip(contract, _grad(loss, [self.params[b] for b in contract],
                                             create_graph=True), strict=True))
            results: list[BlockVector] = []
            for j, (vector, out) in enumerate(zip(vectors, outs, strict=True)):
                terms = [(grads[b] * v).sum() for b, v in vector.items()
                         if grads[b] is not None and grads[b].requires_grad]
                if not terms:
                    results.append({b: torch.zeros_like(self.params[b]) for b in out})
                    continue
                hv = _grad(torch.stack(terms).sum(), [self.params[b] for b in out],
                           retain_graph=j < len(vectors) - 1)
                results.append({b: (h if h is not None else torch.zeros_like(self.params[b]))
                                for b, h in zip(out, hv, strict=True)})
            return results

    def _batch_forward_over_reverse(
        self, batch: MicroBatch, vectors: Sequence[BlockVector], outs: Sequence[list[int]],
    ) -> list[BlockVector]:
        needed = sorted({b for v in vectors for b in v}.union(*map(set, outs)))
        feeds = self.objective.feeds(batch)
        primals = {self._paths[b]: self.params[b].detach() for b in needed}

        def loss_of(params: dict[str, torch.Tensor]) -> torch.Tensor:
            outputs = torch.func.functional_call(self.mirror, params, kwargs=feeds)
            return self.objective.loss(outputs, batch)

        products = self._jvps(torch.func.grad(loss_of), primals,
                              [self._tangents(v, needed) for v in vectors])
        return [{b: hv[self._paths[b]].detach() for b in out}
                for hv, out in zip(products, outs, strict=True)]

    def _batch_gauss_newton(
        self, batch: MicroBatch, vectors: Sequence[BlockVector], outs: Sequence[list[int]],
    ) -> list[BlockVector]:
        needed = sorted({b for v in vectors for b in v}.union(*map(set, outs)))
        with only_requires_grad(self.mirror, [self.params[b] for b in needed]):
            outputs = self.mirror(**self.objective.feeds(batch))  # kept for the Jᵀ products
        space = self._output_space(batch, outputs)
        jvs = self._jvps(self._selected_outputs(batch), self._primals(needed),
                         [self._tangents(v, needed) for v in vectors])
        results: list[BlockVector] = []
        for jv, out in zip(jvs, outs, strict=True):
            h_jv = space.hessian_times(jv)
            hv = _grad_with([outputs[i] for i in space.used], [self.params[b] for b in out],
                            h_jv)
            results.append({b: (h if h is not None else torch.zeros_like(self.params[b]))
                            for b, h in zip(out, hv, strict=True)})
        return results

    # ------------------------------------------------------------------ output-space Gram
    def gram_bytes(self, count: int) -> int:
        """Bytes :meth:`gram` holds per micro-batch for ``count`` vectors (output tangents
        and their products with the output Hessian)."""
        targets = self.objective.batches.first().targets  # the outputs' shapes (KL/MSE)
        per_vector = sum(t.numel() * t.element_size() for t in targets if t is not None)
        return 2 * count * per_vector

    def gram(self, vectors: Sequence[BlockVector],
             progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """``G[p, q] = v_pᵀ H v_q`` for every pair of vectors, Gauss–Newton mode only.

        Why: with ``H = Σ_b w_b J_bᵀ H_out J_b`` every bilinear form is
        ``Σ_b w_b (J_b v_p)ᵀ H_out (J_b v_q)``, so one forward-mode ``J v`` per vector and the
        loss's small output Hessian give all pairs at once, with no backward pass through
        the model (about 3× cheaper than one HVP per vector on a MobileNet). Memory: the
        output tangents of one micro-batch (:meth:`gram_bytes`).
        """
        if self.mode != "gauss_newton":
            raise HawqError("the output-space Gram needs the Gauss-Newton mode")
        total = torch.zeros((len(vectors), len(vectors)), dtype=torch.float64)
        batches = len(self.objective.batches)
        for index, batch in enumerate(self.objective.batches):
            with torch.no_grad():
                outputs = self.mirror(**self.objective.feeds(batch))
            space = self._output_space(batch, outputs)
            jvs = self._jvps_by_support(batch, vectors)
            flat = torch.stack([_flat(jv) for jv in jvs]).double()
            curved = torch.stack([_flat(space.hessian_times(jv)) for jv in jvs]).double()
            total.add_((flat @ curved.T).cpu(), alpha=self.objective.weight(batch))
            if progress is not None:
                progress(index + 1, batches)
        self.products += len(vectors)
        return 0.5 * (total + total.T)

    def _jvps_by_support(self, batch: MicroBatch, vectors: Sequence[BlockVector]
                         ) -> list[Any]:
        """``J v`` for each vector, vectors with the same blocks together: only those blocks
        are primals, so forward mode carries no tangent upstream of them."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, vector in enumerate(vectors):
            groups.setdefault(tuple(sorted(vector)), []).append(index)
        selected = self._selected_outputs(batch)
        results: list[Any] = [None] * len(vectors)
        for support, members in groups.items():
            tangents = [self._tangents(vectors[i], list(support)) for i in members]
            for i, jv in zip(members, self._jvps(selected, self._primals(support), tangents),
                             strict=True):
                results[i] = jv
        return results

    def _output_space(self, batch: MicroBatch, outputs: Sequence[torch.Tensor]) -> _OutputSpace:
        """The loss's gradient w.r.t. the model outputs it reads, with a graph for ``H_out``."""
        used = self._used_outputs()
        leaves = {i: outputs[i].detach().requires_grad_(True) for i in used}
        substituted = [leaves.get(i, o) for i, o in enumerate(outputs)]
        loss = self.objective.loss(substituted, batch)
        out_grads = torch.autograd.grad(loss, [leaves[i] for i in used], create_graph=True)
        return _OutputSpace(used, [leaves[i] for i in used], list(out_grads))

    def _selected_outputs(self, batch: MicroBatch
                          ) -> Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, ...]]:
        feeds = self.objective.feeds(batch)
        used = self._used_outputs()

        def selected(params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
            result = torch.func.functional_call(self.mirror, params, kwargs=feeds)
            return tuple(result[i] for i in used)

        return selected

    def _used_outputs(self) -> list[int]:
        """The model outputs the loss reads, in output order."""
        return sorted({spec.index for spec in self.objective.losses})

    def _primals(self, needed: Sequence[int]) -> dict[str, torch.Tensor]:
        return {self._paths[b]: self.params[b].detach() for b in needed}

    # ------------------------------------------------------------------ torch.func helpers
    def _tangents(self, vector: BlockVector, needed: list[int]) -> dict[str, torch.Tensor]:
        return {self._paths[b]: vector[b] if b in vector else torch.zeros_like(self.params[b])
                for b in needed}

    def _jvps(self, fn: Callable[[dict[str, torch.Tensor]], Any],
              primals: dict[str, torch.Tensor],
              tangents: list[dict[str, torch.Tensor]]) -> list[Any]:
        """``jvp(fn)(primals; t)`` for each tangent: vmapped in groups when possible."""

        def one(t: dict[str, torch.Tensor]) -> Any:
            return torch.func.jvp(fn, (primals,), (t,))[1]

        results: list[Any] = []
        with torch.no_grad():  # torch.func ignores it; plain autograd then tracks nothing
            for start in range(0, len(tangents), self.vmap_size):
                group = tangents[start:start + self.vmap_size]
                if self.vectorize and len(group) > 1:
                    stacked = {k: torch.stack([t[k] for t in group]) for k in group[0]}
                    try:
                        batched = torch.func.vmap(one)(stacked)
                    except Exception as exc:  # an op without a batching rule: go one by one
                        self.vectorize = False
                        self.vectorize_error = f"{type(exc).__name__}: {exc}".splitlines()[0]
                    else:
                        results.extend(_unstack(batched, len(group)))
                        continue
                results.extend(one(t) for t in group)
        return results


class _OutputSpace:
    """The loss's output gradient of one micro-batch, kept differentiable: ``H_out u`` for
    any output tangent ``u`` is one small backward through the loss alone."""

    def __init__(self, used: list[int], leaves: list[torch.Tensor],
                 out_grads: list[torch.Tensor]) -> None:
        self.used, self._leaves, self._out_grads = used, leaves, out_grads

    def hessian_times(self, tangent: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        products = _grad_with(self._out_grads, self._leaves, tangent)
        return [torch.zeros_like(u) if h is None else h
                for u, h in zip(tangent, products, strict=True)]


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unstack(batched: Any, count: int) -> list[Any]:
    """Split the leading (vmap) dimension of a dict / tuple / tensor result."""
    if isinstance(batched, dict):
        return [{k: v[i] for k, v in batched.items()} for i in range(count)]
    if isinstance(batched, tuple):
        return [tuple(v[i] for v in batched) for i in range(count)]
    return [batched[i] for i in range(count)]


def _grad_with(outputs: Sequence[torch.Tensor], inputs: list[torch.Tensor],
               cotangents: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Σ_i cotangent_iᵀ ∂output_i/∂inputs, keeping the graph for the next vector."""
    pairs = [(o, c) for o, c in zip(outputs, cotangents, strict=True)
             if c is not None and o.requires_grad]
    if not pairs:
        return [None] * len(inputs)
    return list(torch.autograd.grad([o for o, _ in pairs], inputs,
                                    grad_outputs=[c.detach() for _, c in pairs],
                                    retain_graph=True, allow_unused=True))


def _grad(output: torch.Tensor, inputs: list[torch.Tensor], create_graph: bool = False,
          retain_graph: bool | None = None) -> list[torch.Tensor | None]:
    if not output.requires_grad:
        return [None] * len(inputs)
    return list(torch.autograd.grad(output, inputs, create_graph=create_graph,
                                    retain_graph=retain_graph, allow_unused=True))


@contextmanager
def only_requires_grad(module: torch.nn.Module, keep: Sequence[torch.Tensor]) -> Iterator[None]:
    """Temporarily track gradients for ``keep`` only, so autograd builds no unused graph."""
    keep_ids = {id(t) for t in keep}
    saved = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(id(p) in keep_ids)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
