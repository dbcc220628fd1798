"""Pass: run skipped FFN operators on the kept rows only.

For each layer the plan marks `skip_ffn` or `skip_both`, the FFN region (post-attention
norm, gated or plain MLP) runs on the kept rows; the frozen rows of the residual pass through.
"""

from __future__ import annotations

from torch import fx

from .base import GraphPass, PassContext
from .find_regions import FFN
from .skip_common import skip_regions


def _skip_ffn(graph: fx.Graph, ctx: PassContext) -> dict[str, int]:
    return skip_regions(graph, ctx, FFN)


SKIP_FFN = GraphPass(
    "skip_ffn",
    "skip_ffn/skip_both layers: norm and MLP on kept rows, frozen rows of the residual pass through",
    _skip_ffn,
)
