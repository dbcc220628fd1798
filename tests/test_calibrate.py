"""Calibration: exact ablation, first-order estimate, budgeted selection, repair (tiny models)."""

from __future__ import annotations

import pytest
import torch

from vskip_compile import calibrate as cal
from vskip_compile.archs import adapter_for
from vskip_compile.testing.tiny import build_tiny, tiny_inputs
from vskip_compile.flops import TextDims, model_flops, plan_report
from vskip_compile.plan import SkipPlan


@pytest.fixture(scope="module")
def tiny():
    model = build_tiny("qwen3_vl")
    batches = [tiny_inputs(model, "qwen3_vl", batch=4, seed=s) for s in range(3)]
    calib = cal.CalibSet.build(model, batches)
    scores = cal.score_candidates(model, calib)
    return model, calib, scores


def test_calib_set_targets_are_the_models_greedy_answers(tiny):
    model, calib, _ = tiny
    b = calib.batches[0]
    assert calib.size == 12 and b.targets.shape == (4, 2)
    with torch.no_grad():
        lp = cal.answer_logprobs(model, b)
    assert torch.equal(cal.greedy(lp, calib.visual_ids), b.targets)
    assert cal.agreement(model, calib, SkipPlan.full(4)) == 1.0


def test_noop_candidate_scores_zero(tiny):
    """The last layer's visual-row updates reach no text row: removing them changes nothing."""
    _, _, scores = tiny
    for op in ("attn", "ffn"):
        assert scores.exact[(3, op)] == 0.0
        assert scores.kl[(3, op)] == 0.0
        assert scores.agree[(3, op)] == 1.0
        assert scores.first_order[(3, op)] == 0.0
    assert all(scores.exact[(i, "attn")] > 0 for i in range(3))


def test_first_order_estimate_ranks_like_exact_ablation(tiny):
    _, _, scores = tiny
    assert scores.spearman() > 0.5


def test_spearman():
    assert cal.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert cal.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert cal.spearman([1, 1, 2], [5, 5, 9]) == pytest.approx(1.0)


@pytest.mark.parametrize("budget", [0.1, 0.25, 0.4, 0.55])
def test_budget_selection_respects_the_budget_exactly(tiny, budget):
    model, calib, scores = tiny
    dims = TextDims.from_hf_config(model.config)
    S, V = calib.seq_len, calib.num_visual
    full = int(model_flops(dims, None, S, V))
    cands = cal.candidates(scores.exact, dims, S, V)
    sel = cal.select(cands, full, budget=budget, measure=None)
    plan = cal._plan(4, [c.key for c in sel.chosen])
    report = plan_report(dims, plan, S, V)
    assert report["saved"] == sum(c.saving for c in sel.chosen)
    assert report["reduction"] == pytest.approx(sel.cut)
    assert report["reduction"] >= budget
    # greedy and minimal: the last candidate added was needed
    assert (report["saved"] - sel.chosen[-1].saving) / full < budget


def _toy(n: int = 8) -> list[cal.Candidate]:
    return [cal.Candidate(layer=i, op="ffn", score=0.1 * i, saving=100) for i in range(n)]


def test_repair_loop_terminates_and_meets_the_tolerance_on_a_toy():
    cands = _toy()
    bad = {(1, "ffn"), (2, "ffn")}  # harmless alone, harmful together (not additive)
    calls = []

    def measure(chosen):
        calls.append([c.key for c in chosen])
        return 0.5 if bad <= {c.key for c in chosen} else 1.0

    sel = cal.select(cands, full_flops=1000, budget=0.3, fidelity=0.99, measure=measure)
    assert sel.fidelity_met and sel.budget_met and sel.fidelity == 1.0
    assert sel.cut >= 0.3 and not bad <= {c.key for c in sel.chosen}
    assert len(calls) == 2 and len(sel.history) == 2
    assert [c.key for c in sel.chosen] == [(0, "ffn"), (1, "ffn"), (3, "ffn")]  # (2, ffn) swapped out


def test_repair_loop_reports_an_impossible_tolerance():
    sel = cal.select(_toy(), full_flops=1000, budget=0.3, fidelity=0.99, measure=lambda chosen: 0.5)
    assert not sel.fidelity_met and sel.cut >= 0.3
    assert len(sel.history) <= 6  # one round per banned candidate, then the budget cannot be met


def test_fidelity_only_selection_keeps_what_holds():
    cands = _toy(4)
    sel = cal.select(cands, full_flops=1000, budget=None, fidelity=0.99,
                     measure=lambda chosen: 0.0 if (2, "ffn") in {c.key for c in chosen} else 1.0)
    assert [c.key for c in sel.chosen] == [(0, "ffn"), (1, "ffn"), (3, "ffn")]


def test_calibrate_writes_stamped_plans_with_provenance(tiny, tmp_path):
    model, calib, scores = tiny
    plans = cal.calibrate(model, calib, [0.2, 0.4], scores=scores, fidelity=0.5)
    adapter = adapter_for(model)
    dims = TextDims.from_hf_config(model.config)
    for plan, budget in zip(plans, [0.2, 0.4]):
        adapter.check_plan(model, plan)
        assert plan.name == f"opskip-b{round(100 * budget)}"
        assert plan.model["architecture"] == "Qwen3VLForConditionalGeneration"
        pv = plan.provenance
        assert pv["split"] == "train" and pv["samples"] == 12 and pv["budget"] == budget
        assert pv["fidelity"] == cal.agreement(model, calib, plan)
        assert plan_report(dims, plan, calib.seq_len, calib.num_visual)["reduction"] == pytest.approx(pv["flops_cut"])
        assert pv["flops_cut"] >= budget
        assert len(pv["scores"]) == 8 and pv["spearman_exact_vs_first_order"] > 0.5
        path = tmp_path / f"{plan.name}.json"
        plan.save(path)
        assert SkipPlan.load(path) == plan


def test_layer_granularity_gives_whole_layer_freezes(tiny):
    model, calib, _ = tiny
    scores = cal.score_candidates(model, calib, "layer")
    assert set(scores.exact) == {(i, "both") for i in range(4)} and not scores.first_order
    (plan,) = cal.calibrate(model, calib, [0.3], granularity="layer", scores=scores, fidelity=0.5)
    assert set(plan.ops) <= {"full", "skip_both"} and plan.name == "shortv-b30"


def test_ablations_in_worker_processes_match(tiny):
    model, calib, scores = tiny
    forked = cal.exact_scores(model, calib, workers=2)
    assert forked.exact == scores.exact and forked.agree == scores.agree
