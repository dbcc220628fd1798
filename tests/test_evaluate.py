"""Evaluation harness: shared-prefix runner vs independent runs, table schema, zoo smoke check."""

from __future__ import annotations

import csv
import json
import sys

import pytest
import torch

import vskip_compile
from vskip_compile import baselines as bl
from vskip_compile import reference
from vskip_compile.archs import adapter_for
from vskip_compile.evaluate.harness import Batch, Harness
from vskip_compile.evaluate.methods import Method
from vskip_compile.evaluate.report import TABLE_COLUMNS, format_table, write_results
from vskip_compile.evaluate.shared import shared_generate
from vskip_compile.evaluate.sweep import sweep, verify_against_unbatched
from vskip_compile.evaluate.timing import (BASELINE_TIMED_BY, FULL_ON_BASELINES, INPUT_PREP, add_timings,
                                           compiled_timed_by, prefill_runner, time_prefill)
from vskip_compile.testing.tiny import TEXT_TOKENS, build_tiny, tiny_inputs
from vskip_compile.plan import SkipPlan

EOS = 2


@pytest.fixture(scope="module")
def tiny_batch():
    """Two images (prefix: 3 text tokens + 16 visual rows), three questions of 3, 5 and 4 tokens."""
    model = build_tiny("qwen3_vl")
    base = tiny_inputs(model, "qwen3_vl", batch=2, text_before=3, text_after=0, seed=1)
    gen = torch.Generator().manual_seed(5)
    lengths = [3, 5, 4]
    owner = torch.tensor([0, 0, 1])
    suffix = torch.zeros(3, max(lengths), dtype=torch.long)
    for r, n in enumerate(lengths):
        suffix[r, :n] = torch.randint(*TEXT_TOKENS, (n,), generator=gen)
    with torch.no_grad():
        prefix = adapter_for(model).prefill_inputs(model, **base)
    batch = Batch([0, 1, 2], prefix, suffix, torch.tensor(lengths), owner)
    return model, base, batch


def _one_question(base, batch, q):
    """HF inputs of question q's whole prompt, batch 1, with its own image's pixels."""
    j = int(batch.owner[q])
    ids = torch.cat([base["input_ids"][j], batch.suffix[q, : batch.lengths[q]]])[None]
    n_patches = base["pixel_values"].shape[0] // 2
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": (ids == 120).int(),
        "pixel_values": base["pixel_values"][j * n_patches : (j + 1) * n_patches],
        "image_grid_thw": base["image_grid_thw"][j : j + 1],
    }


@pytest.mark.parametrize("plan_ops", [
    ["full"] * 4,
    ["skip_attn", "skip_ffn", "skip_both", "full"],
    ["full", "skip_both", "skip_both", "skip_both"],
])
def test_shared_prefix_runner_equals_reference_generate(tiny_batch, plan_ops):
    model, base, batch = tiny_batch
    plan = SkipPlan.from_ops(plan_ops)
    tokens, seconds = shared_generate(model, batch, plan, 3, EOS)
    assert seconds > 0
    for q in range(3):
        inputs = _one_question(base, batch, q)
        with torch.no_grad(), reference.applied(model, plan):
            ref = model.generate(**inputs, max_new_tokens=3, do_sample=False, eos_token_id=EOS, pad_token_id=0)
        ref = ref[0, inputs["input_ids"].shape[1]:]
        assert tokens[q, : len(ref)].tolist() == ref.tolist(), q


@pytest.mark.parametrize("drop", [bl.TokenDrop(0), bl.TokenDrop(3), bl.TokenDrop(2, 0.5), bl.TokenDrop(1, 0.25)])
def test_shared_prefix_runner_equals_whole_prompt_drop_loop(tiny_batch, drop):
    model, base, batch = tiny_batch
    adapter = adapter_for(model)
    tokens, _ = shared_generate(model, batch, drop, 3, EOS)
    for q in range(3):
        with torch.no_grad():
            p = adapter.prefill_inputs(model, **_one_question(base, batch, q))
        ref = bl.generate(model, p, drop, 3, EOS)[0]
        assert tokens[q, : len(ref)].tolist() == ref.tolist(), q


