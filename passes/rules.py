"""Row-wise rules: which aten ops commute with cutting sequence rows, and how to re-emit them.

A rule gets a node and where the sequence lives in its output (`Rows`) and returns a
`Restriction`: for each input, the Rows it must be restricted on, or FULL (used as is: a
weight, a broadcast operand, the keys and values of attention), plus `rebuild`, which emits
the node on the kept rows with every shape constant rewritten. An op without a rule, or
used in a way the rule cannot show row-wise (a reduction or scan along the sequence, a view
that splits the sequence across dims), raises `NotRowwise` with the reason.

(About 690 lines, one concept: one rule table, indexed by aten op, whose entries share the
argument and broadcast helpers at its top; split, a reader would chase one rule across files.)
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import fx

from vskip_compile.attention_ops import FLEX_ATTENTION, SDPA_MASKS
from vskip_compile import flex  # registers vskip::materialized

from .base import aten, divides, quotient, shape, size_of, tensor_val
from .rows import Builder, Geometry, Rows

FULL = None  # demand: the input is used as is, all rows
Demand = Rows | None
NewArg = Callable[[fx.Node], fx.Node]  # original input -> its restricted (or unchanged) node
Rebuild = Callable[[NewArg, Builder, Geometry], fx.Node]


class NotRowwise(Exception):
    """The rule cannot show the node row-wise in the sequence (the message says why)."""


@dataclass
class Restriction:
    demands: list[tuple[fx.Node, Demand]]
    rebuild: Rebuild


Rule = Callable[[fx.Node, Rows, Geometry], Restriction]
RULES: dict[Any, Rule] = {}


def rule(*targets: Any) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for t in targets:
            if t is not None:
                RULES[t] = fn
        return fn

    return register


def restriction_for(node: fx.Node, out: Rows, geo: Geometry) -> Restriction:
    """The rule's answer for node, or NotRowwise when no rule covers its op."""
    fn = RULES.get(node.target)
    if fn is None and isinstance(node.target, torch._ops.OpOverload) and torch.Tag.pointwise in node.target.tags:
        fn = _pointwise
    if fn is None:
        raise NotRowwise("no row-wise rule for this op")
    return fn(node, out, geo)


# -- argument helpers ---------------------------------------------------------------------------


def _arg(node: fx.Node, name: str) -> Any:
    """Argument `name` of an OpOverload call, positional, keyword or schema default."""
    for i, a in enumerate(node.target._schema.arguments):
        if a.name == name:
            if not a.kwarg_only and i < len(node.args):
                return node.args[i]
            if name in node.kwargs:
                return node.kwargs[name]
            return a.default_value if a.has_default_value() else None
    raise KeyError(f"{node.target} has no argument {name!r}")


def _with_arg(node: fx.Node, args: tuple, kwargs: dict, name: str, value: Any) -> tuple[tuple, dict]:
    """(args, kwargs) with argument `name` set to value."""
    for i, a in enumerate(node.target._schema.arguments):
        if a.name == name:
            if not a.kwarg_only and i < len(args):
                return args[:i] + (value,) + args[i + 1 :], kwargs
            return args, {**kwargs, name: value}
    raise KeyError(f"{node.target} has no argument {name!r}")


def _mapped(node: fx.Node, new: NewArg) -> tuple[tuple, dict]:
    return fx.node.map_arg((node.args, node.kwargs), new)


def _same_op(node: fx.Node) -> Rebuild:
    """Re-emit node with its inputs replaced (no shape constants to rewrite)."""

    def rebuild(new: NewArg, b: Builder, geo: Geometry) -> fx.Node:
        args, kwargs = _mapped(node, new)
        return b.call(node.target, args, kwargs, like=node)

    return rebuild


def _norm(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), out.append)
    for n in out:
        if not isinstance(n.meta.get("val"), torch.Tensor):
            raise NotRowwise(f"input {n.name} is not a tensor (symbolic sizes are not supported)")
    return out


def _broadcast(x: fx.Node, out_shape: tuple[int, ...], out: Rows) -> Demand:
    """Demand on an operand broadcast against an output whose sequence is at out.axis."""
    xs = shape(x)
    aligned = out.axis - (len(out_shape) - len(xs))
    if aligned < 0 or xs[aligned] == 1:
        return FULL
    if xs[aligned] != out_shape[out.axis]:
        raise NotRowwise(f"operand {x.name} {tuple(xs)} does not broadcast against {tuple(out_shape)}")
    return Rows(aligned, out.inner)


