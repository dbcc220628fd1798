"""Hybrid decoders: Qwen3.5's gated-delta-net linear-attention layers next to full attention.

A linear-attention layer's token mixer reads every row, in order, into a conv state and a
recurrent state: its attention is never skipped (refused by name, at the plan and in the
passes), its FFN may be (row-wise: frozen rows keep h1). The core keeps HF's left-padded
layout for such a model (padding zeroed by the 2D mask, as HF does) and carries each linear
layer's final (conv, recurrent) state from the prefill into the decode step.

Tiny random qwen3_5 (build_family, fp32, SDPA). Tolerance: logits within 1e-5 and states
within 1e-5 (test_polymorphic's bound: gathered GEMMs reorder K-sums, differences seen are
~1e-7 on logits of magnitude <= 1); every plan here moves the logits by more than 1e-3;
greedy tokens identical.
"""

from __future__ import annotations

import pytest
import torch

import vskip_compile
from vskip_compile import SkipPlan, baselines, check, reference
from vskip_compile.archs import adapter_for
from vskip_compile.archs.probe import probe_inputs
from vskip_compile.archs.shrink import build_family
from vskip_compile.core import KVCache, RecurrentLayerError, recurrent_layers
from vskip_compile.flops import DimsError, TextDims
from vskip_compile.passes import PassContext, SkipPassError, run_passes
from vskip_compile.plan import PlanError

ATOL = 1e-5
NEW_TOKENS = 4


@pytest.fixture(scope="module")
def qwen35():
    model = build_family("qwen3_5")
    model.generation_config.eos_token_id = None  # exactly NEW_TOKENS tokens on every side
    inputs, info = probe_inputs(model)
    assert info["pixels"]  # the image goes through the vision tower
    return model, inputs


def _kinds(model) -> tuple[bool, ...]:
    return recurrent_layers(adapter_for(model).language_model(model))


def _plan(model, linear: str, full: str) -> SkipPlan:
    return SkipPlan.from_ops([linear if r else full for r in _kinds(model)])


PLANS = [("skip_ffn", "skip_both"), ("skip_ffn", "skip_attn"), ("full", "skip_ffn")]


def _reference(model, plan, inputs):
    with torch.no_grad(), reference.applied(model, plan):
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return logits, tokens[:, inputs["input_ids"].shape[1]:]


def test_the_tiny_model_mixes_linear_and_full_attention(qwen35):
    model, _ = qwen35
    kinds = _kinds(model)
    assert any(kinds) and not all(kinds), kinds
    lm = adapter_for(model).language_model(model)
    assert all(hasattr(layer, "linear_attn") and not hasattr(layer, "self_attn") for layer, r in zip(lm.layers, kinds) if r)


@pytest.mark.parametrize("ops", PLANS, ids=["+".join(o) for o in PLANS])
def test_prefill_and_generate_equal_the_reference(qwen35, ops):
    model, inputs = qwen35
    plan = _plan(model, *ops)
    want_logits, want_tokens = _reference(model, plan, inputs)
    with torch.no_grad():
        full = model(**inputs).logits
    assert float((want_logits - full).abs().max()) > 1e-3  # the plan changes the model
    cm = vskip_compile.compile(model, plan, backend="eager")
    torch.testing.assert_close(cm(**inputs).logits, want_logits, rtol=0, atol=ATOL)
    got = cm.generate(**inputs, max_new_tokens=NEW_TOKENS)[:, inputs["input_ids"].shape[1]:]
    assert torch.equal(got, want_tokens), (got.tolist(), want_tokens.tolist())


def test_inductor_prefill_and_generate_equal_the_reference(qwen35):
    model, inputs = qwen35
    plan = _plan(model, "skip_ffn", "skip_both")
    want_logits, want_tokens = _reference(model, plan, inputs)
    cm = vskip_compile.compile(model, plan, backend="inductor")
    torch.testing.assert_close(cm(**inputs).logits, want_logits, rtol=0, atol=ATOL)
    got = cm.generate(**inputs, max_new_tokens=NEW_TOKENS)[:, inputs["input_ids"].shape[1]:]
    assert torch.equal(got, want_tokens), (got.tolist(), want_tokens.tolist())


