"""Allocatable units (tied groups of weights) and pins.

Why ties: one weight initializer read by several nodes (shared embeddings, tied heads) has
one stored width, so those nodes are one unit. Every layer reading one activation quantizer
(the same input tensor, or tensors that share its scale and zero point) must agree on that
quantizer's width: ``layer_choices(tie_activations=True)`` merges such layers into one unit
(one width for weights and activations alike, coarse). Users can add their own ties (HAWQ-V3
ties a residual block's downsample layer to its main branch) and pins (``--pin NAME=BITS``,
``--pin-first-last BITS``: HAWQ-V3 keeps the first and last layers at 8 bits).

Joint weight/activation allocation (:func:`activation_units`, what ``--candidate-act-bits``
uses) does not merge weights: each activation quantizer is its own unit, and each weighted
layer is linked to its weight unit and to the quantizer of its input (:class:`LayerLink`),
which is all the ILP needs to price BOPs and latency per (weight width, activation width).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from onnx import TensorProto

from hawq_onnx.errors import HawqError
from hawq_onnx.graph import GraphView, QuantizableLayer
from hawq_onnx.mixed.problem import ActUnit, LayerChoice
from hawq_onnx.passes.qdq_placement import Placement


class PinError(HawqError):
    """A pin names an unknown layer, a width that is not a candidate, or conflicts."""


class _UnionFind:
    def __init__(self, items: Iterable[str]) -> None:
        self.parent = {item: item for item in items}

    def find(self, item: str) -> str:
        root = item
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[item] != root:
            self.parent[item], item = root, self.parent[item]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


def weighted_layers(view: GraphView, placement: Placement | None = None
                    ) -> list[QuantizableLayer]:
    """Layers with a weight initializer, in graph order (the placement's when given)."""
    layers = placement.layers if placement is not None else view.quantizable_layers()
    return [layer for layer in layers
            if layer.weight is not None and layer.weight in view.initializers
            and layer.params > 0]


def activation_quantizer(tensor: str, placement: Placement | None) -> str | None:
    """The tensor whose Q/DQ parameters ``tensor`` uses (None: it is not quantized)."""
    if placement is None:
        return tensor
    return placement.source(tensor)


def layer_choices(view: GraphView, placement: Placement | None = None, *,
                  tie_activations: bool = False,
                  ties: Sequence[Sequence[str]] = ()) -> list[LayerChoice]:
    """One :class:`LayerChoice` per group of weights that must share a width.

    Weights are always grouped by identity (a shared initializer is one unit, its MACs the
    sum over its readers). ``tie_activations``: also merge layers reading one activation
    quantizer, and list those quantizers in ``act_names``. ``ties``: extra groups, each a
    list of weight or node names. Units come in graph order of their first layer.
    """
    layers = weighted_layers(view, placement)
    weights = list(dict.fromkeys(layer.weight for layer in layers if layer.weight))
    uf = _UnionFind(weights)
    acts = {layer.node: _layer_acts(layer, view, placement) for layer in layers}
    if tie_activations:
        owner: dict[str, str] = {}
        for layer in layers:
            for act in acts[layer.node]:
                uf.union(owner.setdefault(act, layer.weight or ""), layer.weight or "")
    lookup = _name_lookup(layers)
    for group in ties:
        resolved = [_resolve(name, lookup) for name in group]
        for other in resolved[1:]:
            uf.union(resolved[0], other)
    return _build_choices(layers, uf, acts, view, tie_activations)


def _layer_acts(layer: QuantizableLayer, view: GraphView, placement: Placement | None
                ) -> list[str]:
    """Activation quantizers feeding a layer (float inputs that are not constants)."""
    found: list[str] = []
    for tensor in layer.inputs:
        if not tensor or view.is_constant(tensor) or tensor == layer.weight:
            continue
        source = activation_quantizer(tensor, placement)
        if source is not None and source not in found:
            found.append(source)
    return found


def _build_choices(layers: list[QuantizableLayer], uf: _UnionFind,
                   acts: Mapping[str, list[str]], view: GraphView,
                   with_acts: bool) -> list[LayerChoice]:
    groups: dict[str, dict[str, list]] = {}
    for layer in layers:
        root = uf.find(layer.weight or "")
        entry = groups.setdefault(root, {"names": [], "macs": [], "acts": []})
        if layer.weight not in entry["names"]:
            entry["names"].append(layer.weight)
        entry["macs"].append(int(layer.macs))
        if with_acts:
            entry["acts"].extend(a for a in acts[layer.node] if a not in entry["acts"])
    choices = []
    for entry in groups.values():
        params = sum(_numel(view, name) for name in entry["names"])
        choices.append(LayerChoice(tuple(entry["names"]), params, sum(entry["macs"]),
                                   tuple(entry["acts"])))
    return choices


@dataclass(frozen=True)
class LayerLink:
    """One weighted layer in the joint problem: its weight unit, the activation unit of its
    input (None: that width is not allocated) and its MACs per sample."""

    node: str
    unit: int
    act: int | None
    macs: int


def activation_units(view: GraphView, placement: Placement,
                     choices: Sequence[LayerChoice]) -> tuple[list[ActUnit], list[LayerLink]]:
    """One :class:`ActUnit` per activation quantizer that feeds a weighted layer of
    ``choices`` (graph order), and every such layer's :class:`LayerLink`.

    Quantizers that feed no weighted layer (residual Add inputs, pooling, outputs) are left at
    the base activation width: they carry no BOPs and the Hessian analysis has no trace for
    them. A layer input that is not float32 stays float in the exporter, so it is no unit.
    """
    unit_of = {name: i for i, choice in enumerate(choices) for name in choice.names}
    found: dict[str, tuple[list[str], list[str]]] = {}
    links: list[LayerLink] = []
    for layer in weighted_layers(view, placement):
        unit = unit_of.get(layer.weight or "")
        if unit is None:
            continue
        tensor = layer.inputs[0] if layer.inputs else ""
        owner = None
        if tensor and not view.is_constant(tensor) \
                and view.elem_type(tensor) == TensorProto.FLOAT:
            owner = activation_quantizer(tensor, placement)
        act = None
        if owner is not None:
            tensors, readers = found.setdefault(owner, ([], []))
            if tensor not in tensors:
                tensors.append(tensor)
            readers.append(layer.node)
            act = list(found).index(owner)
        links.append(LayerLink(layer.node, unit, act, int(layer.macs)))
    units = [ActUnit(name, tuple(tensors), tuple(readers))
             for name, (tensors, readers) in found.items()]
    return units, links


def resolve_act_pins(units: Sequence[ActUnit], pins: Iterable[tuple[str, int]],
                     candidate_bits: Sequence[int]) -> dict[int, int]:
    """``--pin-act TENSOR=BITS`` -> ``{activation unit index: bits}``; the tensor may be the
    quantizer's own tensor or any layer input read through it."""
    index: dict[str, int] = {}
    for j, unit in enumerate(units):
        index.setdefault(unit.name, j)
        for tensor in unit.tensors:
            index.setdefault(tensor, j)
    return _apply_pins("--pin-act", pins, index, candidate_bits,
                       "candidate activation bits", lambda j: f"quantizer ({units[j].name})",
                       "no activation quantizer feeding a weighted layer reads")


def _numel(view: GraphView, name: str) -> int:
    count = 1
    for dim in view.initializers[name].dims:
        count *= int(dim)
    return count


def _name_lookup(layers: Sequence[QuantizableLayer]) -> dict[str, str]:
    """Weight or node name -> weight name."""
    lookup: dict[str, str] = {}
    for layer in layers:
        if layer.weight:
            lookup[layer.weight] = layer.weight
            lookup.setdefault(layer.node, layer.weight)
    return lookup


def _resolve(name: str, lookup: Mapping[str, str]) -> str:
    if name not in lookup:
        raise PinError(f"'{name}' is neither a quantizable weight nor a layer's node name")
    return lookup[name]


# ---------------------------------------------------------------------------------- pins
def parse_pin(text: str) -> tuple[str, int]:
    """``NAME=BITS`` -> (name, bits); the name may itself contain '='."""
    name, sep, bits = text.rpartition("=")
    if not sep or not name:
        raise PinError(f"--pin expects NAME=BITS, got '{text}'")
    try:
        return name, int(bits)
    except ValueError:
        raise PinError(f"--pin expects NAME=BITS with integer bits, got '{text}'") from None


def choice_index(choices: Sequence[LayerChoice], view: GraphView,
                 placement: Placement | None = None) -> dict[str, int]:
    """Weight name or node name -> index of the unit holding it."""
    index: dict[str, int] = {}
    by_weight = {name: i for i, choice in enumerate(choices) for name in choice.names}
    index.update(by_weight)
    for layer in weighted_layers(view, placement):
        if layer.weight in by_weight:
            index.setdefault(layer.node, by_weight[layer.weight])
    return index


def resolve_pins(choices: Sequence[LayerChoice], view: GraphView,
                 pins: Mapping[str, int] | Iterable[tuple[str, int]],
                 candidate_bits: Sequence[int], placement: Placement | None = None
                 ) -> dict[int, int]:
    """Named pins -> ``{unit index: bits}``; conflicting pins on one unit are an error."""
    items = pins.items() if isinstance(pins, Mapping) else pins
    index = choice_index(choices, view, placement)
    return _apply_pins("--pin", items, index, candidate_bits, "candidate bits",
                       lambda unit: f"tied group ({choices[unit].label})",
                       "no quantizable weight or layer named")


def _apply_pins(flag: str, pins: Iterable[tuple[str, int]], index: Mapping[str, int],
                candidate_bits: Sequence[int], bits_name: str,
                describe: Callable[[int], str], unknown: str) -> dict[int, int]:
    """Named pins -> ``{unit index: bits}``, shared by weight and activation pins so both
    refuse unknown names, non-candidate widths and conflicting pins the same way."""
    out: dict[int, int] = {}
    for name, bits in pins:
        if name not in index:
            raise PinError(f"{flag} {name}={bits}: {unknown} '{name}'")
        if bits not in candidate_bits:
            raise PinError(f"{flag} {name}={bits}: {bits} is not among the {bits_name} "
                           f"{list(candidate_bits)}")
        unit = index[name]
        if out.get(unit, bits) != bits:
            raise PinError(f"{flag} {name}={bits} conflicts with {out[unit]} bits pinned on "
                           f"the same {describe(unit)}")
        out[unit] = bits
    return out


def first_last_pins(choices: Sequence[LayerChoice], view: GraphView, bits: int,
                    placement: Placement | None = None) -> dict[str, int]:
    """Pins (by weight name) for the first and the last weighted layer in graph order."""
    layers = weighted_layers(view, placement)
    if not layers:
        return {}
    order = {name: i for i, (name, _) in enumerate(view.nodes())}
    ordered = sorted(layers, key=lambda layer: order.get(layer.node, 0))
    return {ordered[0].weight or "": bits, ordered[-1].weight or "": bits}


def merge_pins(*groups: Mapping[str, int]) -> list[tuple[str, int]]:
    """All pins in order (conflicts are left for :func:`resolve_pins` to report)."""
    return [item for group in groups for item in group.items()]


__all__ = ["LayerLink", "PinError", "activation_quantizer", "activation_units", "choice_index",
           "first_last_pins", "layer_choices", "merge_pins", "parse_pin", "resolve_act_pins",
           "resolve_pins", "weighted_layers"]