def _broadcast_shapes(shapes: list[tuple]) -> tuple:
    """torch.broadcast_shapes for static or symbolic sizes."""
    rank = max(len(x) for x in shapes)
    out = []
    for d in range(rank):
        sizes = {x[d - rank + len(x)] for x in shapes if d - rank + len(x) >= 0} - {1}
        if len(sizes) > 1:
            raise NotRowwise(f"index shapes {shapes} do not broadcast")
        out.append(sizes.pop() if sizes else 1)
    return tuple(out)


def _scaled_shape(out_shape: tuple[int, ...], out: Rows, geo: Geometry) -> list[int]:
    new = list(out_shape)
    new[out.axis] = geo.scaled(new[out.axis])
    return new


# -- pointwise and shape-preserving ops ---------------------------------------------------------

_UNARY_LIKE = [
    aten._to_copy.default,
    aten.to.dtype,
    aten.to.device,
    aten.to.dtype_layout,
    aten.alias.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.detach.default,
    aten.lift_fresh_copy.default,
    aten.type_as.default,
    aten.dropout.default,
    aten.full_like.default,
    aten.zeros_like.default,
    aten.ones_like.default,
    aten.empty_like.default,
    torch.ops.prims.convert_element_type.default,
]


@rule(*_UNARY_LIKE)
def _pointwise(node: fx.Node, out: Rows, geo: Geometry) -> Restriction:
    """Elementwise with broadcasting: each operand restricted where it spans the sequence."""
    out_shape = shape(node)
    return Restriction([(x, _broadcast(x, out_shape, out)) for x in _tensor_inputs(node)], _same_op(node))


# -- reductions, normalizations, scans (along other dims) ---------------------------------------

# op -> (name of the dim argument, name of keepdim or None when the rank is kept)
_REDUCTIONS: dict[Any, tuple[str, str | None]] = {
    aten.mean.dim: ("dim", "keepdim"),
    aten.sum.dim_IntList: ("dim", "keepdim"),
    aten.amax.default: ("dim", "keepdim"),
    aten.amin.default: ("dim", "keepdim"),
    aten.any.dim: ("dim", "keepdim"),
    aten.any.dims: ("dim", "keepdim"),
    aten.all.dim: ("dim", "keepdim"),
    aten.var.correction: ("dim", "keepdim"),
    aten.std.correction: ("dim", "keepdim"),
    aten.var_mean.correction: ("dim", "keepdim"),
    aten.prod.dim_int: ("dim", "keepdim"),
    aten.logsumexp.default: ("dim", "keepdim"),
    aten.max.dim: ("dim", "keepdim"),
    aten.min.dim: ("dim", "keepdim"),
    aten.argmax.default: ("dim", "keepdim"),
    aten.argmin.default: ("dim", "keepdim"),
    aten.linalg_vector_norm.default: ("dim", "keepdim"),
    aten._softmax.default: ("dim", None),
    aten._log_softmax.default: ("dim", None),
    aten.softmax.int: ("dim", None),
    aten.log_softmax.int: ("dim", None),
    aten._safe_softmax.default: ("dim", None),
    aten.cumsum.default: ("dim", None),
    aten.cumprod.default: ("dim", None),
    aten.logcumsumexp.default: ("dim", None),
    aten.topk.default: ("dim", None),
    aten.sort.default: ("dim", None),
}


@rule(*_REDUCTIONS)
def _reduction(node: fx.Node, out: Rows, geo: Geometry) -> Restriction:
    """Reduce / normalize / scan over dims that are not the sequence axis."""
    x = node.args[0]
    rank = len(shape(x))
    dim_name, keep_name = _REDUCTIONS[node.target]
    dims = _arg(node, dim_name)
    if dims is None or dims == []:
        raise NotRowwise("reduces over all dims, the sequence included")
    dims = {_norm(d, rank) for d in ([dims] if isinstance(dims, int) else dims)}
    keep = True if keep_name is None else bool(_arg(node, keep_name))
    in_axis = out.axis if keep else [d for d in range(rank) if d not in dims][out.axis]
    if in_axis in dims:
        raise NotRowwise(f"reduces or scans along the sequence axis (dim {in_axis} of {tuple(shape(x))})")
    return Restriction([(x, Rows(in_axis, out.inner))], _same_op(node))


