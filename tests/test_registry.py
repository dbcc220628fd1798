"""The registry sweep and the block structures it found: parallel blocks, sliding windows.

CI runs the sweep on a fixed subset of families (eager inner backend, 2-3 layer tiny models,
one random plan each); the whole registry (`vskip check --all-registered`, the README table)
runs with VSKIP_FULL_SWEEP=1, too slow for the CI budget.
"""

from __future__ import annotations

import os

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from vskip_compile import SkipPlan, check, outside, reference
from vskip_compile.archs import AdapterError, adapter_for
from vskip_compile.archs.probe import probe_inputs
from vskip_compile.archs.shrink import build_family, registered_families, tiny_config
from vskip_compile.passes import PassContext, SkipPassError, find_all_regions, run_passes
from vskip_compile.passes import rules

# The CI subset: family -> verdict the sweep must give (a change either way must be looked at).
CI_FAMILIES = {
    "llava": "pass",
    "glm4v": "pass",  # M-RoPE with partial rotary dims, post-attention / post-FFN norms
    "gemma3": "pass",  # a mask mapping, per-layer-type RoPE (bidirectional image blocks: tests/test_blocks.py)
    "granite_docling": "pass",  # embedding_multiplier, logits_scaling, DeepStack (vskip_compile.outside)
    "muse_glimmer": "pass",  # logits * output_multiplier, soft-capping, a NoPE layer
    "fuyu": "pass",  # final_layernorm
    "glm4v_moe": "pass",  # group-limited router: gather / scatter along the experts
    "lfm2_vl": "refused",  # short-convolution layers: a conv state the core does not carry
    "hunyuan_vl": "pass",  # 4 M-RoPE axes: a 4-row position-id tensor is all axes, no text row (core.rope_axes)
    "gemma4": "refused",  # per-layer inputs (hidden_size_per_layer_input) the core does not pass: named
    "gemma4_unified": "pass",  # the last layer of each type stores its K/V in shared_kv_states (core.shared_kv)
    "chameleon": "pass",  # VQ image tokens, merged inside the decoder's own forward; image-code logits forbidden
    "emu3": "pass",  # VQ image tokens (codes + an end-of-line token per row), a PIL / numpy-only processor
    "granite4_vision": "pass",  # per-layer features added before layers 0 and 1 (Adapter.layer_inputs)
    "cohere_compass": "pass",  # RoPE per layer type with interleaved M-RoPE sections
    "llama4": "refused",  # transformers 5.24's forward is broken for every input (check.UPSTREAM_BROKEN)
    "qwen3_5": "pass",  # linear-attention layers: conv / recurrent states carried, their attention never skipped
}


def test_every_registered_family_has_a_config_class():
    from transformers import CONFIG_MAPPING

    families = registered_families()
    assert len(families) >= 80 and "llava" in families
    for family in families:
        assert family in CONFIG_MAPPING, family


def test_shrink_keeps_one_layer_of_each_attention_kind():
    text = tiny_config("gemma3").get_text_config()
    assert sorted(set(text.layer_types)) == ["full_attention", "sliding_attention"]
    assert text.num_hidden_layers == len(text.layer_types) and text.sliding_window == 8
    assert text.hidden_size == 64 and text.vocab_size == 256


# -- generic shrink rules (config level: no forward) -------------------------------------------------


def _ids(cfg):
    return {k: getattr(cfg, k) for k in vars(cfg) if k.endswith(("_token_id", "_token_index"))}


def test_shrink_reaches_every_nested_config():
    """Configs below sub-configs (T5Gemma2's encoder.text_config / vision_config, DeepSeek-OCR 2's
    vision_config.encoder_config) are shrunk like the ones the old fixed key list named."""
    config = tiny_config("t5gemma2")
    assert config.decoder.hidden_size == 64 and config.encoder.text_config.hidden_size == 64
    assert config.encoder.text_config.num_hidden_layers == 2 and config.encoder.vision_config.hidden_size == 32
    encoder = tiny_config("deepseek_ocr2").vision_config.encoder_config
    assert encoder.hidden_size == 32 and encoder.num_hidden_layers == 1


