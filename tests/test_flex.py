"""FlexAttention prefill (vskip_compile.flex): the mask as a score_mod over per-row vectors.

Against the eager reference, compiled with the eager backend (CI; inductor's CPU flex template
is exercised by benchmarks/long_context_memory.py, static shapes). Tolerance, fp32: last-row
logits within 1e-5, as in test_polymorphic (flex attention sums the same masked softmax in
another order: differences seen <= 3e-7; any plan moves logits by >= 3e-2). Greedy tokens equal.
"""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.nn.attention.flex_attention import flex_attention

import vskip_compile
from vskip_compile import SkipPlan, reference
from vskip_compile.testing.tiny import build_tiny, left_padded_batch, tiny_inputs
from vskip_compile.attention_ops import FLEX_ATTENTION
from vskip_compile.passes.rules import NotRowwise, _flex_query_buffers
from vskip_compile.runtime import CompileError

FP32_ATOL = 1e-5
NEW_TOKENS = 3


@pytest.mark.parametrize("arch", ["llava", "qwen3_vl"])
def test_flex_mixed_batch_equals_reference(arch):
    model = build_tiny(arch)
    plan = SkipPlan.from_ops(["skip_attn", "skip_both", "full", "skip_ffn"])
    rows = [tiny_inputs(model, arch, text_before=b, text_after=a, n_images=1, seed=i)
            for i, (b, a) in enumerate([(0, 3), (5, 1), (2, 6)])]
    batch = left_padded_batch(rows)
    cm = vskip_compile.compile(model, plan, backend="eager", attention="flex")
    tokens = cm.generate(**batch, max_new_tokens=NEW_TOKENS)[:, -NEW_TOKENS:]  # one mixed-layout prefill
    for i, row in enumerate(rows):
        with torch.no_grad():
            logits = cm(**row).logits[0, -1]  # [V], the same single-row graph for every layout
        with torch.no_grad(), reference.applied(model, plan):
            ref = model(**row).logits[0, -1]
            ref_tokens = model.generate(**row, max_new_tokens=NEW_TOKENS, do_sample=False)[0, -NEW_TOKENS:]
        assert (logits - ref).abs().max().item() <= FP32_ATOL
        assert torch.equal(tokens[i], ref_tokens)
    assert cm.cache_info().compiles == 2  # batch buckets: one row, several rows


def _flex_node(score_mod, *buffers):
    q = k = v = torch.randn(1, 2, 8, 4)
    gm = make_fx(lambda q, k, v, *bufs: flex_attention(q, k, v, score_mod=score_mod(*bufs)))(q, k, v, *buffers)
    return next(n for n in gm.graph.nodes if n.target is FLEX_ATTENTION)


def test_rule_reads_query_rows_through_a_buffer():
    def score_mod(rows):
        return lambda s, b, h, q, kv: torch.where(kv <= rows[b, q], s, -float("inf"))

    assert _flex_query_buffers(_flex_node(score_mod, torch.arange(8)[None])) == {0: 1}


def test_rule_refuses_a_score_mod_reading_q_idx():
    """HF's causal mask_mod style (kv <= q_idx): after a cut q_idx counts kept rows, so wrong."""
    def score_mod():
        return lambda s, b, h, q, kv: torch.where(kv <= q, s, -float("inf"))

    with pytest.raises(NotRowwise, match="q_idx directly"):
        _flex_query_buffers(_flex_node(score_mod))


def test_flex_inductor_cpu_dynamic_is_refused_by_name():
    model = build_tiny("llava")
    with pytest.raises(CompileError, match="specialize='layout'"):
        vskip_compile.compile(model, SkipPlan.from_ops(["full"] * 4), backend="inductor", attention="flex")
    with pytest.raises(CompileError, match="attention must be one of"):
        vskip_compile.compile(model, SkipPlan.from_ops(["full"] * 4), attention="math")
