"""Analysis: find each decoder layer's attention and FFN operator regions.

A region is a residual add `close = residual + output` (either order) where `output` depends
on `residual` and `close` lies outside the operator (an add inside it, such as a decomposed
tanh-GELU's `x + c x^3`, closes nothing); its nodes are those between them (they depend on
the residual and the output depends on them). The module paths of those nodes (`nn_module_stack`, e.g.
`L['self'].layers.1.mlp.gate_proj` or `lm.layers.0.self_attn.q_proj`) name the layer
(`ctx.layer_pattern`) and the operator (`ctx.attn_module` / `ctx.ffn_module`). Nothing here
knows a model: a post-norm (Gemma), q/k norms (Qwen3) or a DeepStack add after the layer
change nothing.

A parallel block (`h' = h + Attn(n(h)) + FFN(n(h))`, one residual sum, Cohere) closes its
second operator at the second add of that sum, with the first add (h + the other operator's
update) as the rows a skip leaves: see `_parallel_region`.

The pass form (`find_regions`) modifies nothing: it checks that every layer the plan skips
has exactly one region of that kind and counts the regions found.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import fx

from .base import GraphPass, PassContext, SkipPassError, aten, module_path, shape
from .rows import geometry

ADD_OPS = (aten.add.Tensor,)
ATTN, FFN = "attn", "ffn"


@dataclass(frozen=True)
class Region:
    """One operator of one layer: close = residual + output, nodes strictly between."""

    layer: int
    kind: str  # ATTN | FFN
    close: fx.Node
    residual: fx.Node
    output: fx.Node
    nodes: frozenset[fx.Node]  # depend on residual, output depends on them (output included)

    def __str__(self) -> str:
        return f"layer {self.layer} {self.kind} region ({self.close.name} = {self.residual.name} + {self.output.name})"


def _is_ancestor(a: fx.Node, b: fx.Node, order: dict[fx.Node, int]) -> bool:
    """Whether b depends on a (walks b's inputs, never below a in graph order)."""
    stack, seen = [b], {b}
    while stack:
        n = stack.pop()
        if n is a:
            return True
        for x in n.all_input_nodes:
            if x not in seen and order[x] >= order[a]:
                seen.add(x)
                stack.append(x)
    return False


def _between(residual: fx.Node, output: fx.Node, order: dict[fx.Node, int]) -> frozenset[fx.Node]:
    """Nodes that depend on residual and that output depends on (output included)."""
    back: set[fx.Node] = set()
    stack = [output]
    while stack:
        n = stack.pop()
        if n in back or order[n] <= order[residual]:
            continue
        back.add(n)
        stack.extend(n.all_input_nodes)
    between: set[fx.Node] = set()
    for n in sorted(back, key=order.__getitem__):
        if any(x is residual or x in between for x in n.all_input_nodes):
            between.add(n)
    return frozenset(between)


def _operator_of(path: str, ctx: PassContext, pattern: re.Pattern[str]) -> tuple[int, str] | None:
    """(layer, ATTN|FFN) for a node path inside a layer's attention or FFN module, else None."""
    m = pattern.search(path + ".")
    if m is None:
        return None
    rest = (path + ".")[m.end() :]
    for kind, name in ((ATTN, ctx.attn_module), (FFN, ctx.ffn_module)):
        if rest.startswith(name + "."):
            return int(m.group(1)), kind
    return None


def find_all_regions(graph: fx.Graph, ctx: PassContext) -> dict[tuple[int, str], list[Region]]:
    """Every operator region of the graph by (layer, kind); more than one means ambiguity."""
    pattern = re.compile(ctx.layer_pattern)
    order = {n: i for i, n in enumerate(graph.nodes)}
    found: dict[tuple[int, str], list[Region]] = {}
    for close in graph.nodes:
        if close.target not in ADD_OPS or len(close.args) < 2:
            continue
        a, b = close.args[:2]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            continue
        if _is_ancestor(a, b, order):
            residual, output = a, b
        elif _is_ancestor(b, a, order):
            residual, output = b, a
        else:
            continue
        nodes = _between(residual, output, order)
        ops = _ops(nodes, ctx, pattern)
        if len(ops) != 1:
            continue  # neither operator (not a layer's residual add), or both (a parallel block)
        (layer, kind), = ops
        if _operator_of(module_path(close), ctx, pattern) == (layer, kind):
            continue  # an add inside the operator (a decomposed GELU's x + c x^3): not a residual add
        found.setdefault((layer, kind), []).append(Region(layer, kind, close, residual, output, nodes))
    closes = {r.close for regions in found.values() for r in regions}
    for close in graph.nodes:
        region = close not in closes and _parallel_region(close, ctx, pattern, order)
        if region:
            found.setdefault((region.layer, region.kind), []).append(region)
    return found


def _ops(nodes, ctx: PassContext, pattern: re.Pattern[str]) -> set[tuple[int, str]]:
    return {op for op in (_operator_of(module_path(n), ctx, pattern) for n in nodes) if op is not None}


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, stack = {node}, [node]
    while stack:
        for x in stack.pop().all_input_nodes:
            if x not in seen:
                seen.add(x)
                stack.append(x)
    return seen


def _parallel_region(close: fx.Node, ctx: PassContext, pattern: re.Pattern[str], order) -> Region | None:
    """The second operator of a parallel block, `h' = (h + A(n(h))) + F(n(h))` (either
    operator first), or None.

    `close = first + output` where neither depends on the other: `output` is the second
    operator's output (its node's module path is that operator's), `first` is h plus the
    other operator's update (or, once that operator was rewritten, its merged rows). The base
    is their latest common ancestor of the residual stream's shape (h, or the shared normed
    input n(h)); the region is the nodes between the base and `output`, and the frozen rows
    take `first`: skipping F leaves h + A, skipping both leaves h.
    """
    if close.target not in ADD_OPS or len(close.args) < 2:
        return None
    a, b = close.args[:2]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or not isinstance(close.meta.get("val"), torch.Tensor):
        return None
    stream = shape(close)  # sympy sizes: comparing SymInts would add guards to the graph's shape env
    if len(stream) != 3:
        return None  # not the residual stream [B, S, D]
    for first, output in ((a, b), (b, a)):
        op = _operator_of(module_path(output), ctx, pattern)
        if op is None:
            continue
        layer, kind = op
        reach = _ancestors(output)
        if first in reach:
            continue
        base = None
        for n in sorted(_ancestors(first) & reach, key=order.__getitem__, reverse=True):
            if isinstance(n.meta.get("val"), torch.Tensor) and shape(n) == stream:
                base = n
                break
        if base is None:
            continue
        nodes = _between(base, output, order)
        other = {(layer, k) for k in (ATTN, FFN) if k != kind}
        if _ops(nodes, ctx, pattern) == {op} and other & _ops(_between(base, first, order) | {first}, ctx, pattern):
            return Region(layer, kind, close, first, output, nodes)
    return None


def regions_for(graph: fx.Graph, ctx: PassContext, kind: str) -> list[Region]:
    """The regions of `kind` the plan skips, in graph order; refuses missing or ambiguous ones."""
    found = find_all_regions(graph, ctx)
    skips = ctx.plan.skips_attn if kind == ATTN else ctx.plan.skips_ffn
    out: list[Region] = []
    for layer in range(ctx.plan.num_layers):
        if not skips(layer):
            continue
        regions = found.get((layer, kind), [])
        module = ctx.attn_module if kind == ATTN else ctx.ffn_module
        if not regions:
            children = _layer_children(graph, ctx, layer)
            has = f" (its modules in the graph: {', '.join(children)})" if children else ""
            raise SkipPassError(
                f"the plan skips {kind} of layer {layer} but the graph has no residual add closing "
                f"'{module}' of a module path matching {ctx.layer_pattern!r} for that layer{has}"
            )
        if len(regions) > 1:
            raise SkipPassError(
                f"layer {layer} has {len(regions)} {kind} regions ({', '.join(r.close.name for r in regions)}): "
                f"use a layer_pattern that matches only the language model's layers"
            )
        out.append(regions[0])
    return out


def _layer_children(graph: fx.Graph, ctx: PassContext, layer: int) -> list[str]:
    """The child module names of `layer` that the graph's node paths name (a linear-attention
    layer's token mixer, `linear_attn`, where the plan looks for `self_attn`)."""
    pattern = re.compile(ctx.layer_pattern)
    names: dict[str, None] = {}
    for n in graph.nodes:
        path = module_path(n) + "."
        m = pattern.search(path)
        if m is not None and int(m.group(1)) == layer:
            child = path[m.end():].split(".")[0]
            if child:
                names[child] = None
    return list(names)


def _check(graph: fx.Graph, ctx: PassContext) -> dict[str, int]:
    found = find_all_regions(graph, ctx)
    layers = {layer for layer, _ in found}
    counters = {
        "layers": len(layers),
        "attn_regions": sum(len(v) for (_, k), v in found.items() if k == ATTN),
        "ffn_regions": sum(len(v) for (_, k), v in found.items() if k == FFN),
    }
    if not ctx.plan.is_full:
        geometry(graph, ctx)  # layout as data: the graph must carry its kept-row marker
        if layers and max(layers) + 1 != ctx.plan.num_layers:
            raise SkipPassError(f"the plan has {ctx.plan.num_layers} layers but the graph has {max(layers) + 1}")
        for kind in (ATTN, FFN):
            regions_for(graph, ctx, kind)
    return counters


FIND_REGIONS = GraphPass(
    "find_regions",
    "analysis: per layer, the residual adds closing attention and FFN; checks the plan fits the graph",
    _check,
    mutates=False,
)
