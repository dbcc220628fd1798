"""CompiledVLM.generate's compiled decode step against HF's own decode and the eager reference.

The decode step (vskip_compile.core.DecodeStep) is compiled with the prefill's inner backend
("eager" runs AOT autograd's graph as is; inductor in one test: its compiles take tens of
seconds here) over preallocated K/V buffers rounded up to decode_bucket slots.

Tolerance, fp32 decode logits vs HF's decode step on a DynamicCache (same modules, same
weights, same ops): the compiled step attends over T + 1 slots, the unfilled ones masked by
a boolean mask (exactly zero weight after softmax), where HF attends over the n filled ones
with no mask; SDPA's kernels block the key axis by its length, so the softmax sums and the
weights·V sums are added in another order. AOT autograd's decompositions may also reorder
pointwise ops. That is float rounding: seen <= 1.2e-7 (1-2 fp32 ulps) on logits of magnitude
<= 0.6 over 11 steps on each tiny architecture, no step bit-exact; 1e-5 leaves an 80x margin
and is far below the gaps between top logits that would change a greedy token.
"""

from __future__ import annotations

import random

import pytest
import torch

import vskip_compile
from vskip_compile import OPS, SkipPlan, reference, runtime
from vskip_compile.testing.tiny import TINY_ARCHS, left_padded_batch, tiny_inputs

FP32_ATOL = 1e-5
NEW_TOKENS = 6


def _random_plan(seed: int) -> SkipPlan:
    rng = random.Random(seed)
    return SkipPlan.from_ops([rng.choice(OPS[1:])] + [rng.choice(OPS) for _ in range(3)])


def _reference_tokens(model, plan, inputs, **kw):
    with torch.no_grad(), reference.applied(model, plan):
        return model.generate(**inputs, do_sample=False, **kw)


def _hf_decode_logits(cm, p, kv, tokens):
    """HF's own decode (the model on a DynamicCache of the prefill's K/V), teacher-forced on
    tokens [B, n]: logits [B, V] of steps 1..n-1, as CompiledVLM decoded before this change."""
    cache = cm._cache([(k.clone(), v.clone()) for k, v in kv])
    last_position = p.position_ids[..., -1:]  # [B, 1] or [3, B, 1]
    out = []
    for t in range(1, tokens.shape[1]):
        step = cm.model(input_ids=tokens[:, t - 1 : t], cache=cache, position_ids=last_position + t, use_cache=True)
        out.append(step.logits[:, -1])  # [B, V]
    return out


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_generate_matches_reference_and_hf_decode(tiny_model, arch):
    model = tiny_model(arch)
    plan = _random_plan(TINY_ARCHS.index(arch))
    inputs = tiny_inputs(model, arch, text_before=2, text_after=3, seed=3)
    want = _reference_tokens(model, plan, inputs, max_new_tokens=NEW_TOKENS)
    cm = vskip_compile.compile(model, plan, backend="eager")
    got = cm.generate(**inputs, max_new_tokens=NEW_TOKENS)
    assert torch.equal(got, want)
    assert tuple(cm.decode_cache_info()) == (0, 1, 8, 1, 1)  # hits, misses, maxsize, currsize, compiles

    # Per step: the compiled decode step's logits vs HF's decode step, same tokens fed.
    seq_len = inputs["input_ids"].shape[1]
    tokens = got[:, seq_len:]  # [B, n]
    with torch.no_grad():
        p = cm._prefill_inputs(dict(inputs))
        _, kv = cm._prefill(p, logits_to_keep=1)
        want_steps = _hf_decode_logits(cm, p, kv, tokens)
        run = cm._decode_run(kv, p.position_ids, tokens.shape[1], pads=[0] * tokens.shape[0])
        embed = model.get_input_embeddings()
        got_steps = [run.step(embed(tokens[:, t - 1 : t]))[:, -1] for t in range(1, tokens.shape[1])]
    assert len(got_steps) == NEW_TOKENS - 1
    for t, (g, w) in enumerate(zip(got_steps, want_steps), start=1):
        torch.testing.assert_close(g, w, rtol=0, atol=FP32_ATOL, msg=lambda m: f"decode step {t}: {m}")
    assert cm.decode_cache_info().hits == 1  # the second run reused the graph


