"""Property tests of the skip passes: row geometry, view axis tracking, random plans x layouts.

The stacks, the oracle and the tolerance are those of test_passes.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_passes import ATOL, RTOL, B, S, aot_cached, exported, oracle, stack_for

from vskip_compile import OPS, SkipPlan, VisualLayout
from vskip_compile.plan import SCOPES
from vskip_compile.passes import PassContext, run_passes
from vskip_compile.passes.rows import Geometry, Rows
from vskip_compile.passes.rules import NotRowwise, _view_axis


@st.composite
def spans(draw, seq_len: int, max_spans: int = 3):
    """Sorted disjoint non-empty [a, b) spans inside 0..seq_len."""
    cuts = sorted(draw(st.sets(st.integers(0, seq_len), min_size=0, max_size=2 * max_spans)))
    pairs = [(cuts[i], cuts[i + 1]) for i in range(0, len(cuts) - 1, 2)]
    return [(a, b) for a, b in pairs if a < b]


@st.composite
def geometries(draw):
    seq_len = draw(st.integers(1, 24))
    lay = VisualLayout.single(seq_len, draw(spans(seq_len)))
    scope = draw(st.sampled_from(SCOPES))
    return Geometry(seq_len, lay.kept_spans(scope), lay.frozen_spans(scope))


@settings(max_examples=200, deadline=None)
@given(geo=geometries(), outer=st.integers(1, 3), inner=st.integers(1, 3))
def test_kept_pieces_and_merge_rebuild_the_axis(geo, outer, inner):
    """Kept pieces hold exactly the kept rows in order; merging kept + frozen gives the axis back."""
    n = outer * geo.seq_len * inner
    flat = torch.arange(n)  # flat position = (o*S + s)*inner + i
    rows = Rows(0, inner)
    kept = torch.cat([flat[a:b] for a, b in geo.kept_pieces(n, rows, "t")] or [flat[:0]])
    seq_index = (kept // inner) % geo.seq_len
    want = [s for o in range(outer) for a, b in geo.kept for s in range(a, b) for _ in range(inner)]
    assert seq_index.tolist() == want
    assert len(kept) == geo.scaled(n)
    merged = torch.cat([(kept if src == "kept" else flat)[a:b] for src, a, b in geo.merge_pieces(n, rows, "t")])
    assert torch.equal(merged, flat)


@st.composite
def views(draw):
    """A [B, S, D] tensor (D = H*E) and a reshape of it that keeps or splits the sequence."""
    b, s, h, e = (draw(st.integers(1, 4)) for _ in range(4))
    s = max(s, 2)
    dst = draw(
        st.sampled_from(
            [
                (b * s, h * e),  # mm input
                (b, s, h, e),  # heads
                (b, s * h, e),  # sequence merged with heads: inner = h
                (b * s * h, e),
                (b * s * h * e,),
                (b, s // 2, 2 * h * e) if s % 2 == 0 else (b, s, h * e),  # splits the sequence
            ]
        )
    )
    return (b, s, h * e), dst, s


@settings(max_examples=100, deadline=None)
@given(case=views())
def test_view_axis_follows_the_sequence_structurally(case):
    src, dst, seq_len = case
    seq = torch.arange(seq_len).view(1, seq_len, 1).expand(src).contiguous()  # value = sequence index
    try:
        rows = _view_axis(src, dst, Rows(1), seq_len)
    except NotRowwise:
        assert dst[1:2] == (seq_len // 2,) and len(dst) == 3 and seq_len > 2 and seq_len % 2 == 0
        return
    viewed = seq.view(dst)
    idx = torch.arange(dst[rows.axis])
    shape = [1] * len(dst)
    shape[rows.axis] = dst[rows.axis]
    expect = ((idx // rows.inner) % seq_len).view(shape).expand(dst)
    assert torch.equal(viewed, expect)
    assert dst[rows.axis] % (seq_len * rows.inner) == 0 and math.prod(dst) == math.prod(src)


@st.composite
def plans_and_layouts(draw, num_layers: int = 2):
    ops = tuple(draw(st.lists(st.sampled_from(OPS), min_size=num_layers, max_size=num_layers)))
    scope = draw(st.sampled_from(SCOPES))
    return SkipPlan(ops, scope=scope), VisualLayout.single(S, draw(spans(S)), B)


_SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check(out, ref) -> None:
    for o, r in zip(out, ref, strict=True):
        torch.testing.assert_close(o, r, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
@_SETTINGS
@given(case=plans_and_layouts())
def test_random_plans_and_layouts_on_export_graphs(kind, case):
    plan, layout = case
    gm, inputs = exported(kind)
    res = run_passes(gm, PassContext(plan, layout))
    frozen = bool(layout.frozen_spans(plan.scope))
    want_attn = sum(plan.skips_attn(i) for i in range(2)) if frozen else 0
    want_ffn = sum(plan.skips_ffn(i) for i in range(2)) if frozen else 0
    assert (res.counters["attn_rewritten"], res.counters["ffn_rewritten"]) == (want_attn, want_ffn)
    assert res.modified == bool(want_attn + want_ffn)
    with torch.no_grad():
        _check(res.gm(*inputs), oracle(stack_for(kind), inputs, plan, layout))


@_SETTINGS
@given(case=plans_and_layouts())
# Drawn once in CI-like runs: no text row, layer 1's attention dropped between two skipped FFNs.
@example(case=(SkipPlan(("skip_ffn", "skip_both")), VisualLayout.single(S, [(0, S)], B)))
def test_random_plans_and_layouts_on_aot_graphs(case):
    plan, layout = case
    gm, args, inputs = aot_cached("qwen2")
    res = run_passes(gm, PassContext(plan, layout))
    with torch.no_grad():
        _check(res.gm(*args), oracle(stack_for("qwen2"), inputs, plan, layout))
