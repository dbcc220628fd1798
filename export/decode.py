"""DecodeStep: one new token over a fixed-size KV cache, as a static graph.

Decoding is the unmodified model (a plan only changes the prefill), so this graph is the same
for every plan. Interface (every dimension a number; T = max_cache_len, fixed at export):

    forward(inputs_embeds [B, 1, D], position_ids [B, 1] or M-RoPE [3, B, 1],
            past_mask [B, T] bool, k_0, v_0, ..., k_{L-1}, v_{L-1} [B, KV, T, E])
        -> (logits [B, 1, V], k_new_0, v_new_0, ... [B, KV, 1, E])

past_mask says which cache slots hold tokens (the runner fills slots 0..n-1 in order). The new
token attends to those slots and to itself. Only the new K/V rows come out: the runner writes
them into its preallocated buffers at slot n, so a step moves O(1) rows instead of copying the
cache (static shapes suit TensorRT; the cost is attention over all T slots, masked).

The module lives in vskip_compile.core (CompiledVLM.generate compiles the same step with
torch.compile; the runtime must not import the exporters); this module re-exports it and
builds the export's example inputs.
"""

from __future__ import annotations

import torch

from ..core import DecodeStep

__all__ = ["DecodeStep", "example_inputs"]


def example_inputs(model, adapter, batch: int, max_cache_len: int, mrope: bool) -> tuple[torch.Tensor, ...]:
    """Zero-valued example inputs of the decode graph's static shapes."""
    lm = adapter.language_model(model)
    attn = lm.layers[0].self_attn
    cfg = lm.config
    param = next(lm.parameters())
    like = {"dtype": param.dtype, "device": param.device}
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    head_dim = int(attn.head_dim)
    embeds = torch.zeros(batch, 1, cfg.hidden_size, **like)
    pos = torch.zeros((3, batch, 1) if mrope else (batch, 1), dtype=torch.long, device=param.device)
    past_mask = torch.zeros(batch, max_cache_len, dtype=torch.bool, device=param.device)
    past_mask[:, :1] = True
    kv = [torch.zeros(batch, kv_heads, max_cache_len, head_dim, **like) for _ in range(2 * len(lm.layers))]
    return (embeds, pos, past_mask, *kv)
