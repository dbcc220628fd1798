"""What every pass shares: the context, the result, the error, graph copying and clean-up.

A pass is `(gm, ctx) -> PassResult`, pure: it rewrites a copy of `gm`. Its in-place core is
`GraphPass.on_graph(graph, ctx) -> counters`, which `run_passes_on_graph` calls for inductor's
post-grad hook (a bare `torch.fx.Graph`).
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import Callable, Union

import sympy

import torch
from torch import fx

from vskip_compile.errors import VSkipError
from vskip_compile.layout import VisualLayout
from vskip_compile.plan import SkipPlan

aten = torch.ops.aten

# Meta keys that describe a value (recomputed for inserted nodes) rather than where it came from.
VALUE_META = ("val", "tensor_meta", "example_value", "unbacked_bindings")

# Users that only check a node's dtype/device: they neither read rows nor keep a value alive.
ASSERT_OPS = (aten._assert_tensor_metadata.default,)


class SkipPassError(VSkipError, ValueError):
    """A pass cannot prove a rewrite correct (an op it cannot show row-wise, a missing region).

    Internal: no input of the user's is wrong; the CLI shows its traceback (exit 1)."""

    internal = True


@dataclass(frozen=True)
class PassContext:
    """Plan, layout and the names of the adapter's modules (`layers.<i>.<attn_module>` ...).

    layout None (the default): the layout is data, read from the graph's
    `vskip.kept_rows` marker (vskip_compile.kept_rows); one rewritten graph serves every
    layout. A VisualLayout: the constant-offset specialization to that one layout.
    """

    plan: SkipPlan
    layout: VisualLayout | None = None
    attn_module: str = "self_attn"
    ffn_module: str = "mlp"
    layer_pattern: str = r"layers\.(\d+)\."

    def __post_init__(self) -> None:
        if not isinstance(self.plan, SkipPlan):
            raise TypeError(f"plan must be a SkipPlan, got {type(self.plan).__name__}")
        if self.layout is not None and not isinstance(self.layout, VisualLayout):
            raise TypeError(f"layout must be a VisualLayout or None (layout as data), got {type(self.layout).__name__}")


@dataclass
class PassResult:
    """The (new) graph module, whether anything changed, and what was rewritten.

    `gm` is None only from run_passes_on_graph on a graph without an owning module.
    """

    gm: fx.GraphModule | None
    modified: bool
    counters: dict[str, int] = field(default_factory=dict)


OnGraph = Callable[[fx.Graph, PassContext], dict[str, int]]


@dataclass(frozen=True)
class GraphPass:
    """A named pass: `on_graph` mutates a graph in place and returns counters."""

    name: str
    doc: str
    on_graph: OnGraph
    mutates: bool = True

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Pure form: rewrites a copy of gm, cleans it up, returns it."""
        out = copy_graph_module(gm) if self.mutates else gm
        counters = self.on_graph(out.graph, ctx)
        modified = self.mutates and any(v for k, v in counters.items() if k in MODIFYING_COUNTERS)
        if modified:
            finish(out.graph)
            out.recompile()
        return PassResult(out if modified else gm, modified, counters)


# Counters whose non-zero value means the graph changed.
MODIFYING_COUNTERS = frozenset(
    {"attn_rewritten", "ffn_rewritten", "slices_folded", "cats_folded", "markers_removed", "nodes_removed"}
)


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule with a copy of gm's graph, sharing gm's parameters and buffers."""
    graph = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, val_map)
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    new_out = graph.output(out, type_expr=out_node.type)
    new_out.meta = copy.copy(out_node.meta)
    graph._codegen = copy.deepcopy(gm.graph._codegen)  # pytree in/out specs of export's .module()
    new = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    new.meta = dict(getattr(gm, "meta", {}))
    return new


def finish(graph: fx.Graph) -> None:
    """Shared clean-up after a rewrite: dead-code elimination and lint."""
    graph.eliminate_dead_code()
    graph.lint()


# -- node helpers ------------------------------------------------------------------------------


def tensor_val(node: fx.Node) -> torch.Tensor:
    v = node.meta.get("val")
    if not isinstance(v, torch.Tensor):
        raise SkipPassError(
            f"node {node.name} ({op_name(node)}) has no tensor meta['val']: run the passes on a graph "
            "from torch.export or AOT autograd (or propagate fake values first)"
        )
    return v


Size = Union[int, sympy.Expr]  # a static size, or a symbolic one (layout-polymorphic graphs)


def size_of(d) -> Size:
    """An int for a static size (a SymInt that torch specialized included), else its sympy expression."""
    if isinstance(d, int):
        return d
    expr = d.node.expr
    return int(expr) if expr.is_Integer else expr


def shape(node: fx.Node) -> tuple[Size, ...]:
    """Shape of a node's value: ints, and sympy expressions where the size is symbolic."""
    return tuple(size_of(d) for d in tensor_val(node).shape)


def divides(a: Size, b: Size) -> bool:
    """Whether b is provably an integer multiple of a (sympy: b / a an integer for every
    value of the size symbols, which torch declares positive integers)."""
    if isinstance(a, int) and isinstance(b, int):
        return b % a == 0
    return sympy.cancel(sympy.Integer(b) / a if isinstance(b, int) else b / a).is_integer is True


def quotient(b: Size, a: Size) -> Size:
    """b / a where `divides(a, b)`: an int when it is a number."""
    if isinstance(a, int) and isinstance(b, int):
        return b // a
    q = sympy.cancel(sympy.sympify(b) / a)
    return int(q) if q.is_Integer else q


def is_kept_rows_marker(node: fx.Node) -> bool:
    """The `vskip.kept_rows` marker op (vskip_compile.kept_rows), found by name: passes/ does
    not import the model side."""
    t = node.target
    return isinstance(t, torch._ops.OpOverload) and t.namespace == "vskip" and t.__name__.startswith("kept_rows")


def op_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return f"aten.{t.__name__}" if t.namespace == "aten" else f"{t.namespace}.{t.__name__}"
    if t is operator.getitem:
        return "getitem"
    return getattr(t, "__name__", str(t))


def module_path(node: fx.Node) -> str:
    """Deepest module path of a node (nn_module_stack), '' when unknown."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return str(path)


def fake_mode_of(graph: fx.Graph):
    for n in graph.nodes:
        v = n.meta.get("val")
        vs = v if isinstance(v, (tuple, list)) else (v,)
        for x in vs:
            mode = getattr(x, "fake_mode", None)
            if mode is not None:
                return mode
    return None