def test_table_schema(tmp_path):
    rows = [
        {"method": "full", "family": "full", "budget": None, "params": "", "accuracy": 0.9, "accuracy_kept": 1.0,
         "agreement_with_full": 1.0, "flops_cut": 0.0, "prefill_ms_per_question": 1.0, "n": 10},
        {"method": "opskip-b40", "family": "opskip", "budget": 0.4, "params": "p", "accuracy": 0.9,
         "accuracy_kept": 1.0, "agreement_with_full": 1.0, "flops_cut": 0.41, "prefill_ms_per_question": 1.0, "n": 10},
        {"method": "vtw-b40", "family": "vtw", "budget": 0.4, "params": "{}", "accuracy": 0.6,
         "accuracy_kept": 0.66, "agreement_with_full": 0.6, "flops_cut": 0.45, "prefill_ms_per_question": 0.5, "n": 10},
    ]
    paths = write_results(rows, tmp_path, {"command": "vskip eval --limit 10"})
    data = json.loads(paths["json"].read_text())
    assert data["command"] == "vskip eval --limit 10" and data["columns"] == list(TABLE_COLUMNS)
    assert [r["method"] for r in data["rows"]] == ["full", "opskip-b40", "vtw-b40"]
    with paths["csv"].open() as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == list(TABLE_COLUMNS) and len(table) == 3
    assert paths["png"].stat().st_size > 1000
    assert "opskip-b40" in format_table(rows) and "not timed" in format_table(rows)
    rows[1].update(prefill_speedup=1.3, timed_by=compiled_timed_by("eager"))
    paths = write_results(rows, tmp_path, {"command": "vskip eval --limit 10"})
    with paths["csv"].open() as f:
        table = list(csv.DictReader(f))
    assert table[1]["timed_by"] == compiled_timed_by("eager") and table[0]["timed_by"] == ""
    assert "1.300x" in format_table(rows)


# -- prefill timing: each method on its real implementation ------------------------------------------

