"""Token-dropping baselines: FLOPs formulas vs a direct count, K = L is the full model, budgets."""

from __future__ import annotations

import pytest
import torch

from vskip_compile import baselines as bl
from vskip_compile.archs import adapter_for
from vskip_compile.testing.tiny import build_tiny, tiny_inputs
from vskip_compile.core import KVCache
from vskip_compile.flop_count import count_flops
from vskip_compile.flops import S, V, TextDims, model_flops


@pytest.fixture(scope="module", params=["qwen3_vl", "llava"])
def tiny(request):
    arch = request.param
    model = build_tiny(arch)
    inputs = tiny_inputs(model, arch, batch=2, text_before=3, text_after=5)
    with torch.no_grad():
        p = adapter_for(model).prefill_inputs(model, **inputs)
    return model, inputs, p


def test_full_loop_and_drop_at_num_layers_equal_the_model(tiny):
    model, inputs, p = tiny
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=3, do_sample=False)[:, inputs["input_ids"].shape[1]:]
        logits = model(**inputs).logits[:, -1]
        mine, _ = bl.prefill(model, p, bl.TokenDrop(4), KVCache())
    assert torch.equal(bl.generate(model, p, None, 3), ref)
    assert torch.equal(bl.generate(model, p, bl.TokenDrop(4), 3), ref)
    assert torch.equal(bl.generate(model, p, bl.TokenDrop(4, 0.5), 3), ref)
    torch.testing.assert_close(mine, logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("drop", [bl.TokenDrop(0), bl.TokenDrop(2), bl.TokenDrop(1, 0.25), bl.TokenDrop(2, 0.5)])
def test_flops_formulas_equal_a_direct_count(tiny, drop):
    model, _, p = tiny
    adapter = adapter_for(model)
    dims = TextDims.from_hf_config(model.config)
    batch, seq_len = p.inputs_embeds.shape[:2]
    nv = p.layout.num_visual
    counted = count_flops(bl.prefill, model, p, drop, KVCache(), adapter)
    head = adapter.lm_head(model).weight  # [vocab, D], run on the last row only
    lm_head = 2 * batch * head.shape[0] * head.shape[1]
    assert counted - lm_head == batch * bl.token_drop_flops(dims, drop, seq_len, nv)


def test_symbolic_formulas():
    dims = TextDims(64, 4, 2, 16, 128, 4)
    full = model_flops(dims)
    assert bl.vtw_flops(dims, 4) == full
    assert bl.fastv_flops(dims, 1, V) == full
    assert bl.fastv_flops(dims, 2, 0) == bl.vtw_flops(dims, 2)
    assert bl.vtw_flops(dims, 0) == model_flops(dims, None, S - V, 0)


def test_decode_on_the_dropped_cache_equals_rerunning_the_pruned_prompt(tiny):
    """VTW: the second token from the cache equals a fresh pruned prefill of prompt + first token."""
    model, inputs, p = tiny
    adapter = adapter_for(model)
    drop = bl.TokenDrop(2)
    tokens = bl.generate(model, p, drop, 2)
    longer = dict(inputs)
    longer["input_ids"] = torch.cat([inputs["input_ids"], tokens[:, :1]], 1)
    longer["attention_mask"] = torch.ones_like(longer["input_ids"])
    if "mm_token_type_ids" in inputs:
        longer["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(tokens[:, :1]).int()], 1)
    if bool(torch.isin(tokens[:, 0], torch.tensor(adapter.visual_token_ids(model))).any()):
        pytest.skip("the random model answered with an image placeholder id")
    with torch.no_grad():
        p2 = adapter.prefill_inputs(model, **longer)
        logits, _ = bl.prefill(model, p2, drop, KVCache())
    assert torch.equal(logits.argmax(-1), tokens[:, 1])


@pytest.mark.parametrize("budget", [0.2, 0.3, 0.4, 0.5, 0.6])
def test_budget_pickers_take_the_least_aggressive_setting(budget):
    dims = TextDims(128, 4, 2, 32, 384, 8)
    Sv, Vv = 78, 64
    full = bl.token_drop_flops(dims, None, Sv, Vv)

    def cut(drop):
        return 1 - bl.token_drop_flops(dims, drop, Sv, Vv) / full

    vtw = bl.vtw_for_budget(dims, budget, Sv, Vv)
    assert cut(vtw) >= budget and (vtw.layer == 8 or cut(bl.TokenDrop(vtw.layer + 1)) < budget)
    fastv = bl.fastv_for_budget(dims, budget, Sv, Vv, layer=2)
    keep = fastv.keep(Vv)
    assert cut(fastv) >= budget and 1 <= keep
    if keep < Vv:
        assert cut(bl.TokenDrop(fastv.layer, (keep + 1) / Vv)) < budget


def test_budget_out_of_reach_is_refused():
    dims = TextDims(128, 4, 2, 32, 384, 8)
    with pytest.raises(ValueError, match="cannot cut"):
        bl.vtw_for_budget(dims, 0.95, 78, 64)