def test_shrink_keeps_per_layer_overrides_of_the_kept_layers():
    """Dots3's sliding layers override heads and latent sizes (transformers' per_layer_config):
    the tiny sizes replace them (equal to the global ones they drop out), every layer reads."""
    text = tiny_config("dots3_note").text_config
    for i, layer in enumerate(text.per_layer_config):
        assert layer.head_dim <= 16 and layer.num_attention_heads == 4, i
        assert layer.num_key_value_heads == layer.num_attention_heads  # latent attention: no KV groups
        if text.layer_types[i] == "sliding_attention":
            assert layer.head_dim == layer.qk_nope_head_dim + layer.qk_rope_head_dim
    assert tiny_config("gemma4").text_config.per_layer_config[1].head_dim <= 16  # Gemma 4's wide full layers


def test_shrink_renumbers_per_layer_overrides():
    """An override of a kept layer moves to its new index; a size override gets the tiny size."""
    from transformers import Gemma3TextConfig

    from vskip_compile.archs.shrink import _shrink_text

    text = Gemma3TextConfig(num_hidden_layers=12, per_layer_config={5: {"attention_bias": True, "head_dim": 512}})
    _shrink_text(text)  # keeps layers 0 (sliding) and 5 (full)
    assert text.layer_types == ["sliding_attention", "full_attention"]
    assert text._heterogeneity_spec.per_layer_overrides == {1: {"attention_bias": True}}
    assert text.per_layer_config[1].head_dim == 16 and not text.per_layer_config[0].attention_bias


def test_shrink_keeps_one_layer_of_each_attention_and_mlp_kind():
    text = tiny_config("dots3_note").text_config
    pairs = list(zip(text.layer_types, text.mlp_layer_types))
    assert len(set(pairs)) == len(pairs) == text.num_hidden_layers >= 3
    assert {"dense", "sparse"} <= set(text.mlp_layer_types)


def test_shrink_fills_sizes_the_class_leaves_none():
    assert tiny_config("diffusion_gemma").text_config.num_experts == 4  # MoE router sizes
    assert tiny_config("deepseek_ocr2").text_config.mlp_layer_types == ["dense", "sparse"]  # first_k_dense 1
    assert tiny_config("hunyuan_vl").text_config.head_dim == 16  # read by its attention


def test_shrink_gives_sliding_layers_a_window():
    from vskip_compile.archs.shrink import _shrink_text

    text = tiny_config("gemma3").get_text_config()
    text.sliding_window = None
    _shrink_text(text)
    assert text.sliding_window == 8


def test_shrink_of_latent_attention_keeps_the_head_dim_ties():
    """Kimi K2.5 (DeepSeek-V3 text): head_dim is the rotary part; one routing group of 4 experts."""
    text = tiny_config("kimi_k25").text_config
    assert text.head_dim == text.qk_rope_head_dim == 8 and text.qk_head_dim == 16
    assert text.num_key_value_heads == text.num_attention_heads and text.n_group == 1
    dots = tiny_config("dots3_note").text_config
    for params in dots.rope_parameters.values():  # partial factor = rotary part / head_dim
        assert params["partial_rotary_factor"] == dots.qk_rope_head_dim / dots.head_dim


def test_shrink_ties_widths_across_configs():
    """A width equal to another config's default hidden size follows that config's tiny one."""
    blip2 = tiny_config("blip-2")
    assert blip2.qformer_config.encoder_hidden_size == blip2.vision_config.hidden_size == 32
    assert blip2.text_config.word_embed_proj_dim == blip2.text_config.hidden_size == 64  # OPT's own width
    dots = tiny_config("dots3_note")
    assert dots.vision_config.adapter_out_dim == dots.audio_config.adapter_out_dim == 64
    assert tiny_config("qwen2_vl").vision_config.hidden_size == 64  # embed_dim is its tower, hidden its output
    ovis = tiny_config("ovis2")
    assert (ovis.hidden_size, ovis.vocab_size) == (64, 256)  # a composite config's own sizes


def test_shrink_token_ids_fit_the_tiny_vocabulary():
    molmo = tiny_config("molmo2")  # aliased: image_token_id -> image_patch_id
    assert 200 <= molmo.image_patch_id < 256 and molmo.image_token_id == molmo.image_patch_id
    thinker = tiny_config("qwen2_5_omni_thinker")  # a checkpoint field the class lacks
    assert 200 <= thinker.vision_start_token_id < 256


