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
"""

from __future__ import annotations

import torch
from torch import nn


class _AppendCache:
    """Stands in for a HF Cache for one step: attention sees [past slots, new row]; the new
    rows are recorded as graph outputs. 5.24 attention calls
    `cache.update(key_states, value_states, layer_idx, kwargs=...)` with K after RoPE."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]]):
        self.past = past
        self.new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.new[layer_idx] = (key_states, value_states)  # [B, KV, 1, E]
        past_k, past_v = self.past[layer_idx]  # [B, KV, T, E]
        return torch.cat([past_k, key_states], dim=2), torch.cat([past_v, value_states], dim=2)  # [B, KV, T+1, E]


class DecodeStep(nn.Module):
    """The decoder layers of a HF text model for one token over a masked fixed-size cache."""

    def __init__(self, language_model: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.lm = language_model
        self.lm_head = lm_head

    @property
    def num_layers(self) -> int:
        return len(self.lm.layers)

    def forward(self, inputs_embeds, position_ids, past_mask, *past_kv):
        if len(past_kv) != 2 * self.num_layers:
            raise ValueError(f"expected {2 * self.num_layers} past K/V tensors, got {len(past_kv)}")
        cache = _AppendCache([(past_kv[2 * i], past_kv[2 * i + 1]) for i in range(self.num_layers)])
        self_slot = torch.ones_like(past_mask[:, :1])  # [B, 1]
        mask = torch.cat([past_mask, self_slot], dim=1)[:, None, None, :]  # [B, 1, 1, T+1]
        x = inputs_embeds  # [B, 1, D]
        position_embeddings = self.lm.rotary_emb(x, position_ids)
        for layer in self.lm.layers:
            x = layer(
                x,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                position_ids=None,
                cache=cache,
                use_cache=True,
            )
        logits = self.lm_head(self.lm.norm(x))  # [B, 1, V]
        new_kv: list[torch.Tensor] = []
        for i in range(self.num_layers):
            new_kv.extend(cache.new[i])  # k_new_i, v_new_i: [B, KV, 1, E]
        return (logits, *new_kv)


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
