"""Sampling in `CompiledVLM.generate` (the one decode loop), against HF generate itself.

A tiny random Qwen3-VL under a mixed plan, eager backend. HF's reference is `model.generate`
under `reference.applied(model, plan)` with torch's global RNG seeded; ours is a
torch.Generator per row seeded the same: the same processors and warpers (transformers' own),
in HF's order, draw the same tokens. In a left-padded batch of mixed layouts, each row with its
own seed and options draws what it draws alone. Greedy stays the argmax path.
"""

from __future__ import annotations

import pytest
import torch

import vskip_compile
from vskip_compile import SkipPlan, reference
from vskip_compile.testing.tiny import left_padded_batch, tiny_inputs
from vskip_compile.runtime import CompileError
from vskip_compile.sampling import ROW_OPTIONS, check_option

ARCH = "qwen3_vl"
PLAN = SkipPlan.from_ops(["skip_attn", "skip_both", "full", "skip_ffn"])
NEW = 6
SAMPLED = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.2)


@pytest.fixture(scope="module")
def setup(tiny_model):
    model = tiny_model(ARCH)
    cm = vskip_compile.compile(model, PLAN, backend="eager")
    rows = [tiny_inputs(model, ARCH, text_before=2, text_after=3, n_images=1, seed=1),
            tiny_inputs(model, ARCH, text_before=0, text_after=5, n_images=1, seed=2)]
    return model, cm, rows


def _new(out: torch.Tensor, inputs: dict) -> list[list[int]]:
    return out[:, inputs["input_ids"].shape[1]:].tolist()


def _hf(model, row: dict, seed: int, **options) -> list[int]:
    with torch.no_grad(), reference.applied(model, PLAN):
        torch.manual_seed(seed)
        return _new(model.generate(**row, max_new_tokens=NEW, **options), row)[0]


def test_sampled_rows_equal_hf_generate_alone_and_in_a_mixed_batch(setup):
    model, cm, rows = setup
    want = [_hf(model, row, 7 + i, **SAMPLED) for i, row in enumerate(rows)]
    for i, row in enumerate(rows):
        assert _new(cm.generate(**row, max_new_tokens=NEW, seed=7 + i, **SAMPLED), row)[0] == want[i]
    batch = left_padded_batch(rows)
    got = _new(cm.generate(**batch, max_new_tokens=NEW, row_options=[{"seed": 7}, {"seed": 8}], **SAMPLED), batch)
    assert got == want
    other = _new(cm.generate(**batch, max_new_tokens=NEW, row_options=[{"seed": 9}, {"seed": 10}], **SAMPLED), batch)
    assert other != got  # other seeds, other draws


def test_per_row_options_in_one_batch(setup):
    """Row 0 sampled (min_p, its seed), row 1 greedy with a repetition penalty and a budget
    of 3 tokens: each equals HF generate of that row alone with those options."""
    model, cm, rows = setup
    batch = left_padded_batch(rows)
    options = [{"do_sample": True, "temperature": 1.3, "min_p": 0.05, "seed": 3},
               {"repetition_penalty": 1.5, "max_new_tokens": 3}]
    got = _new(cm.generate(**batch, max_new_tokens=NEW, row_options=options, pad_token_id=0), batch)
    assert got[0] == _hf(model, rows[0], 3, do_sample=True, temperature=1.3, min_p=0.05)
    greedy = _hf(model, rows[1], 0, do_sample=False, repetition_penalty=1.5)
    assert got[1][:3] == greedy[:3] and got[1][3:] == [0] * (NEW - 3)  # finished rows are padded


def test_greedy_stays_the_argmax_path(setup):
    """No option: plain argmax. A row budget alone (the server always sets one) takes the
    per-row stopping path but the same argmax, so the same tokens."""
    model, cm, rows = setup
    batch = left_padded_batch(rows)
    plain = cm.generate(**batch, max_new_tokens=NEW)
    with torch.no_grad(), reference.applied(model, PLAN):
        for i, row in enumerate(rows):
            hf = _new(model.generate(**row, max_new_tokens=NEW, do_sample=False), row)[0]
            assert _new(plain, batch)[i][: len(hf)] == hf
    budgets = cm.generate(**batch, max_new_tokens=NEW, row_options=[{"max_new_tokens": NEW}, {"max_new_tokens": NEW}])
    assert torch.equal(budgets, plain)


def test_streamer_gets_the_prompt_then_each_step(setup):
    """HF's streamer protocol (put(prompt), put(tokens [B]) per step, end()), plus
    finished(mask) after each step."""
    _, cm, rows = setup
    batch = left_padded_batch(rows)

    class Recorder:
        def __init__(self):
            self.puts, self.finished_masks, self.ended = [], [], False

        def put(self, value):
            self.puts.append(value.clone())

        def end(self):
            self.ended = True

        def finished(self, mask):
            self.finished_masks.append(mask.tolist())

    rec = Recorder()
    out = cm.generate(**batch, max_new_tokens=4, streamer=rec, row_options=[{"max_new_tokens": 2}, {}])
    assert torch.equal(rec.puts[0], batch["input_ids"]) and rec.ended
    steps = torch.stack(rec.puts[1:], dim=1)
    assert torch.equal(steps, out[:, batch["input_ids"].shape[1]:])
    assert rec.finished_masks[1][0] and not rec.finished_masks[0][0]  # row 0 finishes after its 2nd token


@pytest.mark.parametrize("options, culprit", [
    (dict(do_sample=True, temperature=0.0), "temperature must be a number > 0"),
    (dict(do_sample=True, top_k=-1), "top_k must be an integer >= 0"),
    (dict(do_sample=True, min_p=2.0), "min_p must be a number in [0, 1]"),
    (dict(do_sample=True, seed=-3), "seed must be an integer"),
    (dict(repetition_penalty=0), "repetition_penalty must be a number > 0"),
    (dict(stop_strings=["x"]), "stop_strings needs tokenizer="),
    (dict(row_options=[{}]), "row_options has 1 entries for a batch of 2 rows"),
    (dict(row_options=[{"beams": 2}, {}]), "row_options[0]: unknown option(s) beams"),
    (dict(row_options=[{"max_new_tokens": 9}, {}]), "max_new_tokens=9, more than the call's 6"),
])
def test_bad_sampling_options_are_refused_naming_them(setup, options, culprit):
    _, cm, rows = setup
    batch = left_padded_batch(rows)
    with pytest.raises(CompileError) as e:
        cm.generate(**batch, max_new_tokens=NEW, **options)
    assert culprit in str(e.value)


def test_check_option_accepts_the_unset_and_valid_values():
    for name in ROW_OPTIONS:
        check_option(name, None)
    for name, value in (("temperature", 0.1), ("top_p", 1), ("top_k", 0), ("min_p", 0.0), ("seed", 2**63 - 1),
                        ("stop_strings", "a"), ("stop_strings", ["a", "bc"]), ("max_new_tokens", 1), ("do_sample", False)):
        check_option(name, value)
    with pytest.raises(ValueError, match="unknown sampling option"):
        check_option("beam", 1)
