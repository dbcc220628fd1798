"""`vskip calibrate` and `vskip eval`: the easy-VQA experiments (vskip_compile.evaluate.experiments)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import command_line, fraction, make_console, model_dir_of, nonneg_int, pos_int, print_json


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=nonneg_int, default=1,
                   help="torch threads (default 1: on a shared CPU several threads spin against each other)")


def _set_threads(args: argparse.Namespace) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="find answer-silent visual-row operators on easy-VQA train samples; write skip plans",
        description="Score every (layer, attention/FFN) visual-row update by exact ablation and a "
        "first-order estimate on train-split samples (the model's own answers as targets), select "
        "under a FLOPs budget or a fidelity tolerance, re-measure and repair, write plan JSON files.",
    )
    p.add_argument("--model-dir", help="easy-VQA Qwen3-VL directory (default: the zoo model)")
    p.add_argument("--samples", type=pos_int, default=256, help="train-split questions (default 256)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--budget", type=fraction, nargs="+", help="decoder prefill FLOPs cut(s) to reach, e.g. 0.4")
    which.add_argument("--tolerance", type=fraction, help="largest plan whose answer agreement is >= 1 - tolerance")
    p.add_argument("--fidelity", type=fraction, default=0.995,
                   help="answer agreement with the full model a budgeted plan must keep (default 0.995)")
    p.add_argument("--granularity", choices=("op", "layer", "both"), default="op",
                   help="op: operator-level plans (opskip-*); layer: whole-layer freezes (shortv-*); both")
    p.add_argument("--out-dir", help="where plans go (default: <model-dir>/plans)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=pos_int, default=128)
    p.add_argument("--workers", type=pos_int, default=2,
                   help="single-threaded processes for the per-candidate ablations (default 2)")
    _add_threads(p)
    p.add_argument("--json", action="store_true", help="print the plans as JSON")
    p.set_defaults(run=run_calibrate)


def run_calibrate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..evaluate.experiments import calibrate_easyvqa

    _set_threads(args)
    console = make_console()
    grans = ("op", "layer") if args.granularity == "both" else (args.granularity,)
    calib, report = calibrate_easyvqa(
        model_dir_of(args), samples=args.samples, seed=args.seed, batch_size=args.batch_size, budgets=args.budget,
        fidelity=1 - args.tolerance if args.tolerance else args.fidelity, granularities=grans, workers=args.workers,
        out_dir=Path(args.out_dir) if args.out_dir else None, command=command_line(args), log=console.print,
        progress=lambda xs, desc: tqdm(xs, desc=desc))
    if args.json:
        print_json(report)
        return 0
    from rich.table import Table

    table = Table(title=f"calibration on {calib.size} train samples (S={calib.seq_len}, V={calib.num_visual})")
    for col in ("plan", "ops", "FLOPs cut", "agreement", "met"):
        table.add_column(col)
    for r in report:
        table.add_row(r["plan"], r["ops"], f"{100 * r['flops_cut']:.1f}%", f"{100 * r['fidelity']:.2f}%",
                      "yes" if r["fidelity_met"] else "NO")
    console.print(table)
    return 0


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="easy-VQA test accuracy vs prefill FLOPs: full model, plans and baselines",
        description="Accuracy, accuracy kept, decoder prefill FLOPs cut (symbolic model at each "
        "question's layout) and measured prefill time on the easy-VQA test split, for the full model, "
        "the shipped operator-level plans and the baselines at each budget. Writes results.json, "
        "results.csv and pareto.png.",
    )
    p.add_argument("--model-dir", help="easy-VQA Qwen3-VL directory (default: the zoo model)")
    p.add_argument("--plans-dir", help="opskip-bXX / shortv-bXX plans (default: <model-dir>/plans)")
    p.add_argument("--out-dir", help="results directory (default: <model-dir>/eval)")
    p.add_argument("--budgets", type=fraction, nargs="+", default=[0.2, 0.3, 0.4, 0.5, 0.6])
    p.add_argument("--methods", nargs="+", default=["opskip", "shortv", "vtw", "fastv"],
                   choices=["opskip", "shortv", "vtw", "fastv"])
    p.add_argument("--limit", type=pos_int, help="first N test questions only")
    p.add_argument("--images-per-batch", type=pos_int, default=32)
    p.add_argument("--workers", type=pos_int, default=2, help="single-threaded worker processes (default 2)")
    p.add_argument("--verify", type=nonneg_int, default=24,
                   help="questions checked one at a time against independent runs first (0: skip)")
    p.add_argument("--fastv-layer", type=nonneg_int, default=2, help="FastV drop layer K (lowered if a budget needs)")
    _add_threads(p)
    p.add_argument("--time-samples", type=nonneg_int, default=32,
                   help="questions (of the most common prompt length) whose prefill is timed on each method's "
                   "real implementation; the median is reported (default 32; 0: no timing)")
    p.add_argument("--time-backend", choices=["eager", "inductor"], default="eager",
                   help="vskip_compile.compile backend timing the full model and the opskip/shortv plans "
                   "(default eager: like the baselines, which run eager HF layers whatever this says)")
    p.add_argument("--time-repeats", type=pos_int, default=3,
                   help="interleaved timing rounds; per question the fastest counts (default 3)")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.set_defaults(run=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from ..evaluate.experiments import EvalSettings, evaluate_easyvqa
    from ..evaluate.report import format_table

    _set_threads(args)
    settings = EvalSettings(
        budgets=tuple(args.budgets), methods=tuple(args.methods), limit=args.limit,
        images_per_batch=args.images_per_batch, workers=args.workers, verify=args.verify, fastv_layer=args.fastv_layer,
        time_samples=args.time_samples, time_backend=args.time_backend, time_repeats=args.time_repeats)
    rows, paths = evaluate_easyvqa(model_dir_of(args), settings, plans_dir=Path(args.plans_dir) if args.plans_dir else None,
                                   out_dir=Path(args.out_dir) if args.out_dir else None, command=command_line(args))
    if args.json:
        print_json(rows)
    else:
        print(format_table(rows))
        print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0
