"""`vskip`: the command line. A thin shell over the Python API; nothing imports it.

Adding a subcommand: write `add_<name>(sub)` that makes its parser with `sub.add_parser(...)`
and sets `run=<function(args) -> exit code>` with `set_defaults`, then list it in SUBCOMMANDS.
Import heavy modules (torch, transformers) inside the run function so `vskip --help` stays
fast. A problem the user can fix raises a VSkipError (UsageError here): one line on stderr
naming what is wrong, exit code 2; any other exception is a bug: its traceback, exit code 1.
Numbers are checked by their argparse type (`_int_in`), so a bad one names its flag.
Rich tables for people, `--json` for machines.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import VSkipError
from .flops import DimsError, TextDims, hf_text_config, plan_report
from .plan import OPS, SkipPlan
from .errors import VSkipError


class UsageError(VSkipError, ValueError):
    """Bad command-line input (a missing file, a file that is not JSON, a bad number)."""


# Errors that are the user's to fix: reported as "vskip COMMAND: error: ..." with exit code 2.
USER_ERRORS: tuple[type[Exception], ...] = (VSkipError,)
MAX_ROWS = 1 << 24  # no decoder has a context this long: a larger row count is a typo


# -- shared helpers -------------------------------------------------------------------------------
def _read_json(path: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: not a JSON file ({e})") from e


def _load_plan(path: str) -> SkipPlan:
    return SkipPlan.load(path)


def _add_model_args(p: argparse.ArgumentParser, required: bool) -> None:
    which = p.add_mutually_exclusive_group(required=required)
    which.add_argument("--preset", help="a known model, e.g. qwen3-vl-8b (see `vskip flops --list-presets`)")
    which.add_argument("--config", metavar="config.json", help="any Hugging Face config.json")


def _dims(args: argparse.Namespace) -> tuple[str, TextDims, int | None]:
    """(model label, dims, max_position_embeddings or None) from --preset or --config."""
    if args.preset is not None:
        from .presets import get_preset

        preset = get_preset(args.preset)
        return preset.name, preset.dims, preset.max_positions
    cfg = _read_json(args.config)
    if not isinstance(cfg, dict):
        raise UsageError(f"{args.config}: a config.json is a JSON object, got {type(cfg).__name__}")
    try:
        dims = TextDims.from_hf_config(cfg)
    except (DimsError, TypeError, ValueError) as e:  # transformers' own field checks raise these
        raise DimsError(f"{args.config}: {' '.join(str(e).split())}") from e
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    limit = text.get("max_position_embeddings")
    return args.config, dims, limit if isinstance(limit, int) and not isinstance(limit, bool) else None


def _int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """argparse type: an int in low..high. argparse names the flag in its error (exit 2)."""
    what = {0: "a non-negative int", 1: "a positive int"}.get(low, f"an int >= {low}")
    what += f" (at most {high})" if high is not None else ""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


def _float_in(low: float, high: float | None = None, low_open: bool = False) -> Callable[[str], float]:
    """argparse type: a finite float in [low, high] ((low, high] when low_open)."""
    what = f"a number {'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (low_open and value == low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    return parse


_nonneg_int = _int_in(0)
_pos_int = _int_in(1)
_rows = _int_in(0, MAX_ROWS)
_port = _int_in(1, 65535)


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


# -- vskip flops ----------------------------------------------------------------------------------
def add_flops(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "flops",
        help="decoder prefill FLOPs of a model, full or under a plan",
        description="Decoder prefill FLOPs (2 per multiply-add, full attention rectangle, "
        "projections + attention + FFN; no LM head) for S = visual + text rows.",
    )
    _add_model_args(p, required=False)
    p.add_argument("--visual", type=_rows, help="visual rows (image tokens)")
    p.add_argument("--text", type=_rows, help="text rows")
    p.add_argument("--prefix", type=_rows, default=0,
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
    if args.visual is None or args.text is None:
        raise UsageError("give the row counts with --visual V --text T")
    if args.prefix > args.text:
        raise UsageError(f"--prefix {args.prefix} is more than --text {args.text}")
    if args.visual + args.text < 1:
        raise UsageError("--visual + --text is 0: a prefill has at least one row")
    label, dims, max_rows = _dims(args)
    if max_rows is not None and args.visual + args.text > max_rows:
        raise UsageError(f"--visual {args.visual} + --text {args.text} = {args.visual + args.text} rows exceed "
                         f"{label}'s max_position_embeddings {max_rows}")
    plan = _load_plan(args.plan) if args.plan else None
    report = plan_report(dims, plan, args.visual + args.text, args.visual, args.prefix)
    out = {
        "model": label,
        "plan_name": (plan.name or args.plan) if plan else None,
        "T": args.text,
        **report,
    }
    if args.json:
        _print_json(out)
        return 0
    from rich.table import Table

    g = 1e9
    title = f"{label}: S={out['S']} (visual {out['V']}, text {out['T']}), plan: {out['plan_name'] or 'none (full model)'}"
    table = Table(title=title, caption=f"reduction {100 * out['reduction']:.2f}% of decoder prefill FLOPs")
    for col in ("layer", "op", "full GFLOPs", "plan GFLOPs", "saved GFLOPs"):
        table.add_column(col, justify="left" if col == "op" else "right")
    for row in out["layers"]:
        table.add_row(str(row["layer"]), row["op"], f"{row['full'] / g:.2f}", f"{row['plan'] / g:.2f}",
                      f"{row['saved'] / g:.2f}")
    table.add_section()
    table.add_row("total", "", f"{out['full'] / g:.2f}", f"{out['plan'] / g:.2f}", f"{out['saved'] / g:.2f}")
    _console().print(table)
    return 0


def _list_presets(as_json: bool) -> int:
    from dataclasses import asdict

    from .presets import PRESETS

    if as_json:
        _print_json({name: {"hf_id": p.hf_id, "architecture": p.architecture, **asdict(p.dims)} for name, p in PRESETS.items()})
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
    _console().print(table)
    return 0


# -- vskip plan show | validate -------------------------------------------------------------------
def add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="inspect and check skip-plan files")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="{show,validate,import,export}")

    show = verbs.add_parser("show", help="the plan's layers, ops and provenance")
    show.add_argument("plan", metavar="PLAN.json")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(run=run_plan_show)

    val = verbs.add_parser("validate", help="check a plan file, optionally against a model")
    val.add_argument("plan", metavar="PLAN.json")
    which = val.add_mutually_exclusive_group()
    which.add_argument("--layers", type=_pos_int, help="the model's decoder layer count")
    which.add_argument("--preset", help="a known model (layer count and architecture)")
    which.add_argument("--config", metavar="config.json",
                       help="a Hugging Face config.json (layer count, architecture and config hash)")
    val.set_defaults(run=run_plan_validate)

    imp = verbs.add_parser("import", help="an OpSkip policy (configs/<family>/preset{N}.json) -> a plan")
    imp.add_argument("policy", metavar="POLICY.json")
    imp.add_argument("--out", metavar="PLAN.json", help="write the plan here (default: print it)")
    imp.add_argument("--layers", type=_pos_int, help="the model's decoder layer count, checked")
    imp.set_defaults(run=run_plan_import)

    exp = verbs.add_parser("export", help="a plan -> an OpSkip policy")
    exp.add_argument("plan", metavar="PLAN.json")
    exp.add_argument("--out", metavar="POLICY.json", help="write the policy here (default: print it)")
    exp.set_defaults(run=run_plan_export)


def run_plan_show(args: argparse.Namespace) -> int:
    plan = _load_plan(args.plan)
    if args.json:
        _print_json(plan.to_dict())
        return 0
    from rich.table import Table

    console = _console()
    console.print(str(plan))
    console.print(f"version {plan.version}, scope {plan.scope}, model {json.dumps(plan.model)}")
    for key, value in (plan.provenance or {}).items():
        console.print(f"  {key}: {json.dumps(value)}")
    table = Table(title=plan.name or args.plan)
    for col in ("layer", "op", "visual attention", "visual FFN"):
        table.add_column(col, justify="right" if col == "layer" else "left")
    for i, op in enumerate(plan.ops):
        table.add_row(str(i), op, "skipped" if plan.skips_attn(i) else "kept",
                      "skipped" if plan.skips_ffn(i) else "kept")
    console.print(table)
    return 0


def run_plan_validate(args: argparse.Namespace) -> int:
    plan = _load_plan(args.plan)
    against = ""
    # Architecture names are HF class names (config.json "architectures", as adapters stamp
    # them). --layers and --preset carry no text config: a config hash is checked only with --config.
    model = dict(plan.model or {})
    no_hash = dataclasses.replace(plan, model={k: v for k, v in model.items() if k != "config_hash"})
    if args.layers is not None:
        no_hash.check_model(model.get("architecture", ""), args.layers, {})
        against = f" for a {args.layers}-layer model"
    elif args.preset is not None:
        from .presets import get_preset

        preset = get_preset(args.preset)
        no_hash.check_model(preset.architecture, preset.dims.layers, {}, aliases=preset.aliases)
        against = f" for preset {preset.name}"
    elif args.config is not None:
        cfg = _read_json(args.config)
        if not isinstance(cfg, dict):
            raise UsageError(f"{args.config}: a config.json is a JSON object, got {type(cfg).__name__}")
        dims = TextDims.from_hf_config(cfg)
        text = hf_text_config(cfg) if model.get("config_hash") else {}
        arch = (cfg.get("architectures") or [model.get("architecture", "")])[0]
        plan.check_model(arch, dims.layers, text, aliases=[cfg["model_type"]] if isinstance(cfg.get("model_type"), str) else [])
        against = f" for {args.config}"
    print(f"valid{against}: {plan}")
    return 0


def _write_or_print(obj: Any, out: str | None) -> None:
    if out is None:
        _print_json(obj)
        return
    Path(out).write_text(json.dumps(obj, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)


def run_plan_import(args: argparse.Namespace) -> int:
    plan = SkipPlan.from_opskip(_read_json(args.policy), num_layers=args.layers)
    _write_or_print(plan.to_dict(), args.out)
    return 0


def run_plan_export(args: argparse.Namespace) -> int:
    _write_or_print(_load_plan(args.plan).to_opskip(), args.out)
    return 0


# -- vskip demo -----------------------------------------------------------------------------------
def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the shipped model: plan, FLOPs cut, answers full vs skip")
    p.add_argument("-n", type=_int_in(1, 100), default=4, help="how many test questions (1..100)")
    p.add_argument("--backend", default="inductor", choices=["inductor", "eager"],
                   help="inner compiler of the skip-shaped prefill graph")
    p.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from .demo import run

    return run(_console(), n=args.n, backend=args.backend)


# -- vskip calibrate ------------------------------------------------------------------------------
def _model_dir(args: argparse.Namespace) -> Path:
    if args.model_dir:
        return Path(args.model_dir)
    from .zoo.easyvqa import MODEL_DIR

    return MODEL_DIR


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {value}")
    return value


def add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="find answer-silent visual-row operators on easy-VQA train samples; write skip plans",
        description="Score every (layer, attention/FFN) visual-row update by exact ablation and a "
        "first-order estimate on train-split samples (the model's own answers as targets), select "
        "under a FLOPs budget or a fidelity tolerance, re-measure and repair, write plan JSON files.",
    )
    p.add_argument("--model-dir", help="easy-VQA Qwen3-VL directory (default: the zoo model)")
    p.add_argument("--samples", type=_pos_int, default=256, help="train-split questions (default 256)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--budget", type=_fraction, nargs="+", help="decoder prefill FLOPs cut(s) to reach, e.g. 0.4")
    which.add_argument("--tolerance", type=_fraction, help="largest plan whose answer agreement is >= 1 - tolerance")
    p.add_argument("--fidelity", type=_fraction, default=0.995,
                   help="answer agreement with the full model a budgeted plan must keep (default 0.995)")
    p.add_argument("--granularity", choices=("op", "layer", "both"), default="op",
                   help="op: operator-level plans (opskip-*); layer: whole-layer freezes (shortv-*); both")
    p.add_argument("--out-dir", help="where plans go (default: <model-dir>/plans)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=_pos_int, default=128)
    p.add_argument("--workers", type=_pos_int, default=2,
                   help="single-threaded processes for the per-candidate ablations (default 2)")
    p.add_argument("--threads", type=_nonneg_int, default=1,
                   help="torch threads (default 1: on a shared CPU several threads spin against each other)")
    p.add_argument("--json", action="store_true", help="print the plans as JSON")
    p.set_defaults(run=run_calibrate)


def run_calibrate(args: argparse.Namespace) -> int:
    import random

    import torch
    from tqdm import tqdm

    from . import calibrate, evaluate
    from .zoo import easyvqa

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = _model_dir(args)
    model, processor = evaluate.load_model(model_dir)
    train = easyvqa.train_set()
    if not 0 < args.samples <= len(train):
        raise UsageError(f"--samples must be in 1..{len(train)}")
    picked = sorted(random.Random(args.seed).sample(range(len(train)), args.samples))
    h = evaluate.Harness(model, processor, [train[i] for i in picked])
    batches = list(h.prompt_batches(range(len(picked)), args.batch_size))
    calib = calibrate.CalibSet.build(model, batches)
    out_dir = Path(args.out_dir) if args.out_dir else model_dir / "plans"
    out_dir.mkdir(parents=True, exist_ok=True)
    budgets = args.budget if args.budget else [None]
    fidelity = 1 - args.tolerance if args.tolerance else args.fidelity
    extra = {"seed": args.seed, "train_indices_sha": _sha(picked), "command": _command(args),
             "weights_sha256": _file_sha(model_dir / "model.safetensors")}
    console = _console()
    written, report = [], []
    grans = ("op", "layer") if args.granularity == "both" else (args.granularity,)
    for gran in grans:
        scores = calibrate.score_candidates(model, calib, gran, progress=lambda xs: tqdm(xs, desc=f"ablate {gran}"),
                                            workers=args.workers)
        plans = calibrate.calibrate(model, calib, budgets, granularity=gran, fidelity=fidelity, scores=scores,
                                    extra_provenance=extra)
        for plan in plans:
            path = out_dir / f"{plan.name}.json"
            plan.save(path)
            written.append(path)
            pv = plan.provenance
            report.append({"plan": plan.name, "ops": str(plan), "flops_cut": pv["flops_cut"], "fidelity": pv["fidelity"],
                           "fidelity_met": pv["fidelity_met"], "path": str(path)})
        if gran == "op":
            console.print(f"Spearman rank correlation, exact ablation vs first-order estimate: {scores.spearman():.3f}")
    if args.json:
        _print_json(report)
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


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run, from the parsed options (written into outputs)."""
    parts = ["vskip", args.command]
    for key, value in sorted(vars(args).items()):
        if key in ("run", "command", "verb") or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif isinstance(value, (list, tuple)):
            parts += [flag, *map(str, value)]
        else:
            parts += [flag, str(value)]
    return " ".join(parts)