def test_shrink_names_an_image_placeholder_the_class_leaves_none():
    config = tiny_config("blip-2")
    others = {v for k, v in _ids(config).items() if k != "image_token_index"}
    assert 200 <= config.image_token_index < 256 and config.image_token_index not in others
    assert config.image_token_id == config.image_token_index


def test_build_fits_mrope_sections_to_the_rotary_width():
    """Modeling-code defaults ([8, 12, 12] in GLM-OCR) and declared-but-unset sections (ERNIE-4.5-VL)
    sum to the tiny model's rotary frequencies."""
    for family in ("glm_ocr", "ernie4_5_vl_moe"):
        model = build_family(family)
        inv_freq = model.model.language_model.rotary_emb.inv_freq  # [rotary_dim / 2]
        assert sum(model.config.text_config.rope_parameters["mrope_section"]) == inv_freq.shape[-1], family


def test_probe_gives_the_image_feature_call_its_side_text_inputs():
    """InstructBLIP's image features need the Q-Former's instruction ids."""
    model = build_family("instructblip")
    inputs, info = probe_inputs(model)
    assert info["pixels"] and inputs["qformer_input_ids"].shape == inputs["qformer_attention_mask"].shape
    assert info["image_tokens"] == model.config.num_query_tokens


@pytest.mark.parametrize("family", sorted(CI_FAMILIES))
def test_sweep_verdicts_of_the_ci_families(family):
    result = check.check_family(family)
    assert result.verdict == CI_FAMILIES[family], result
    if result.verdict == "refused":
        assert result.reason  # every refusal names its reason
    if family == "gemma4":
        assert "Gemma4TextModel: per-layer inputs (hidden_size_per_layer_input 256) are not passed" in result.reason
    if family == "llama4":
        assert "Llama4ForConditionalGeneration.forward reads image_outputs" in result.reason
    if family in ("chameleon", "emu3", "granite4_vision", "cohere_compass"):
        assert result.pixels  # the image went through the family's own processor and tower / tokenizer


@pytest.mark.skipif(not os.environ.get("VSKIP_FULL_SWEEP"), reason="whole registry: set VSKIP_FULL_SWEEP=1 (slow)")
def test_whole_registry_sweep():
    results = check.sweep()
    assert not [r for r in results if r.verdict == "fail"], check.sweep_table(results)
    assert all(r.reason for r in results if r.verdict == "refused")


# -- parallel block (Cohere2 text: h' = h + Attn(n(h)) + FFN(n(h))) + sliding windows -------------


@pytest.fixture(scope="module")
def aya():
    """Aya Vision (Cohere2 text): a parallel block per layer; layer 0 slides over 8 rows."""
    model = build_family("aya_vision")
    inputs, _ = probe_inputs(model)
    gm = check.traced_prefill(model, adapter_for(model), inputs)
    return model, inputs, gm


def _reference_logits(model, plan, inputs):
    with torch.no_grad(), reference.applied(model, plan):
        return model(**inputs).logits


def test_parallel_block_regions(aya):
    """Both operators of each layer are found: the FFN's region closes at the second add of the
    one residual sum, its frozen rows take the first add (h + attention)."""
    model, _, gm = aya
    layers = len(model.model.language_model.layers)
    found = find_all_regions(gm.graph, PassContext(SkipPlan.full(layers)))
    for layer in range(layers):
        (attn,), (ffn,) = found[(layer, "attn")], found[(layer, "ffn")]
        assert ffn.residual is attn.close  # (h + A) + F
        assert not any("self_attn" in str(n.meta.get("nn_module_stack")) for n in ffn.nodes)


@pytest.mark.parametrize("ops", [("skip_ffn", "skip_attn"), ("skip_both", "full"), ("full", "skip_both"),
                                 ("skip_attn", "skip_ffn")])
def test_parallel_block_matches_the_reference(aya, ops):
    """Rewritten graph (what the eager inner backend runs) == eager reference, which removes
    exactly the skipped operator's term: h + F on frozen rows for skip_attn, h + A for skip_ffn."""
    model, inputs, gm = aya
    plan = SkipPlan.from_ops(ops)
    want = _reference_logits(model, plan, inputs)
    torch.testing.assert_close(check.rewritten_logits(gm, plan), want, atol=check.ATOL, rtol=1e-4)
    assert not torch.allclose(want, _reference_logits(model, SkipPlan.full(2), inputs), atol=check.ATOL)


