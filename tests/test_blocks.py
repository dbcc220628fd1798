"""Bidirectional attention blocks (Gemma 3: the rows of one image attend to each other both ways).

The oracle is the HF model itself: reference.applied runs Gemma 3's own forward, which builds
its mask mapping from token_type_ids (causal OR same image; AND the window on sliding layers).
The compiled paths rebuild that mask from one block id per row (vskip_compile.archs.blocks);
fp32 tiny models, so compiled and reference differ by reordered sums only (check.ATOL = 1e-4).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vskip_compile import SkipPlan, check, compile, reference
from vskip_compile.archs import AdapterError, adapter_for
from vskip_compile.archs.blocks import MaskError, attention_blocks
from vskip_compile.archs.shrink import build_family
from vskip_compile.core import block_mask, causal_mask, windowed
from vskip_compile.padding import left_pad_batch, pad_left

TEXT = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]


def _prompt(model, before: int, images: list[int], after: int) -> dict[str, torch.Tensor]:
    """input_ids with `before` text rows, then per image n image-token rows and 2 text rows,
    then `after` text rows; token_type_ids mark the image rows as Gemma 3's processor does
    (no pixels: the image rows keep their token embeddings, the mask is what is tested)."""
    token = model.config.image_token_id
    ids = TEXT[:before]
    for n in images:
        ids = ids + [token] * n + TEXT[:2]
    ids = torch.tensor([ids + TEXT[-after:] if after else ids])  # [1, S]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": (ids == token).long()}


@pytest.fixture(scope="module")
def gemma3():
    """Gemma 3, 2 layers (one sliding over 8 rows, one full), per-layer-type RoPE bases."""
    model = build_family("gemma3")
    text = model.config.text_config
    assert sorted(set(text.layer_types)) == ["full_attention", "sliding_attention"] and text.sliding_window == 8
    return model


def _reference_logits(model, plan, inputs):
    with torch.no_grad(), reference.applied(model, plan):
        return model(**inputs).logits


def test_blocks_are_read_off_the_models_mask(gemma3):
    inputs = _prompt(gemma3, 3, [5, 4], 2)  # rows 3-7 and 10-13 are images
    with torch.no_grad():
        p = adapter_for(gemma3).prefill_inputs(gemma3, **inputs)
    rows = list(range(inputs["input_ids"].shape[1]))
    want = [7 if 3 <= r <= 7 else 13 if 10 <= r <= 13 else r for r in rows]  # an image's rows: its last row
    assert p.blocks.tolist() == [want]
    without = {k: v for k, v in inputs.items() if k != "token_type_ids"}  # HF then masks causally
    with torch.no_grad():
        assert adapter_for(gemma3).prefill_inputs(gemma3, **without).blocks is None


def test_a_mask_of_another_form_is_refused_by_name():
    """A mask with one future text key allowed is no block structure: refused, naming the layer."""

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Identity(), torch.nn.Identity()])
            self.config = type("C", (), {"layer_types": ["sliding_attention", "full_attention"]})()

    S = 6
    blocks = torch.tensor([[0, 1, 3, 3, 4, 5]])  # rows 2-3 one block
    good = block_mask(blocks)
    mapping = {"full_attention": good, "sliding_attention": windowed(good, 4)}
    assert torch.equal(attention_blocks(LM(), mapping, None, 1, S, (4, None)), blocks)
    bad = good.clone()
    bad[0, 0, 0, 5] = True  # text row 0 sees row 5 on the full layer only: no blocks give both layers' masks
    with pytest.raises(MaskError, match=r"decoder layer 0 \(sliding_attention\).*query 0, key 5"):
        attention_blocks(LM(), {"full_attention": bad, "sliding_attention": windowed(good, 4)}, None, 1, S, (4, None))
    with pytest.raises(MaskError, match="no entry for layer type"):
        attention_blocks(LM(), {"full_attention": good}, None, 1, S, (4, None))
    assert attention_blocks(LM(), {"full_attention": causal_mask(S, "cpu"), "sliding_attention": None}, None, 1, S,
                            (4, None)) is None


def test_an_unrebuildable_mask_is_an_adapter_refusal(gemma3, monkeypatch):
    """Through the adapter, the refusal names the model and the mask."""
    import vskip_compile.archs.blocks as blocks

    def broken(*args, **kwargs):
        raise MaskError("decoder layer 0: made up")

    monkeypatch.setattr(blocks, "attention_blocks", broken)
    with pytest.raises(AdapterError, match="Gemma3ForConditionalGeneration passes its language model a precomputed "
                                           "attention mask that the vskip core does not rebuild: decoder layer 0"):
        adapter_for(gemma3).prefill_inputs(gemma3, **_prompt(gemma3, 3, [5], 2))


@settings(max_examples=6, deadline=None)
@given(ops=st.lists(st.sampled_from(["full", "skip_attn", "skip_ffn", "skip_both"]), min_size=2, max_size=2),
       before=st.integers(0, 4), images=st.lists(st.integers(1, 12), min_size=1, max_size=3), after=st.integers(1, 3))
def test_bidirectional_image_attention_matches_the_reference(gemma3, ops, before, images, after):
    """Random plans x layouts (images of up to 12 rows: longer than the 8-row window) through the
    traced and rewritten prefill (what the eager inner backend runs) == HF's own forward under
    the reference semantics."""
    inputs = _prompt(gemma3, before, images, after)
    gm = check.traced_prefill(gemma3, adapter_for(gemma3), inputs)
    plan = SkipPlan.from_ops(ops)
    torch.testing.assert_close(check.rewritten_logits(gm, plan), _reference_logits(gemma3, plan, inputs),
                               atol=check.ATOL, rtol=1e-4)


def test_the_block_mask_matters(gemma3):
    """On this prompt HF's logits with and without the image blocks differ: the tests above
    would see a causal-only rebuild."""
    inputs = _prompt(gemma3, 2, [10], 2)
    without = {k: v for k, v in inputs.items() if k != "token_type_ids"}
    with torch.no_grad():
        assert not torch.allclose(gemma3(**inputs).logits, gemma3(**without).logits, atol=1e-3)


def test_compiled_generate_matches_the_reference(gemma3):
    """CompiledVLM (eager inner backend): logits and greedy tokens, prefill and decode."""
    result = check.parity(gemma3, SkipPlan.from_ops(["skip_both", "skip_attn"]), _prompt(gemma3, 3, [10, 3], 2))
    assert result["ok"] and result["skip_changes_logits"], result


def test_mixed_layouts_in_one_left_padded_batch(gemma3):
    """Rows of different lengths, image counts and positions in ONE prefill: each row's logits
    and tokens equal the row alone (block ids travel with their rows through the padding
    rotation; padding rows are blocks of their own)."""
    plan = SkipPlan.from_ops(["skip_attn", "skip_both"])
    prompts = [_prompt(gemma3, 1, [9], 1), _prompt(gemma3, 4, [3, 6], 3), _prompt(gemma3, 2, [2], 1)]
    batch = left_pad_batch(prompts)
    cm = compile(gemma3, plan, backend="eager")
    with torch.no_grad():
        together = cm.generate(**batch, max_new_tokens=3, eos_token_id=[])
    for row, prompt in enumerate(prompts):
        alone = cm.generate(**prompt, max_new_tokens=3, eos_token_id=[])
        assert torch.equal(together[row, -3:], alone[0, -3:]), row
    assert cm.cache_info().currsize <= 2  # one graph per batch bucket (1 row, 2 or more)


def test_pad_left_keeps_blocks_alone():
    from vskip_compile.archs import PrefillInputs
    from vskip_compile.layout import VisualLayout

    p = PrefillInputs(torch.zeros(1, 4, 2), torch.arange(4)[None], None, None, VisualLayout(4, (((1, 3),),)),
                      blocks=torch.tensor([[0, 2, 2, 3]]))
    assert pad_left(p, 2).blocks.tolist() == [[0, 1, 2, 4, 4, 5]]


def test_paths_that_build_causal_masks_refuse_blocks(gemma3):
    from vskip_compile import baselines

    with torch.no_grad():
        p = adapter_for(gemma3).prefill_inputs(gemma3, **_prompt(gemma3, 3, [5], 2))
    with pytest.raises(AdapterError, match="token-dropping prefill builds causal attention masks only"):
        baselines.prefill(gemma3, p, None, None)


def test_inductor_serves_mixed_layouts_with_one_batched_graph(gemma3):
    """Inductor's graph decomposes Gemma's tanh-GELU into adds inside the FFN (no residual adds:
    find_regions skips them); one batched graph serves two batches of other layouts; tokens equal
    the eager inner backend's (both compiled from the same rewritten graph)."""
    plan = SkipPlan.from_ops(["skip_attn", "skip_both"])
    cm = compile(gemma3, plan, backend="inductor")
    eager = compile(gemma3, plan, backend="eager")
    for prompts in ([_prompt(gemma3, 1, [9], 1), _prompt(gemma3, 4, [3, 6], 3)],
                    [_prompt(gemma3, 2, [5], 3), _prompt(gemma3, 0, [2, 2, 2], 1), _prompt(gemma3, 3, [11], 2)]):
        batch = left_pad_batch(prompts)
        got = cm.generate(**batch, max_new_tokens=3, eos_token_id=[])
        assert torch.equal(got, eager.generate(**batch, max_new_tokens=3, eos_token_id=[]))
    assert cm.cache_info().compiles == 1
