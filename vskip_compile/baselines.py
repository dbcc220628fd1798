"""Baselines the operator-level plans are compared with, in the same harness and FLOPs convention.

- ShortV-like layer freeze: whole layers `skip_both`, chosen by the same calibration criterion.
  It is just a SkipPlan (`vskip_compile.calibrate`, granularity "layer").
- VTW-like token dropping: from layer K on, the visual rows and their K/V leave the sequence.
- FastV-like pruning: at layer K-1 rank the visual tokens by the attention the last prompt row
  pays them (mean over heads); from layer K on keep only the top `keep` of them (K/V included).

Dropping changes the sequence, so it cannot be a row-freeze plan: `prefill` runs the HF decoder
layers itself (eager, explicit causal mask, rotary embeddings recomputed from the kept rows'
positions, DeepStack adds sliced alike) and fills a `core.KVCache` with the K/V each layer
really saw; `decode` steps continue greedily on that cache through `decoding.decode_loop` (one
text row per step, positions continuing after the prompt's largest position, as HF's M-RoPE
decode does). With K = num_layers nothing is dropped and the result is the unmodified model.

FLOPs (2 per multiply-add, full attention rectangle, as `vskip_compile.flops`): layers before K
run S rows, layers from K on run S' = S - V + keep rows for both the attention (queries and
keys) and the FFN. FastV's ranking reuses layer K-1's own attention probabilities (that layer
runs with eager attention to expose them): no extra FLOPs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .archs import Adapter, PrefillInputs, adapter_for
from .core import (CoreError, KVCache, additive_mask, attention_windows, causal_mask, refuse_recurrent, rope_axes,
                   rope_position_ids, rotary_layer_types)
from .decoding import decode_loop
from .flops import S, V, TextDims, _tidy, attn_flops, ffn_flops
from .outside import embedding_multiplier, final_norm, rotary_layers, scale_embeddings


# -- the two token-dropping baselines ------------------------------------------------------------
@dataclass(frozen=True)
class TokenDrop:
    """Drop visual tokens from decoder layer `layer` (K) on; keep the top `keep_ratio` of them
    by layer K-1 attention (FastV) or none (VTW, keep_ratio 0)."""

    layer: int
    keep_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.layer < 0:
            raise ValueError(f"drop layer must be >= 0, got {self.layer}")
        if not 0.0 <= self.keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in [0, 1], got {self.keep_ratio}")
        if self.keep_ratio > 0 and self.layer < 1:
            raise ValueError("FastV ranks tokens with layer K-1's attention: it needs layer >= 1")

    @property
    def kind(self) -> str:
        return "fastv" if self.keep_ratio > 0 else "vtw"

    def keep(self, num_visual: int) -> int:
        """Visual tokens kept from layer K on, for an image of num_visual tokens."""
        return int(round(self.keep_ratio * num_visual))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "layer": self.layer, "keep_ratio": self.keep_ratio}


# -- FLOPs -----------------------------------------------------------------------------------------
def drop_flops(dims: TextDims, layer: int, rows_after: Any, S: Any = S) -> Any:
    """Prefill FLOPs when layers < `layer` run S rows and the others run `rows_after` rows."""
    total = 0
    for i in range(dims.layers):
        rows = S if i < layer else rows_after
        total += attn_flops(dims, rows, rows) + ffn_flops(dims, rows, i)
    return _tidy(total)


def vtw_flops(dims: TextDims, layer: int, S: Any = S, V: Any = V) -> Any:
    """VTW: every visual row leaves at layer K."""
    return drop_flops(dims, layer, S - V, S)


def fastv_flops(dims: TextDims, layer: int, keep: Any, S: Any = S, V: Any = V) -> Any:
    """FastV: `keep` visual rows stay from layer K on (ranking is free, see module doc)."""
    return drop_flops(dims, layer, S - V + keep, S)


def token_drop_flops(dims: TextDims, drop: TokenDrop | None, S_value: int, V_value: int) -> int:
    """Numeric prefill FLOPs of a drop spec (None: the full model) at one layout."""
    if drop is None:
        return int(drop_flops(dims, dims.layers, S_value, S_value))
    return int(fastv_flops(dims, drop.layer, drop.keep(V_value), S_value, V_value))


def vtw_for_budget(dims: TextDims, budget: float, S_value: int, V_value: int) -> TokenDrop:
    """The latest drop layer K whose FLOPs cut at (S, V) is at least `budget`."""
    full = token_drop_flops(dims, None, S_value, V_value)
    for layer in range(dims.layers, -1, -1):
        drop = TokenDrop(layer)
        if 1 - token_drop_flops(dims, drop, S_value, V_value) / full >= budget:
            return drop
    raise ValueError(f"VTW cannot cut {budget:.0%} of prefill FLOPs at S={S_value}, V={V_value}")


def fastv_for_budget(dims: TextDims, budget: float, S_value: int, V_value: int, layer: int = 2) -> TokenDrop:
    """FastV at drop layer `layer` (lowered when needed) keeping the most visual tokens whose
    FLOPs cut at (S, V) is at least `budget`."""
    full = token_drop_flops(dims, None, S_value, V_value)
    for k in range(min(layer, dims.layers), 0, -1):
        for keep in range(V_value, 0, -1):
            drop = TokenDrop(k, keep / V_value)
            if drop.keep(V_value) == keep and 1 - token_drop_flops(dims, drop, S_value, V_value) / full >= budget:
                return drop
    raise ValueError(f"FastV cannot cut {budget:.0%} of prefill FLOPs at S={S_value}, V={V_value} keeping a token")


# -- running it ------------------------------------------------------------------------------------
def run_layer(layer: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor | None, position_embeddings,
              cache: KVCache) -> torch.Tensor:
    """One HF decoder layer, eager, with an explicit mask and the K/V stand-in."""
    return layer(x, attention_mask=mask, position_embeddings=position_embeddings, position_ids=None, cache=cache,
                 use_cache=True)


@contextlib.contextmanager
def _eager_attention(attn: torch.nn.Module):
    """Run HF attention with its eager kernel inside the block (it returns the probabilities)."""
    config = attn.config
    before = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = before


def rank_visual(layer: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor, position_embeddings, cache: KVCache,
                spans, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer output, FastV scores [B, V]): runs `layer` with eager attention (it returns the
    probabilities) and scores each visual key by the attention query row last[b] pays it,
    mean over heads. mask: boolean [.., rows, keys]; spans: the visual key columns."""
    probs: list[torch.Tensor] = []
    hook = layer.self_attn.register_forward_hook(lambda m, a, out: probs.append(out[1]))
    try:
        with _eager_attention(layer.self_attn):
            x = run_layer(layer, x, additive_mask(mask, x.dtype), position_embeddings, cache)
    finally:
        hook.remove()
    row = probs[0][torch.arange(x.shape[0]), :, last, :].mean(dim=1)  # [B, keys]
    vis_idx = torch.tensor([r for a, b in spans for r in range(a, b)], device=x.device)
    return x, row[:, vis_idx]  # [B, V]


