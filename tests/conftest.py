"""Shared fixtures: cached tiny models and an independent formulation of the skip semantics."""

from __future__ import annotations

import functools

import pytest
import torch

from vskip_compile.archs import adapter_for
from vskip_compile.testing.tiny import build_tiny

# Tiny models on a shared 2-core machine: one intra-op thread is 2-4x faster than two
# threads spinning against other jobs (measured: 100 s -> 22 s for test_reference.py).
torch.set_num_threads(1)


@functools.lru_cache(maxsize=None)
def _cached_tiny(arch: str):
    return build_tiny(arch)


@pytest.fixture(scope="session")
def tiny_model():
    """tiny_model(arch) -> a cached tiny model; tests must leave it as they found it."""
    return _cached_tiny


def manual_logits(model, inputs: dict, ops, scope: str = "visual", image_token_id: int | None = None):
    """Prefill logits under a plan, written independently of vskip_compile.reference.

    A layer-by-layer loop over the HF decoder layers' submodules, with an explicit causal
    mask and the frozen rows chosen by torch.where. The frozen rows come straight from
    input_ids (no VisualLayout); only the language-model inputs come from the adapter,
    whose prefill_inputs is checked against the HF forward separately.
    """
    adapter = adapter_for(model)
    token = adapter.image_token_id(model) if image_token_id is None else image_token_id
    p = adapter.prefill_inputs(model, **inputs)
    lm = adapter.language_model(model)
    h = p.inputs_embeds  # [B, S, D]
    batch, seq, _ = h.shape
    visual = (inputs["input_ids"] == token)  # [B, S]
    if scope == "prefix_through_visual":
        last = visual.int().cumsum(-1).argmax(-1, keepdim=True)  # first index reaching the max count
        visual = torch.arange(seq)[None, :] <= last
        visual &= (inputs["input_ids"] == token).any(-1, keepdim=True)
    frozen = visual[..., None]  # [B, S, 1]
    mask = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None].expand(batch, 1, seq, seq)
    if p.attention_mask is not None:
        mask = mask & p.attention_mask.bool()[:, None, None, :]
    cos_sin = lm.rotary_emb(h, p.position_ids)
    for i, layer in enumerate(lm.layers):
        attn = layer.self_attn(
            hidden_states=layer.input_layernorm(h), attention_mask=mask, position_embeddings=cos_sin
        )[0]
        h1 = h + attn
        if ops[i] in ("skip_attn", "skip_both"):
            h1 = torch.where(frozen, h, h1)
        h2 = h1 + layer.mlp(layer.post_attention_layernorm(h1))
        if ops[i] in ("skip_ffn", "skip_both"):
            h2 = torch.where(frozen, h1, h2)
        h = h2
        if p.deepstack is not None and i < len(p.deepstack):
            h = h + p.deepstack[i]
    return adapter.lm_head(model)(lm.norm(h))


@pytest.fixture(scope="session")
def manual():
    return manual_logits
