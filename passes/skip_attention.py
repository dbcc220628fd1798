"""Pass: cut the query path of skipped attention operators to the kept rows.

For each layer the plan marks `skip_attn` or `skip_both`, the attention region (input norm,
q projection, q-norm, RoPE on q, SDPA, output projection) runs on the kept rows only; keys
and values keep every row; the frozen rows of the residual pass through unchanged.
"""

from __future__ import annotations

from torch import fx

from .base import GraphPass, PassContext
from .find_regions import ATTN
from .skip_common import skip_regions


def _skip_attention(graph: fx.Graph, ctx: PassContext) -> dict[str, int]:
    return skip_regions(graph, ctx, ATTN)


SKIP_ATTENTION = GraphPass(
    "skip_attention",
    "skip_attn/skip_both layers: q path, SDPA query rows and o_proj on kept rows; K/V on all rows",
    _skip_attention,
)