def _file_sha(path: Path) -> str | None:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _sha(xs) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(list(xs)).encode()).hexdigest()[:16]


# -- vskip eval -------------------------------------------------------------------------------------
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
    p.add_argument("--budgets", type=_fraction, nargs="+", default=[0.2, 0.3, 0.4, 0.5, 0.6])
    p.add_argument("--methods", nargs="+", default=["opskip", "shortv", "vtw", "fastv"],
                   choices=["opskip", "shortv", "vtw", "fastv"])
    p.add_argument("--limit", type=_pos_int, help="first N test questions only")
    p.add_argument("--images-per-batch", type=_pos_int, default=32)
    p.add_argument("--workers", type=_pos_int, default=2, help="single-threaded worker processes (default 2)")
    p.add_argument("--verify", type=_nonneg_int, default=24,
                   help="questions checked one at a time against independent runs first (0: skip)")
    p.add_argument("--fastv-layer", type=_nonneg_int, default=2, help="FastV drop layer K (lowered if a budget needs)")
    p.add_argument("--threads", type=_nonneg_int, default=1,
                   help="torch threads (default 1: on a shared CPU several threads spin against each other)")
    p.add_argument("--time-samples", type=_nonneg_int, default=32,
                   help="questions (of the most common prompt length) whose prefill is timed on each method's "
                   "real implementation; the median is reported (default 32; 0: no timing)")
    p.add_argument("--time-backend", choices=["eager", "inductor"], default="eager",
                   help="vskip_compile.compile backend timing the full model and the opskip/shortv plans "
                   "(default eager: like the baselines, which run eager HF layers whatever this says)")
    p.add_argument("--time-repeats", type=_pos_int, default=3,
                   help="interleaved timing rounds; per question the fastest counts (default 3)")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.set_defaults(run=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    import time

    import torch

    from . import evaluate
    from .flops import hf_text_config as _text
    from .plan import config_hash
    from .zoo import easyvqa

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = _model_dir(args)
    model, processor = evaluate.load_model(model_dir)
    plans_dir = Path(args.plans_dir) if args.plans_dir else model_dir / "plans"
    out_dir = Path(args.out_dir) if args.out_dir else model_dir / "eval"
    test = easyvqa.test_set()
    indices = list(range(min(args.limit, len(test)) if args.limit else len(test)))
    t0 = time.time()
    h = evaluate.Harness(model, processor, test)
    S_cal = evaluate.calibration_seq_len(plans_dir) or evaluate.median([h.prompt_len(q) for q in indices])
    try:
        methods = evaluate.build_methods(model, args.budgets, plans_dir, args.methods, S_cal, h.num_visual,
                                         fastv_layer=args.fastv_layer)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from e
    mismatches = {}
    if args.verify:
        step = max(1, len(indices) // args.verify)
        sample = indices[::step][: args.verify]
        mismatches = evaluate.verify_against_unbatched(h, methods, sample)
        if any(mismatches.values()):
            raise evaluate.EvalError(f"harness answers differ from one-at-a-time runs: {mismatches}")
    rows = evaluate.sweep(h, methods, indices=indices, images_per_batch=args.images_per_batch, workers=args.workers)
    timed = evaluate.timing_subset(h, indices, args.time_samples)
    timing: dict = {"questions": 0}
    if timed:
        timings = evaluate.time_prefill(model, methods, [h.full_inputs(q) for q in timed], backend=args.time_backend,
                                        repeats=max(1, args.time_repeats), adapter=h.adapter)
        timing = {
            "questions": len(timed),
            "question_indices": timed,
            "layout": {"S": h.prompt_len(timed[0]), "V": h.num_visual},
            "backend": args.time_backend,
            "repeats": max(1, args.time_repeats),
            **evaluate.add_timings(rows, timings),
            "implementations": evaluate.timing_implementations(args.time_backend),
        }
    meta = {
        "title": f"easy-VQA test ({len(indices)} questions), {type(model).__name__}",
        "command": _command(args),
        "model_dir": str(model_dir),
        "weights_sha256": _file_sha(model_dir / "model.safetensors"),
        "model": {"architecture": type(model).__name__, "config_hash": config_hash(_text(model.config))},
        "questions": len(indices),
        "budgets": args.budgets,
        "calibration_layout": {"S": S_cal, "V": h.num_visual},
        "verified_questions": args.verify,
        "verify_mismatches": mismatches,
        "threads": torch.get_num_threads(),
        "workers": args.workers,
        "timing": timing,
        "seconds": round(time.time() - t0, 1),
        "notes": evaluate.NOTES,
    }
    paths = evaluate.write_results(rows, out_dir, meta)
    if args.json:
        _print_json(rows)
    else:
        print(evaluate.format_table(rows))
        print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


# -- vskip bench ----------------------------------------------------------------------------------
def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="prefill timing at real layer widths: compiled full vs skip vs eager")
    p.add_argument("--models", nargs="+", default=["qwen3-vl-8b", "llava-1.5-7b"])
    p.add_argument("--visual", nargs="+", type=_int_in(1, 1 << 16), default=[576, 1024], help="visual rows per case")
    p.add_argument("--text", type=_int_in(1, 1 << 16), default=64, help="text rows")
    p.add_argument("--layers", type=_int_in(1, 256), default=2, help="decoder layers (random weights)")
    p.add_argument("--repeats", type=_pos_int, default=5, help="interleaved rounds; medians are printed")
    p.add_argument("--ops", nargs="+", default=None, choices=OPS, help="plan ops, repeated over the layers")
    p.add_argument("--threads", type=_pos_int, default=None,
                   help="torch intra-op threads (default: torch's own choice, one per core)")
    p.add_argument("--device", default="cpu", help="torch device (cuda on a GPU)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weights and activations")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from .bench import DEFAULT_OPS, run

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    rows = run(_console(stderr=args.json), args.models, tuple(args.visual), args.text, args.layers, args.repeats,
               tuple(args.ops) if args.ops else DEFAULT_OPS, device=args.device, dtype=args.dtype)
    if args.json:
        _print_json(rows)
    return 0


from .export.cli import add_export, add_run  # noqa: E402  (vskip export / vskip run; imports only argparse)

# -- vskip serve ----------------------------------------------------------------------------------
def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a VLM under a skip plan: OpenAI-compatible HTTP on Ray Serve",
        description="Deploy the model (compiled under the plan, or its ONNX engine) on Ray Serve: "
        "POST /v1/chat/completions (base64 data-URL images + text, greedy), GET /health. Requests "
        "of the same visual layout are batched into one prefill. Starts a local Ray instance, or "
        "joins a cluster with --address. Needs the serve extra: pip install 'vskip-compile[serve]'.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="model directory (config.json, weights, processor)")
    p.add_argument("--plan", required=True, metavar="PLAN.json", help="skip plan for this model")
    p.add_argument("--engine", choices=("inductor", "eager", "onnx"), default="inductor",
                   help="inductor (default) or eager: vskip_compile.compile backends; onnx: an exported engine")
    p.add_argument("--engine-dir", metavar="DIR", help="ONNX engine directory written by export_onnx (--engine onnx)")
    p.add_argument("--replicas", type=_pos_int, default=1, help="model replicas (default 1)")
    p.add_argument("--replica-cpus", type=_float_in(0, low_open=True), default=1.0,
                   help="CPUs Ray reserves per replica (default 1)")
    p.add_argument("--threads", type=_pos_int, default=1, help="intra-op threads per replica (default 1)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--address", help="join this Ray cluster (auto, or HEAD:6379) instead of starting a local Ray")
    p.add_argument("--max-batch-size", type=_pos_int, default=8, help="requests per batch (default 8)")
    p.add_argument("--batch-wait-ms", type=_float_in(0, 60_000), default=20.0,
                   help="how long a batch waits to fill (default 20)")
    p.add_argument("--max-layouts", type=_pos_int, default=32,
                   help="kept for compatibility; no effect: one polymorphic prefill graph serves every layout")
    p.add_argument("--max-tokens", type=_pos_int, default=64, help="largest max_tokens a request may ask (default 64)")
    p.add_argument("--max-image-bytes", type=_pos_int, default=4 * 1024 * 1024, help="largest image file (default 4 MiB)")
    p.add_argument("--metrics-port", type=_port, help="Prometheus port of a local Ray's metrics (not with --address)")
    p.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import threading

    from . import modeldir

    # The user's files first: a bad one is refused before Ray starts.
    model_dir = Path(args.model)
    try:
        text = hf_text_config(modeldir.check(model_dir))
    except DimsError as e:
        raise DimsError(f"{model_dir / 'config.json'}: {e}") from e
    modeldir.check_processor(model_dir)
    plan = _load_plan(args.plan)
    if plan.num_layers != text.get("num_hidden_layers"):
        raise UsageError(f"{args.plan} has {plan.num_layers} layers; {model_dir} has {text.get('num_hidden_layers')}")
    if args.engine == "onnx" and not args.engine_dir:
        raise UsageError("--engine onnx needs --engine-dir (a directory written by export_onnx)")
    if args.address and args.metrics_port is not None:
        raise UsageError("--metrics-port sets up a local Ray; with --address, the cluster's `ray start` sets it")
    from .serve import use_loopback

    if not args.address:
        use_loopback()  # a local Ray instance stays on 127.0.0.1
    try:
        from .serve import app as serve_app
    except ImportError as e:
        raise UsageError(f"vskip serve needs the serve extra: pip install 'vskip-compile[serve]' ({e})") from e
    from .serve.request import Limits

    limits = Limits(max_tokens=args.max_tokens, default_max_tokens=min(16, args.max_tokens),
                    max_image_bytes=args.max_image_bytes)
    options = serve_app.ServeOptions(
        model_dir=str(model_dir), plan=plan.to_dict(), engine=args.engine, engine_dir=args.engine_dir,
        replicas=args.replicas, replica_cpus=args.replica_cpus, threads=args.threads,
        max_batch_size=args.max_batch_size, batch_wait_s=args.batch_wait_ms / 1000, max_layouts=args.max_layouts,
        limits=limits,
    )
    url = serve_app.start(options, host=args.host, port=args.port, address=args.address, metrics_port=args.metrics_port)
    print(f"serving {model_dir} under {plan} ({args.engine}, {args.replicas} replica(s)) at {url}/v1/chat/completions; "
          "Ctrl-C stops", flush=True)
    try:
        threading.Event().wait()  # a server: runs until interrupted
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        serve_app.stop()
    return 0


# -- vskip passes ---------------------------------------------------------------------------------
def add_passes(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("passes", help="the ordered list of graph passes the compiler runs")
    p.set_defaults(run=run_passes)


def run_passes(args: argparse.Namespace) -> int:
    from .passes import describe_passes

    print(describe_passes())
    return 0


# -- vskip check ----------------------------------------------------------------------------------
def add_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="can a local model be compiled with visual skipping? per-layer report + parity verdict")
    p.add_argument("model_dir", nargs="?", help="a local Hugging Face model directory (loaded offline)")
    p.add_argument("--all-registered", action="store_true",
                   help="sweep transformers' image-text-to-text registry with a tiny random model per family")
    p.add_argument("--families", nargs="+", metavar="MODEL_TYPE", help="with --all-registered: only these families")
    p.add_argument("--backend", default="eager", choices=["eager", "inductor"], help="inner compiler of the parity check")
    p.add_argument("--seed", type=_int_in(0), default=0, help="seed of the random inputs and plan")
    p.add_argument("--json", action="store_true", help="the report as JSON")
    p.set_defaults(run=run_check)


def run_check(args: argparse.Namespace) -> int:
    """Exit 0 only when the model is supported (--all-registered: when no family fails)."""
    from . import check

    if args.all_registered == (args.model_dir is not None):
        raise UsageError("give a MODEL_DIR or --all-registered (one of them)")
    if args.families and not args.all_registered:
        raise UsageError("--families goes with --all-registered")
    if args.all_registered:
        from .archs.shrink import registered_families

        unknown = sorted(set(args.families or ()) - set(registered_families()))
        if unknown:
            raise UsageError(f"--families: not in the image-text-to-text registry: {', '.join(unknown)}")
        if args.json:
            results = check.sweep(args.families, seed=args.seed, backend=args.backend)
            _print_json([dataclasses.asdict(r) for r in results])
        else:
            print(check.TABLE_HEADER, flush=True)
            results = check.sweep(args.families, seed=args.seed, backend=args.backend,
                                  on_result=lambda r: print(check.table_row(r), flush=True))
            print(f"\n{check.summary(results)}")
        return 1 if any(r.verdict == "fail" for r in results) else 0
    report = check.check_dir(args.model_dir, seed=args.seed, backend=args.backend)
    if args.json:
        _print_json(report.to_dict())
    else:
        print(report.render())
    return 0 if report.supported else 1


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_flops, add_plan, add_passes, add_demo, add_calibrate, add_eval, add_bench, add_export, add_run, add_serve,
    add_check,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vskip", description="Operator-level visual skipping for multimodal LLM prefill.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command: 0 on success; a user error (VSkipError): one line on stderr, 2; any
    other exception is ours: its traceback, 1. Bad arguments exit 2 through argparse."""
    args = build_parser().parse_args(argv)
    name = " ".join(str(x) for x in (args.command, getattr(args, "verb", None)) if x)
    try:
        return args.run(args)
    except USER_ERRORS as e:
        print(f"vskip {name}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader stopped early (`| head`): end quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception:  # a bug, not the user's input: show where
        traceback.print_exc()
        print(f"vskip {name}: internal error (the traceback above is a bug; please report it)", file=sys.stderr)
        return 1
