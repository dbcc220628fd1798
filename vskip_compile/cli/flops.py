"""`vskip flops`: decoder prefill FLOPs of a model, full or under a plan (no torch)."""

from __future__ import annotations

import argparse

from ..flops import plan_report
from .common import UsageError, add_model_args, int_in, load_plan, make_console, model_dims, print_json, row_count


def add_flops(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "flops",
        help="decoder prefill FLOPs of a model, full or under a plan",
        description="Decoder prefill FLOPs (2 per multiply-add, full attention rectangle, "
        "projections + attention + FFN; no LM head) for S = visual + text rows.",
    )
    add_model_args(p, required=False)
    p.add_argument("--visual", type=row_count, help="visual rows (image tokens)")
    p.add_argument("--text", type=row_count, help="text rows")
    p.add_argument("--video-frames", type=int_in(1, 1 << 16), metavar="N",
                   help="a video of N frames: N x --frame-tokens video rows, on top of --visual image rows")
    p.add_argument("--frame-tokens", type=int_in(1, 1 << 16), default=256, metavar="T",
                   help="visual tokens per video frame (default 256; with --video-frames)")
    p.add_argument("--prefix", type=row_count, default=0,
                   help="text rows before the last image (frozen too under plan scope prefix_through_visual)")
    p.add_argument("--plan", metavar="plan.json", help="a skip plan; without it, the full model")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--list-presets", action="store_true", help="list the known presets and exit")
    p.set_defaults(run=run_flops)


def run_flops(args: argparse.Namespace) -> int:
    if args.list_presets:
        return _list_presets(args.json)
    if args.preset is None and args.config is None:
        raise UsageError("give the model with --preset NAME or --config config.json")
    if args.visual is None and args.video_frames is not None:
        args.visual = 0  # a video alone
    if args.visual is None or args.text is None:
        raise UsageError("give the row counts with --visual V --text T (or --video-frames N --text T)")
    if args.prefix > args.text:
        raise UsageError(f"--prefix {args.prefix} is more than --text {args.text}")
    video = args.video_frames * args.frame_tokens if args.video_frames is not None else 0
    visual = args.visual + video  # image rows + video rows
    if visual + args.text < 1:
        raise UsageError("--visual + --text is 0: a prefill has at least one row")
    label, dims, max_rows = model_dims(args)
    if max_rows is not None and visual + args.text > max_rows:
        what = f"--visual {args.visual}" + (f" + --video-frames {args.video_frames} x {args.frame_tokens}" if video else "")
        raise UsageError(f"{what} + --text {args.text} = {visual + args.text} rows exceed "
                         f"{label}'s max_position_embeddings {max_rows}")
    plan = load_plan(args.plan) if args.plan else None
    report = plan_report(dims, plan, visual + args.text, visual, args.prefix, video)
    out = {
        "model": label,
        "plan_name": (plan.name or args.plan) if plan else None,
        "T": args.text,
        **({"video_frames": args.video_frames, "frame_tokens": args.frame_tokens} if video else {}),
        **report,
    }
    if args.json:
        print_json(out)
        return 0
    from rich.table import Table

    g = 1e9
    video = f" of which video {out['V_video']} = {args.video_frames} frames x {args.frame_tokens}" if out["V_video"] else ""
    rows = f", {out['rows']} rows" if out["rows"] != "visual" else ""
    title = (f"{label}: S={out['S']} (visual {out['V']}{video}, text {out['T']}), "
             f"plan: {out['plan_name'] or 'none (full model)'}{rows}")
    table = Table(title=title, caption=f"reduction {100 * out['reduction']:.2f}% of decoder prefill FLOPs")
    for col in ("layer", "op", "full GFLOPs", "plan GFLOPs", "saved GFLOPs"):
        table.add_column(col, justify="left" if col == "op" else "right")
    for row in out["layers"]:
        table.add_row(str(row["layer"]), row["op"], f"{row['full'] / g:.2f}", f"{row['plan'] / g:.2f}",
                      f"{row['saved'] / g:.2f}")
    table.add_section()
    table.add_row("total", "", f"{out['full'] / g:.2f}", f"{out['plan'] / g:.2f}", f"{out['saved'] / g:.2f}")
    make_console().print(table)
    return 0


def _list_presets(as_json: bool) -> int:
    from dataclasses import asdict

    from ..presets import PRESETS

    if as_json:
        print_json({name: {"hf_id": p.hf_id, "architecture": p.architecture, **asdict(p.dims)} for name, p in PRESETS.items()})
        return 0
    from rich.table import Table

    table = Table(title="presets")
    for col in ("name", "model", "layers", "d", "heads", "kv", "head_dim", "ffn", "mlp"):
        table.add_column(col)
    for p in PRESETS.values():
        d = p.dims
        ffn = f"{d.top_k}x{d.expert_ffn} of {d.experts}" if d.mlp == "moe" else str(d.ffn)
        table.add_row(p.name, p.hf_id, str(d.layers), str(d.hidden), str(d.heads), str(d.kv_heads),
                      str(d.head_dim), ffn, d.mlp)
    make_console().print(table)
    return 0
