"""The benchmark's eager variants compute the plan: checked against the oracle's semantics."""

import pytest
import torch

from vskip_compile.bench import MODELS, GatherPrefill, ReferencePrefill, _position_ids, build_text_model
from vskip_compile.core import DecoderCore
from vskip_compile.layout import VisualLayout
from vskip_compile.plan import SkipPlan


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-llama"])
@pytest.mark.parametrize("ops", [("skip_attn", "skip_both"), ("skip_ffn", "full"), ("full", "full")])
def test_gather_matches_reference(name, ops):
    spec = MODELS[name]
    torch.manual_seed(0)
    lm, head = build_text_model(spec, layers=2)
    plan = SkipPlan.from_ops(ops)
    layout = VisualLayout.single(20, [(3, 15)])
    x = torch.randn(1, 20, spec.hidden)
    pos = _position_ids(spec, 20)
    with torch.inference_mode():
        ref = ReferencePrefill(DecoderCore(lm, head, logits_to_keep=1), plan, layout)(x, pos)[0]
        gather = GatherPrefill(lm, head, plan, layout)(x, pos)
    # fp32, same math on fewer rows: GEMM shapes differ, so sums are reordered (~1e-6 relative).
    torch.testing.assert_close(gather, ref, rtol=1e-5, atol=1e-5)
    if plan.is_full:
        return
    with torch.inference_mode():
        full = DecoderCore(lm, head, logits_to_keep=1)(x, pos)[0]
    # Same kernels on the same rows: any difference at all is the plan acting.
    assert not torch.equal(full, ref), "the plan should change the last row's logits"


@pytest.mark.slow
def test_bench_case_runs_every_variant_and_reports_consistent_figures():
    """One round at tiny width through the real benchmark (inductor full, static-layout skip and
    polymorphic skip): the skip variants agree with the oracle, and the reported ratios follow
    from the medians."""
    from vskip_compile.bench import bench_case

    r = bench_case(MODELS["tiny-qwen3"], layers=2, visual=16, text=8, repeats=2, ops=("skip_attn", "skip_both"),
                   log=lambda _: None)
    m = r["median_ms"]
    assert set(m) == {"compiled full", "compiled skip", "compiled poly", "eager reference", "eager gather"}
    # fp32, same math on fewer rows (see test_gather_matches_reference): a few ulps.
    assert r["max_abs_diff_last_logits"] < 1e-5
    assert r["speedup"] > 0 and all(t > 0 for t in m.values())  # (ms are rounded: sub-ms medians lose digits)
    assert r["realized"] == pytest.approx(r["speedup"] / r["ideal_speedup"])
    assert r["realized_poly"] == pytest.approx(m["compiled full"] / m["compiled poly"] / r["ideal_speedup"], rel=0.02)
    assert r["poly_vs_static"] == pytest.approx(r["realized_poly"] / r["realized"])
    b = r["min_ms"]  # best-of-rounds: never above the median
    assert all(b[n] <= m[n] for n in m)
    assert r["poly_vs_static_min"] == pytest.approx(r["realized_poly_min"] / r["realized_min"])
    assert 0 < r["flops_reduction"] < 1 and r["ideal_speedup"] == pytest.approx(1 / (1 - r["flops_reduction"]))
    assert len(r["skip_vs_gather_rounds"]) == 2 and 0 <= r["skip_faster_rounds"] <= 2
