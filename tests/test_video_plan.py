"""Plans that name the modality (`rows`), schema version 2 and the v1 migration, span kinds in
the layout, and video FLOPs (`vskip flops --video-frames`). Plain data: no model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vskip_compile import PlanError, SkipPlan, VisualLayout
from vskip_compile.cli import main
from vskip_compile.flops import model_flops, plan_report
from vskip_compile.kept_rows import kept_inputs
from vskip_compile.layout import LayoutError
from vskip_compile.plan import PLAN_VERSION, migrate
from vskip_compile.presets import get_preset

PRESET20 = str(Path(__file__).parents[1] / "vskip_compile" / "plans" / "qwen3-vl-8b-preset20.json")


# -- layout ---------------------------------------------------------------------------------
def test_codes_give_spans_and_kinds_an_image_next_to_a_video_is_its_own_span():
    layout = VisualLayout.from_codes([[0, 1, 1, 2, 2, 0, 2, 0]])
    assert layout.spans == (((1, 3), (3, 5), (6, 7)),)
    assert layout.kinds == (("image", "video", "video"),)
    assert layout.frozen_spans(rows="video") == ((3, 5), (6, 7))
    assert layout.frozen_spans(rows="image") == ((1, 3),)
    assert layout.frozen_spans() == ((1, 3), (3, 5), (6, 7))
    assert layout.frozen_spans("prefix_through_visual", "image") == ((0, 3),)
    assert layout.kept_spans(rows="image") == ((0, 1), (3, 8))
    assert str(layout) == "VisualLayout(S=8, B=1, visual=[1:3,3:5v,6:7v])"
    with pytest.raises(LayoutError, match="modality code 3"):
        VisualLayout.from_codes([[0, 3]])
    with pytest.raises(LayoutError, match="unknown rows 'audio'"):
        layout.frozen_spans(rows="audio")


def test_layouts_without_kinds_are_images_and_equal_the_explicit_ones():
    a = VisualLayout.single(10, [(2, 5)])
    assert a.kinds == (("image",),) and a == VisualLayout(10, (((2, 5),),), (("image",),))
    assert hash(a) == hash(VisualLayout.from_masks([[0, 0, 1, 1, 1, 0, 0, 0, 0, 0]]))
    assert a != VisualLayout.single(10, [(2, 5)], kinds=["video"])
    with pytest.raises(LayoutError, match="one kind per span"):
        VisualLayout(10, (((2, 5),),), (("image", "video"),))
    # a batch whose rows differ only in kind is not uniform
    mixed = VisualLayout(10, (((2, 5),), ((2, 5),)), (("image",), ("video",)))
    assert not mixed.is_uniform


def test_kept_inputs_follow_the_plan_rows():
    layout = VisualLayout.from_codes([[0, 1, 1, 0, 2, 2, 2, 0], [0, 0, 2, 2, 0, 1, 0, 0]])
    index, valid = kept_inputs(layout, rows="video")
    assert index[0][valid[0]].tolist() == [0, 1, 2, 3, 7] and index[1][valid[1]].tolist() == [0, 1, 4, 5, 6, 7]
    index, valid = kept_inputs(layout, rows="image", pads=[0, 1])
    assert index[0][valid[0]].tolist() == [0, 3, 4, 5, 6, 7] and index[1][valid[1]].tolist() == [1, 2, 3, 4, 6, 7]


def test_host_kept_inputs_are_the_torch_ones():
    import numpy as np

    from vskip_compile.export import host

    layout = VisualLayout.from_codes([[0, 1, 1, 0, 2, 2, 2, 0], [2, 0, 2, 2, 0, 1, 0, 0]])
    for rows in ("visual", "image", "video"):
        for scope in ("visual", "prefix_through_visual"):
            want = kept_inputs(layout, scope, [0, 0], rows=rows)
            got = host.kept_inputs(layout, scope, [0, 0], rows)
            assert np.array_equal(got[0], want[0].numpy()) and np.array_equal(got[1], want[1].numpy())
    ids = np.array([[5, 120, 120, 6, 121, 121, 121, 7]])
    assert host.layout_of(ids, [120, 121], [121]) == VisualLayout.from_codes([[0, 1, 1, 0, 2, 2, 2, 0]])


# -- plans ----------------------------------------------------------------------------------
def test_rows_round_trip_and_default_left_out():
    plan = SkipPlan.from_ops(["skip_both", "full"], rows="video")
    d = plan.to_dict()
    assert d == {"version": PLAN_VERSION, "num_layers": 2, "ops": ["skip_both", "full"], "rows": "video"}
    assert PLAN_VERSION == 2 and SkipPlan.from_dict(d) == plan
    assert plan != SkipPlan.from_ops(["skip_both", "full"]) and "rows" not in SkipPlan.full(2).to_dict()
    assert str(plan) == "SkipPlan [B.] (2 layers: 1 skip_both, video rows only)"
    assert plan.with_model("A", {"hidden_size": 8}).rows == "video"
    with pytest.raises(PlanError, match="unknown rows 'audio'"):
        SkipPlan.from_dict({**d, "rows": "audio"})
    with pytest.raises(PlanError, match="unknown rows 1"):
        SkipPlan.from_dict({**d, "rows": 1})
    with pytest.raises(PlanError, match="OpSkip policies .* cannot say so"):
        plan.to_opskip()


def test_v1_files_migrate_to_v2_and_mean_every_visual_row(tmp_path):
    v1 = {"version": 1, "num_layers": 2, "ops": ["skip_attn", "full"], "scope": "prefix_through_visual", "name": "old"}
    assert migrate(v1) == {**v1, "version": 2} and migrate({**v1, "version": 2}) == {**v1, "version": 2}
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(v1))
    plan = SkipPlan.load(path)
    assert (plan.version, plan.rows, plan.scope, plan.name) == (2, "visual", "prefix_through_visual", "old")
    with pytest.raises(PlanError, match="'rows' needs plan version 2"):
        SkipPlan.from_dict({**v1, "rows": "video"})
    with pytest.raises(PlanError, match="unknown plan version 3"):
        SkipPlan.from_dict({**v1, "version": 3})
    with pytest.raises(PlanError, match="unknown plan version True"):  # JSON true is not version 1
        SkipPlan.from_dict({**v1, "version": True})
    # the shipped v1 plan files load (migrated)
    assert SkipPlan.load(PRESET20).version == 2


def test_cli_plan_migrate_writes_version_2(tmp_path, capsys):
    src, out = tmp_path / "v1.json", tmp_path / "v2.json"
    src.write_text(json.dumps({"version": 1, "num_layers": 1, "ops": ["skip_both"]}))
    assert main(["plan", "migrate", str(src), "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == {"version": 2, "num_layers": 1, "ops": ["skip_both"]}
    src.write_text(json.dumps({"version": 1, "num_layers": 1, "ops": ["skip_both"], "rows": "video"}))
    assert main(["plan", "migrate", str(src)]) == 2
    assert "'rows' needs plan version 2" in capsys.readouterr().err


def test_engine_plan_id_keeps_old_engines_and_names_rows():
    from vskip_compile.export.manifest import plan_id

    assert plan_id(SkipPlan.from_ops(["skip_both"])) == {"ops": ["skip_both"], "scope": "visual"}
    assert plan_id(SkipPlan.from_ops(["skip_both"], rows="video"))["rows"] == "video"


# -- FLOPs ----------------------------------------------------------------------------------
def test_flops_of_a_video_plan_count_only_the_video_rows():
    dims = get_preset("qwen3-vl-8b").dims
    plan = SkipPlan.load(PRESET20)
    video_only = SkipPlan(plan.ops, plan.num_layers, rows="video")
    image_only = SkipPlan(plan.ops, plan.num_layers, rows="image")
    S, V, W = 2048 + 576 + 64, 2048 + 576, 2048  # an image of 576 rows and a video of 2048
    everything = model_flops(dims, plan, S, V)
    assert model_flops(dims, video_only, S, V, V_video=W) == model_flops(dims, plan, S, W)  # as if only W were visual
    assert model_flops(dims, image_only, S, V, V_video=W) == model_flops(dims, plan, S, V - W)
    assert everything < model_flops(dims, video_only, S, V, V_video=W) < model_flops(dims, None, S, V)
    report = plan_report(dims, video_only, S, V, 0, W)
    assert (report["V_video"], report["rows"]) == (W, "video") and report["plan"] == model_flops(dims, plan, S, W)
    with pytest.raises(ValueError, match="video rows"):
        plan_report(dims, video_only, S, V, 0, V + 1)


def test_cli_flops_video_frames_counts_frames_times_tokens(capsys):
    code = main(["flops", "--preset", "qwen3-vl-8b", "--video-frames", "8", "--frame-tokens", "256", "--text", "64",
                 "--plan", PRESET20, "--json"])
    d = json.loads(capsys.readouterr().out)
    assert code == 0 and (d["S"], d["V"], d["V_video"], d["video_frames"]) == (8 * 256 + 64, 2048, 2048, 8)
    dims = get_preset("qwen3-vl-8b").dims
    plan = SkipPlan.load(PRESET20)
    assert d["plan"] == model_flops(dims, plan, 2112, 2048) and d["full"] == model_flops(dims, None, 2112, 2048)
    # with an image too: V counts both, a rows=video plan freezes the video rows only
    code = main(["flops", "--preset", "qwen3-vl-8b", "--visual", "576", "--video-frames", "4", "--text", "64",
                 "--json"])
    d = json.loads(capsys.readouterr().out)
    assert code == 0 and (d["V"], d["V_video"], d["S"]) == (576 + 1024, 1024, 576 + 1024 + 64)
    with pytest.raises(SystemExit) as exit_:  # argparse: the flag's type names it
        main(["flops", "--preset", "qwen3-vl-8b", "--video-frames", "0", "--text", "64"])
    assert exit_.value.code == 2 and "--video-frames" in capsys.readouterr().err
    code = main(["flops", "--preset", "qwen2.5-vl-7b", "--video-frames", "600", "--text", "64"])  # 153,664 > 128,000
    assert code == 2 and "max_position_embeddings 128000" in capsys.readouterr().err


# -- vskip bench --video-frames (plumbing; the benchmark itself runs on a quiet machine) --------
def test_bench_video_case_layout():
    from vskip_compile.bench import FRAME_GAP, case_layout

    layout = case_layout(0, 64, frames=8, frame_tokens=256)
    assert layout.num_visual == layout.num_rows("video") == 2048 and len(layout.row_spans) == 8
    assert layout.seq_len == 2048 + 7 * FRAME_GAP + 64 and layout.row_spans[0] == (8, 264)
    assert all(b2 - a2 == 256 and a2 - b1 == FRAME_GAP for (_, b1), (a2, b2) in zip(layout.row_spans, layout.row_spans[1:]))
    assert case_layout(576, 64) == VisualLayout.single(640, [(8, 584)])


def test_cli_bench_video_frames_reach_the_cases(monkeypatch, capsys):
    import vskip_compile.bench as bench

    seen = []

    def fake_case(spec, layers, visual, text, repeats, ops, log=print, device="cpu", dtype=None, frames=None,
                  frame_tokens=256):
        seen.append((spec.name, visual, frames, frame_tokens, layers, text))
        layout = bench.case_layout(visual, text, frames, frame_tokens)
        names = ("compiled full", "compiled skip", "compiled poly", "eager reference", "eager gather")
        return {"model": spec.name, "device": "cpu", "S": layout.seq_len, "V": layout.num_visual, "video_frames": frames,
                "median_ms": dict.fromkeys(names, 1.0), "min_ms": dict.fromkeys(names, 1.0), "peak_mib": dict.fromkeys(names, 1.0),
                **dict.fromkeys(("ideal_speedup", "realized", "realized_poly", "poly_vs_static", "skip_vs_gather",
                                 "realized_min", "realized_poly_min", "poly_vs_static_min",
                                 "max_abs_diff_last_logits"), 1.0), "skip_faster_rounds": 0, "repeats": repeats}

    monkeypatch.setattr(bench, "bench_case", fake_case)
    monkeypatch.setattr(bench, "_return_freed_memory_to_os", lambda: True)  # not this test process's malloc
    assert main(["bench", "--models", "qwen3-vl-8b", "--video-frames", "8", "32", "--frame-tokens", "128",
                 "--layers", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert seen == [("qwen3-vl-8b", 0, 8, 128, 2, 64), ("qwen3-vl-8b", 0, 32, 128, 2, 64)]
    assert [r["V"] for r in rows] == [1024, 4096]
    with pytest.raises(SystemExit):
        main(["bench", "--video-frames", "0"])