def _gather_rows(x: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    """x with the rows idx [B, S'] kept along `dim` (the sequence dim; batch is the dim before)."""
    shape = [1] * x.ndim
    shape[dim - 1], shape[dim] = idx.shape
    index = idx.view(shape).expand(*x.shape[:dim], idx.shape[1], *x.shape[dim + 1 :])
    return torch.gather(x, dim, index)


def kept_rows(layout_spans, seq_len: int, scores: torch.Tensor | None, keep: int, batch: int, device) -> torch.Tensor:
    """Rows [B, S'] (ascending) that stay: every non-visual row and the `keep` best visual rows."""
    visual = torch.zeros(seq_len, dtype=torch.bool, device=device)
    for a, b in layout_spans:
        visual[a:b] = True
    text_idx = torch.nonzero(~visual).flatten()  # [T]
    vis_idx = torch.nonzero(visual).flatten()  # [V]
    rows = text_idx.expand(batch, -1)
    if keep:
        top = scores.topk(keep, dim=-1).indices  # [B, keep] into the visual rows
        rows = torch.cat([rows, vis_idx[top]], dim=1)
    return rows.sort(dim=1).values  # [B, S']


def drop_rows(lm: torch.nn.Module, rows: torch.Tensor, x: torch.Tensor, pos: torch.Tensor, deepstack):
    """(x, positions, DeepStack adds, rotary embeddings) of the sequence cut to `rows` [B, S']."""
    x = _gather_rows(x, rows, 1)  # [B, S', D]
    pos = _gather_rows(pos, rows, pos.ndim - 1)  # [3, B, S'] or [B, S']
    deepstack = [_gather_rows(d, rows, 1) for d in deepstack]
    return x, pos, deepstack, lm.rotary_emb(x, pos)


def next_positions(pos: torch.Tensor) -> torch.Tensor:
    """[B]: the position after the prompt's largest one (rotary ids [3, B, S] or [B, S])."""
    return (pos.amax(dim=(0, 2)) if pos.ndim == 3 else pos.amax(dim=1)) + 1


def check_plain_layers(language_model: torch.nn.Module, what: str) -> None:
    """Refuse (CoreError) a text model whose layers the eager token-dropping code would run
    wrong: it builds one causal mask and one rotary embedding for every layer, so sliding
    windows, per-layer-type rotary embeddings, NoPE layers and recurrent (linear-attention)
    layers are named, never ignored."""
    name = type(language_model).__name__
    refuse_recurrent(language_model, what)
    if any(w is not None for w in attention_windows(language_model)):
        raise CoreError(f"{what} runs full causal attention only; {name} has sliding-window layers")
    if rotary_layer_types(language_model) is not None or not all(rotary_layers(language_model)):
        raise CoreError(f"{what} gives every layer one rotary embedding; {name}'s layers differ (per layer type, "
                        "or layers without one)")


def prefill(
    model, p: PrefillInputs, drop: TokenDrop | None, cache: KVCache, adapter: Adapter | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(last-row logits [B, vocab], next position [B]) of a prefill with `drop`; fills `cache`.

    Needs a batch without padding whose rows share one visual layout."""
    adapter = adapter or adapter_for(model)
    lm = adapter.language_model(model)
    p.require_causal("the token-dropping prefill")
    check_plain_layers(lm, "the token-dropping prefill")
    if p.attention_mask is not None and not bool(p.attention_mask.all()):
        raise ValueError("token-dropping prefill takes batches without padding (group by prompt length)")
    spans = p.layout.row_spans
    x = scale_embeddings(p.inputs_embeds, embedding_multiplier(lm))  # [B, S, D], as the text model does first
    batch, seq_len, _ = x.shape
    pos = rope_position_ids(p.position_ids, rope_axes(lm))  # [3, B, S] or [B, S]
    next_pos = next_positions(pos)  # [B]
    deepstack = list(p.deepstack or ())
    position_embeddings = lm.rotary_emb(x, pos)
    scores = None
    for i, layer in enumerate(lm.layers):
        if drop is not None and i == drop.layer:
            rows = kept_rows(spans, seq_len, scores, drop.keep(p.layout.num_visual), batch, x.device)  # [B, S']
            x, pos, deepstack, position_embeddings = drop_rows(lm, rows, x, pos, deepstack)
            seq_len = rows.shape[1]
        mask = causal_mask(seq_len, x.device)
        if drop is not None and drop.keep_ratio > 0 and i == drop.layer - 1:
            last = torch.full((batch,), seq_len - 1, device=x.device)  # the last prompt row ranks
            x, scores = rank_visual(layer, x, mask, position_embeddings, cache, spans, last)  # scores [B, V]
        else:
            x = run_layer(layer, x, mask, position_embeddings, cache)
        if i < len(deepstack):
            x = x + deepstack[i]  # [B, S, D], zero outside the visual rows
    h = final_norm(lm)(x[:, -1:, :])  # [B, 1, D]
    return adapter.lm_head(model)(h)[:, -1, :], next_pos


def decode(model, cache: KVCache, token: torch.Tensor, position: torch.Tensor, adapter: Adapter | None = None,
           valid: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """Logits [B, vocab] of one decode step at `position` [B]: the unmodified model on `cache`
    (grows it). valid: per layer, the cache slots [B, T] a row attends to (grown by this step's
    slot here); None: every slot."""
    adapter = adapter or adapter_for(model)
    lm = adapter.language_model(model)
    x = scale_embeddings(model.get_input_embeddings()(token[:, None]), embedding_multiplier(lm))  # [B, 1, D]
    position_embeddings = lm.rotary_emb(x, adapter.text_position_ids(model, position[:, None]))
    for i, layer in enumerate(lm.layers):
        mask = None
        if valid is not None:
            valid[i] = torch.cat([valid[i], torch.ones_like(valid[i][:, :1])], dim=1)  # [B, T + 1]
            mask = valid[i][:, None, None, :]  # [B, 1, 1, T + 1]
        x = run_layer(layer, x, mask, position_embeddings, cache)
    return adapter.lm_head(model)(final_norm(lm)(x))[:, -1, :]


def decode_steps(model, cache: KVCache, position: torch.Tensor, adapter: Adapter,
                 valid: dict[int, torch.Tensor] | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """step(tokens [B]) -> logits [B, vocab] for decoding.decode_loop: `decode` from `position`
    [B] on, one position further each call."""
    at = [position]

    def step(token: torch.Tensor) -> torch.Tensor:
        logits = decode(model, cache, token, at[0], adapter, valid)
        at[0] = at[0] + 1
        return logits

    return step


def eos_ids(eos_token_id: int | None, device) -> torch.Tensor | None:
    """The eos id as decoding.decode_loop takes it."""
    return None if eos_token_id is None else torch.tensor([eos_token_id], device=device)


@torch.no_grad()
def generate(
    model, p: PrefillInputs, drop: TokenDrop | None, max_new_tokens: int, eos_token_id: int | None = None,
    adapter: Adapter | None = None,
) -> torch.Tensor:
    """Greedy new tokens [B, n] (n <= max_new_tokens; stops once every row has emitted eos)."""
    adapter = adapter or adapter_for(model)
    cache = KVCache()
    logits, position = prefill(model, p, drop, cache, adapter)
    step = decode_steps(model, cache, position, adapter)
    return torch.stack(decode_loop(logits, step, max_new_tokens, eos_ids(eos_token_id, logits.device)), dim=1)
