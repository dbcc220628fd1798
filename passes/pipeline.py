"""The ordered pass list and the two ways to run it.

    result = run_passes(gm, PassContext(plan, layout))      # pure: a rewritten copy
    run_passes_on_graph(graph, PassContext(plan, layout))   # in place (inductor post-grad hook)
"""

from __future__ import annotations

from torch import fx

from vskip_compile.errors import VSkipError

from .base import (MODIFYING_COUNTERS, GraphPass, PassContext, PassResult, SkipPassError, copy_graph_module, finish,
                   is_kept_rows_marker)
from .cleanup import CLEANUP
from .find_regions import FIND_REGIONS
from .skip_attention import SKIP_ATTENTION
from .skip_ffn import SKIP_FFN

PASSES: list[GraphPass] = [FIND_REGIONS, SKIP_ATTENTION, SKIP_FFN, CLEANUP]


def describe_passes() -> str:
    """The pass list as text (`vskip passes`)."""
    width = max(len(p.name) for p in PASSES)
    lines = [f"{i}. {p.name.ljust(width)}  {p.doc}" for i, p in enumerate(PASSES, 1)]
    return "\n".join(lines)


def _run_all(graph: fx.Graph, ctx: PassContext) -> dict[str, int]:
    counters: dict[str, int] = {}
    modified = False
    for p in PASSES:
        if p is CLEANUP and not modified and not any(is_kept_rows_marker(n) for n in graph.nodes):
            continue  # nothing was rewritten: the graph stays exactly as traced
        out = _guarded(p, graph, ctx)
        modified = modified or any(v for k, v in out.items() if k in MODIFYING_COUNTERS)
        counters.update(out)
    if modified:
        finish(graph)
    return counters


def _guarded(p: GraphPass, graph: fx.Graph, ctx: PassContext) -> dict[str, int]:
    """p.on_graph, where any failure that is not already a named refusal becomes one
    (SkipPassError naming the pass): an unknown structure is refused, never a crash. The
    callers run on a copy (run_passes) or a scratch graph first (run_passes_on_graph), so a
    half-done rewrite never reaches the caller's graph."""
    try:
        return p.on_graph(graph, ctx)
    except VSkipError:
        raise
    except Exception as e:
        raise SkipPassError(
            f"pass {p.name} failed on a structure it does not know ({type(e).__name__}: {' '.join(str(e).split())}); "
            "the graph is left as traced"
        ) from e


def _modified(counters: dict[str, int]) -> bool:
    return any(v for k, v in counters.items() if k in MODIFYING_COUNTERS)


def run_passes(gm: fx.GraphModule | fx.Graph, ctx: PassContext) -> PassResult:
    """Run PASSES on a copy of gm (an AOT forward graph, `ep.graph_module` or `ep.module()`).

    Given a bare `fx.Graph` instead, runs in place like `run_passes_on_graph`.
    """
    if isinstance(gm, fx.Graph):
        return run_passes_on_graph(gm, ctx)
    out = copy_graph_module(gm)
    counters = _run_all(out.graph, ctx)
    if not _modified(counters):
        return PassResult(gm, False, counters)
    out.recompile()
    return PassResult(out, True, counters)


def run_passes_on_graph(graph: fx.Graph, ctx: PassContext) -> PassResult:
    """Run PASSES in place on graph (inductor's post_grad_custom_pre_pass).

    The passes first run on a scratch copy: a refusal (SkipPassError) leaves graph untouched.
    `gm` of the result is the graph's owning module (None for a graph without one).
    """
    owner = graph.owning_module
    if owner is not None and owner.graph is graph:
        scratch = copy_graph_module(owner).graph  # DCE's purity check needs the owning module
    else:
        scratch = fx.Graph()
        scratch.output(scratch.graph_copy(graph, {}))
    _run_all(scratch, ctx)  # raises before `graph` changes
    counters = _run_all(graph, ctx)
    return PassResult(graph.owning_module, _modified(counters), counters)
