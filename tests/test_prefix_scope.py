"""Plan scope 'prefix_through_visual' (OpSkip's `freeze_scope`) through the whole chain.

Under this scope a skipped operator leaves unchanged every row from row 0 through the last
visual row: the text before the image (and between images) is frozen with the visual rows;
the text after the last image stays exact. Each compiled path is checked against the eager
reference (`reference.applied`), the same oracle as the default scope: passes (FLOPs and
logits of the rewritten exported graph), compiled generate with inner eager (4 tiny archs)
and inductor, and the ONNX engine.

Tolerance, fp32: last-row logits within 1e-5 (as tests/test_compile.py: the compiled graph
runs the skipped operators' GEMMs on fewer rows, so K-sums are blocked differently; seen
<= 2e-7 here, the scope's own effect is >= 5e-2). Greedy tokens must be identical.
"""

from __future__ import annotations

import pytest
import torch

import vskip_compile
from vskip_compile import SkipPlan, reference
from vskip_compile.archs import adapter_for
from vskip_compile.testing.tiny import TINY_ARCHS, build_tiny, tiny_inputs
from vskip_compile.core import DecoderCore
from vskip_compile.flop_count import count_flops
from vskip_compile.flops import TextDims, model_flops

FP32_ATOL = 1e-5
NEW_TOKENS = 4
OPS = ("skip_attn", "skip_both", "skip_ffn", "full")
PREFIX = SkipPlan.from_ops(OPS, scope="prefix_through_visual")
VISUAL = SkipPlan.from_ops(OPS)
# Text before, between and after two images: the prefix scope freezes 0 .. end of image 2.
LAYOUT = dict(text_before=3, text_between=2, text_after=4, n_images=2)


def _reference(model, plan, inputs):
    """Last-row logits [B, V] and greedy tokens [B, S + n] of the eager oracle."""
    with torch.no_grad(), reference.applied(model, plan):
        logits = model(**inputs).logits[:, -1]
        tokens = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return logits, tokens


def _prefix_rows(layout) -> tuple[int, int, int]:
    """(S, V, P): sequence, visual rows and the non-visual rows the prefix scope also freezes."""
    (frozen,) = layout.frozen_spans("prefix_through_visual")
    return layout.seq_len, layout.num_visual, frozen[1] - frozen[0] - layout.num_visual


def test_layout_freezes_text_before_and_between_the_images(tiny_model):
    model = tiny_model("qwen3_vl")
    layout = adapter_for(model).layout(model, tiny_inputs(model, "qwen3_vl", **LAYOUT)["input_ids"])
    (a, b), (c, d) = layout.row_spans
    assert (a, c - b) == (3, 2)
    assert layout.frozen_spans("prefix_through_visual") == ((0, d),)
    assert layout.kept_spans("prefix_through_visual") == ((d, layout.seq_len),)
    assert _prefix_rows(layout) == (layout.seq_len, (b - a) + (d - c), 3 + 2)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_eager_compile_matches_reference(tiny_model, arch):
    model = tiny_model(arch)
    inputs = tiny_inputs(model, arch, **LAYOUT)
    want_logits, want_tokens = _reference(model, PREFIX, inputs)
    cm = vskip_compile.compile(model, PREFIX, backend="eager")
    logits = cm(**inputs, logits_to_keep=1).logits[:, -1]  # [B, V]
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=FP32_ATOL)
    assert torch.equal(cm.generate(**inputs, max_new_tokens=NEW_TOKENS), want_tokens)
    visual_logits, _ = _reference(model, VISUAL, inputs)
    assert (visual_logits - logits).abs().max() > 100 * FP32_ATOL  # the scope did something