def test_parallel_block_and_sliding_window_generate_like_the_reference(aya):
    """Logits and greedy tokens through CompiledVLM (eager inner backend), prefill and decode,
    on a prompt longer than the sliding window (8 rows)."""
    model, inputs, _ = aya
    assert model.config.text_config.layer_types[0] == "sliding_attention"
    assert inputs["input_ids"].shape[1] > model.config.text_config.sliding_window
    result = check.parity(model, SkipPlan.from_ops(["skip_both", "skip_ffn"]), inputs)
    assert result["ok"] and result["skip_changes_logits"], result


def test_sliding_window_is_kept_exactly(aya):
    """All-full: the traced core's per-layer masks reproduce HF's forward, whose sliding layer
    attends 8 rows back (one shared causal mask would not)."""
    model, inputs, gm = aya
    text = model.config.text_config
    with torch.no_grad():
        want = model(**inputs).logits
        text.sliding_window = 4096  # HF builds its masks at call time: now a plain causal mask
        try:
            unwindowed = model(**inputs).logits
        finally:
            text.sliding_window = 8
    torch.testing.assert_close(check.rewritten_logits(gm, SkipPlan.full(2)), want, atol=check.ATOL, rtol=1e-4)
    assert not torch.allclose(unwindowed, want, atol=1e-3)  # the window matters on this prompt


# -- M-RoPE with partial rotary dims and sandwich norms (GLM-4V) ----------------------------------


@pytest.fixture(scope="module")
def glm4v():
    """GLM-4V text: M-RoPE over half the head dims, post-attention and post-FFN norms; one
    8x8-patch image (merged 2x2: 16 image tokens) in Qwen's patch layout."""
    model = build_family("glm4v")
    vision = model.config.vision_config
    patch = 3 * vision.temporal_patch_size * vision.patch_size**2
    gen = torch.Generator().manual_seed(0)
    token = model.config.image_token_id
    ids = torch.tensor([[5, 6, 7] + [token] * 16 + [8, 9, 10, 11]])
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                  pixel_values=torch.randn(64, patch, generator=gen), image_grid_thw=torch.tensor([[1, 8, 8]]),
                  mm_token_type_ids=(ids == token).int())
    return model, inputs, check.traced_prefill(model, adapter_for(model), inputs)


@settings(max_examples=12, deadline=None)
@given(ops=st.lists(st.sampled_from(["full", "skip_attn", "skip_ffn", "skip_both"]), min_size=2, max_size=2))
def test_partial_mrope_and_sandwich_norms_match_the_reference(glm4v, ops):
    """Random plans on the graph that crashed the rewrite before (a stride-2 RoPE slice folded
    into its parent): equal to the eager reference."""
    model, inputs, gm = glm4v
    plan = SkipPlan.from_ops(ops)
    torch.testing.assert_close(check.rewritten_logits(gm, plan), _reference_logits(model, plan, inputs),
                               atol=check.ATOL, rtol=1e-4)


# -- refusals, never crashes ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def llava_graph():
    from vskip_compile.testing.tiny import build_tiny, tiny_inputs

    model = build_tiny("llava")
    return check.traced_prefill(model, adapter_for(model), tiny_inputs(model, "llava"))


_ERRORS = [TypeError, RuntimeError, IndexError, KeyError, ValueError, AssertionError, ZeroDivisionError]


