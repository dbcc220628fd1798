"""reference.applied: the eager skip semantics, checked against an independent formulation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vskip_compile import OPS, PlanError, SkipPlan
from vskip_compile.archs import adapter_for
from vskip_compile.testing.tiny import IMAGE_TOKEN_ID, TINY_ARCHS, tiny_inputs
from vskip_compile.reference import ReferenceCallError, applied

MIXED = ("skip_both", "skip_attn", "skip_ffn", "full")


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_all_full_plan_is_the_unmodified_model(tiny_model, arch):
    model = tiny_model(arch)
    inputs = tiny_inputs(model, arch, n_images=2)
    want = _logits(model, inputs)
    with applied(model, SkipPlan.full(4)):
        got = _logits(model, inputs)
    assert torch.equal(got, want)


@pytest.mark.parametrize("arch", TINY_ARCHS)
@settings(max_examples=5, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.sampled_from(OPS), min_size=4, max_size=4), scope=st.sampled_from(["visual", "prefix_through_visual"]))
def test_random_plans_match_independent_formulation(tiny_model, manual, arch, ops, scope):
    model = tiny_model(arch)
    inputs = tiny_inputs(model, arch)
    with applied(model, SkipPlan(ops, scope=scope)):
        got = _logits(model, inputs)
    with torch.no_grad():
        want = manual(model, inputs, ops, scope)
    assert torch.equal(got, want)


LAYOUTS = {
    "image_first": {"text_before": 0},
    "image_last": {"text_after": 0},
    "two_images": {"n_images": 2},
    "batch2": {"batch": 2},
    "no_image": {"n_images": 0},
}
CASES = [
    ("image_first", "visual"),
    ("image_last", "visual"),
    ("image_last", "prefix_through_visual"),
    ("two_images", "visual"),
    ("two_images", "prefix_through_visual"),
    ("batch2", "prefix_through_visual"),
    ("no_image", "prefix_through_visual"),
]


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("layout,scope", CASES)
def test_layouts(tiny_model, manual, arch, layout, scope):
    model = tiny_model(arch)
    inputs = tiny_inputs(model, arch, **LAYOUTS[layout])
    with applied(model, SkipPlan(MIXED, scope=scope)):
        got = _logits(model, inputs)
    with torch.no_grad():
        want = manual(model, inputs, MIXED, scope)
    assert torch.equal(got, want)
    if layout == "no_image":  # nothing to freeze
        assert torch.equal(got, _logits(model, inputs))


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_text_rows_before_the_image_are_exact(tiny_model, arch):
    """Causality: with scope 'visual', rows before the first image see no change at all."""
    model = tiny_model(arch)
    inputs = tiny_inputs(model, arch, text_before=3)
    with applied(model, SkipPlan(("skip_both",) * 4)):
        got = _logits(model, inputs)
    want = _logits(model, inputs)
    assert torch.equal(got[:, :3], want[:, :3])
    assert not torch.equal(got[:, 3:], want[:, 3:])


def _final_hidden(model, inputs):
    """Input of the language model's final norm: the last hidden state [B, S, D]."""
    seen = []
    norm = adapter_for(model).language_model(model).norm
    handle = norm.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        _logits(model, inputs)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("scope", ["visual", "prefix_through_visual"])
def test_skip_both_everywhere_freezes_exactly_the_scope_rows(tiny_model, scope):
    model = tiny_model("llava")
    inputs = tiny_inputs(model, "llava", text_before=3, n_images=2, text_between=2, text_after=4)
    with torch.no_grad():
        embeds = adapter_for(model).prefill_inputs(model, **inputs).inputs_embeds
    with applied(model, SkipPlan(("skip_both",) * 4, scope=scope)):
        h = _final_hidden(model, inputs)
    ids = inputs["input_ids"][0]
    visual = ids == IMAGE_TOKEN_ID
    end = int(visual.nonzero().max()) + 1
    frozen = visual.clone() if scope == "visual" else torch.arange(len(ids)) < end
    assert torch.equal(h[0, frozen], embeds[0, frozen])
    assert (h[0, ~frozen] != embeds[0, ~frozen]).any(-1).all()