_NORMS = {
    aten.native_layer_norm.default: "normalized_shape",
    aten.layer_norm.default: "normalized_shape",
    aten.rms_norm.default: "normalized_shape",
    getattr(aten, "_fused_rms_norm", None) and aten._fused_rms_norm.default: "normalized_shape",
}


@rule(*_NORMS)
def _layer_norm(node: fx.Node, out: Rows, geo: Geometry) -> Restriction:
    x = node.args[0]
    rank, n = len(shape(x)), len(_arg(node, _NORMS[node.target]))
    if out.axis >= rank - n:
        raise NotRowwise("normalizes over the sequence axis")
    others = [(w, FULL) for w in _tensor_inputs(node) if w is not x]
    return Restriction([(x, Rows(out.axis, out.inner))] + others, _same_op(node))


# -- views, layout ops --------------------------------------------------------------------------


def _view_axis(src: tuple[int, ...], dst: tuple[int, ...], rows: Rows, seq_len: int) -> Rows:
    """Where the sequence of a tensor of shape src lands after viewing it as dst.

    With contiguous (row-major) flat positions, one sequence step is `step` = stride(axis)·inner
    elements; it stays inside dst dim k when stride_k divides step and step·S divides
    stride_k·dst[k]. No dim qualifies: the view splits the sequence across dims.
    """

    def strides(s: tuple[int, ...]) -> list[int]:
        out, acc = [], 1
        for d in reversed(s):
            out.append(acc)
            acc *= d
        return out[::-1]

    step = strides(src)[rows.axis] * rows.inner
    for k, (stride, size) in enumerate(zip(strides(dst), dst)):
        if divides(stride, step) and divides(step * seq_len, stride * size):
            inner = quotient(step, stride)
            if not isinstance(inner, int):
                raise NotRowwise(f"the view {tuple(src)} -> {tuple(dst)} gives the sequence a symbolic stride {inner}")
            return Rows(k, inner)
    raise NotRowwise(f"the view {tuple(src)} -> {tuple(dst)} splits the sequence axis across dims")