@settings(max_examples=25, deadline=None)
@given(
    op=st.sampled_from(["view", "mm", "mul", "add", "_unsafe_view", "t", "transpose", "rsqrt", "mean", "cat"]),
    error=st.sampled_from(_ERRORS),
    ops=st.lists(st.sampled_from(["skip_attn", "skip_ffn", "skip_both"]), min_size=4, max_size=4),
)
def test_a_failing_rule_becomes_a_named_refusal(llava_graph, op, error, ops):
    """Any exception inside a row rule on a structure it was not written for (as the sweep saw:
    sizes that do not stack) becomes a SkipPassError naming the op, the layer and the node."""
    targets = [t for t in rules.RULES if getattr(t, "__name__", "").split(".")[0] == op]
    pointwise = getattr(torch.ops.aten, op, None)
    if not targets and pointwise is not None:
        targets = [getattr(pointwise, name) for name in pointwise.overloads()]

    def broken(node, out, geo):
        raise error("tensors of different sizes stacked")

    with pytest.MonkeyPatch.context() as m:
        for t in targets:
            m.setitem(rules.RULES, t, broken)
        try:
            result = run_passes(llava_graph, PassContext(SkipPlan.from_ops(ops)))
        except SkipPassError as e:
            msg = str(e)
            assert "layer" in msg and "node" in msg and f"aten.{op}" in msg, msg
            assert error.__name__ in msg
        else:  # the op does not occur where the plan cuts rows: nothing to refuse
            assert result.modified


# -- what HF does outside the decoder layers (vskip_compile.outside) --------------------------------


class _ScalesLogits(torch.nn.Module):
    """A model whose forward transforms lm_head's logits as Granite (/ logits_scaling) and
    Gemma-2 (soft-capping) do; forward(logits) stands in for everything before the head."""

    def __init__(self, **fields):
        super().__init__()
        self.config = transformers.PretrainedConfig(**fields)

    def forward(self, logits):
        logits = logits / self.config.logits_scaling
        logits = logits / self.config.final_logit_softcapping
        logits = torch.tanh(logits)
        return logits * self.config.final_logit_softcapping


class _IgnoresThem(_ScalesLogits):
    """LLaVA-NeXT over a Granite text model: the text config names logits_scaling, the VLM's
    forward never applies it."""

    def forward(self, logits):
        return logits


class _CohereLike(_ScalesLogits):
    def forward(self, logits):
        return logits * self.config.logit_scale


def test_logit_transforms_are_reproduced_where_the_forward_applies_them():
    head = torch.nn.Linear(8, 16, bias=False)
    h = 30 * torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))  # large logits: the cap bends them
    model = _ScalesLogits(logits_scaling=4.0, final_logit_softcapping=5.0)
    wrapped = outside.logits_head(model, head)
    assert isinstance(wrapped, outside.LogitsHead)
    assert torch.equal(wrapped(h), model(head(h)))  # HF's ops in HF's order and dtype: bit for bit
    assert (wrapped(h) - head(h)).abs().max() > 1.0
    assert outside.logits_head(_IgnoresThem(logits_scaling=4.0, final_logit_softcapping=5.0), head) is head
    assert outside.logits_head(_ScalesLogits(logits_scaling=1.0), head) is head  # neutral values: the bare head
    with pytest.raises(outside.OutsideLayersError, match=r"_CohereLike: config\.logit_scale = 0\.5"):
        outside.logits_head(_CohereLike(logit_scale=0.5), head)


# family -> what it does outside its decoder layers that the core must reproduce
OUTSIDE_FAMILIES = {
    "granite_docling": "inputs_embeds * embedding_multiplier, logits / logits_scaling, DeepStack",
    "muse_glimmer": "logits * output_multiplier then soft-capping, a NoPE layer (layer_rope_theta 0), sliding window",
    "fuyu": "the final norm is named final_layernorm",
}


@pytest.fixture(scope="module", params=sorted(OUTSIDE_FAMILIES))
def outside_family(request):
    model = build_family(request.param)
    inputs, _ = probe_inputs(model)
    return request.param, model, inputs


def test_the_families_do_something_outside_their_layers(outside_family):
    """Each family exercises what it is listed for (else the parity below would prove nothing)."""
    family, model, _ = outside_family
    adapter = adapter_for(model)
    lm = adapter.language_model(model)
    head = adapter.lm_head(model)
    if family == "granite_docling":
        assert outside.embedding_multiplier(lm) != 1.0 and head.logits_scaling != 1.0
    if family == "muse_glimmer":
        assert head.output_multiplier != 1.0 and head.final_logit_softcapping is not None
        assert outside.rotary_layers(lm) == (True, False)
    if family == "fuyu":
        assert not hasattr(lm, "norm") and outside.final_norm(lm) is lm.final_layernorm


