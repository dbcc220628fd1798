"""Cut the frozen rows out of one operator region (shared by skip_attention and skip_ffn).

For `close = residual + output` the kept rows of `close` are computed from the kept rows of
its inputs, walking the region backwards from `close` (demand analysis, nothing mutated):

- a node some surviving user still needs on all rows (the norm output feeding k/v, the k/v
  path itself, anything used outside the region) stays as is; if the kept rows need it too,
  they take a constant-offset slice of it (`Builder.slice_rows`);
- any other node is re-emitted on the kept rows by its row-wise rule (`rules.py`), which says
  which inputs it needs restricted (and on which axis) and which as is (weights, broadcast
  operands, keys and values of attention);
- the residual and inputs from outside the region (RoPE cos/sin, the attention mask) are
  sliced where they span the sequence.

Then the kept rows of `close` are merged with the residual's frozen rows (constant-offset
cat) and replace `close`. Every refusal happens in `plan_rewrite`, before the graph changes.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

from torch import fx

from .base import ASSERT_OPS, SkipPassError, op_name, shape, size_of
from .find_regions import Region
from .rows import Builder, Geometry, Rows
from .rules import NotRowwise, Restriction, restriction_for

# Ops that move no data: re-emitting them on the kept rows is free, so they are restricted even
# when the full node stays alive (the slice then lands on the computed tensor underneath).
_FREE = {"view", "_unsafe_view", "reshape", "permute", "transpose", "t", "unsqueeze", "squeeze", "expand", "alias"}


@dataclass
class RewritePlan:
    """The outcome of the demand analysis of one region."""

    region: Region
    rows: Rows  # where the sequence lives in close / residual
    demand: dict[fx.Node, Rows]  # nodes whose kept rows are needed, and their row axis
    rules: dict[fx.Node, Restriction]  # re-emitted nodes
    sliced: set[fx.Node]  # nodes whose kept rows are a slice of the full node
    dead: set[fx.Node]  # region nodes with no surviving user


def _unused_item(node: fx.Node) -> bool:
    """An item of a tuple output nobody reads (topk(..).indices leaves the values' getitem in an
    exported graph): no use of the node it reads from."""
    return node.target is operator.getitem and not node.users


def _refuse(region: Region, node: fx.Node, why: str) -> SkipPassError:
    return SkipPassError(
        f"cannot skip {region.kind} of layer {region.layer}: op {op_name(node)} at node {node.name} "
        f"(module {node.meta.get('nn_module_stack') and list(node.meta['nn_module_stack'].values())[-1][0] or '?'}) "
        f"is not provably row-wise: {why}"
    )


def residual_rows(region: Region, geo: Geometry) -> Rows:
    """The residual stream is [B, S, D]: the sequence is axis 1."""
    for node in (region.residual, region.close):
        s = shape(node)
        if len(s) != 3 or s[1] != geo.seq_len:
            raise SkipPassError(
                f"{region}: {node.name} has shape {s}, expected the residual stream [B, S={geo.seq_len}, D]; "
                "is the layout for this graph's sequence length?"
            )
    return Rows(1)


def plan_rewrite(region: Region, geo: Geometry) -> RewritePlan:
    """Demand analysis of one region; raises SkipPassError naming the op/layer/node it refuses."""
    order = {n: i for i, n in enumerate(region.close.graph.nodes)}
    rows = residual_rows(region, geo)
    inside = region.nodes | {region.close}
    demand: dict[fx.Node, Rows] = {region.close: rows}
    rules: dict[fx.Node, Restriction] = {}
    full_live: set[fx.Node] = set()
    full_by: dict[fx.Node, set[fx.Node]] = {}  # node -> re-emitted users that need it on all rows
    sliced: set[fx.Node] = set()
    dead: set[fx.Node] = set()

    for node in sorted(inside, key=order.__getitem__, reverse=True):
        live = node is not region.close and any(
            u.target not in ASSERT_OPS and not _unused_item(u)
            and (u not in inside or u in full_live or u in full_by.get(node, ()))
            for u in node.users
        )
        if live:
            full_live.add(node)
        want = demand.get(node)
        if want is None:
            if not live:
                dead.add(node)
            continue
        if live and getattr(node.target, "__name__", "").split(".")[0] not in _FREE:
            sliced.add(node)
            continue
        try:
            res = restriction_for(node, want, geo)
        except NotRowwise as e:
            if live:
                sliced.add(node)
                continue
            raise _refuse(region, node, str(e)) from None
        except SkipPassError:
            raise
        except Exception as e:  # a rule meeting a structure it was not written for: refuse, never crash
            raise _refuse(region, node, f"its rule failed ({type(e).__name__}: {' '.join(str(e).split())})") from e
        rules[node] = res
        if not live:
            dead.add(node)
        for arg, need in res.demands:
            if need is None:
                full_by.setdefault(arg, set()).add(node)
                continue
            if arg in demand and demand[arg] != need:
                raise _refuse(region, node, f"input {arg.name} is needed on two different sequence axes")
            demand[arg] = need
    for node in demand:
        if node not in rules and node not in inside:
            sliced.add(node)  # the residual, or an input from outside (cos/sin, mask): slice it
    for node, need in demand.items():  # every axis holds whole sequences: offsets are exact
        v = node.meta.get("val")
        v = v[0] if isinstance(v, (tuple, list)) else v
        try:
            geo.outer(size_of(v.shape[need.axis]), need, node.name)
        except SkipPassError as e:
            raise _refuse(region, node, str(e)) from None
    return RewritePlan(region, rows, demand, rules, sliced, dead)


def apply_rewrite(p: RewritePlan, geo: Geometry, b: Builder) -> int:
    """Emit the kept-row computation before `close`, merge in the frozen rows, replace `close`.
    Returns the number of re-emitted nodes. Needs kept rows (skip_common.drop_regions
    handles a layout with none)."""
    graph = p.region.close.graph
    close, residual = p.region.close, p.region.residual
    order = {n: i for i, n in enumerate(graph.nodes)}
    with graph.inserting_before(close):
        new: dict[fx.Node, fx.Node] = {}
        for node in sorted(p.demand, key=order.__getitem__):
            try:
                if node in p.sliced:
                    new[node] = b.slice_rows(node, p.demand[node], geo)
                else:
                    wanted = {a for a, need in p.rules[node].demands if need is not None}
                    new[node] = p.rules[node].rebuild(lambda a, w=wanted: new[a] if a in w else a, b, geo)
            except SkipPassError:
                raise
            except Exception as e:  # re-emitting on the kept rows failed (e.g. sizes that do not line up)
                raise _refuse(p.region, node, f"re-emitting it on the kept rows failed "
                                              f"({type(e).__name__}: {' '.join(str(e).split())})") from e
        merged = b.merge_rows(new[close], residual, p.rows, geo, like=close)  # [B, S, D]
    close.replace_all_uses_with(merged)
    erase_unused(p.dead | {close})
    return len(p.rules)


def erase_unused(nodes: set[fx.Node]) -> None:
    """Erase the nodes left without users (latest first), with the dtype asserts hanging off
    them. Explicit, because DCE keeps ops it deems impure (SDPA is tagged
    nondeterministic_seeded) and those asserts."""
    if not nodes:
        return
    graph = next(iter(nodes)).graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in sorted(nodes, key=order.__getitem__, reverse=True):
        for user in list(node.users):
            if user.target in ASSERT_OPS:
                graph.erase_node(user)
        if not node.users:
            graph.erase_node(node)
