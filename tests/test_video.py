"""Video inputs through the compiled model, against the eager reference (tiny Qwen2.5-VL / Qwen3-VL).

Videos as the processors write them (archs.tiny.tiny_video_inputs): pixel_values_videos,
video_grid_thw, mm_token_type_ids 2 at the video rows; Qwen3-VL frames between timestamp text,
Qwen2.5-VL one run per video with second_per_grid_ts. One compiled model per architecture
serves every case (the layout is data). Tolerances as in test_compile.py: fp32 logits within
1e-5 (GEMMs on fewer rows reorder sums), greedy tokens equal.
"""

from __future__ import annotations

import pytest
import torch

import vskip_compile
from vskip_compile import SkipPlan, reference
from vskip_compile.archs import adapter_for
from vskip_compile.testing.tiny import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, left_padded_batch, tiny_video_inputs
from vskip_compile.core import DecoderCore
from vskip_compile.flops import TextDims, model_flops
from vskip_compile.runtime import last_positions

FP32_ATOL = 1e-5
ARCHS = ("qwen2_5_vl", "qwen3_vl")
OPS4 = ("skip_both", "skip_attn", "skip_ffn", "skip_both")
CASES = {
    "video": [("text", 3), ("video", 4), ("text", 4)],
    "video+image": [("text", 2), ("image",), ("text", 2), ("video", 4), ("text", 4)],
    "two-videos": [("text", 2), ("video", 2), ("text", 2), ("video", 4), ("text", 3)],
}


def _reference(model, plan, inputs, max_new_tokens=4):
    with torch.no_grad(), reference.applied(model, plan):
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return logits, tokens


@pytest.fixture(scope="module")
def compiled(tiny_model):
    """compiled(arch, rows) -> one eager-backend CompiledVLM per (arch, rows), built once."""
    cache = {}

    def get(arch: str, rows: str = "visual"):
        if (arch, rows) not in cache:
            cache[(arch, rows)] = vskip_compile.compile(tiny_model(arch), SkipPlan.from_ops(OPS4, rows=rows),
                                                        backend="eager")
        return cache[(arch, rows)]

    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_layout_knows_each_span_modality(tiny_model, arch):
    model = tiny_model(arch)
    inputs = tiny_video_inputs(model, arch, CASES["video+image"])
    layout = adapter_for(model).layout(model, inputs["input_ids"], inputs["mm_token_type_ids"])
    # Qwen3-VL writes a 4-frame video (2 temporal patches) as 2 runs; Qwen2.5-VL as one
    want_kinds = ("image", "video") if arch == "qwen2_5_vl" else ("image", "video", "video")
    assert layout.kinds == (want_kinds,)
    assert layout.num_rows("image") == 16 and layout.num_rows("video") == 32 and layout.num_visual == 48
    ids = inputs["input_ids"][0]
    for (a, b), kind in zip(layout.row_spans, layout.kinds[0]):
        assert bool((ids[a:b] == (IMAGE_TOKEN_ID if kind == "image" else VIDEO_TOKEN_ID)).all())
    assert layout.frozen_spans(rows="video") == tuple(s for s, k in zip(layout.row_spans, want_kinds) if k == "video")
    assert layout.frozen_spans(rows="image") == layout.row_spans[:1]


def test_generic_adapter_marks_video_by_token_id_or_mm_token_type_ids(tiny_model):
    from vskip_compile.archs import AdapterError, GenericAdapter

    ids = torch.tensor([[5, VIDEO_TOKEN_ID, VIDEO_TOKEN_ID, 6, IMAGE_TOKEN_ID, 7]])
    qwen = tiny_model("qwen2_5_vl")
    assert GenericAdapter().layout(qwen, ids).kinds == (("video", "image"),)
    llava = tiny_model("llava")  # its config names no video token: the processor's marks say which rows
    assert GenericAdapter().layout(llava, ids).row_spans == ((4, 5),)
    marked = GenericAdapter().layout(llava, ids, torch.tensor([[0, 2, 2, 0, 1, 0]]))
    assert marked.row_spans == ((1, 3), (4, 5)) and marked.kinds == (("video", "image"),)
    with pytest.raises(AdapterError, match="mm_token_type_ids marks row 0 position 1 as 1"):
        GenericAdapter().layout(qwen, ids, torch.tensor([[0, 1, 1, 0, 1, 0]]))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("arch", ARCHS)
def test_video_compiled_equals_reference(tiny_model, compiled, arch, case):
    model = tiny_model(arch)
    inputs = tiny_video_inputs(model, arch, CASES[case], seed=1, seconds_per_grid=0.5 if case == "two-videos" else 1.0)
    cm = compiled(arch)
    want_logits, want_tokens = _reference(model, cm.plan, inputs)
    with torch.no_grad():
        full = model(**inputs).logits
    logits = cm(**inputs).logits
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=FP32_ATOL)
    assert (full - want_logits).abs().max() > 1e-3, "the plan should change the logits"
    tokens = cm.generate(**inputs, max_new_tokens=4)
    assert torch.equal(tokens, want_tokens)


