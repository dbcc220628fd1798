"""Evaluation harness: shared-prefix runner vs independent runs, table schema, zoo smoke check."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from vskip_compile import baselines as bl
from vskip_compile import evaluate as ev
from vskip_compile import reference
from vskip_compile.archs import adapter_for
from vskip_compile.archs.tiny import TEXT_TOKENS, build_tiny, tiny_inputs
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
    batch = ev.Batch([0, 1, 2], prefix, suffix, torch.tensor(lengths), owner)
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
    tokens, seconds = ev.shared_generate(model, batch, plan, 3, EOS)
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
    tokens, _ = ev.shared_generate(model, batch, drop, 3, EOS)
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
    paths = ev.write_results(rows, tmp_path, {"command": "vskip eval --limit 10"})
    data = json.loads(paths["json"].read_text())
    assert data["command"] == "vskip eval --limit 10" and data["columns"] == list(ev.TABLE_COLUMNS)
    assert [r["method"] for r in data["rows"]] == ["full", "opskip-b40", "vtw-b40"]
    with paths["csv"].open() as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == list(ev.TABLE_COLUMNS) and len(table) == 3
    assert paths["png"].stat().st_size > 1000
    assert "opskip-b40" in ev.format_table(rows)


def test_methods_need_the_full_model_first():
    with pytest.raises(ValueError, match="full model"):
        ev.sweep(None, [ev.Method("vtw-b40", "vtw", 0.4, drop=bl.TokenDrop(2))])


# -- the zoo model, when its weights are there ------------------------------------------------------
def _zoo():
    from vskip_compile.zoo import easyvqa

    if not (easyvqa.MODEL_DIR / "model.safetensors").exists():
        pytest.skip("easy-VQA weights not present")
    return easyvqa


def test_zoo_harness_agrees_with_one_question_at_a_time():
    easyvqa = _zoo()
    model, processor = ev.load_model(easyvqa.MODEL_DIR)
    h = ev.Harness(model, processor, easyvqa.test_set()[:40])
    L = model.config.text_config.num_hidden_layers
    methods = [
        ev.Method("full", "full", None, plan=SkipPlan.full(L)),
        ev.Method("ops", "opskip", None, plan=SkipPlan.from_ops(["full", "skip_attn"] + ["skip_both"] * (L - 2))),
        ev.Method("vtw", "vtw", None, drop=bl.TokenDrop(L // 2)),
        ev.Method("fastv", "fastv", None, drop=bl.TokenDrop(2, 0.5)),
    ]
    assert ev.verify_against_unbatched(h, methods, list(range(0, 40, 5))) == {m.name: 0 for m in methods}
    rows = ev.sweep(h, methods, progress=False)
    assert rows[0]["accuracy"] > 0.8 and rows[0]["flops_cut"] == 0.0


def test_cli_refuses_a_missing_model(tmp_path, capsys):
    from vskip_compile.cli import main

    assert main(["eval", "--model-dir", str(tmp_path)]) == 2
    assert "no model" in capsys.readouterr().err
    assert main(["calibrate", "--model-dir", str(tmp_path), "--budget", "0.4"]) == 2
    with pytest.raises(SystemExit):
        main(["calibrate", "--budget", "1.5"])
