"""ONNX engines with video: vision graphs of video grids, the host's video M-RoPE ids (== HF's
get_rope_index), onnxruntime generate == the eager reference, and `vskip export / run --video`
on a model directory. Tolerances as in test_export_onnx.py (last-row logits 1e-5, tokens equal)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from vskip_compile import SkipPlan
from vskip_compile.testing.tiny import tiny_video_inputs
from vskip_compile.export import OnnxRunner, export_onnx, host
from vskip_compile.reference import applied

pytest.importorskip("onnxruntime")

ATOL = RTOL = 1e-5
ARCHS = ("qwen2_5_vl", "qwen3_vl")
PLAN = SkipPlan.from_ops(["skip_both", "skip_attn", "skip_ffn", "skip_both"], name="video")
EXAMPLE = [("text", 2), ("image",), ("text", 2), ("video", 4), ("text", 4)]
OTHER = [("text", 5), ("video", 2), ("text", 1), ("video", 4), ("text", 3)]  # two videos, a layout never seen


@pytest.mark.parametrize("seconds", [1.0, 0.5])
@pytest.mark.parametrize("parts", [EXAMPLE, OTHER, [("text", 1), ("video", 8), ("text", 1)]])
@pytest.mark.parametrize("arch", ARCHS)
def test_video_mrope_matches_hf_get_rope_index(tiny_model, arch, parts, seconds):
    model = tiny_model(arch)
    inputs = tiny_video_inputs(model, arch, parts, seconds_per_grid=seconds)
    kw = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in inputs}
    want, want_deltas = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                                   attention_mask=inputs["attention_mask"], **kw)
    video = {"tokens_per_second": model.config.vision_config.tokens_per_second} if arch == "qwen2_5_vl" else {}
    got, deltas = host.mrope_position_ids(
        inputs["input_ids"].numpy(), inputs["mm_token_type_ids"].numpy(),
        kw["image_grid_thw"].numpy() if "image_grid_thw" in kw else None, model.model.visual.spatial_merge_size,
        inputs["attention_mask"].numpy(), video_grid_thw=kw["video_grid_thw"].numpy(),
        second_per_grid_ts=kw["second_per_grid_ts"].numpy() if "second_per_grid_ts" in kw else None,
        split_video_frames=arch == "qwen3_vl", **video)
    np.testing.assert_array_equal(got, want.numpy())
    np.testing.assert_array_equal(deltas, want_deltas.numpy())
    # the runner's first decode position: the last prompt token's ids + 1, as HF generate steps
    # (runtime.last_positions; tests/test_video.py checks HF generate's own rotary inputs)
    first = host.last_positions(got) + 1  # [3, B, 1]
    np.testing.assert_array_equal(first, want.numpy()[..., -1:] + 1)


_ENGINES: dict = {}


@pytest.fixture(scope="module")
def engine(tiny_model, tmp_path_factory):
    def get(arch: str):
        if arch not in _ENGINES:
            model = tiny_model(arch)
            inputs = tiny_video_inputs(model, arch, EXAMPLE)
            out = tmp_path_factory.mktemp(f"{arch}-video")
            export_onnx(model, PLAN, inputs, out, optimize=False, max_seq_len=96)
            _ENGINES[arch] = (model, out)
        return _ENGINES[arch]

    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_video_engine_generates_like_the_reference(engine, arch):
    model, out = engine(arch)
    runner = OnnxRunner(out)
    assert sorted(runner.manifest["graphs"]["vision"]) == ["grid1x8x8", "grid2x8x8"]  # the image's and the video's
    for parts, seconds in ((EXAMPLE, 1.0), (OTHER, 0.5)):
        case = tiny_video_inputs(model, arch, parts, seed=11, seconds_per_grid=seconds)
        with torch.no_grad(), applied(model, PLAN):
            want_tokens = model.generate(**case, max_new_tokens=5, do_sample=False).numpy()
            want_logits = model(**case).logits[:, -1:].numpy()
        np.testing.assert_allclose(runner.prefill(**case)["logits"], want_logits, atol=ATOL, rtol=RTOL)
        np.testing.assert_array_equal(runner.generate(**case, max_new_tokens=5), want_tokens)


def test_cli_export_and_run_with_a_video(tmp_path, capsys):
    """`vskip export --video FRAMES` then `vskip run --video FILE.mp4` (PyAV) and `--video FRAMES`
    on a model directory saved to disk: the oracle's answer for the same processor inputs."""
    pytest.importorskip("av")
    from PIL import Image

    from test_export_onnx import mini_model_dir
    from test_video_io import _frames, _mp4

    from vskip_compile.cli import main
    from vskip_compile.export.cli import build_inputs

    model, processor, _ = mini_model_dir(tmp_path / "model")
    plan_path = tmp_path / "plan.json"
    SkipPlan.from_ops(["skip_both", "skip_attn"], name="cli").save(plan_path)
    frames = []
    for i, f in enumerate(_frames(4)):
        frames.append(str(tmp_path / f"f{i}.png"))
        Image.fromarray(f).save(frames[-1])
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(_mp4(_frames(4)))
    prompt, engine_dir = "what shape is in the image ?", tmp_path / "engine"
    assert main(["export", "--model", str(tmp_path / "model"), "--plan", str(plan_path), "--video", ",".join(frames),
                 "--prompt", prompt, "--out", str(engine_dir), "--max-seq-len", "200", "--no-optimize"]) == 0
    capsys.readouterr()
    for source in (",".join(frames), str(clip)):
        inputs = build_inputs(processor, [], prompt, "pt", videos=[source])
        assert "pixel_values_videos" in inputs
        with torch.no_grad(), applied(model, SkipPlan.load(plan_path)):
            ids = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        want = processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
        assert main(["run", "--engine", str(engine_dir), "--video", source, "--prompt", prompt,
                     "--max-new-tokens", "4"]) == 0
        assert capsys.readouterr().out.strip() == want
    assert main(["run", "--engine", str(engine_dir), "--video", str(tmp_path / "missing.mp4"), "--prompt", prompt]) == 2
    assert "--video" in capsys.readouterr().err
