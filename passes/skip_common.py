"""The body shared by skip_attention and skip_ffn: find regions, analyse all, then rewrite."""

from __future__ import annotations

from torch import fx

from .base import PassContext, SkipPassError
from .find_regions import Region, regions_for
from .restrict import apply_rewrite, erase_unused, plan_rewrite, residual_rows
from .rows import Builder, Geometry, geometry


def skip_regions(graph: fx.Graph, ctx: PassContext, kind: str) -> dict[str, int]:
    """Rewrite every `kind` region the plan skips; all refusals come before the first change."""
    zero = {f"{kind}_rewritten": 0, f"{kind}_nodes_restricted": 0}
    geo = geometry(graph, ctx)
    if ctx.plan.is_full or not geo.frozen:
        return zero  # nothing to skip: no region is even looked for
    regions = regions_for(graph, ctx, kind)
    if not regions:
        return zero
    if not geo.kept:
        return {f"{kind}_rewritten": drop_regions(regions, geo), f"{kind}_nodes_restricted": 0}
    plans = [plan_rewrite(r, geo) for r in regions]
    closes = {r.close for r in regions}
    for r in regions:
        if closes & (r.nodes | {r.residual}):
            raise SkipPassError(f"{r} overlaps another {kind} region: cannot rewrite them independently")
    b = Builder.for_graph(graph)
    restricted = sum(apply_rewrite(p, geo, b) for p in plans)
    return {f"{kind}_rewritten": len(plans), f"{kind}_nodes_restricted": restricted}


def drop_regions(regions: list[Region], geo: Geometry) -> int:
    """Every row frozen: each skipped operator's update is dropped outright (close -> residual).

    Regions may chain here: when the other kind's pass dropped the operator between two of
    them, one region's residual is the previous one's close. Dropping in graph order and
    following the replacements handles that; nothing is restricted, so no row rule is needed.
    """
    for r in regions:
        residual_rows(r, geo)  # the layout is for this graph's sequence length
    replaced: dict[fx.Node, fx.Node] = {}
    for r in regions:  # graph order
        residual = r.residual
        while residual in replaced:
            residual = replaced[residual]
        r.close.replace_all_uses_with(residual)
        replaced[r.close] = residual
        erase_unused(r.nodes | {r.close})
    return len(regions)