def test_decode_positions_are_the_ones_hf_generate_uses(tiny_model, compiled):
    """Qwen2.5-VL: an 8-frame video's temporal ids (4 patches x 4 tokens_per_second) run past
    the 2 text tokens after it. The decode steps' position ids must be the ones HF generate
    feeds its rotary embedding (read with a hook): the last prompt token's ids + t on each axis
    in transformers 5.24, not max position + 1 as get_rope_index's rope deltas would suggest.
    (The tiny random model's greedy tokens do not notice a shift of a few positions, so the
    positions themselves are compared.)"""
    arch = "qwen2_5_vl"
    model = tiny_model(arch)
    inputs = tiny_video_inputs(model, arch, [("text", 2), ("video", 8), ("text", 2)], seed=2)
    p = adapter_for(model).prefill_inputs(model, **inputs)
    seen = []
    hook = model.model.language_model.rotary_emb.register_forward_hook(lambda m, a, o: seen.append(a[1][..., -1:]))
    try:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
    finally:
        hook.remove()
    hf_steps = seen[1:]  # [3, B, 1] per decode step (seen[0]: the prefill)
    ours = last_positions(p.position_ids)  # [3, B, 1]
    assert [torch.equal(ours + 1 + t, step) for t, step in enumerate(hf_steps)] == [True] * len(hf_steps)
    assert int(p.position_ids.amax()) + 1 != int(hf_steps[0].amax()), "the case must tell the two rules apart"
    cm = compiled(arch)
    _, want_tokens = _reference(model, cm.plan, inputs, max_new_tokens=6)
    assert torch.equal(cm.generate(**inputs, max_new_tokens=6), want_tokens)


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_batch_of_videos_equals_each_row_alone(tiny_model, compiled, arch):
    model = tiny_model(arch)
    rows = [tiny_video_inputs(model, arch, [("text", 2), ("video", 4), ("text", 3)], seed=3),
            tiny_video_inputs(model, arch, [("text", 6), ("video", 2), ("text", 2), ("video", 2), ("text", 5)], seed=4)]
    cm = compiled(arch)
    batch = left_padded_batch(rows)
    out = cm.generate(**batch, max_new_tokens=3)
    width = batch["input_ids"].shape[1]
    for r, row in enumerate(rows):
        _, want = _reference(model, cm.plan, row, max_new_tokens=3)
        pad = width - row["input_ids"].shape[1]
        assert torch.equal(out[r, pad:], want[0])


@pytest.mark.parametrize("rows, frozen_token", [("video", VIDEO_TOKEN_ID), ("image", IMAGE_TOKEN_ID)])
@pytest.mark.parametrize("arch", ["qwen3_vl"])  # DeepStack on both modalities; the rows plumbing is arch-independent
def test_plan_rows_freeze_one_modality(tiny_model, compiled, manual, arch, rows, frozen_token):
    """`rows` selects the spans a skip freezes: compiled, the reference and an independent
    loop that freezes only `frozen_token`'s rows agree; freezing every visual row differs."""
    model = tiny_model(arch)
    inputs = tiny_video_inputs(model, arch, CASES["video+image"], seed=5)
    cm = compiled(arch, rows)
    with torch.no_grad():
        want = manual(model, inputs, OPS4, image_token_id=frozen_token)
    ref, _ = _reference(model, cm.plan, inputs, max_new_tokens=1)
    torch.testing.assert_close(ref, want, rtol=0, atol=FP32_ATOL)
    torch.testing.assert_close(cm(**inputs).logits, want, rtol=0, atol=FP32_ATOL)
    every = compiled(arch)(**inputs).logits
    assert (every - want).abs().max() > 1e-3, "freezing image and video rows should differ"


@pytest.fixture(scope="module")
def exported_video_core(tiny_model):
    """(model, prefill inputs, exported core graph, its args) of a tiny Qwen3-VL video + image prompt."""
    arch = "qwen3_vl"
    model = tiny_model(arch)
    adapter = adapter_for(model)
    inputs = tiny_video_inputs(model, arch, CASES["video+image"], seed=6)
    with torch.no_grad():
        p = adapter.prefill_inputs(model, **inputs)
    deepstack = tuple(p.deepstack or ())
    core = DecoderCore.from_model(model, adapter, num_deepstack=len(deepstack))
    args = (p.inputs_embeds, p.position_ids, *deepstack)
    return model, p, torch.export.export(core, args, strict=False).module(), args


@pytest.mark.parametrize("rows", ["visual", "video", "image"])
def test_flop_counter_on_the_rewritten_video_graph_equals_the_flops_model(exported_video_core, rows):
    """Saved FLOPs of the rewritten graph (FlopCounterMode, SDPA rule of flop_count) on a video
    + image prompt equal the FLOPs model with the video rows of the plan's `rows`."""
    from vskip_compile.flop_count import count_flops
    from vskip_compile.passes import PassContext, run_passes

    model, p, gm, args = exported_video_core
    plan = SkipPlan.from_ops(OPS4, rows=rows)
    res = run_passes(gm, PassContext(plan, p.layout))
    saved = count_flops(gm, *args) - count_flops(res.gm, *args)
    dims = TextDims.from_hf_config(model.config)
    S, V, V_video = p.layout.seq_len, p.layout.num_visual, p.layout.num_rows("video")
    want = model_flops(dims, None, S, V) - model_flops(dims, plan, S, V, V_video=V_video)
    assert saved == want > 0


@pytest.mark.slow
def test_inductor_video_and_image_equal_reference(tiny_model):
    """The one inductor case: Qwen3-VL, an image and a video (DeepStack on both), logits and tokens."""
    arch = "qwen3_vl"
    model = tiny_model(arch)
    inputs = tiny_video_inputs(model, arch, CASES["video+image"], seed=7)
    cm = vskip_compile.compile(model, SkipPlan.from_ops(OPS4), backend="inductor")
    want_logits, want_tokens = _reference(model, cm.plan, inputs, max_new_tokens=3)
    torch.testing.assert_close(cm(**inputs).logits, want_logits, rtol=0, atol=FP32_ATOL)
    assert torch.equal(cm.generate(**inputs, max_new_tokens=3), want_tokens)