@rule(aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def _view(node: fx.Node, out: Rows, geo: Geometry) -> Restriction:
    x = node.args[0]
    out_shape = shape(node)
    in_rows = _view_axis(out_shape, shape(x), out, geo.seq_len)

    def rebuild(new: NewArg, b: Builder, geo: Geometry) -> fx.Node:
        src = new(x)
        if node.target is not aten.reshape.default and not tensor_val(src).is_contiguous():
            # the kept rows of one span are a strided slice: copy them before a strict view
            src = b.call(aten.clone.default, (src,), {"memory_format": torch.contiguous_format}, like=node)
        return b.call(node.target, (src, _scaled_shape(out_shape, out, geo)), like=node)  # seq axis resized

    return Restriction([(x, in_rows)], rebuild)


@rule(aten.expand.default)
def _expand(node: fx.Node, out: Rows, geo: Geometry) -> Restriction:
    x = node.args[0]
    out_shape = shape(node)

    def rebuild(new: NewArg, b: Builder, geo: Geometry) -> fx.Node:
        return b.call(node.target, (new(x), _scaled_shape(out_shape, out, geo)), like=node)

    return Restriction([(x, _broadcast(x, out_shape, out))], rebuild)


@rule(aten.permute.default)
def _permute(node: fx.Node, out: Rows, geo: Geometry) -> Restriction:
    x = node.args[0]
    dims = [_norm(d, len(shape(x))) for d in node.args[1]]
    return Restriction([(x, Rows(dims[out.axis], out.inner))], _same_op(node))


@rule(aten.transpose.int)
def _transpose(node: fx.Node, out: Rows, geo: Geometry) -> Restriction:
    x = node.args[0]
    rank = len(shape(x))
    d0, d1 = _norm(node.args[1], rank), _norm(node.args[2], rank)
    swap = {d0: d1, d1: d0}
    return Restriction([(x, Rows(swap.get(out.axis, out.axis), out.inner))], _same_op(node))


@rule(aten.t.default)
def _t(node: fx.Node, out: Rows, geo: Geometry) -> Restriction:
    x = node.args[0]
    axis = out.axis if len(shape(x)) < 2 else 1 - out.axis
    return Restriction([(x, Rows(axis, out.inner))], _same_op(node))


@rule(aten.unsqueeze.default)
def _unsqueeze(node: fx.Node, out: Rows, geo: Geometry) -> Restriction:
    x = node.args[0]
    d = _norm(node.args[1], len(shape(node)))
    if d == out.axis:
        raise NotRowwise("the sequence axis is the new unit dim")
    return Restriction([(x, Rows(out.axis if out.axis < d else out.axis - 1, out.inner))], _same_op(node))


@rule(aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)
def _squeeze(node: fx.Node, out: Rows, geo: Geometry) -> Restriction:
    x = node.args[0]
    xs = shape(x)
    if node.target is aten.squeeze.default:
        gone = {i for i, s in enumerate(xs) if s == 1}
    else:
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        gone = {_norm(d, len(xs)) for d in dims if xs[_norm(d, len(xs))] == 1}
    kept = [i for i in range(len(xs)) if i not in gone]
    return Restriction([(x, Rows(kept[out.axis], out.inner))], _same_op(node))


@rule(aten.slice.Tensor, aten.narrow.default)
def _slice(node: fx.Node, out: Rows, geo: Geometry) -> Restriction:
    x = node.args[0]
    if _norm(_arg(node, "dim"), len(shape(x))) == out.axis:
        raise NotRowwise("slices the sequence axis")
    return Restriction([(x, out)], _same_op(node))


@rule(aten.select.int)
def _select(node: fx.Node, out: Rows, geo: Geometry) -> Restriction:
    x = node.args[0]
    d = _norm(node.args[1], len(shape(x)))
    return Restriction([(x, Rows(out.axis if out.axis < d else out.axis + 1, out.inner))], _same_op(node))


@rule(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unsafe_split.Tensor)
def _split(node: fx.Node, out: Rows, geo: Geometry) -> Restriction:
    x = node.args[0]
    if _norm(_arg(node, "dim"), len(shape(x))) == out.axis:
        raise NotRowwise("splits the sequence axis")
    return Restriction([(x, out)], _same_op(node))


@rule(aten.unbind.int)
def _unbind(node: fx.Node, out: Rows, geo: Geometry) -> Restriction:
    x = node.args[0]
    d = _norm(_arg(node, "dim"), len(shape(x)))
    return Restriction([(x, Rows(out.axis if out.axis < d else out.axis + 1, out.inner))], _same_op(node))


@rule(aten.cat.default)
def _cat(node: fx.Node, out: Rows, geo: Geometry) -> Restriction:
    rank = len(shape(node))
    if _norm(_arg(node, "dim"), rank) == out.axis:
        raise NotRowwise("concatenates along the sequence axis")
    parts = node.args[0]
    if any(len(shape(p)) != rank for p in parts):
        raise NotRowwise("concatenates tensors of different ranks")
    return Restriction([(p, out) for p in parts], _same_op(node))


@rule(aten.stack.default)
def _stack(node: fx.Node, out: Rows, geo: Geometry) -> Restriction:
    d = _norm(_arg(node, "dim"), len(shape(node)))
    if d == out.axis:
        raise NotRowwise("stacks along the sequence axis")
    rows = Rows(out.axis if out.axis < d else out.axis - 1, out.inner)
    return Restriction([(p, rows) for p in node.args[0]], _same_op(node))


@rule(operator.getitem)
def _getitem(node: fx.Node, out: Rows, geo: Geometry) -> Restriction:
    src, index = node.args
    if not isinstance(src, fx.Node) or not isinstance(src.meta.get("val"), (tuple, list)):
        raise NotRowwise("getitem on something other than an op's tuple output")
    if (src.target in _SDPA or src.target is FLEX_ATTENTION) and index != 0:
        raise NotRowwise(f"uses output {index} of attention (only the attention output is row-wise here)")
    return Restriction([(src, out)], lambda new, b, geo: b.call(operator.getitem, (new(src), index), like=node))


@rule(aten.one_hot.default)
def _one_hot(node: fx.Node, out: Rows, geo: Geometry) -> Restriction:
    if out.axis == len(shape(node)) - 1:
        raise NotRowwise("the sequence is the class axis")
    return Restriction([(node.args[0], out)], _same_op(node))


@rule(aten.repeat_interleave.self_int)
def _repeat_interleave(node: fx.Node, out: Rows, geo: Geometry) -> Restriction:
    """Each element repeated r times along `dim` (MoE: a token copied once per routed expert):
    along the sequence axis, r repeats of one row are r times the row's inner block."""
    x, repeats = node.args[:2]
    dim = _arg(node, "dim")
    if dim is None:
        raise NotRowwise("repeat_interleave without dim flattens the tensor")
    if not isinstance(repeats, int) or repeats < 1:
        raise NotRowwise(f"repeats {repeats!r} is not a positive constant")
    if _norm(dim, len(shape(x))) != out.axis:
        return Restriction([(x, out)], _same_op(node))
    if out.inner % repeats:
        raise NotRowwise(f"{repeats} repeats of a row do not fill the inner block of {out.inner}")
    size = _arg(node, "output_size")
    size = size_of(size.meta["val"]) if isinstance(size, fx.Node) else size

    def rebuild(new: NewArg, b: Builder, geo: Geometry) -> fx.Node:
        args, kwargs = _mapped(node, new)
        if size is not None:
            args, kwargs = _with_arg(node, args, kwargs, "output_size", geo.scaled(size))
        return b.call(node.target, args, kwargs, like=node)

    return Restriction([(x, Rows(out.axis, out.inner // repeats))], rebuild)


@rule(aten.index.Tensor)
def _index(node: fx.Node, out: Rows, geo: Geometry) -> Restriction:
    """x[i0, i1, ..] with integer index tensors (MoE: expert weights gathered per routed row).

    The output holds the indices' broadcast dims (where the first index was when the indexed
    dims are adjacent, else in front) and x's other dims. On an index dim, output row r reads
    x at the indices' row r only: the indices are restricted, x is used as is. On one of x's
    other dims, the rows are x's own: x is restricted, the indices used as is.
    """
    x, indices = node.args[:2]
    pos = [i for i, t in enumerate(indices) if t is not None]
    if not pos:
        raise NotRowwise("index without index tensors")
    for i in pos:
        if tensor_val(indices[i]).dtype in (torch.bool, torch.uint8):
            raise NotRowwise(f"boolean-mask index {indices[i].name} (data-dependent shape)")
    idx_shape = _broadcast_shapes([shape(indices[i]) for i in pos])
    r = len(idx_shape)
    first = pos[0] if pos == list(range(pos[0], pos[-1] + 1)) else 0
    if first <= out.axis < first + r:
        at = Rows(out.axis - first, out.inner)
        demands = [(x, FULL)] + [(indices[i], _broadcast(indices[i], idx_shape, at)) for i in pos]
        return Restriction(demands, _same_op(node))
    others = [d for d in range(len(shape(x))) if d not in pos]  # x's dims the output keeps, in order
    axis = others[out.axis if out.axis < first else out.axis - r]  # the index block sits at `first`
    demands = [(x, Rows(axis, out.inner))] + [(indices[i], FULL) for i in pos]
    return Restriction(demands, _same_op(node))


def _along_other_dim(node: fx.Node, out: Rows, operands: list[fx.Node], verb: str) -> None:
    """Refuse (NotRowwise) a gather / scatter whose `dim` is the sequence axis, or whose
    operands do not all hold the output's rows on that axis (then row r of one is not row r of
    another)."""
    rank = len(shape(node))
    if _norm(_arg(node, "dim"), rank) == out.axis:
        raise NotRowwise(f"{verb} along the sequence axis (dim {out.axis} of {tuple(shape(node))})")
    size = shape(node)[out.axis]
    for x in operands:
        if len(shape(x)) != rank or shape(x)[out.axis] != size:
            raise NotRowwise(f"operand {x.name} {tuple(shape(x))} does not hold the {size} rows of axis {out.axis} "
                             f"of the output {tuple(shape(node))}")


@rule(aten.gather.default)
def _gather(node: fx.Node, out: Rows, geo: Geometry) -> Restriction:
    """gather(x, dim, index) (MoE routers: the scores of the top-k experts): out[.., r, ..] at
    a position of the sequence axis (not `dim`) reads x and index at that same position only.
    Along `dim` itself, or with an x holding other rows than index on the sequence axis
    (gather lets index be shorter on every dim), it is not row-wise."""
    x, index = node.args[0], _arg(node, "index")
    _along_other_dim(node, out, [x, index], "gathers")
    return Restriction([(x, out), (index, out)], _same_op(node))


@rule(aten.scatter.value, aten.scatter.src, aten.scatter_add.default)
def _scatter(node: fx.Node, out: Rows, geo: Geometry) -> Restriction:
    """scatter(self, dim, index, src | value) (MoE routers: the mask of the chosen expert groups):
    at a position of the sequence axis (not `dim`), out reads self, index and src at that same
    position only. The operands must hold the same rows on that axis (scatter lets index and
    src be shorter); along `dim`, it is not row-wise."""
    src = None if node.target is aten.scatter.value else _arg(node, "src")  # scatter.value scatters a scalar
    tensors = [node.args[0], _arg(node, "index")] + ([src] if isinstance(src, fx.Node) else [])
    _along_other_dim(node, out, tensors, "scatters")
    return Restriction([(t, out) for t in tensors], _same_op(node))


# -- matrix products ----------------------------------------------------------------------------


@rule(aten.mm.default)
def _mm(node: fx.Node, out: Rows, geo: Geometry) -> Restriction:
    a, b = node.args[:2]
    demands = [(a, out), (b, FULL)] if out.axis == 0 else [(a, FULL), (b, out)]
    return Restriction(demands, _same_op(node))


@rule(aten.addmm.default)
def _addmm(node: fx.Node, out: Rows, geo: Geometry) -> Restriction:
    bias, a, b = node.args[:3]
    demands = [(a, out), (b, FULL)] if out.axis == 0 else [(a, FULL), (b, out)]
    return Restriction([(bias, _broadcast(bias, shape(node), out))] + demands, _same_op(node))


def _bmm_demands(a: fx.Node, b: fx.Node, out: Rows, rank: int) -> list[tuple[fx.Node, Demand]]:
    """Batched product [.., M, K] @ [.., K, N]: rows come from a, columns from b, batch from both."""
    if out.axis == rank - 2:
        return [(a, Rows(len(shape(a)) - 2, out.inner)), (b, FULL)]
    if out.axis == rank - 1:
        return [(a, FULL), (b, Rows(len(shape(b)) - 1, out.inner))]
    batch = tuple(max(x, y) for x, y in zip(shape(a)[:-2], shape(b)[:-2])) if len(shape(a)) == len(shape(b)) else None
    if batch is None:
        raise NotRowwise("batched product with operands of different ranks along the sequence")
    out_shape = (*batch, 1, 1)  # only the batch dims matter for the broadcast check
    return [(a, _broadcast(a, out_shape, out)), (b, _broadcast(b, out_shape, out))]


@rule(aten.bmm.default, aten.matmul.default)
def _bmm(node: fx.Node, out: Rows, geo: Geometry) -> Restriction:
    a, b = node.args[:2]
    if len(shape(a)) < 2 or len(shape(b)) < 2:
        raise NotRowwise("matrix-vector product")
    return Restriction(_bmm_demands(a, b, out, len(shape(node))), _same_op(node))


@rule(aten.baddbmm.default)
def _baddbmm(node: fx.Node, out: Rows, geo: Geometry) -> Restriction:
    bias, a, b = node.args[:3]
    demands = _bmm_demands(a, b, out, 3)
    return Restriction([(bias, _broadcast(bias, shape(node), out))] + demands, _same_op(node))


@rule(aten.linear.default)
def _linear(node: fx.Node, out: Rows, geo: Geometry) -> Restriction:
    x = node.args[0]
    if out.axis == len(shape(node)) - 1:
        raise NotRowwise("the sequence is the feature axis")
    weights = [(w, FULL) for w in _tensor_inputs(node) if w is not x]
    return Restriction([(x, Rows(out.axis - (len(shape(node)) - len(shape(x))), out.inner))] + weights, _same_op(node))


# -- attention ----------------------------------------------------------------------------------

_SDPA = SDPA_MASKS  # op -> (name of the mask argument or None, whether the mask must be additive float)


@rule(*_SDPA)
def _sdpa(node: fx.Node, out: Rows, geo: Geometry) -> Restriction:
    """softmax(q kᵀ + mask) v: query rows cut, keys and values of all rows, mask rows cut.

    is_causal=True with fewer queries than keys would align the mask top-left (wrong here):
    the cut query rows get an explicit causal mask built from their positions (K x S, see
    _causal_rows), never the S x S one.
    """
    q, k, v = node.args[:3]
    rank = len(shape(q))
    val = node.meta.get("val")
    out_shape = tuple(val[0].shape) if isinstance(val, (tuple, list)) else shape(node)  # [B, H, L, Ev]
    if out.axis != rank - 2:
        raise NotRowwise(f"the sequence is not the query-row axis (axis {out.axis} of {out_shape})")
    mask_name, additive = _SDPA[node.target]
    mask = _arg(node, mask_name) if mask_name else None
    causal = bool(_arg(node, "is_causal"))
    demands: list[tuple[fx.Node, Demand]] = [(q, out), (k, FULL), (v, FULL)]
    if mask is not None:
        demands.append((mask, _broadcast(mask, out_shape[:-1] + (shape(k)[-2],), out)))
    if causal:
        if mask_name is None:
            raise NotRowwise("flash attention with is_causal=True takes no mask; trace with an explicit mask")
        if mask is not None:
            raise NotRowwise("is_causal=True together with an explicit mask")
        if shape(q)[-2] != geo.seq_len or shape(k)[-2] != geo.seq_len or out.inner != 1:
            raise NotRowwise("is_causal=True on a query/key length other than the sequence")

    def rebuild(new: NewArg, b: Builder, geo: Geometry) -> fx.Node:
        args, kwargs = _mapped(node, new)
        if causal:
            rows = _causal_rows(b, geo, tensor_val(q), additive, like=node)  # [K, S] or [B, 1, K, S]
            args, kwargs = _with_arg(node, args, kwargs, "is_causal", False)
            args, kwargs = _with_arg(node, args, kwargs, mask_name, rows)
        return b.call(node.target, args, kwargs, like=node)

    return Restriction(demands, rebuild)


def _causal_rows(b: Builder, geo, q: torch.Tensor, additive: bool, like: fx.Node) -> fx.Node:
    """The causal mask's kept query rows, key <= query position, built from the positions of
    the kept rows: [K, S] for a static layout (its kept spans), [B, 1, K, S] for layout as data
    (the kept-row index; padding entries point at a real row or a padding one, so every row
    keeps key 0 and no softmax runs over nothing). Boolean, or additive (0 / -inf) in q's dtype."""
    keys = b.call(aten.arange.start_step, (0, geo.seq_len, 1), {"dtype": torch.int64, "device": q.device},
                  like=like)  # [S] (start_step: the overload inductor lowers after its decompositions)
    if isinstance(geo, Geometry):
        pos = b.call(aten.unsqueeze.default, (b.slice_rows(keys, Rows(0), geo), 1), like=like)  # [K, 1]
    else:
        pos = b.call(aten.unsqueeze.default, (b.call(aten.unsqueeze.default, (geo.index, 1), like=like), -1),
                     like=like)  # [B, 1, K, 1]
    allowed = b.call(aten.le.Tensor, (keys, pos), like=like)  # [K, S] or [B, 1, K, S]
    if not additive:
        return allowed
    zero = b.call(aten.scalar_tensor.default, (0.0,), {"dtype": q.dtype, "device": q.device}, like=like)
    never = b.call(aten.scalar_tensor.default, (float("-inf"),), {"dtype": q.dtype, "device": q.device}, like=like)
    return b.call(aten.where.self, (allowed, zero, never), like=like)


_ONE_BLOCK = 1 << 30  # the block size of flex attention's empty (length-free) block mask


def _flex_query_buffers(node: fx.Node) -> dict[int, int]:
    """score_mod buffers read at the query row: {buffer position: its query-row axis}.

    After the cut, the kernel's q_idx counts kept rows, not sequence positions: exact only if
    q_idx is used solely to index buffers whose rows are cut alike (vskip_compile.flex reads
    each query's position from such a buffer). Anything else reading q_idx is refused, and so
    is a block mask built for the full query length or a mask_mod that reads q_idx.
    """
    module = node.graph.owning_module
    block_mask, buffers = node.args[4], node.args[7]
    if not (isinstance(block_mask[-3], int) and block_mask[-3] >= _ONE_BLOCK and block_mask[-2] >= _ONE_BLOCK):
        raise NotRowwise(f"flex attention with a block-sparse mask (blocks {block_mask[-3]} x {block_mask[-2]}) "
                         "built for the full query length")
    mask_mod = getattr(module, block_mask[-1].target)
    if next(n for i, n in enumerate(mask_mod.graph.find_nodes(op="placeholder")) if i == 2).users:
        raise NotRowwise("flex attention's mask_mod reads q_idx")
    score_mod = getattr(module, node.args[3].target)
    placeholders = list(score_mod.graph.find_nodes(op="placeholder"))  # score, b, h, q_idx, kv_idx, *buffers
    q_idx, buffer_nodes = placeholders[3], placeholders[5:]
    if len(buffer_nodes) != len(buffers):
        raise NotRowwise("flex attention's score_mod buffers do not match its call")
    axes: dict[int, int] = {}
    for use in q_idx.users:
        if use.target is not aten.index.Tensor or use.args[0] not in buffer_nodes:
            raise NotRowwise(f"flex attention's score_mod reads q_idx directly ({use.target}), not through a row buffer")
        j = buffer_nodes.index(use.args[0])
        at = [i for i, t in enumerate(use.args[1]) if t is q_idx]
        if len(at) != 1 or axes.setdefault(j, at[0]) != at[0]:
            raise NotRowwise(f"flex attention's score_mod indexes buffer {j} by q_idx on several axes")
    for j, axis in axes.items():
        for use in buffer_nodes[j].users:
            if use.target is not aten.index.Tensor or use.args[1][axis] is not q_idx:
                raise NotRowwise(f"flex attention's score_mod reads buffer {j} other than at the query row")
    return axes


@rule(FLEX_ATTENTION)
def _flex_attention(node: fx.Node, out: Rows, geo: Geometry) -> Restriction:
    """Flex attention: query rows cut, keys and values of all rows, the score_mod's query-row
    buffers cut alike (see _flex_query_buffers)."""
    q, k, v = node.args[:3]
    if out.axis != len(shape(q)) - 2:
        raise NotRowwise(f"the sequence is not the query-row axis (axis {out.axis} of {shape(q)})")
    query_axes = _flex_query_buffers(node)
    demands: list[tuple[fx.Node, Demand]] = [(q, out), (k, FULL), (v, FULL)]
    demands += [(buf, FULL) for buf in node.args[7] if isinstance(buf, fx.Node)]

    def rebuild(new: NewArg, b: Builder, geo: Geometry) -> fx.Node:
        args, kwargs = _mapped(node, new)
        buffers = tuple(_kept_first(buf, Rows(query_axes[j]), b, geo) if j in query_axes else buf
                        for j, buf in enumerate(args[7]))
        return b.call(node.target, (*args[:7], buffers, *args[8:]), kwargs, like=node)

    return Restriction(demands, rebuild)


def _kept_first(buf: fx.Node, rows: Rows, b: Builder, geo: Geometry) -> fx.Node:
    """buf with its kept rows first, then its rows K.. S (never read: q_idx < K), same shape.

    Not the K kept rows alone: every call of a score_mod body must pass inputs of one shape
    (inductor checks the body against each call), and the full-row layers keep calling it.
    """
    kept = b.slice_rows(buf, rows, geo)  # [.., K, ..]
    rest = b.call(aten.slice.Tensor, (buf, rows.axis, geo.kept_len, geo.seq_len), like=buf)  # [.., S - K, ..]
    whole = b.call(aten.cat.default, ([kept, rest], rows.axis), like=buf)  # [.., S, ..]
    return b.call(torch.ops.vskip.materialized.default, (whole,), like=buf)  # a buffer, like the core's (vskip_compile.flex)
