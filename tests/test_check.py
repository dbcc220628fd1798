"""`vskip check`: per-layer support, parity verdict and exit code, on models saved to disk."""

from __future__ import annotations

import json

import pytest
import torch

from vskip_compile import check
from vskip_compile.archs.shrink import build_family
from vskip_compile.testing.tiny import build_tiny
from vskip_compile.cli import main


def test_check_a_tiny_llava_saved_to_disk(tmp_path, capsys):
    model = build_tiny("llava")
    model.save_pretrained(tmp_path)
    assert main(["check", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verdict"] == "pass" and report["reasons"] == []
    assert [(s["attn"], s["ffn"]) for s in report["layers"]] == [(True, True)] * 4
    assert report["inputs"]["pixels"] is True and report["inputs"]["image_tokens"] == 16  # asked from the model
    assert report["parity"]["ok"] and report["parity"]["max_abs_logits"] <= check.ATOL
    assert report["parity"]["skip_changes_logits"]  # the plan really skipped something
    assert any(op != "full" for op in report["plan"])


def test_check_the_shipped_model(capsys):
    from vskip_compile.zoo.easyvqa import MODEL_DIR

    assert main(["check", str(MODEL_DIR)]) == 0
    out = capsys.readouterr().out
    assert "verdict: SUPPORTED" in out and "layer 7: can skip attn, ffn" in out


def test_check_names_why_a_model_is_refused(tmp_path, capsys):
    """LFM2-VL's decoder layers name their FFN feed_forward (and real checkpoints mix in
    short-convolution layers): refused with that reason, exit 1, never a crash or a silent pass."""
    model = build_family("lfm2_vl")
    model.save_pretrained(tmp_path)
    assert main(["check", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "verdict: REFUSED" in out
    assert "has no mlp child module" in out


def test_check_passes_a_model_with_a_mask_mapping(tmp_path, capsys):
    """Gemma 3 hands its language model a mask mapping (sliding and full layers, per-type RoPE):
    supported now (vskip_compile.archs.blocks), exit 0."""
    build_family("gemma3").save_pretrained(tmp_path)
    assert main(["check", str(tmp_path)]) == 0
    assert "verdict: SUPPORTED" in capsys.readouterr().out


def test_check_refuses_bad_arguments(tmp_path, capsys):
    assert main(["check"]) == 2
    assert "MODEL_DIR or --all-registered" in capsys.readouterr().err
    assert main(["check", str(tmp_path / "missing")]) == 2
    assert "no such model directory" in capsys.readouterr().err
    assert main(["check", "--all-registered", "--families", "no_such_family"]) == 2
    assert "no_such_family" in capsys.readouterr().err


def test_random_plan_uses_only_skippable_ops():
    support = [check.LayerSupport(0, True, False), check.LayerSupport(1, False, True), check.LayerSupport(2, False, False)]
    for seed in range(20):
        ops = check.random_plan(support, seed).ops
        assert ops[0] in ("full", "skip_attn") and ops[1] in ("full", "skip_ffn") and ops[2] == "full"
        assert ops != ("full",) * 3
