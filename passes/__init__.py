"""Aten-level FX passes that cut the frozen rows out of skipped operators.

    from vskip_compile.passes import PassContext, run_passes
    result = run_passes(gm, PassContext(plan, layout))  # result.gm, result.counters

Never imports transformers nor an architecture adapter: the passes see a graph, a plan, a
layout and the module names the adapter passes in PassContext.
"""

from .base import GraphPass, PassContext, PassResult, SkipPassError
from .find_regions import Region, find_all_regions
from .pipeline import PASSES, describe_passes, run_passes, run_passes_on_graph

__all__ = [
    "PASSES",
    "GraphPass",
    "PassContext",
    "PassResult",
    "Region",
    "SkipPassError",
    "describe_passes",
    "find_all_regions",
    "run_passes",
    "run_passes_on_graph",
]
