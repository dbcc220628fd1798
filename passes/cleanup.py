"""Pass: fold the slice/cat chains the skip passes leave, then dead-code elimination.

Only nodes the skip passes inserted (meta['vskip']) are touched, so the model's own slices
and cats stay as traced. Folds, to a fixed point:
- slice(cat(p0, p1, ..), d, a, b) along the cat's dim  -> the pieces it covers (or a slice of one);
- slice(slice(x, d, a0, e0), d, a, b)                 -> slice(x, d, a0 + a, min(a0 + b, e0));
- cat(.., slice(x, d, a, b), slice(x, d, b, c), .., d) -> cat(.., slice(x, d, a, c), ..);
- a slice over a whole axis -> its input, a cat of one piece -> the piece.
Slices with a step other than 1 (the model's own, re-emitted on the kept rows, RoPE's
x[..., 1::2]) are never folded.
With skip_both, the FFN's kept input (a slice of the attention's merged residual) folds back
to the attention's kept rows. The `vskip.kept_rows` layout marker, read by the skip passes,
is replaced by its input (also in graphs nothing else touched).
"""

from __future__ import annotations

from torch import fx

from .base import GraphPass, PassContext, aten, is_kept_rows_marker, shape
from .rows import Builder


def _ours(node: object, target: object) -> bool:
    return isinstance(node, fx.Node) and node.target is target and node.meta.get("vskip") is True


def _slice_args(node: fx.Node) -> tuple[fx.Node, int, int, int]:
    src, dim, start, end = node.args[:4]
    return src, dim, start, end


def _unit_step(node: fx.Node) -> bool:
    """A slice with step 1 (a re-emitted model slice such as RoPE's x[..., 1::2] is not one)."""
    return (node.args[4] if len(node.args) > 4 else node.kwargs.get("step", 1)) == 1


def _fold_slice(node: fx.Node, b: Builder) -> fx.Node | None:
    if not _unit_step(node):
        return None
    src, dim, start, end = _slice_args(node)
    if start == 0 and end == shape(src)[dim]:
        return src
    if _ours(src, aten.slice.Tensor) and _slice_args(src)[1] == dim and _unit_step(src):
        inner, _, a0, e0 = _slice_args(src)
        return b.slice(inner, dim, a0 + start, min(a0 + end, e0), like=node)  # the inner slice's end bounds it
    if _ours(src, aten.cat.default) and src.args[1] == dim:
        offs, acc = [], 0
        for p in src.args[0]:
            offs.append((acc, acc + shape(p)[dim]))
            acc += shape(p)[dim]
        for p, (a, e) in zip(src.args[0], offs):
            if a <= start and end <= e:
                return b.slice(p, dim, start - a, end - a, like=node)
        covered = [p for p, (a, e) in zip(src.args[0], offs) if start <= a and e <= end]
        if covered and sum(shape(p)[dim] for p in covered) == end - start:
            return b.cat(covered, dim, like=node)
    return None


def _fold_cat(node: fx.Node, b: Builder) -> fx.Node | None:
    parts, dim = list(node.args[0]), node.args[1]
    if len(parts) == 1:
        return parts[0]
    merged: list[fx.Node] = []
    changed = False
    for p in parts:
        q = merged[-1] if merged else None
        if _ours(p, aten.slice.Tensor) and _ours(q, aten.slice.Tensor) and _unit_step(p) and _unit_step(q):
            ps, pd, pa, pe = _slice_args(p)
            qs, qd, qa, qe = _slice_args(q)
            if ps is qs and pd == qd == dim and qe == pa:
                merged[-1] = b.slice(ps, dim, qa, pe, like=node)
                changed = True
                continue
        merged.append(p)
    return b.cat(merged, dim, like=node) if changed else None


_STRICT_VIEWS = (aten.view.default, aten._unsafe_view.default)


def _breaks_a_view(node: fx.Node, new: fx.Node) -> bool:
    """Whether swapping a contiguous node for a strided one would feed a strict view."""
    old_c, new_c = node.meta["val"].is_contiguous(), new.meta["val"].is_contiguous()
    return old_c and not new_c and any(u.target in _STRICT_VIEWS for u in node.users)


def _cleanup(graph: fx.Graph, ctx: PassContext) -> dict[str, int]:
    b = Builder.for_graph(graph)
    counters = {"slices_folded": 0, "cats_folded": 0, "markers_removed": 0, "nodes_removed": 0}
    changed = True
    while changed:
        changed = False
        for node in list(graph.nodes):
            if node.users and (_ours(node, aten.slice.Tensor) or _ours(node, aten.cat.default)):
                with graph.inserting_before(node):
                    slice_ = node.target is aten.slice.Tensor
                    new = _fold_slice(node, b) if slice_ else _fold_cat(node, b)
                if new is not None and new is not node and not _breaks_a_view(node, new):
                    node.replace_all_uses_with(new)
                    counters["slices_folded" if slice_ else "cats_folded"] += 1
                    changed = True
    for node in list(graph.nodes):  # the layout marker has been read: it becomes its input again
        if is_kept_rows_marker(node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            counters["markers_removed"] += 1
    before = len(graph.nodes)
    graph.eliminate_dead_code()
    counters["nodes_removed"] = before - len(graph.nodes)
    return counters


CLEANUP = GraphPass(
    "cleanup",
    "fold the inserted slice/cat chains (slice of cat, adjacent slices), drop the layout marker, dead-code elimination",
    _cleanup,
)