def test_core_and_decode_step_equal_the_unmodified_model(outside_family):
    """All-full DecoderCore (eager) == the HF model's prefill logits, and one DecodeStep over
    its K/V == the logits HF's generate gives the next token (fp32, reordered sums only)."""
    from vskip_compile import baselines
    from vskip_compile.core import DecodeStep, DecoderCore, rope_position_ids

    family, model, inputs = outside_family
    adapter = adapter_for(model)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        p = adapter.prefill_inputs(model, **inputs)
        deepstack = tuple(p.deepstack or ())
        logits, *kv = DecoderCore.from_model(model, adapter, 0, len(deepstack))(p.inputs_embeds, p.position_ids,
                                                                                 *deepstack)
        torch.testing.assert_close(logits, model(**inputs).logits, atol=1e-5, rtol=1e-5)
        token = out.sequences[:, -2]  # [B], the first new token
        assert torch.equal(token, logits[:, -1].argmax(-1))
        position = baselines.next_positions(rope_position_ids(p.position_ids))[:, None]  # [B, 1]
        step = DecodeStep(adapter.language_model(model), adapter.lm_head(model))
        past_mask = torch.ones(p.inputs_embeds.shape[:2], dtype=torch.bool)  # [B, S]
        new, *_ = step(model.get_input_embeddings()(token[:, None]), adapter.text_position_ids(model, position),
                       past_mask, *kv)
    torch.testing.assert_close(new[:, -1], out.logits[1], atol=1e-5, rtol=1e-5)


def test_a_layer_that_is_not_attention_is_refused_by_its_type():
    """LFM2's short-convolution layers carry a conv state the core does not: refused, naming
    the layer and its type. The registry's default LFM2-VL config is all attention (its FFN
    named feed_forward): refused naming that child."""
    model = build_family("lfm2_vl")
    with pytest.raises(AdapterError, match=r"decoder layer 0 \(Lfm2DecoderLayer\) has no mlp child module \(it has feed_forward"):
        adapter_for(model).language_model(model)
    config = tiny_config("lfm2_vl")
    config.get_text_config().layer_types = ["full_attention", "conv"]
    model = transformers.Lfm2VlForConditionalGeneration(config)
    with pytest.raises(AdapterError, match=r"decoder layer 1 \(Lfm2DecoderLayer\) is a 'conv' layer"):
        adapter_for(model).language_model(model)


def test_eager_token_dropping_refuses_layers_it_would_run_wrong():
    """The baselines build one causal mask and one rotary embedding for all layers: a model
    with a sliding window and a NoPE layer (MuseGlimmer) is refused by name, never run wrong."""
    from vskip_compile import baselines
    from vskip_compile.core import CoreError

    model = build_family("muse_glimmer")
    inputs, _ = probe_inputs(model)
    with torch.no_grad():
        p = adapter_for(model).prefill_inputs(model, **inputs)
    with pytest.raises(CoreError, match="token-dropping prefill runs full causal attention only; .* sliding-window"):
        baselines.prefill(model, p, None, baselines.KVCache())


def test_pooled_image_tokens_fit_the_tiny_patch_grid():
    """Gemma 3 pools its patch grid to mm_tokens_per_image tokens (default 256 = 16 x 16): more
    than the tiny tower's 8 x 8 patches, a zero pooling stride; the shrink asks 4 x 4."""
    config = tiny_config("gemma3")
    assert config.mm_tokens_per_image == 16
    assert config.vision_config.image_size // config.vision_config.patch_size == 8


def test_position_rows_follow_the_rotary_axes():
    """Qwen's [text; t; h; w] drops its text row for 3 axes; HunYuan-VL's 4 axes keep all 4 rows."""
    from vskip_compile.core import rope_position_ids

    ids = torch.arange(4 * 5).view(4, 1, 5)  # [4, B, S]
    assert torch.equal(rope_position_ids(ids), ids[1:]) and torch.equal(rope_position_ids(ids, 4), ids)
    assert torch.equal(rope_position_ids(ids[1:]), ids[1:]) and torch.equal(rope_position_ids(ids[0]), ids[0])


# -- families the generic shrink needed more for: VQ image tokens, per-layer features, K/V stores ---