def test_prefill_cache_holds_hf_states(qwen35):
    """The compiled prefill's cache: each linear layer's conv and recurrent state as HF's
    cache holds them after the unmodified model's prefill (all-full plan), K/V elsewhere."""
    model, inputs = qwen35
    kinds = _kinds(model)
    cm = vskip_compile.compile(model, SkipPlan.from_ops(["full"] * len(kinds)), backend="eager")
    got = cm(**inputs).cache
    with torch.no_grad():
        want = model(**inputs, use_cache=True).cache
    for i, r in enumerate(kinds):
        g, w = got.layers[i], want.layers[i]
        if r:
            torch.testing.assert_close(g.conv_states[0], w.conv_states[0], rtol=0, atol=ATOL)
            torch.testing.assert_close(g.recurrent_states[0], w.recurrent_states[0], rtol=0, atol=ATOL)
        else:
            torch.testing.assert_close(g.keys, w.keys, rtol=0, atol=ATOL)


def _rows(model, inputs) -> list[dict]:
    """Three prompts of different lengths: the probe's (one image), the same with 5 more text
    tokens in front, and a text-only one."""
    ids = inputs["input_ids"]
    extra = torch.tensor([[11, 12, 13, 14, 15]])
    longer = {**inputs, "input_ids": torch.cat([extra, ids], dim=1)}
    for key in ("attention_mask", "mm_token_type_ids"):
        if key in inputs:
            longer[key] = torch.cat([inputs[key].new_ones(1, 5) * (key == "attention_mask"), inputs[key]], dim=1)
    text = {"input_ids": torch.tensor([[21, 22, 23, 24, 25, 26, 27]]), "attention_mask": torch.ones(1, 7, dtype=torch.long)}
    if "mm_token_type_ids" in inputs:
        text["mm_token_type_ids"] = torch.zeros(1, 7, dtype=inputs["mm_token_type_ids"].dtype)
    return [inputs, longer, text]


def _left_pad(rows: list[dict]) -> dict:
    width = max(r["input_ids"].shape[1] for r in rows)
    out = {}
    for k in dict.fromkeys(k for r in rows for k in r):
        parts = [r[k] for r in rows if k in r]
        if k in ("input_ids", "attention_mask", "mm_token_type_ids"):
            parts = [torch.cat([t.new_zeros(1, width - t.shape[1]), t], dim=1) for t in parts]  # [1, width]
        out[k] = torch.cat(parts)
    return out


def test_left_padded_batch_equals_each_row_alone(qwen35):
    """One left-padded prefill and batched decode of rows of different lengths: each row's last
    logits, linear-layer states and greedy tokens equal the reference on that row alone (a
    recurrence over padding would move the states: HF zeroes padding rows in front)."""
    model, inputs = qwen35
    kinds = _kinds(model)
    plan = _plan(model, "skip_ffn", "skip_both")
    rows = _rows(model, inputs)
    batch = _left_pad(rows)
    width = batch["input_ids"].shape[1]
    cm = vskip_compile.compile(model, plan, backend="eager")
    with torch.no_grad():
        p = cm._prefill_inputs(batch, left_padded=True)
        logits, pairs = cm._prefill(p, logits_to_keep=1)
    got_tokens = cm.generate(**batch, max_new_tokens=NEW_TOKENS)[:, width:]
    for i, row in enumerate(rows):
        want_logits, want_tokens = _reference(model, plan, row)
        torch.testing.assert_close(logits[i, -1], want_logits[0, -1], rtol=0, atol=ATOL)
        assert torch.equal(got_tokens[i], want_tokens[0]), (i, got_tokens[i].tolist(), want_tokens[0].tolist())
        with torch.no_grad(), reference.applied(model, plan):
            cache = model(**row, use_cache=True).cache
        for j, r in enumerate(kinds):
            if r:
                torch.testing.assert_close(pairs[j][0][i], cache.layers[j].conv_states[0][0], rtol=0, atol=ATOL)
                torch.testing.assert_close(pairs[j][1][i], cache.layers[j].recurrent_states[0][0], rtol=0, atol=ATOL)


