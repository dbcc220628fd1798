"""Long contexts on the default SDPA path: no S x S mask is ever built (vskip_compile.core, the
SDPA rule in passes/rules.py).

The rewritten prefill graph that CompiledVLM runs (inner eager backend: the aten graph runs op
by op) is watched by a TorchDispatchMode: no op may output a tensor of S x S elements per
batch row. All-row attention runs SDPA with is_causal (the CPU flash kernel takes no mask); a
skipped attention operator's K kept query rows get a K x S mask built from their positions; a
left-padded batch is rotated to right padding inside the graph, so it needs no mask either.
Sequences of about 1,200 rows (64 images of 16 tokens): an S x S tensor (1.4 M elements) stands
out among the largest legitimate ones (K x S mask rows, S x FFN activations: ~0.2 M).

Tolerance, fp32: last-row logits within 1e-5 of the eager reference, as in test_polymorphic
(is_causal sums the same softmax as the explicit mask, in another order: differences seen
<= 3e-7; a plan moves logits by >= 3e-2). Greedy tokens equal.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vskip_compile
import vskip_compile.passes as passes
from vskip_compile import SkipPlan, reference
from vskip_compile.testing.tiny import build_tiny, left_padded_batch, tiny_inputs

FP32_ATOL = 1e-5
NEW_TOKENS = 2
N_IMAGES = 64  # 16 visual tokens each, 2 text rows between them: S ~ 1,200
SKIP = SkipPlan.from_ops(["skip_attn", "skip_both", "full", "skip_ffn"])
FULL = SkipPlan.from_ops(["full"] * 4)


class LargestOutput(TorchDispatchMode):
    """Records the op whose output has the most elements per batch row."""

    def __init__(self, batch: int):
        super().__init__()
        self.batch, self.numel, self.op = batch, 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() // self.batch > self.numel:
                self.numel, self.op = t.numel() // self.batch, (func, tuple(t.shape))
        return out


@pytest.fixture
def watched(monkeypatch):
    """Every rewritten prefill graph compiled from here on runs under a LargestOutput mode
    (the inner eager backend calls gm.forward of the graph run_passes returns)."""
    modes: list[LargestOutput] = []
    run_passes = passes.run_passes

    def watching(gm, ctx):
        result = run_passes(gm, ctx)
        if hasattr(result.gm, "real_recompile"):  # a lazy graph module: generate its code now
            result.gm.real_recompile()
        forward = type(result.gm).forward.__get__(result.gm)  # the generated code itself

        def run(*args):
            batch = next(a.shape[0] for a in args if isinstance(a, torch.Tensor) and a.ndim == 3)  # inputs_embeds
            with LargestOutput(batch) as mode:
                out = forward(*args)
            modes.append(mode)
            return out

        result.gm.forward = run
        return result

    monkeypatch.setattr(passes, "run_passes", watching)
    return modes


def _long_model(arch: str):
    """A tiny model whose position limit admits the long prompts (its default rotary
    embedding does not depend on the limit)."""
    model = build_tiny(arch)
    model.config.get_text_config().max_position_embeddings = 4096
    return model


def _long_row(model, arch: str, text_before: int, seed: int) -> dict:
    return tiny_inputs(model, arch, text_before=text_before, text_after=5, n_images=N_IMAGES, seed=seed)


def _reference(model, plan: SkipPlan, row: dict):
    with torch.no_grad(), reference.applied(model, plan):
        logits = model(**row).logits[0, -1]  # [V]
        tokens = model.generate(**row, max_new_tokens=NEW_TOKENS, do_sample=False)[0, -NEW_TOKENS:]
    return logits, tokens


def _assert_no_square(mode: LargestOutput, seq_len: int) -> None:
    assert mode.numel < seq_len * seq_len, f"an S x S tensor per batch row (S = {seq_len}): {mode.op}"


@pytest.mark.parametrize("plan", [FULL, SKIP], ids=["full", "skip"])
@pytest.mark.parametrize("specialize", [None, "layout"], ids=["polymorphic", "static"])
def test_unpadded_prefill_builds_no_square_mask(watched, plan, specialize):
    arch = "qwen3_vl"  # M-RoPE ids and DeepStack travel with the rows
    model = _long_model(arch)
    row = _long_row(model, arch, text_before=3, seed=0)
    seq_len = row["input_ids"].shape[1]
    cm = vskip_compile.compile(model, plan, backend="eager", specialize=specialize)
    with torch.no_grad():
        logits = cm(**row).logits[0, -1]
    assert len(watched) == 1
    _assert_no_square(watched[0], seq_len)
    tokens = cm.generate(**row, max_new_tokens=NEW_TOKENS)[0, -NEW_TOKENS:]
    want_logits, want_tokens = _reference(model, plan, row)
    assert (logits - want_logits).abs().max().item() <= FP32_ATOL
    assert torch.equal(tokens, want_tokens)


@pytest.mark.parametrize("arch", ["qwen3_vl", "llava"])
def test_left_padded_batch_builds_no_square_mask(watched, arch):
    """Rows of different lengths in one prefill: the padding is rotated to the right inside the
    graph (core.LeftPadRoll), so the left-padded batch needs no mask either; logits and the K/V
    of the real rows (rotated back) equal each row's reference, greedy tokens too."""
    model = _long_model(arch)
    rows = [_long_row(model, arch, text_before=b, seed=i) for i, b in enumerate((3, 40))]
    batch = left_padded_batch(rows)
    seq_len = batch["input_ids"].shape[1]
    assert not bool(batch["attention_mask"].all())
    cm = vskip_compile.compile(model, SKIP, backend="eager")
    with torch.no_grad():
        logits, kv = cm._prefill(cm._prefill_inputs(batch, left_padded=True), logits_to_keep=1)  # [B, 1, V]
    assert len(watched) == 1
    _assert_no_square(watched[0], seq_len)
    tokens = cm.generate(**batch, max_new_tokens=NEW_TOKENS)[:, -NEW_TOKENS:]
    for i, row in enumerate(rows):
        want_logits, want_tokens = _reference(model, SKIP, row)
        assert (logits[i, -1] - want_logits).abs().max().item() <= FP32_ATOL
        assert torch.equal(tokens[i], want_tokens)
        n = row["input_ids"].shape[1]
        with torch.no_grad(), reference.applied(model, SKIP):
            k_ref = model(**row, use_cache=True).past_key_values.layers[1].keys  # [1, KV, n, E]
        torch.testing.assert_close(kv[1][0][i:i + 1, :, -n:], k_ref, rtol=0, atol=FP32_ATOL)