@pytest.mark.parametrize("family, codebook", [("chameleon", "num_embeddings"), ("emu3", "codebook_size")])
def test_vq_image_tokens_are_visual_rows(family, codebook):
    """Chameleon / Emu3 turn an image into VQ codes the vocabulary_map names as tokens: the tiny
    codebook's codes all have ids in the tiny vocabulary, one image gives its 8 x 8 codes
    (Chameleon: 128 px / 16; Emu3: 112 px / 8 = 14 x 14, one end-of-line token per row), and
    those rows are the layout's visual rows."""
    from vskip_compile.archs.shrink import IMAGE_CODES

    model = build_family(family)
    codes = getattr(model.config.vq_config, codebook)
    mapping = model.model.vocabulary_mapping
    assert codes == IMAGE_CODES and sorted(mapping.img2bpe) == list(range(codes))
    assert max(mapping.img2bpe.values()) < model.config.get_text_config().vocab_size
    inputs, info = probe_inputs(model)
    assert info["pixels"] and info["image_tokens"] == {"chameleon": 8 * 8, "emu3": 14 * 15}[family], info
    p = adapter_for(model).prefill_inputs(model, **inputs)
    assert p.layout.num_visual == info["image_tokens"]
    with torch.no_grad():  # the image rows hold the embedded codes, not the placeholder's embedding
        placeholder = model.get_input_embeddings()(torch.tensor(model.config.image_token_id))
    visual = inputs["input_ids"][0] == model.config.image_token_id
    assert not torch.allclose(p.inputs_embeds[0, visual], placeholder.expand(int(visual.sum()), -1))


def test_chameleon_forbids_its_image_codes_in_the_core_logits():
    """Chameleon's forward sets the image-code tokens' logits to the dtype minimum: the head the
    core uses does the same (all-full core == the model's logits, those columns included)."""
    from vskip_compile.core import DecoderCore

    model = build_family("chameleon")
    inputs, _ = probe_inputs(model)
    adapter = adapter_for(model)
    head = adapter.lm_head(model)
    forbidden = sorted(model.model.vocabulary_mapping.image_tokens)
    assert isinstance(head, outside.LogitsHead) and head.forbidden.tolist() == forbidden
    with torch.no_grad():
        p = adapter.prefill_inputs(model, **inputs)
        logits, *_ = DecoderCore.from_model(model, adapter)(p.inputs_embeds, p.position_ids)
        want = model(**inputs).logits
    assert bool((logits[..., forbidden] == torch.finfo(logits.dtype).min).all())
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)


def test_per_layer_features_become_input_and_deepstack_injections():
    """Granite 4 Vision adds per-layer features to the image rows before layers 0 and 1 (its
    inputs_embeds are zero there): the adapter folds layer 0's into inputs_embeds and layer 1's
    into the DeepStack add after layer 0; the all-full core reproduces HF's logits."""
    from vskip_compile.core import DecoderCore

    model = build_family("granite4_vision")
    inputs, info = probe_inputs(model)
    adapter = adapter_for(model)
    with torch.no_grad():
        p = adapter.prefill_inputs(model, **inputs)
        visual = inputs["input_ids"][0] == model.config.image_token_id
        assert info["pixels"] and len(p.deepstack) == 1
        assert bool(p.deepstack[0][0, visual].abs().sum(-1).gt(0).all()) and not p.deepstack[0][0, ~visual].any()
        assert bool(p.inputs_embeds[0, visual].abs().sum(-1).gt(0).all())  # layer 0's features, not zeros
        logits, *_ = DecoderCore.from_model(model, adapter, 0, 1)(p.inputs_embeds, p.position_ids, *p.deepstack)
        torch.testing.assert_close(logits, model(**inputs).logits, atol=1e-5, rtol=1e-5)


def test_kv_stores_are_passed_and_kv_reuse_is_refused():
    """Gemma 4's last layer of each type stores its K/V in shared_kv_states (an argument the core
    passes: without it the trace failed); layers that reuse earlier K/V, and per-layer inputs,
    are refused by name. Gemma 4 without per-layer inputs passes the check."""
    from vskip_compile.core import CoreError, shared_kv

    config = tiny_config("gemma4")
    config.text_config.hidden_size_per_layer_input = 0
    model = transformers.Gemma4ForConditionalGeneration(config).eval()
    lm = adapter_for(model).language_model(model)
    assert "store" in lm.config.kv_sharing_modes and shared_kv(lm)
    result = check.check_model(model, name="gemma4 without per-layer inputs")
    assert result.verdict == "pass" and result.parity["skip_changes_logits"], result.render()
    text = lm.config  # a third layer, of the first one's type, reusing that layer's K/V
    text.num_hidden_layers, text.layer_types = 3, text.layer_types + text.layer_types[:1]
    text.num_kv_shared_layers = 1
    assert text.kv_sharing_modes[2] == "reuse"
    with pytest.raises(CoreError, match=r"decoder layers \[2\] reuse the K/V of earlier layers"):
        shared_kv(lm)


