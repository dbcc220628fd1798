"""Tiny models and architecture adapters: layouts, prefill inputs, registry, generic fallback."""

from __future__ import annotations

import pytest
import torch
import transformers

from vskip_compile import PlanError, SkipPlan
from vskip_compile.archs import (
    ADAPTERS,
    AdapterError,
    GenericAdapter,
    PrefillInputs,
    adapter_for,
)
from vskip_compile.testing.tiny import (
    ALL_TINY_ARCHS,
    IMAGE_TOKEN_ID,
    TINY_ARCHS,
    VIDEO_TOKEN_ID,
    tiny_inputs,
)
from vskip_compile.reference import applied

# Inputs variants: (name, tiny_inputs kwargs)
VARIANTS = {
    "one_image": {},
    "image_first": {"text_before": 0},
    "image_last": {"text_after": 0},
    "two_images": {"n_images": 2},
    "batch2": {"batch": 2},
    "no_image": {"n_images": 0},
}


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_model_shape(tiny_model, arch):
    model = tiny_model(arch)
    text = model.config.get_text_config()
    assert not model.training
    assert model.config._attn_implementation == "sdpa"
    assert text.num_key_value_heads < text.num_attention_heads  # GQA exercised
    inputs = tiny_inputs(model, arch)
    n_visual = int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum())
    assert 16 <= n_visual <= 64
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (*inputs["input_ids"].shape, text.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_layout(tiny_model, arch, variant):
    model = tiny_model(arch)
    kw = VARIANTS[variant]
    inputs = tiny_inputs(model, arch, **kw)
    layout = adapter_for(model).layout(model, inputs["input_ids"])
    assert layout.seq_len == inputs["input_ids"].shape[1]
    assert layout.batch_size == kw.get("batch", 1) and layout.is_uniform
    spans = layout.row_spans
    assert len(spans) == kw.get("n_images", 1)
    assert layout.num_visual == int((inputs["input_ids"][0] == IMAGE_TOKEN_ID).sum())
    if variant == "image_first":
        assert spans[0][0] == 0
    if variant == "image_last":
        assert spans[-1][1] == layout.seq_len


def test_qwen_video_tokens_are_visual(tiny_model):
    model = tiny_model("qwen2_5_vl")
    ids = torch.tensor([[5, VIDEO_TOKEN_ID, VIDEO_TOKEN_ID, 6, IMAGE_TOKEN_ID, 7]])
    assert adapter_for(model).layout(model, ids).row_spans == ((1, 3), (4, 5))
    llava = tiny_model("llava")  # llava has no video token: only image rows
    assert adapter_for(llava).layout(llava, ids).row_spans == ((4, 5),)


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("variant", ["one_image", "two_images", "batch2", "no_image"])
def test_prefill_inputs_reproduce_hf_forward(tiny_model, manual, arch, variant):
    """The adapter's language-model inputs, run layer by layer, give HF's logits bit for bit."""
    model = tiny_model(arch)
    inputs = tiny_inputs(model, arch, **VARIANTS[variant])
    with torch.no_grad():
        want = model(**inputs).logits
        got = manual(model, inputs, ("full",) * 4)
    assert torch.equal(got, want)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_prefill_inputs_fields(tiny_model, arch):
    model = tiny_model(arch)
    inputs = tiny_inputs(model, arch, batch=2)
    with torch.no_grad():
        p = adapter_for(model).prefill_inputs(model, **inputs)
    assert isinstance(p, PrefillInputs)
    batch, seq = inputs["input_ids"].shape
    assert p.inputs_embeds.shape == (batch, seq, 64)
    want_pos = (3, batch, seq) if arch.startswith("qwen") else (batch, seq)
    assert tuple(p.position_ids.shape) == want_pos
    assert p.attention_mask is not None and p.attention_mask.shape == (batch, seq)
    visual = torch.tensor(p.layout.visual_mask())[None, :, None]  # [1, S, 1]
    if arch == "qwen3_vl":
        assert len(p.deepstack) == len(model.config.vision_config.deepstack_visual_indexes)
        for d in p.deepstack:
            assert d.shape == p.inputs_embeds.shape
            assert torch.equal(d.masked_fill(visual, 0), torch.zeros_like(d))  # exactly 0 off the image
            assert (d.abs().sum(-1)[:, visual[0, :, 0]] > 0).all()  # every visual row gets a feature
    else:
        assert p.deepstack is None


def test_prefill_inputs_need_input_ids(tiny_model):
    model = tiny_model("llava")
    inputs = tiny_inputs(model, "llava")
    embeds = model.get_input_embeddings()(inputs.pop("input_ids"))
    with pytest.raises(AdapterError, match="input_ids"):
        adapter_for(model).prefill_inputs(model, inputs_embeds=embeds, **inputs)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_structure_and_plan_checks(tiny_model, arch):
    model = tiny_model(arch)
    adapter = adapter_for(model)
    assert adapter.name == arch
    lm = adapter.language_model(model)
    assert adapter.layers(model) is lm.layers and len(lm.layers) == 4
    assert hasattr(lm, "norm") and hasattr(lm, "rotary_emb")
    assert adapter.lm_head(model) is model.lm_head
    assert adapter.image_token_id(model) == IMAGE_TOKEN_ID
    assert adapter.architecture(model) == type(model).__name__
    cfg = adapter.text_config(model)
    assert cfg["num_hidden_layers"] == 4 and cfg["head_dim"] == 16
    stamped = SkipPlan.full(4).with_model(adapter.architecture(model), cfg)
    adapter.check_plan(model, stamped)
    with pytest.raises(PlanError, match="3 layers but the model has 4"):
        adapter.check_plan(model, SkipPlan.full(3))
    with pytest.raises(PlanError, match="architecture"):
        adapter.check_plan(model, SkipPlan.full(4).with_model("OtherVLM", cfg))
    adapter.check_plan(model, SkipPlan.full(4).with_model(model.config.model_type, cfg))  # alias


def test_registry_picks_by_model_type():
    assert set(ADAPTERS) == {"qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "llava", "llava_next"}
    for model_type, cls in ADAPTERS.items():
        assert model_type in cls.model_types


def test_every_registered_adapter_has_a_tiny_model(tiny_model):
    """optimum-style guard: a registered architecture without a tiny test model fails here
    (the MoE one, outside TINY_ARCHS, included)."""
    tiny_types = {}
    for arch in ALL_TINY_ARCHS:
        model = tiny_model(arch)
        tiny_types[model.config.model_type] = model
    for model_type, cls in ADAPTERS.items():
        assert model_type in tiny_types, f"adapter {cls.__name__} ({model_type}) has no tiny model in vskip_compile/testing/tiny.py"
        assert type(adapter_for(tiny_types[model_type])) is cls


# -- generic adapter on classes with no registered adapter ------------------------------------


def _tiny_mistral3():
    from vskip_compile.testing.tiny import _TEXT

    cfg = transformers.Mistral3Config(
        text_config=transformers.MistralConfig(**_TEXT),
        vision_config=transformers.PixtralVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            image_size=32, patch_size=4, head_dim=16,
        ),
        image_token_index=IMAGE_TOKEN_ID,
        spatial_merge_size=2,
        vision_feature_layer=-1,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.Mistral3ForConditionalGeneration(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.tensor([[5, 6, 7] + [IMAGE_TOKEN_ID] * 16 + [8, 9]])  # 32px / 4 / merge 2 -> 16 tokens
    inputs = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values=torch.randn(1, 3, 32, 32, generator=gen),
        image_sizes=torch.tensor([[32, 32]]),
    )
    return model, inputs


def _tiny_qwen2_vl():
    from vskip_compile.testing.tiny import _QWEN_IDS, _TEXT

    text = dict(_TEXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=4, spatial_merge_size=2)
    cfg = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **_QWEN_IDS)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.Qwen2VLForConditionalGeneration(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.tensor([[5, 6] + [IMAGE_TOKEN_ID] * 16 + [8, 9, 10]])  # 8x8 patches merged 2x2
    inputs = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values=torch.randn(64, 3 * 2 * 4 * 4, generator=gen),
        image_grid_thw=torch.tensor([[1, 8, 8]]),
        mm_token_type_ids=(ids == IMAGE_TOKEN_ID).int(),
    )
    return model, inputs


@pytest.mark.parametrize("build", [_tiny_mistral3, _tiny_qwen2_vl], ids=["mistral3", "qwen2_vl"])
def test_generic_adapter_on_unregistered_class(manual, build):
    model, inputs = build()
    assert model.config.model_type not in ADAPTERS
    adapter = adapter_for(model)
    assert type(adapter) is GenericAdapter
    assert adapter.layout(model, inputs["input_ids"]).num_visual == 16
    ops = ("skip_both", "skip_attn", "full", "skip_ffn")
    with torch.no_grad():
        want = model(**inputs).logits
        assert torch.equal(manual(model, inputs, ("full",) * 4), want)
        with applied(model, SkipPlan(ops)):
            got = model(**inputs).logits
        assert torch.equal(got, manual(model, inputs, ops))
    assert not torch.equal(got, want)


def test_generic_adapter_refuses_models_it_cannot_serve():
    class NoLayers(torch.nn.Module):
        config = transformers.PretrainedConfig()

        def get_decoder(self):
            return torch.nn.Linear(2, 2)

    with pytest.raises(AdapterError, match="layers"):
        GenericAdapter().language_model(NoLayers())
    with pytest.raises(AdapterError, match="image_token_id"):
        GenericAdapter().image_token_id(NoLayers())

    class NoMlp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Module()])
            self.layers[0].self_attn = torch.nn.Identity()

    class Wrapper(torch.nn.Module):
        def get_decoder(self):
            return NoMlp()

    with pytest.raises(AdapterError, match="mlp"):
        GenericAdapter().language_model(Wrapper())
