"""DecoderCore and vskip_compile.compile (inner eager) against HF and the eager reference.

Inductor is slow to compile on CPU; its cases live in test_backend.py.

Tolerances, fp32: the compiled graph runs the skipped operators' GEMMs on fewer rows (and a
sub-batch GEMM on fewer batch rows) than the reference, which zeroes updates of a full-size
GEMM; different GEMM shapes block and reorder the K-sums, so logits differ by float rounding.
Seen: <= 2e-7 on logits of magnitude <= 1 (a few fp32 ulps); 1e-5 leaves a 50x margin and is
still far below any plan's effect (>= 3e-2 between plans on these models).
bf16: one bf16 ulp at magnitude 1 is 7.8e-3; eager bf16 matched exactly in every case seen,
3e-2 allows a few ulps of reordering in the same GEMMs.
"""

from __future__ import annotations

import random

import pytest
import torch

import vskip_compile
from vskip_compile import OPS, PlanError, SkipPlan, reference
from vskip_compile.archs import adapter_for
from vskip_compile.testing.tiny import TINY_ARCHS, build_tiny, left_padded_batch, tiny_inputs
from vskip_compile.core import DecoderCore
from vskip_compile.passes.rules import _arg
from vskip_compile.config import CompileError

FP32_ATOL = 1e-5
BF16_ATOL = 3e-2


def _cat_inputs(a: dict, b: dict) -> dict:
    """Two single-row HF input dicts of equal length as one batch (pixels concatenated)."""
    return {k: torch.cat([a[k], b[k]]) for k in a}


def _random_case(seed: int):
    """A random plan of 4 layers and a random layout (text before 0-6, after 1-9, 1-2 images)."""
    rng = random.Random(seed)
    plan = SkipPlan.from_ops([rng.choice(OPS[1:])] + [rng.choice(OPS) for _ in range(3)])
    layout = dict(text_before=rng.randint(0, 6), text_after=rng.randint(1, 9), n_images=rng.choice([1, 2]))
    return plan, layout


def _reference(model, plan, inputs, max_new_tokens=4):
    with torch.no_grad(), reference.applied(model, plan):
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return logits, tokens


# -- DecoderCore ------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_core_equals_hf_model(tiny_model, arch):
    """All rows, all-full: same modules, same ops, same shapes, so bit-exact: without padding
    the core calls SDPA with is_causal and no mask, as HF's SDPA path does (if a kernel ever
    differs, 1e-6 is the bound)."""
    model = tiny_model(arch)
    inputs = tiny_inputs(model, arch, text_before=2, text_after=3)
    adapter = adapter_for(model)
    with torch.no_grad():
        want = model(**inputs).logits
        p = adapter.prefill_inputs(model, **inputs)
        deepstack = p.deepstack or ()
        out = DecoderCore.from_model(model, adapter, 0, len(deepstack))(p.inputs_embeds, p.position_ids, *deepstack)
    assert len(out) == 1 + 2 * len(adapter.layers(model))
    torch.testing.assert_close(out[0], want, rtol=0, atol=1e-6)
    assert torch.equal(out[0], want), f"not bit-exact: {(out[0] - want).abs().max()}"
    k0 = out[1]  # [B, KV, S, E]
    assert k0.shape == (1, 2, want.shape[1], 16)


def test_core_exports_and_captures_fullgraph(tiny_model):
    """torch.export (non-strict) and Dynamo fullgraph both take the core, DeepStack included."""
    arch = "qwen3_vl"
    model = tiny_model(arch)
    adapter = adapter_for(model)
    with torch.no_grad():
        p = adapter.prefill_inputs(model, **tiny_inputs(model, arch))
        core = DecoderCore.from_model(model, adapter, 1, len(p.deepstack))
        args = (p.inputs_embeds, p.position_ids, *p.deepstack)
        want = core(*args)
        ep = torch.export.export(core, args, strict=False)
        got = ep.module()(*args)
        graphs = []

        def capture(gm, example_inputs):
            graphs.append(gm)
            return gm

        dyn = torch.compile(core, backend=capture, fullgraph=True, dynamic=False)(*args)
    assert want[0].shape == (1, 1, model.config.text_config.vocab_size)
    for a, b, c in zip(want, got, dyn):
        assert torch.equal(a, b) and torch.equal(a, c)
    sdpa = [n for n in ep.graph.nodes if n.target == torch.ops.aten.scaled_dot_product_attention.default]
    assert len(sdpa) == 4 and all(_arg(n, "attn_mask") is None and _arg(n, "is_causal") for n in sdpa)  # no S x S mask
    assert len(graphs) == 1


