"""`vskip bench`: prefill timing at real layer widths, compiled full vs skip vs eager."""

from __future__ import annotations

import argparse

from ..plan import OPS
from .common import int_in, make_console, pos_int, print_json


def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="prefill timing at real layer widths: compiled full vs skip vs eager")
    p.add_argument("--models", nargs="+", default=["qwen3-vl-8b", "llava-1.5-7b"])
    p.add_argument("--visual", nargs="+", type=int_in(1, 1 << 16), default=[576, 1024], help="visual rows per case")
    p.add_argument("--text", type=int_in(1, 1 << 16), default=64, help="text rows")
    p.add_argument("--layers", type=int_in(1, 256), default=2, help="decoder layers (random weights)")
    p.add_argument("--repeats", type=pos_int, default=5, help="interleaved rounds; medians are printed")
    p.add_argument("--ops", nargs="+", default=None, choices=OPS, help="plan ops, repeated over the layers")
    p.add_argument("--threads", type=pos_int, default=None,
                   help="torch intra-op threads (default: torch's own choice, one per core)")
    p.add_argument("--device", default="cpu", help="torch device (cuda on a GPU)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weights and activations")
    p.add_argument("--video-frames", nargs="+", type=int_in(1, 1 << 12), metavar="N",
                   help="video cases of N frames each (instead of --visual): N x --frame-tokens video rows")
    p.add_argument("--frame-tokens", type=int_in(1, 1 << 14), default=256, metavar="T",
                   help="visual tokens per video frame (default 256)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from ..bench import DEFAULT_OPS, run

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    rows = run(make_console(stderr=args.json), args.models, tuple(args.visual), args.text, args.layers, args.repeats,
               tuple(args.ops) if args.ops else DEFAULT_OPS, device=args.device, dtype=args.dtype,
               video_frames=tuple(args.video_frames or ()), frame_tokens=args.frame_tokens)
    if args.json:
        print_json(rows)
    return 0