def test_image_last_freezes_every_row(tiny_model):
    """No text after the image: every row is frozen, skipped operators vanish from the graph."""
    model = tiny_model("llava")
    inputs = tiny_inputs(model, "llava", text_before=2, text_after=0)
    want_logits, want_tokens = _reference(model, PREFIX, inputs)
    cm = vskip_compile.compile(model, PREFIX, backend="eager")
    torch.testing.assert_close(cm(**inputs, logits_to_keep=1).logits[:, -1], want_logits, rtol=0, atol=FP32_ATOL)
    assert torch.equal(cm.generate(**inputs, max_new_tokens=NEW_TOKENS), want_tokens)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_passes_flops_and_logits_of_the_exported_graph(tiny_model, arch):
    """The rewritten exported prefill does exactly the symbolic model's FLOPs with P prefix rows
    (FlopCounterMode with the project's SDPA rule; the graph adds only the LM head on its one
    logits row, which the convention leaves out) and gives the reference's logits."""
    from vskip_compile.passes import PassContext, run_passes

    model = tiny_model(arch)
    adapter = adapter_for(model)
    inputs = tiny_inputs(model, arch, **LAYOUT)
    p = adapter.prefill_inputs(model, **inputs)
    deepstack = tuple(p.deepstack or ())
    args = (p.inputs_embeds, p.position_ids, *deepstack)
    core = DecoderCore.from_model(model, adapter, logits_to_keep=1, num_deepstack=len(deepstack))
    with torch.no_grad():
        ep = torch.export.export(core, args, strict=False)
    res = run_passes(ep.module(), PassContext(PREFIX, p.layout))
    assert res.counters["attn_rewritten"] == 2 and res.counters["ffn_rewritten"] == 2

    dims = TextDims.from_hf_config(model.config)
    S, V, P = _prefix_rows(p.layout)
    lm_head = 2 * dims.hidden * model.config.text_config.vocab_size  # one logits row
    assert count_flops(res.gm, *args) == model_flops(dims, PREFIX, S, V, P) + lm_head
    assert count_flops(ep.module(), *args) == model_flops(dims, None, S, V) + lm_head
    with torch.no_grad():
        got = res.gm(*args)[0][:, -1]  # [B, V]
    want_logits, _ = _reference(model, PREFIX, inputs)
    torch.testing.assert_close(got, want_logits, rtol=0, atol=FP32_ATOL)


@pytest.mark.slow
def test_inductor_compile_matches_reference():
    """Inductor (the pass runs as its post-grad hook): Qwen3-VL, M-RoPE and DeepStack, 2 images."""
    arch = "qwen3_vl"
    model = build_tiny(arch)
    inputs = tiny_inputs(model, arch, **LAYOUT)
    want_logits, want_tokens = _reference(model, PREFIX, inputs)
    cm = vskip_compile.compile(model, PREFIX, backend="inductor")
    logits = cm(**inputs, logits_to_keep=1).logits[:, -1]
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=FP32_ATOL)
    assert torch.equal(cm.generate(**inputs, max_new_tokens=NEW_TOKENS), want_tokens)
    visual_logits, _ = _reference(model, VISUAL, inputs)
    assert (visual_logits - logits).abs().max() > 100 * FP32_ATOL


@pytest.mark.slow
def test_onnx_engine_matches_reference(tiny_model, tmp_path):
    """export_onnx bakes the scope into the prefill graph; the manifest records it."""
    pytest.importorskip("onnxruntime")
    import json

    import numpy as np

    from vskip_compile.export import OnnxRunner, export_onnx

    arch = "qwen3_vl"
    model = tiny_model(arch)
    inputs = tiny_inputs(model, arch, **LAYOUT)
    want_logits, want_tokens = _reference(model, PREFIX, inputs)
    export_onnx(model, PREFIX, inputs, tmp_path, optimize=False)
    assert json.loads((tmp_path / "manifest.json").read_text())["plan"]["scope"] == "prefix_through_visual"
    runner = OnnxRunner(tmp_path)
    got_logits = runner.prefill(**inputs)["logits"][:, -1]  # [B, V]
    np.testing.assert_allclose(got_logits, want_logits.numpy(), rtol=FP32_ATOL, atol=FP32_ATOL)
    np.testing.assert_array_equal(runner.generate(**inputs, max_new_tokens=NEW_TOKENS), want_tokens.numpy())