def test_decode_runs_one_compiled_graph(tiny_model, monkeypatch):
    """Every decode step goes through the one graph Dynamo captured (fullgraph), not the HF model."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(runtime, "_decode_backend", lambda inner: capture)
    model = tiny_model("qwen3_vl")
    plan = _random_plan(7)
    inputs = tiny_inputs(model, "qwen3_vl", text_before=1, text_after=2, seed=1)
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        cm = vskip_compile.compile(model, plan, backend="eager")
        got = cm.generate(**inputs, max_new_tokens=NEW_TOKENS)
    finally:
        handle.remove()
    assert torch.equal(got, _reference_tokens(model, plan, inputs, max_new_tokens=NEW_TOKENS))
    assert len(graphs) == 1
    assert len(calls) == 1  # the adapter's capture of the language-model inputs; no HF decode


def test_inductor_generate_matches_reference(tiny_model):
    arch = "qwen2_5_vl"  # M-RoPE: position ids [3, B, 1] in the decode graph
    model = tiny_model(arch)
    plan = SkipPlan.from_ops(["skip_both", "skip_attn", "full", "skip_ffn"])
    inputs = tiny_inputs(model, arch, text_before=2, text_after=3)
    want = _reference_tokens(model, plan, inputs, max_new_tokens=NEW_TOKENS)
    cm = vskip_compile.compile(model, plan, backend="inductor")
    assert torch.equal(cm.generate(**inputs, max_new_tokens=NEW_TOKENS), want)
    assert tuple(cm.decode_cache_info())[:2] == (0, 1)


def test_decode_graph_cache_buckets_and_bound(tiny_model):
    """Key (capacity, batch, dtype, device); capacity = prompt + new - 1 rounded up to the
    bucket, so prompts of similar length share a decode graph; the LRU keeps cache_size."""
    arch = "llava"  # 16 visual tokens per image
    model = tiny_model(arch)
    plan = SkipPlan.from_ops(["skip_ffn", "full", "skip_both", "full"])
    cm = vskip_compile.compile(model, plan, backend="eager", cache_size=1, decode_bucket=8)

    def run(text_after, new, seed=0):
        inputs = tiny_inputs(model, arch, text_before=1, text_after=text_after, seed=seed)
        out = cm.generate(**inputs, max_new_tokens=new)
        assert torch.equal(out, _reference_tokens(model, plan, inputs, max_new_tokens=new))
        return tuple(cm.decode_cache_info())

    assert run(2, 3) == (0, 1, 1, 1, 1)  # S = 19: 21 slots needed -> 24
    assert run(4, 3, seed=1) == (1, 1, 1, 1, 1)  # another prompt, S = 21: 23 -> 24, same graph
    assert run(2, 7) == (1, 2, 1, 1, 2)  # 25 -> 32: evicts the 24-slot graph (cache_size 1)
    assert run(2, 3) == (1, 3, 1, 1, 3)  # so the 24-slot graph is compiled again
    assert tuple(cm.cache_info()) == (3, 1, 1, 1, 1)  # prefill: one polymorphic graph for all four prompts
    cm.cache_clear()
    assert tuple(cm.decode_cache_info()) == (0, 0, 1, 0, 0)


@pytest.mark.parametrize("arch", ["qwen3_vl", "llava"])
def test_left_padded_rows_stopping_at_eos_equal_hf_padded_generate(tiny_model, arch):
    """Two padding groups, one stops at EOS early: the same tokens as HF generate on the
    left-padded batch under the plan (HF masks the padding; so do we, in one call)."""
    model = tiny_model(arch)
    plan = _random_plan(5)
    rows = [tiny_inputs(model, arch, text_before=1, text_after=3, seed=2),
            tiny_inputs(model, arch, text_before=4, text_after=3, seed=3)]
    batch = left_padded_batch(rows)
    seq_len = batch["input_ids"].shape[1]
    free = _reference_tokens(model, plan, batch, max_new_tokens=NEW_TOKENS, eos_token_id=[], pad_token_id=0)
    row0, row1 = free[0, seq_len:].tolist(), free[1, seq_len:].tolist()
    eos = next(tok for tok in row0[:3] if tok not in row1 and tok != 0)  # row 0 stops within 3 tokens
    kw = dict(max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=0)
    got = vskip_compile.compile(model, plan, backend="eager").generate(**batch, **kw)
    assert torch.equal(got, _reference_tokens(model, plan, batch, **kw))
    stop = row0.index(eos)
    assert got.shape[1] == seq_len + NEW_TOKENS and (got[0, seq_len + stop + 1 :] == 0).all()


def test_batch_of_two_row_reaching_eos_is_padded(tiny_model):
    """One layout, two rows; EOS is a token row 0 generates early and row 1 never does before
    the end: row 0 is padded with pad_token_id while row 1 decodes on, as HF generate does."""
    arch = "llava_next"
    model = tiny_model(arch)
    plan = _random_plan(11)
    inputs = tiny_inputs(model, arch, text_before=2, text_after=2, batch=2, seed=4)
    seq_len = inputs["input_ids"].shape[1]
    free = _reference_tokens(model, plan, inputs, max_new_tokens=NEW_TOKENS, eos_token_id=[], pad_token_id=0)
    row0, row1 = free[0, seq_len:].tolist(), free[1, seq_len:].tolist()
    eos = next(tok for tok in row0[:3] if tok not in row1 and tok != 0)  # row 0 stops within 3 tokens
    kw = dict(max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=0)
    want = _reference_tokens(model, plan, inputs, **kw)
    cm = vskip_compile.compile(model, plan, backend="eager")
    got = cm.generate(**inputs, **kw)
    assert torch.equal(got, want)
    stop = row0.index(eos)
    assert got.shape[1] == seq_len + NEW_TOKENS  # row 1 went on to the end
    assert (got[0, seq_len + stop + 1 :] == 0).all() and stop < NEW_TOKENS - 1  # row 0 padded
    assert torch.equal(got[1, seq_len:], free[1, seq_len:])


def test_three_rows_decode_in_a_batch_of_four_equal_each_alone(tiny_model):
    """A batch of 3 left-padded rows prefills its 3 rows and decodes in the 4-row decode graph
    (one empty row: no key but its own, logits dropped): each row's tokens are the ones it
    gets alone, and the decode cache holds one batch-4 graph. One architecture, the served
    one: the empty rows are the runtime's (architecture-free), and the left-padded decode of
    every tiny architecture is checked against HF's padded generate above."""
    arch = "qwen3_vl"
    model = tiny_model(arch)
    plan = _random_plan(7)
    rows = [tiny_inputs(model, arch, text_before=b, text_after=a, seed=s) for b, a, s in ((1, 3, 2), (4, 2, 3), (0, 5, 4))]
    cm = vskip_compile.compile(model, plan, backend="eager")
    got = cm.generate(**left_padded_batch(rows), max_new_tokens=NEW_TOKENS, pad_token_id=0)
    assert [k.batch for k in cm._decode_graphs.graphs] == [4]
    for i, row in enumerate(rows):
        want = _reference_tokens(model, plan, row, max_new_tokens=NEW_TOKENS)[0, row["input_ids"].shape[1]:]
        assert torch.equal(got[i, -NEW_TOKENS:], want), f"row {i}"
    assert runtime.decode_batch_bucket(3) == 4 and runtime.decode_batch_bucket(1) == 1 and runtime.decode_batch_bucket(8) == 8


def test_decode_buffers_take_each_tensors_own_width():
    """Latent attention (Kimi-K2.5, DeepSeek-V3 style) caches V narrower than K: each buffer is
    shaped by its own tensor, filled with the prefill rows, the rest empty."""
    from vskip_compile.decode_state import DecodeRun

    k, v = torch.randn(1, 2, 5, 32), torch.randn(1, 2, 5, 8)  # [B, KV, S, E]
    run = DecodeRun(graph=None, kv=[(k, v)], last_position=torch.tensor([[4]]), capacity=8, pads=[0], batch_bucket=2)
    kb, vb = run.buffers
    assert kb.shape == (2, 2, 8, 32) and vb.shape == (2, 2, 8, 8)
    assert torch.equal(kb[:1, :, :5], k) and torch.equal(vb[:1, :, :5], v) and not vb[:, :, 5:].any()