def _greedy(model, inputs, plan, steps):
    """Prefill under the plan, then decode one token at a time with the unmodified model."""
    with torch.no_grad():
        with applied(model, plan):
            out = model(**inputs, use_cache=True)
        cache = out.cache
        token = out.logits[:, -1].argmax(-1)  # [B]
        done = torch.zeros_like(token, dtype=torch.bool)
        tokens = []
        eos, pad = model.generation_config.eos_token_id, model.generation_config.pad_token_id
        for step in range(steps):
            token = torch.where(done, pad, token)
            tokens.append(token)
            done |= token == eos
            if step + 1 < steps:
                out = model(input_ids=token[:, None], cache=cache, use_cache=True)
                cache, token = out.cache, out.logits[:, -1].argmax(-1)
    return torch.cat([inputs["input_ids"], torch.stack(tokens, 1)], 1)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_generate_under_plan_is_plan_prefill_then_plain_decode(tiny_model, arch):
    model = tiny_model(arch)
    inputs = tiny_inputs(model, arch, batch=2)
    plan = SkipPlan(MIXED)
    with torch.no_grad(), applied(model, plan):
        got = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, _greedy(model, inputs, plan, 4))


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_model_is_unchanged_after_exit(tiny_model, arch):
    model = tiny_model(arch)
    inputs = tiny_inputs(model, arch)
    before_logits = _logits(model, inputs)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}

    def hook_counts():
        return [
            (name, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._forward_hooks_always_called))
            for name, m in model.named_modules()
        ]

    before_hooks = hook_counts()
    with applied(model, SkipPlan(MIXED)):
        assert hook_counts() != before_hooks
        _logits(model, inputs)
    with pytest.raises(KeyError), applied(model, SkipPlan(MIXED)):  # exit by exception too
        raise KeyError("boom")
    assert hook_counts() == before_hooks
    state = model.state_dict()
    assert state.keys() == before_state.keys()
    assert all(torch.equal(state[k], v) for k, v in before_state.items())
    assert torch.equal(_logits(model, inputs), before_logits)


def test_refuses_a_plan_for_another_model(tiny_model):
    model = tiny_model("qwen3_vl")
    with pytest.raises(PlanError, match="plan has 6 layers but the model has 4"):
        with applied(model, SkipPlan.full(6)):
            pass
    other = tiny_model("llava")
    adapter = adapter_for(other)
    stamped = SkipPlan(MIXED).with_model(adapter.architecture(other), adapter.text_config(other))
    with pytest.raises(PlanError, match="LlavaForConditionalGeneration"):
        with applied(model, stamped):
            pass


def test_refuses_a_batch_with_different_layouts(tiny_model):
    model = tiny_model("llava")
    inputs = tiny_inputs(model, "llava", batch=2)
    ids = inputs["input_ids"].clone()
    ids[1] = torch.roll(ids[1], 1)  # same token count, image one row later in row 1
    inputs["input_ids"] = ids
    with applied(model, SkipPlan(MIXED)), pytest.raises(ReferenceCallError, match="different visual layouts"):
        _logits(model, inputs)


def test_refuses_a_prefill_without_input_ids(tiny_model):
    model = tiny_model("llava")
    inputs = tiny_inputs(model, "llava", n_images=0)
    embeds = model.get_input_embeddings()(inputs.pop("input_ids"))
    with applied(model, SkipPlan(MIXED)), pytest.raises(ReferenceCallError, match="input_ids"):
        _logits(model, dict(inputs, inputs_embeds=embeds))


def test_refuses_calls_below_the_top_model(tiny_model):
    model = tiny_model("llava")
    inputs = tiny_inputs(model, "llava")
    with applied(model, SkipPlan(MIXED)), pytest.raises(ReferenceCallError, match="outside a call of the top model"):
        with torch.no_grad():
            model.model(**inputs)