# -- compile(): inner eager vs the eager reference -----------------------------------------------


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_eager_backend_matches_reference(tiny_model, arch):
    """One random plan and layout per architecture (seed: its index), alone: logits, tokens, the
    graph reused by generate, and a plan that changed the logits. Random plans x layouts x mixed
    batches of every architecture are test_polymorphic's property tests; a second seed here
    added 4 Dynamo compiles (~1 min of CI) and no case those do not draw."""
    seed = TINY_ARCHS.index(arch)
    model = tiny_model(arch)
    plan, layout = _random_case(seed)
    inputs = tiny_inputs(model, arch, seed=seed, **layout)
    want_logits, want_tokens = _reference(model, plan, inputs)
    cm = vskip_compile.compile(model, plan, backend="eager")
    logits = cm(**inputs, logits_to_keep=1).logits  # [B, 1, V]
    torch.testing.assert_close(logits[:, -1], want_logits[:, -1], rtol=0, atol=FP32_ATOL)
    assert torch.equal(cm.generate(**inputs, max_new_tokens=4), want_tokens)
    assert cm.cache_info().misses == 1 and cm.cache_info().hits == 1  # generate reused the graph
    with torch.no_grad():
        unskipped = model(**inputs).logits
    assert (unskipped[:, -1] - logits[:, -1]).abs().max() > 100 * FP32_ATOL  # the plan did something


def test_all_rows_batch_and_scope(tiny_model):
    """cm(**inputs) gives every row's logits; a uniform batch runs one graph; the plan's
    scope (here the text before the image is frozen too) reaches the passes."""
    arch = "qwen2_5_vl"
    model = tiny_model(arch)
    plan = SkipPlan.from_ops(["skip_both", "skip_attn", "full", "skip_ffn"], scope="prefix_through_visual")
    inputs = tiny_inputs(model, arch, text_before=1, text_after=2, batch=2)
    want_logits, want_tokens = _reference(model, plan, inputs, max_new_tokens=3)
    cm = vskip_compile.compile(model, plan, backend="eager")
    out = cm(**inputs)
    torch.testing.assert_close(out.logits, want_logits, rtol=0, atol=FP32_ATOL)
    assert out.cache.get_seq_length() == inputs["input_ids"].shape[1]
    assert torch.equal(cm.generate(**inputs, max_new_tokens=3), want_tokens)


@pytest.mark.parametrize("arch", ["llava", "qwen3_vl"])
def test_bf16_matches_bf16_reference(arch):
    model = build_tiny(arch, dtype=torch.bfloat16)
    plan, layout = _random_case(5)
    inputs = tiny_inputs(model, arch, seed=5, **layout)
    want_logits, want_tokens = _reference(model, plan, inputs)
    cm = vskip_compile.compile(model, plan, backend="eager")
    logits = cm(**inputs, logits_to_keep=1).logits
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits[:, -1], want_logits[:, -1], rtol=0, atol=BF16_ATOL)
    assert torch.equal(cm.generate(**inputs, max_new_tokens=4), want_tokens)


# -- graph cache, batches, refusals ------------------------------------------------------------


def test_graph_cache_hits_misses_and_bound(tiny_model):
    """One graph per batch bucket: another layout (and length) is a hit; the bound evicts."""
    model = tiny_model("llava")
    plan = SkipPlan.from_ops(["skip_both", "full", "skip_attn", "full"])
    a = tiny_inputs(model, "llava", text_before=1, text_after=2)
    b = tiny_inputs(model, "llava", text_before=2, text_after=1, seed=1)  # same length, other layout
    c = tiny_inputs(model, "llava", text_before=5, text_after=7, seed=2)  # another length
    cm = vskip_compile.compile(model, plan, backend="eager", cache_size=1)
    first = cm(**a, logits_to_keep=1).logits
    assert tuple(cm.cache_info()) == (0, 1, 1, 1, 1)
    again = cm(**a, logits_to_keep=1).logits
    assert torch.equal(first, again)
    cm(**b, logits_to_keep=1)
    cm(**c, logits_to_keep=1)
    assert tuple(cm.cache_info()) == (3, 1, 1, 1, 1)  # hits, misses, maxsize, currsize, compiles
    cm(**_cat_inputs(a, b), logits_to_keep=1)  # the batched bucket evicts the one-row graph (maxsize 1)
    cm(**a, logits_to_keep=1)
    assert tuple(cm.cache_info())[:4] == (3, 3, 1, 1)
    cm.cache_clear()
    assert tuple(cm.cache_info()) == (0, 0, 1, 0, 0)


@pytest.mark.parametrize("arch", ["llava", "qwen3_vl"])
def test_mixed_layout_batch_runs_in_one_call(tiny_model, arch):
    """Rows with different visual spans run in one call of one graph, in order."""
    model = tiny_model(arch)
    plan = SkipPlan.from_ops(["skip_attn", "skip_both", "skip_ffn", "full"])
    row0 = tiny_inputs(model, arch, text_before=1, text_after=5, seed=0)
    row1 = tiny_inputs(model, arch, text_before=4, text_after=2, seed=1)
    batch = _cat_inputs(row0, row1)
    cm = vskip_compile.compile(model, plan, backend="eager")
    logits = cm(**batch, logits_to_keep=1).logits
    tokens = cm.generate(**batch, max_new_tokens=3)
    assert cm.cache_info().misses == 1 and cm.cache_info().compiles == 1
    for i, row in enumerate((row0, row1)):
        want_logits, want_tokens = _reference(model, plan, row, max_new_tokens=3)
        torch.testing.assert_close(logits[i, -1], want_logits[0, -1], rtol=0, atol=FP32_ATOL)
        n = want_tokens.shape[1]
        assert torch.equal(tokens[i, :n], want_tokens[0])


