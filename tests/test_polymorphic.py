"""Layout-polymorphic prefill: one graph per batch bucket serves every layout, mixed batches.

Random plans x random layouts (prompt lengths, 0-3 images, image at the start, middle or end)
x batches of 1-4 rows of different layouts, left-padded into ONE prefill call and one batched
decode, on the 4 tiny architectures and the MoE one, against the eager reference
(`reference.applied` + HF on each row alone).

Tolerance, fp32: last-row logits within 1e-5. The compiled graph runs a skipped operator's
GEMMs on the gathered kept rows of the whole batch (other GEMM shapes than the reference's
full-size ones, so other K-sum blockings) and the attention over a padded key range whose
masked keys add exact zeros; differences seen are <= 3e-7 on logits of magnitude <= 1, and
any plan moves logits by >= 3e-2 on these models. Greedy tokens must be identical.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vskip_compile
from vskip_compile import OPS, SkipPlan, reference
from vskip_compile.archs import adapter_for
from vskip_compile.testing.tiny import ALL_TINY_ARCHS, tiny_inputs
from vskip_compile.kept_rows import kept_inputs
from vskip_compile.layout import VisualLayout

FP32_ATOL = 1e-5
NEW_TOKENS = 3
_COMPILED: dict = {}  # (arch, plan) -> CompiledVLM, reused across examples (its graphs are the point)


def _compiled(model, arch: str, plan: SkipPlan, backend: str = "eager"):
    key = (arch, plan, backend)
    if key not in _COMPILED:
        _COMPILED[key] = vskip_compile.compile(model, plan, backend=backend)
    return _COMPILED[key]


def left_pad(rows: list[dict]) -> dict:
    """Single-row input dicts of different lengths and image counts as one left-padded batch
    (pad id 0); image tensors of the rows that have images concatenated in row order."""
    width = max(r["input_ids"].shape[1] for r in rows)
    seq_keys = ("input_ids", "attention_mask", "mm_token_type_ids")  # [1, S] each
    keys = dict.fromkeys(k for r in rows for k in r)
    out = {}
    for k in keys:
        parts = [r[k] for r in rows if k in r]
        if k in seq_keys:
            parts = [torch.cat([t.new_zeros(1, width - t.shape[1]), t], dim=1) for t in parts]  # [1, width]
        out[k] = torch.cat(parts)
    return out


def _reference_row(model, plan: SkipPlan, row: dict):
    with torch.no_grad(), reference.applied(model, plan):
        logits = model(**row).logits[:, -1]  # [1, V]
        tokens = model.generate(**row, max_new_tokens=NEW_TOKENS, do_sample=False)[0, row["input_ids"].shape[1]:]
    return logits, tokens


row_layouts = st.tuples(
    st.integers(0, 6),  # text before the first image
    st.integers(0, 5),  # text after the last image (0: the image ends the prompt)
    st.integers(0, 3),  # images
)


def _row(model, arch: str, layout: tuple[int, int, int], seed: int) -> dict:
    before, after, images = layout
    if images == 0:
        after = max(after, 1)  # a text-only row needs text
    return tiny_inputs(model, arch, text_before=before, text_after=after, n_images=images, seed=seed)


@pytest.mark.parametrize("arch", ALL_TINY_ARCHS)
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.sampled_from(OPS), min_size=4, max_size=4), layouts=st.lists(row_layouts, min_size=1, max_size=4),
       seed=st.integers(0, 1000))
def test_mixed_batches_equal_each_row_alone(tiny_model, arch, ops, layouts, seed):
    model = tiny_model(arch)
    plan = SkipPlan.from_ops(ops)
    rows = [_row(model, arch, lay, seed + i) for i, lay in enumerate(layouts)]
    image = adapter_for(model).image_token_id(model)
    if not any(bool((r["input_ids"] == image).any()) for r in rows):
        rows[0] = _row(model, arch, (2, 2, 1), seed)  # an all-text batch runs the unmodified model: not this test's subject
    batch = left_pad(rows) if len(rows) > 1 else rows[0]
    cm = _compiled(model, arch, plan)
    before = cm.cache_info()
    got = cm.generate(**batch, max_new_tokens=NEW_TOKENS)
    assert cm.cache_info().misses - before.misses <= 1  # at most this batch bucket's first graph
    width = batch["input_ids"].shape[1]
    logits = cm(**rows[0], logits_to_keep=1).logits[:, -1] if len(rows) == 1 else None
    for i, row in enumerate(rows):
        want_logits, want_tokens = _reference_row(model, plan, row)
        new = got[i, width:width + len(want_tokens)]
        assert torch.equal(new, want_tokens), f"row {i} of {len(rows)}: {new.tolist()} != {want_tokens.tolist()}"
        if logits is not None:
            torch.testing.assert_close(logits, want_logits, rtol=0, atol=FP32_ATOL)
    assert cm.cache_info().currsize <= 2  # one graph per batch bucket (1 row, several rows)


@pytest.mark.parametrize("arch", ["llava", "qwen3_vl"])
def test_batched_logits_equal_each_row_alone(tiny_model, arch):
    """Prefill logits of a mixed left-padded batch, row by row, against each row alone."""
    model = tiny_model(arch)
    plan = SkipPlan.from_ops(["skip_both", "skip_attn", "skip_ffn", "full"])
    rows = [_row(model, arch, lay, i) for i, lay in enumerate([(0, 3, 1), (4, 0, 1), (2, 2, 2), (3, 1, 0)])]
    cm = _compiled(model, arch, plan)
    p = cm._prefill_inputs(left_pad(rows), left_padded=True)
    with torch.no_grad():
        logits, kv = cm._prefill(p, logits_to_keep=1)
    assert cm.cache_info().compiles <= 2
    for i, row in enumerate(rows):
        want, _ = _reference_row(model, plan, row)
        torch.testing.assert_close(logits[i, -1:], want, rtol=0, atol=FP32_ATOL)
        seq = row["input_ids"].shape[1]
        with torch.no_grad(), reference.applied(model, plan):
            ref = model(**row, use_cache=True)
        k_ref = ref.past_key_values.layers[1].keys  # [1, KV, S, E], after layer 1 (skip_attn): K of every row
        torch.testing.assert_close(kv[1][0][i:i + 1, :, -seq:], k_ref, rtol=0, atol=FP32_ATOL)


def test_kept_inputs_pad_with_frozen_rows():
    layout = VisualLayout(8, (((2, 6),), (), ((0, 8),)))
    index, valid = kept_inputs(layout, "visual", pads=[1, 0, 0])
    assert index.shape == valid.shape == (3, 8)
    assert index[0].tolist() == [1, 6, 7, 0, 0, 0, 0, 0] and valid[0].tolist() == [True] * 3 + [False] * 5  # row 0: padding
    assert index[1].tolist() == list(range(8)) and bool(valid[1].all())
    assert not bool(valid[2].any())  # nothing kept: every entry points at a frozen row, results dropped
    prefix, _ = kept_inputs(VisualLayout(6, (((1, 3),),)), "prefix_through_visual")
    assert prefix.tolist() == [[3, 4, 5]]


def test_stream_of_layouts_compiles_one_graph_per_batch_bucket(tiny_model):
    """>= 30 distinct layouts (lengths, image counts and positions, batch sizes 1-3) through one
    CompiledVLM with the inductor backend: prefill graphs compiled <= batch buckets used (2)."""
    arch = "qwen3_vl"
    model = tiny_model(arch)
    plan = SkipPlan.from_ops(["skip_attn", "skip_both", "full", "skip_ffn"])
    cm = vskip_compile.compile(model, plan, backend="inductor")
    seen = set()
    buckets = set()
    n = 0
    for before in range(0, 5):
        for after in (0, 2, 5):
            for images in (1, 2):
                rows = [_row(model, arch, (before, after, images), n)]
                if n % 4 == 3:  # a mixed batch now and then
                    rows.append(_row(model, arch, ((before + 2) % 5, 1, 3 - images), n + 1))
                batch = left_pad(rows) if len(rows) > 1 else rows[0]
                seen.add(tuple(map(tuple, batch["input_ids"].tolist())))
                buckets.add(len(rows) > 1)
                cm.generate(**batch, max_new_tokens=1)  # prefill only: decode graphs are not the subject
                n += 1
    assert len(seen) >= 30
    info = cm.cache_info()
    assert info.compiles <= len(buckets), info
    assert info.currsize == len(buckets)


def test_a_recompile_is_counted_and_warned_about_naming_the_guard():
    """The counting backend CompiledVLM compiles through: a second graph for one entry adds to
    cache_info().compiles and warns with the guard that failed."""
    from vskip_compile.graph_cache import CountedBackend, GraphLRU, RecompileWarning

    def f(x):
        return x * 2

    cache = GraphLRU(2)
    compiled = torch.compile(f, backend=CountedBackend("eager", cache, "test graph", f.__code__), dynamic=False,
                             recompile_limit=4)
    compiled(torch.ones(3))
    assert cache.info().compiles == 1
    with pytest.warns(RecompileWarning, match="test graph recompiled .*guard failed: .*size"):
        compiled(torch.ones(5))
    assert cache.info().compiles == 2