def test_an_upstream_broken_forward_is_refused_by_name():
    """Llama 4's VLM forward fails for every input in transformers 5.24 (even text only), so the
    check refuses it naming the bug rather than calling it unbuilt."""
    model = build_family("llama4")
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(AttributeError, match="image_outputs"), torch.no_grad():
        model(input_ids=ids)
    report = check.check_model(model, name="llama4")
    assert report.verdict == "refused" and "transformers 5.24" in report.reasons[0]


# -- timm towers (TimmWrapperConfig and its kind): only where timm imports -------------------------
# timm needs torchvision, whose PyPI wheels do not import beside the CPU torch 2.13 wheel (and a
# plain `pip install timm` replaces torch by a CUDA 2.14): not a dependency, so these skip there.


def test_timm_towers_are_shrunk_through_timm_kwargs_without_the_hub(monkeypatch):
    """A timm tower keeps its checkpoint's architecture, made tiny through timm's own kwargs
    (Perception LM's Perception Encoder: 1 block of width 32 over 8 x 8 patches of 14 px;
    FastVLM's FastViT-MCi3: 1 block per stage); the config's hidden_size is the tower's output
    width (what the projector reads); timm never loads weights (load_pretrained raises here)."""
    builder = pytest.importorskip("timm.models._builder")

    def no_hub(*args, **kwargs):
        raise AssertionError("timm tried to load pretrained weights")

    monkeypatch.setattr(builder, "load_pretrained", no_hub)
    model = build_family("perception_lm")
    tower = model.model.vision_tower.timm_model
    assert type(tower).__name__ == "Eva" and len(tower.blocks) == 1 and tower.num_features == 32
    assert tuple(tower.patch_embed.img_size) == (112, 112)
    assert model.model.multi_modal_projector.linear_1.in_features == 32
    fast = build_family("fast_vlm")
    tower = fast.model.vision_tower.timm_model
    assert type(tower).__name__ == "FastVit" and [len(s.blocks) for s in tower.stages] == [1] * 5
    assert fast.config.vision_config.hidden_size == tower.num_features == 64
    assert fast.model.multi_modal_projector.linear_1.in_features == 64


def test_a_tiled_timm_tower_probes_with_pixels():
    """Perception LM's processor tiles at the tower's side (tile_size 112, one tile): thumbnail
    and tile, each 8 x 8 patches pooled 2 x 2 into 16 image tokens; the sweep passes it."""
    pytest.importorskip("timm")
    model = build_family("perception_lm")
    inputs, info = probe_inputs(model)
    assert info["pixels"], info
    assert inputs["pixel_values"].shape[-3:] == (3, 112, 112)  # [B, tiles, 3, H, W]
    assert info["image_tokens"] == inputs["pixel_values"].shape[1] * 16
    result = check.check_family("perception_lm")
    assert result.verdict == "pass", result


def test_gemma3n_shrinks_to_a_consistent_tiny_model():
    """Gemma 3n: per-layer lists (FFN widths, activation sparsity) follow the kept layers, the
    per-layer-input vocabulary is the tiny one, trailing K/V-sharing layers leave each layer type
    a producing layer (2 kept layers of 2 types: none shared); its tower's width stays timm's 2048.
    Its per-layer inputs are then refused by name."""
    pytest.importorskip("timm")
    text = tiny_config("gemma3n").text_config
    assert text.intermediate_size == [128] * text.num_hidden_layers == [128] * len(text.activation_sparsity_pattern)
    assert text.vocab_size_per_layer_input == 256 and text.num_kv_shared_layers == 0
    result = check.check_family("gemma3n")
    assert result.verdict == "refused" and "per-layer inputs (hidden_size_per_layer_input 256)" in result.reason