def test_results_without_matplotlib_keep_json_and_csv(tmp_path, monkeypatch, capsys):
    """No eval extra: the plot is left out with a message naming the package; nothing else is lost."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ModuleNotFoundError
    rows = [{"method": "full", "family": "full", "budget": None, "params": "", "accuracy": 0.9, "accuracy_kept": 1.0,
             "agreement_with_full": 1.0, "flops_cut": 0.0, "prefill_ms_per_question": 1.0, "n": 10}]
    paths = write_results(rows, tmp_path, {"command": "vskip eval"})
    assert set(paths) == {"json", "csv"} and not (tmp_path / "pareto.png").exists()
    assert json.loads(paths["json"].read_text())["rows"] == rows
    assert "matplotlib is not installed" in capsys.readouterr().err

def test_time_prefill_runs_plans_compiled_and_drops_on_the_dropping_loop(tiny_batch):
    model, base, batch = tiny_batch
    inputs = [_one_question(base, batch, q) for q in (0, 2, 0)]  # two distinct prompts (layouts)
    full = Method("full", "full", None, plan=SkipPlan.full(4))
    ops = Method("opskip-x", "opskip", 0.4, plan=SkipPlan.from_ops(["full", "skip_attn", "skip_ffn", "skip_both"]))
    vtw = Method("vtw-x", "vtw", 0.4, drop=bl.TokenDrop(2))
    fastv = Method("fastv-x", "fastv", 0.4, drop=bl.TokenDrop(2, 0.5))
    methods = [full, ops, vtw, fastv]
    repeats = 2
    timings = time_prefill(model, methods, inputs, backend="eager", repeats=repeats, progress=False)
    assert set(timings) == {m.name for m in methods} | {FULL_ON_BASELINES, INPUT_PREP}
    calls = len(inputs) * (1 + repeats)  # warm-up, then the timed rounds
    for m in (full, ops):  # through CompiledVLM: one polymorphic graph for both layouts, every other call a hit
        t = timings[m.name]
        assert t.timed_by == compiled_timed_by("eager")
        assert t.cache_info.misses == 1 and t.cache_info.hits == calls - 1 and t.cache_info.compiles == 1
        assert t.max_abs_diff is not None and t.max_abs_diff <= 1e-3
    for name in ("vtw-x", "fastv-x", FULL_ON_BASELINES):
        assert timings[name].timed_by == BASELINE_TIMED_BY and timings[name].cache_info is None
    assert all(len(t.ms) == len(inputs) and all(ms > 0 for ms in t.ms) for t in timings.values())

    rows = [{"method": m.name, "family": m.family, "prefill_ms_per_question": None} for m in methods]
    meta = add_timings(rows, timings)
    for r in rows:
        t = timings[r["method"]]
        assert r["timed_by"] == t.timed_by and r["prefill_ms_per_question"] == t.median_ms
        assert r["timed_questions"] == len(inputs)
    # speed-up against the full model on the same implementation
    assert rows[0]["prefill_speedup"] == 1.0
    assert rows[1]["prefill_speedup"] == timings["full"].median_ms / timings["opskip-x"].median_ms
    assert rows[2]["prefill_speedup"] == timings[FULL_ON_BASELINES].median_ms / timings["vtw-x"].median_ms
    assert rows[1]["compiled_graphs"] == 1 and "compiled_graphs" not in rows[2]  # one polymorphic graph, two layouts
    assert set(meta["full_model_prefill_ms_by_implementation"]) == {compiled_timed_by("eager"), BASELINE_TIMED_BY}
    assert meta["input_prep_ms"] == timings[INPUT_PREP].median_ms


@pytest.mark.parametrize("drop", [bl.TokenDrop(2), bl.TokenDrop(2, 0.5), bl.TokenDrop(4)])
def test_timed_drop_path_shortens_the_sequence(tiny_batch, drop):
    """The timed baseline removes the rows (later layers see fewer rows), it does not mask them."""
    model, base, batch = tiny_batch
    x = _one_question(base, batch, 1)
    S, V = x["input_ids"].shape[1], 16
    run, timed_by, compiled = prefill_runner(model, Method("d", drop.kind, None, drop=drop))
    assert compiled is None and timed_by == BASELINE_TIMED_BY
    seen = {}
    layers = adapter_for(model).layers(model)
    handles = [layer.register_forward_pre_hook(lambda m, a, kw, i=i: seen.__setitem__(i, a[0].shape[1] if a else
                                               kw["hidden_states"].shape[1]), with_kwargs=True)
               for i, layer in enumerate(layers)]
    try:
        logits = run(x)
    finally:
        for handle in handles:
            handle.remove()
    assert logits.shape == (1, model.config.text_config.vocab_size)
    expect = [S if i < drop.layer else S - V + drop.keep(V) for i in range(len(layers))]
    assert [seen[i] for i in range(len(layers))] == expect


def test_time_prefill_refuses_an_unknown_backend(tiny_batch):
    model, _, _ = tiny_batch
    with pytest.raises(ValueError, match="backend"):
        time_prefill(model, [Method("full", "full", None, plan=SkipPlan.full(4))], [{}], backend="tensorrt")


def test_methods_need_the_full_model_first():
    with pytest.raises(ValueError, match="full model"):
        sweep(None, [Method("vtw-b40", "vtw", 0.4, drop=bl.TokenDrop(2))])


# -- the zoo model, when its weights are there ------------------------------------------------------
def _zoo():
    from vskip_compile.zoo import easyvqa

    if not (easyvqa.MODEL_DIR / "model.safetensors").exists():
        pytest.skip("easy-VQA weights not present")
    return easyvqa


def test_zoo_harness_agrees_with_one_question_at_a_time():
    easyvqa = _zoo()
    model, processor = vskip_compile.load(easyvqa.MODEL_DIR)
    h = Harness(model, processor, easyvqa.test_set()[:40])
    L = model.config.text_config.num_hidden_layers
    methods = [
        Method("full", "full", None, plan=SkipPlan.full(L)),
        Method("ops", "opskip", None, plan=SkipPlan.from_ops(["full", "skip_attn"] + ["skip_both"] * (L - 2))),
        Method("vtw", "vtw", None, drop=bl.TokenDrop(L // 2)),
        Method("fastv", "fastv", None, drop=bl.TokenDrop(2, 0.5)),
    ]
    assert verify_against_unbatched(h, methods, list(range(0, 40, 5))) == {m.name: 0 for m in methods}
    rows = sweep(h, methods, progress=False)
    assert rows[0]["accuracy"] > 0.8 and rows[0]["flops_cut"] == 0.0


def test_cli_refuses_a_missing_model(tmp_path, capsys):
    from vskip_compile.cli import main

    assert main(["eval", "--model-dir", str(tmp_path)]) == 2
    assert "no model" in capsys.readouterr().err
    timing = ["--time-samples", "4", "--time-backend", "inductor", "--time-repeats", "1"]
    assert main(["eval", "--model-dir", str(tmp_path), *timing]) == 2
    with pytest.raises(SystemExit):
        main(["eval", "--time-backend", "tensorrt"])
    assert main(["calibrate", "--model-dir", str(tmp_path), "--budget", "0.4"]) == 2
    with pytest.raises(SystemExit):
        main(["calibrate", "--budget", "1.5"])
