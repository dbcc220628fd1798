"""FlexAttention for the prefill core: the causal and padding mask as a score_mod over
per-row vectors, so no S x S mask is ever materialized.

The SDPA path (vskip_compile.core) needs no mask for all-row attention either (is_causal,
the padding rotated to the right); here each attention call gets `FlexMask(query_rows [B, S],
pads [B])`, and the mask is computed inside the kernel from

    allowed(b, q, k) = k <= query_rows[b, q] and (k >= pads[b] or k == query_rows[b, q])

(a left-padded batch, each padding row attending to itself: the runtime refuses other
padding). The mask reads the query's sequence position from `query_rows`, never `q_idx`
itself, so cutting an attention operator's query rows to the kept rows (the passes gather
`query_rows` like any row tensor) keeps it exact: that is what the flex-attention rule in
passes/rules.py checks before it cuts.

No block mask: a block-sparse mask would be built for the full query length; the empty (one
giant block) mask is length-free, and the FLOPs convention counts the full S_q x S_kv
rectangle anyway. Only compiled (inductor) flex attention is memory-lean: eager flex attention
on CPU is torch's dense reference implementation.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .config import ATTENTIONS  # noqa: F401  (the kernels DecoderCore takes)

NAME = "vskip_flex"  # the name under transformers' AttentionInterface


@torch.library.custom_op("vskip::materialized", mutates_args=())
def materialized(x: torch.Tensor) -> torch.Tensor:
    """x as a buffer of its own. Inductor's CPU flex template (torch 2.13) fails with "No
    choices" when a score_mod buffer is a computed, not yet realized tensor (an arange, a
    gather); an opaque op's output is always a realized buffer. Costs one copy of a [B, S] or
    [B] index vector."""
    return x.clone()


@materialized.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)



class FlexMask(NamedTuple):
    """What a decoder layer gets as its attention mask on the flex path."""

    query_rows: torch.Tensor  # [B, S] int64: each query row's position in the sequence
    pads: torch.Tensor  # [B] int64: each row's left padding (keys before it are masked)


def flex_mask(attention_mask: torch.Tensor, hidden: torch.Tensor) -> FlexMask:
    """FlexMask of a left-padded batch from its [B, S] padding mask. Keys are masked through
    a per-row pad count, not a [B, S] key vector: indexing a buffer by kv_idx miscompiles in
    inductor's CPU flex template with dynamic shapes (torch 2.13). The rows are counted on
    the hidden state's own sequence axis [B, S, D], so that a traced graph's row buffer has
    the residual stream's symbolic length (the passes cut both alike)."""
    batch, seq_len = hidden.shape[:2]
    torch._check(attention_mask.shape[1] == seq_len)
    rows = materialized(torch.arange(seq_len, device=hidden.device).expand(batch, seq_len))  # [B, S]
    pads = materialized((attention_mask == 0).sum(dim=1))  # [B], left padding
    return FlexMask(rows, pads)


def flex_attention_forward(module: nn.Module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                           **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; a FlexMask selects flex attention, anything
    else (the eager reference, decoding) goes to transformers' own SDPA function unchanged."""
    if not isinstance(attention_mask, FlexMask):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    from torch.nn.attention.flex_attention import flex_attention

    rows, pads = attention_mask

    def score_mod(score, b, h, q_idx, kv_idx):
        q_row = rows[b, q_idx]
        allowed = (kv_idx <= q_row) & ((kv_idx >= pads[b]) | (kv_idx == q_row))
        return torch.where(allowed, score, -float("inf"))

    out = flex_attention(query, key, value, score_mod=score_mod, scale=scaling,
                         enable_gqa=query.shape[1] != key.shape[1])  # [B, H, Q, E]
    return out.transpose(1, 2).contiguous(), None  # [B, Q, H, E], as the SDPA function returns


def dispatch_to_flex(config) -> None:
    """Point `config`'s decoder layers at flex_attention_forward, for good (set once, outside
    any traced code: Dynamo does not restore a config attribute a compiled forward mutated).
    Everything but a FlexMask still runs transformers' own SDPA function, so the eager
    reference, decoding and any other caller of the model compute what they computed before;
    only `config._attn_implementation` reads differently ("vskip_flex")."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, flex_attention_forward)
    if config._attn_implementation not in ("sdpa", NAME):
        raise ValueError(f"attention='flex' needs a model on SDPA attention, got {config._attn_implementation!r}")
    config._attn_implementation = NAME
