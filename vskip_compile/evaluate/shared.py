"""shared_generate: greedy answers of a batch whose questions share their image's prefix.

Every prompt is `prefix + suffix`; causal attention makes the prefix states independent of
the question, so the prefix runs once per image and its K/V serve that image's questions.
Accuracy: a SkipPlan (the full model, operator-level plans, ShortV-like layer freezes) runs
the reference semantics (skipped updates zeroed at the frozen rows, as `reference.applied`);
a TokenDrop (VTW, FastV) drops rows as `baselines.generate` does, with the baselines' own
layer, drop, ranking and decode functions.
"""

from __future__ import annotations

import contextlib
import time

import torch

from .. import baselines, reference
from ..archs import adapter_for
from ..baselines import TokenDrop
from ..core import KVCache, causal_mask, rope_axes, rope_position_ids
from ..decoding import decode_loop
from ..outside import embedding_multiplier, final_norm, scale_embeddings
from ..plan import SkipPlan
from .harness import Batch


@torch.no_grad()
def shared_generate(model, b: Batch, method: SkipPlan | TokenDrop, max_new_tokens: int, eos: int,
                    adapter=None) -> tuple[torch.Tensor, float]:
    """(greedy new tokens [Q, n], prefill seconds) for every question of a batch.

    Plans: the prefix runs with the skipped updates zeroed at the frozen rows (the reference
    semantics), suffixes and decoding run the unmodified layers. VTW: the prefix drops its
    visual rows at layer K. FastV: the ranking needs each question's last row, so the prefix
    is shared only up to layer K-1; from layer K each question runs its kept rows itself.
    The layers, the row drops, FastV's ranking and the decode steps are the baselines' own
    (`baselines.run_layer`, `drop_rows`, `rank_visual`, `decode_steps`, `decoding.decode_loop`)."""
    adapter = adapter or adapter_for(model)
    lm = adapter.language_model(model)
    layers = lm.layers
    L = len(layers)
    plan = method if isinstance(method, SkipPlan) else None
    drop = method if isinstance(method, TokenDrop) and method.layer < L else None
    fastv = drop is not None and drop.keep_ratio > 0
    J = drop.layer if fastv else L  # layers whose prefix is shared
    p = b.prefix
    p.require_causal("the shared-prefix runner")
    baselines.check_plain_layers(lm, "the shared-prefix runner")
    spans = p.layout.row_spans
    Q, Ls = b.suffix.shape
    dev = p.inputs_embeds.device
    t0 = time.perf_counter()

    # prefix, once per image: layers < J
    scale = embedding_multiplier(lm)  # Granite: the text model scales its input embeddings first
    x = scale_embeddings(p.inputs_embeds, scale)  # [I, P, D]
    pos = rope_position_ids(p.position_ids, rope_axes(lm))  # [3, I, P] or [I, P]
    next_pos = baselines.next_positions(pos)  # [I]
    deepstack = list(p.deepstack or ())
    pe = lm.rotary_emb(x, pos)
    cache = KVCache()
    frozen = p.layout.frozen_spans(plan.scope, plan.rows) if plan is not None else ()

    def zero(module, args, output):  # the reference semantics: exact zeros at the frozen rows
        return reference._zero_rows(output, frozen)

    with reference.hooked(layers, plan, zero) if plan is not None else contextlib.nullcontext():
        for i in range(J):
            if drop is not None and not fastv and i == drop.layer:
                rows = baselines.kept_rows(spans, x.shape[1], None, 0, x.shape[0], dev)  # [I, P-V]
                x, pos, deepstack, pe = baselines.drop_rows(lm, rows, x, pos, deepstack)
            x = baselines.run_layer(layers[i], x, causal_mask(x.shape[1], dev), pe, cache)
            if i < len(deepstack):
                x = x + deepstack[i]
    for i in range(J):
        k, v = cache.kv[i]
        cache.kv[i] = (k[b.owner], v[b.owner])  # [Q, KV, P_i, E]

    # suffixes, per question: layers < J on the shared prefix K/V
    xs = scale_embeddings(model.get_input_embeddings()(b.suffix), scale)  # [Q, Ls, D]
    spos = next_pos[b.owner][:, None] + torch.arange(Ls, device=dev)  # [Q, Ls]
    spos_r = adapter.text_position_ids(model, spos)  # [3, Q, Ls] or [Q, Ls]
    pe_s = lm.rotary_emb(xs, spos_r)
    last = b.lengths - 1  # [Q] last real suffix row
    scores = None
    for i in range(J):
        mask = causal_mask(Ls, dev, past=cache.get_seq_length(i))  # [1, 1, Ls, kvp + Ls]
        if fastv and i == J - 1:
            xs, scores = baselines.rank_visual(layers[i], xs, mask, pe_s, cache, spans, last)  # scores [Q, V]
        else:
            xs = baselines.run_layer(layers[i], xs, mask, pe_s, cache)
    suffix_valid = torch.arange(Ls, device=dev)[None] < b.lengths[:, None]  # [Q, Ls]
    valid = {i: torch.cat([torch.ones(Q, cache.get_seq_length(i) - Ls, dtype=torch.bool, device=dev), suffix_valid], 1)
             for i in range(J)}

    if fastv:  # from layer K, each question runs its kept rows
        P = x.shape[1]
        xf = torch.cat([x[b.owner], xs], dim=1)  # [Q, P + Ls, D]
        pf = torch.cat([pos[..., b.owner, :], spos_r], dim=-1)
        ds = [torch.cat([d[b.owner], torch.zeros_like(xs)], dim=1) for d in deepstack]
        rows = baselines.kept_rows(spans, P + Ls, scores, drop.keep(p.layout.num_visual), Q, dev)  # [Q, S']
        xf, pf, ds, pe_f = baselines.drop_rows(lm, rows, xf, pf, ds)
        Sp = xf.shape[1]
        for i in range(J, L):
            xf = baselines.run_layer(layers[i], xf, causal_mask(Sp, dev), pe_f, cache)
            if i < len(ds):
                xf = xf + ds[i]
            valid[i] = torch.cat([torch.ones(Q, Sp - Ls, dtype=torch.bool, device=dev), suffix_valid], 1)
        xs = xf[:, Sp - Ls :]
    h = final_norm(lm)(xs[torch.arange(Q), last])  # [Q, D]
    logits = adapter.lm_head(model)(h)  # [Q, vocab]
    seconds = time.perf_counter() - t0

    position = spos[torch.arange(Q), last] + 1  # [Q]
    step = baselines.decode_steps(model, cache, position, adapter, valid)
    tokens = decode_loop(logits, step, max_new_tokens, baselines.eos_ids(eos, dev))
    return torch.stack(tokens, dim=1), seconds