def test_left_padded_batch_equals_hf_on_the_batch(qwen35):
    """All-full plan: the compiled prefill of a left-padded batch equals HF's forward of that
    batch (its padding mask, its zeroed padding rows), logits and states."""
    model, inputs = qwen35
    kinds = _kinds(model)
    batch = _left_pad(_rows(model, inputs))
    cm = vskip_compile.compile(model, SkipPlan.from_ops(["full"] * len(kinds)), backend="eager")
    with torch.no_grad():
        p = cm._prefill_inputs(batch, left_padded=True)
        logits, pairs = cm._prefill(p, logits_to_keep=1)
        out = model(**batch, use_cache=True)
    torch.testing.assert_close(logits[:, -1], out.logits[:, -1], rtol=0, atol=ATOL)
    for j, r in enumerate(kinds):
        if r:
            torch.testing.assert_close(pairs[j][0], out.cache.layers[j].conv_states[0], rtol=0, atol=ATOL)
            torch.testing.assert_close(pairs[j][1], out.cache.layers[j].recurrent_states[0], rtol=0, atol=ATOL)


def test_skipping_attention_of_a_linear_layer_is_refused_by_name(qwen35):
    model, inputs = qwen35
    kinds = _kinds(model)
    layer = kinds.index(True)
    gm = check.traced_prefill(model, adapter_for(model), inputs)
    for op in ("skip_attn", "skip_both"):
        plan = SkipPlan.from_ops([op if i == layer else "full" for i in range(len(kinds))])
        with pytest.raises(PlanError, match=rf"layer {layer}, a linear-attention layer"):
            vskip_compile.compile(model, plan, backend="eager")
        with pytest.raises(PlanError, match="linear-attention"):
            with reference.applied(model, plan):
                pass
        with pytest.raises(SkipPassError, match=rf"attn of layer {layer} .*linear_attn"):
            run_passes(gm, PassContext(plan))


def test_layer_support_never_offers_a_linear_layers_attention(qwen35):
    model, inputs = qwen35
    kinds = _kinds(model)
    gm = check.traced_prefill(model, adapter_for(model), inputs)
    support = check.layer_support(gm, len(kinds), kinds)
    for s, r in zip(support, kinds):
        assert (s.attn, s.ffn, s.recurrent) == (not r, True, r), s
    for seed in range(8):
        plan = check.random_plan(support, seed)
        assert not any(plan.skips_attn(i) for i, r in enumerate(kinds) if r), plan


def test_paths_that_carry_kv_only_refuse_by_name(qwen35):
    model, inputs = qwen35
    lm = adapter_for(model).language_model(model)
    with pytest.raises(RecurrentLayerError, match="token-dropping prefill .* 'linear_attention'"):
        baselines.check_plain_layers(lm, "the token-dropping prefill")
    with pytest.raises(DimsError, match="linear_attention"):
        TextDims.from_hf_config(model.config)
    layer = _kinds(model).index(True)
    x = torch.zeros(1, 4, model.config.get_text_config().hidden_size)
    with pytest.raises(RecurrentLayerError, match=f"decoder layer {layer} is a recurrent"):
        lm.layers[layer](x, position_embeddings=None, attention_mask=None, cache=KVCache(), use_cache=True)


def test_a_prompt_over_one_chunk_gets_its_own_graph(qwen35):
    """The chunked gated-delta rule loops over 64-row chunks (unrolled when traced): a prompt of
    more chunks compiles its own graph (a cache entry per chunk count, never a recompile) and
    equals the reference."""
    import warnings

    from vskip_compile.graph_cache import RecompileWarning

    model, inputs = qwen35
    plan = _plan(model, "skip_ffn", "skip_both")
    extra = torch.arange(30, 110)[None]  # [1, 80] text tokens in front
    long = {**inputs, "input_ids": torch.cat([extra, inputs["input_ids"]], dim=1)}
    long["attention_mask"] = torch.ones_like(long["input_ids"])
    if "mm_token_type_ids" in inputs:
        long["mm_token_type_ids"] = torch.cat([torch.zeros_like(extra), inputs["mm_token_type_ids"]], dim=1).to(
            inputs["mm_token_type_ids"].dtype)
    assert inputs["input_ids"].shape[1] <= 64 < long["input_ids"].shape[1]
    cm = vskip_compile.compile(model, plan, backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecompileWarning)
        cm(**inputs)
        got = cm(**long).logits
    assert cm.cache_info().currsize == 2
    want, _ = _reference(model, plan, long)
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