def test_no_image_runs_the_unmodified_model(tiny_model):
    model = tiny_model("qwen2_5_vl")
    inputs = tiny_inputs(model, "qwen2_5_vl", n_images=0, text_before=4, text_after=3)
    cm = vskip_compile.compile(model, SkipPlan.from_ops(["skip_both"] * 4), backend="eager")
    with torch.no_grad():
        want = model(**inputs).logits
        want_tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(cm(**inputs).logits, want)
    assert torch.equal(cm.generate(**inputs, max_new_tokens=3), want_tokens)
    assert cm.cache_info().misses == 0


def test_refusals(tiny_model):
    model = tiny_model("llava")
    with pytest.raises(PlanError, match="layers"):
        vskip_compile.compile(model, SkipPlan.full(3), backend="eager")
    other = tiny_model("qwen3_vl")
    stamped = SkipPlan.full(4).with_model("Qwen3VLForConditionalGeneration", adapter_for(other).text_config(other))
    with pytest.raises(PlanError):
        vskip_compile.compile(model, stamped, backend="eager")
    with pytest.raises(CompileError, match="unknown backend"):
        vskip_compile.compile(model, SkipPlan.full(4), backend="onnx")
    cm = vskip_compile.compile(model, SkipPlan.full(4), backend="eager")
    inputs = tiny_inputs(model, "llava")
    with pytest.raises(CompileError, match="num_return_sequences"):
        cm.generate(**inputs, do_sample=True, num_return_sequences=2)
    with pytest.raises(CompileError, match="temperature"):
        cm.generate(**inputs, temperature=0.7)
    original = model.generation_config.repetition_penalty
    model.generation_config.repetition_penalty = 1.3
    try:
        with pytest.raises(CompileError, match="repetition_penalty"):
            cm.generate(**inputs)
    finally:
        model.generation_config.repetition_penalty = original  # the cached model is shared
    padded = dict(inputs, attention_mask=inputs["attention_mask"].clone())
    padded["attention_mask"][0, 0] = 0
    with pytest.raises(CompileError, match="padded"):
        cm(**padded)
    assert cm.cache_info().misses == 0


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_left_padded_batch_generates_each_row_as_alone(tiny_model, arch):
    """Rows of different lengths, left-padded: every row's new tokens equal that row's own
    (unpadded) reference generate; the whole batch runs one prefill graph."""
    model = tiny_model(arch)
    plan = SkipPlan.from_ops(["skip_both", "skip_attn", "skip_ffn", "full"])
    rows = [tiny_inputs(model, arch, text_before=b, text_after=a, seed=i)
            for i, (b, a) in enumerate([(1, 3), (4, 3), (1, 3)])]  # pads 3, 0, 3
    batch = left_padded_batch(rows)
    assert batch["attention_mask"][:, :3].tolist() == [[0] * 3, [1] * 3, [0] * 3]
    cm = vskip_compile.compile(model, plan, backend="eager")
    got = cm.generate(**batch, max_new_tokens=4)
    assert got.shape[1] == batch["input_ids"].shape[1] + 4
    assert torch.equal(got[:, : batch["input_ids"].shape[1]], batch["input_ids"])
    for i, row in enumerate(rows):
        want = _reference(model, plan, row)[1][0, row["input_ids"].shape[1]:]
        assert torch.equal(got[i, batch["input_ids"].shape[1]:], want), f"row {i}"
    assert cm.cache_info().misses == 1 and cm.cache_info().compiles == 1  # one call, whatever the paddings


def test_padding_that_is_not_left_padding_is_refused(tiny_model):
    model = tiny_model("llava")
    cm = vskip_compile.compile(model, SkipPlan.full(4), backend="eager")
    rows = [tiny_inputs(model, "llava", text_before=1, seed=0), tiny_inputs(model, "llava", text_before=3, seed=1)]
    batch = left_padded_batch(rows)
    right = dict(batch, attention_mask=batch["attention_mask"].flip(1))
    with pytest.raises(CompileError, match="batch row 0: attention_mask is not left padding"):
        cm.generate(**right, max_new_tokens=2)
    with pytest.raises(CompileError, match="generate\\(\\) takes left-padded"):
        cm(**batch)  # a forward's logits and cache would have one length per padding
    assert cm.cache_info().misses == 0


def test_graph_cache_bookkeeping_is_thread_safe():
    """vskip serve calls one CompiledVLM from two threads: concurrent lookups, inserts and
    evictions must keep the counters exact and never raise (an unlocked move_to_end after a
    concurrent eviction raises KeyError)."""
    import threading

    from vskip_compile.graph_cache import GraphLRU

    lru = GraphLRU(maxsize=3)
    calls_per_thread, errors = 2000, []

    def hammer(seed: int):
        try:
            for i in range(calls_per_thread):
                key = (seed * 7 + i) % 5
                assert lru.get(key, lambda: object()) is not None
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=hammer, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    info = lru.info()
    assert not errors
    assert info.hits + info.misses == 4 * calls_per_thread
    assert info.currsize <= 3
