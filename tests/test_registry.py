"""The registry sweep and the block structures it found: parallel blocks, sliding windows.

CI runs the sweep on a fixed subset of families (eager inner backend, 2-3 layer tiny models,
one random plan each); the whole registry (`vskip check --all-registered`, the README table)
runs with VSKIP_FULL_SWEEP=1, too slow for the CI budget.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vskip_compile import SkipPlan, check
from vskip_compile.archs import adapter_for
from vskip_compile.archs.probe import probe_inputs
from vskip_compile.archs.shrink import build_family, registered_families, tiny_config
from vskip_compile.passes import PassContext, SkipPassError, find_all_regions, run_passes
from vskip_compile.passes import rules

# The CI subset: family -> verdict the sweep must give (a change either way must be looked at).
CI_FAMILIES = {
    "llava": "pass",
    "aya_vision": "pass",  # Cohere2 text: parallel block + sliding-window layers
    "gemma3": "refused",  # mask mapping (bidirectional image attention)
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


@pytest.mark.parametrize("family", sorted(CI_FAMILIES))
def test_sweep_verdicts_of_the_ci_families(family):
    result = check.check_family(family)
    assert result.verdict == CI_FAMILIES[family], result
    if result.verdict == "refused":
        assert result.reason  # every refusal names its reason


@pytest.mark.skipif(not os.environ.get("VSKIP_FULL_SWEEP"), reason="whole registry: set VSKIP_FULL_SWEEP=1 (slow)")
def test_whole_registry_sweep():
    results = check.sweep()
    assert not [r for r in results if r.verdict == "fail"], check.sweep_table(results)
    assert all(r.reason for r in results if r.verdict == "refused")


# -- parallel block (Cohere2 text: h' = h + Attn(n(h)) + FFN(n(h))) ------------------------------


@pytest.fixture(scope="module")
def aya():
    model = build_family("aya_vision")
    inputs, info = probe_inputs(model)
    return model, inputs, info


def test_parallel_block_regions(aya):
    """Both operators of each layer are found: the FFN's region closes at the second add of the
    one residual sum, and its frozen rows take the first add (h + attention)."""
    model, inputs, _ = aya
    gm = check.traced_prefill(model, adapter_for(model), inputs)
    layers = len(model.model.language_model.layers)
    found = find_all_regions(gm.graph, PassContext(SkipPlan.full(layers)))
    for layer in range(layers):
        (attn,), (ffn,) = found[(layer, "attn")], found[(layer, "ffn")]
        assert ffn.residual is attn.close  # (h + A) + F
        assert not any("self_attn" in str(n.meta.get("nn_module_stack")) for n in ffn.nodes)


@pytest.mark.parametrize("ops", [("skip_ffn", "skip_attn"), ("skip_both", "full"), ("full", "skip_both")])
def test_parallel_block_and_sliding_window_match_the_reference(aya, ops):
    """Compiled (eager inner backend) == eager reference: logits and greedy tokens. The prompt is
    longer than the window (8), so the sliding layer's own mask is exercised, also in decode."""
    model, inputs, info = aya
    assert inputs["input_ids"].shape[1] > model.config.text_config.sliding_window
    plan = SkipPlan.from_ops(ops[: len(model.model.language_model.layers)])
    result = check.parity(model, plan, inputs)
    assert result["ok"], result
    assert result["skip_changes_logits"]


def test_sliding_window_is_kept_exactly(aya):
    """An all-full compiled prefill equals the HF forward, whose sliding layers use their window
    (a full causal mask would differ on this prompt)."""
    from vskip_compile import compile as vskip_compile

    model, inputs, _ = aya
    plan = SkipPlan.full(len(model.model.language_model.layers))
    with torch.no_grad():
        want = model(**inputs).logits
        got = vskip_compile(model, plan, backend="eager")(**inputs).logits
    torch.testing.assert_close(got, want, atol=check.ATOL, rtol=1e-4)


# -- refusals, never crashes ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def llava_graph():
    from vskip_compile.archs.tiny import build_tiny, tiny_inputs

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
