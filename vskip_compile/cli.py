"""`vskip`: the command line. A thin shell over the Python API; nothing imports it.

Adding a subcommand: write `add_<name>(sub)` that makes its parser with `sub.add_parser(...)`
and sets `run=<function(args) -> exit code>` with `set_defaults`, then list it in SUBCOMMANDS.
Import heavy modules (torch, transformers) inside the run function so `vskip --help` stays
fast. A problem the user can fix raises one of USER_ERRORS: exit code 2 and the message.
Rich tables for people, `--json` for machines.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from .flops import DimsError, TextDims, hf_text_config, plan_report
from .layout import LayoutError
from .plan import PlanError, SkipPlan


class UsageError(ValueError):
    """Bad command-line input (a missing file, a file that is not JSON, a bad number)."""


# Errors that are the user's to fix: reported as "vskip: error: ..." with exit code 2.
USER_ERRORS: tuple[type[Exception], ...] = (UsageError, PlanError, DimsError, LayoutError)


# -- shared helpers -------------------------------------------------------------------------------
def _read_json(path: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: not a JSON file ({e})") from e


def _load_plan(path: str) -> SkipPlan:
    if not Path(path).is_file():
        raise UsageError(f"plan file not found: {path}")
    return SkipPlan.load(path)


def _add_model_args(p: argparse.ArgumentParser, required: bool) -> None:
    which = p.add_mutually_exclusive_group(required=required)
    which.add_argument("--preset", help="a known model, e.g. qwen3-vl-8b (see `vskip flops --list-presets`)")
    which.add_argument("--config", metavar="config.json", help="any Hugging Face config.json")


def _dims(args: argparse.Namespace) -> tuple[str, TextDims]:
    """(model label, dims) from --preset or --config."""
    if args.preset is not None:
        from .presets import get_preset

        preset = get_preset(args.preset)
        return preset.name, preset.dims
    return args.config, TextDims.from_hf_config(_read_json(args.config))


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative int, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative int, got {value}")
    return value


def _console():
    from rich.console import Console

    return Console()


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
    p.add_argument("--visual", type=_nonneg_int, help="visual rows (image tokens)")
    p.add_argument("--text", type=_nonneg_int, help="text rows")
    p.add_argument("--prefix", type=_nonneg_int, default=0,
                   help="text rows before the image (frozen too under plan scope prefix_through_visual)")
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
    label, dims = _dims(args)
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
    which.add_argument("--layers", type=_nonneg_int, help="the model's decoder layer count")
    which.add_argument("--preset", help="a known model (layer count and architecture)")
    which.add_argument("--config", metavar="config.json",
                       help="a Hugging Face config.json (layer count, architecture and config hash)")
    val.set_defaults(run=run_plan_validate)

    imp = verbs.add_parser("import", help="an OpSkip policy (configs/<family>/preset{N}.json) -> a plan")
    imp.add_argument("policy", metavar="POLICY.json")
    imp.add_argument("--out", metavar="PLAN.json", help="write the plan here (default: print it)")
    imp.add_argument("--layers", type=_nonneg_int, help="the model's decoder layer count, checked")
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
        no_hash.check_model(preset.architecture, preset.dims.layers, {})
        against = f" for preset {preset.name}"
    elif args.config is not None:
        cfg = _read_json(args.config)
        dims = TextDims.from_hf_config(cfg)
        text = hf_text_config(cfg) if model.get("config_hash") else {}
        arch = (cfg.get("architectures") or [model.get("architecture", "")])[0]
        plan.check_model(arch, dims.layers, text)
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
    p.add_argument("-n", type=int, default=4, help="how many test questions")
    p.add_argument("--backend", default="inductor", choices=["inductor", "eager"],
                   help="inner compiler of the skip-shaped prefill graph")
    p.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from .demo import run

    return run(_console(), n=args.n, backend=args.backend)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_flops, add_plan, add_demo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vskip", description="Operator-level visual skipping for multimodal LLM prefill.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except USER_ERRORS as e:
        name = " ".join(str(x) for x in (args.command, getattr(args, "verb", None)) if x)
        print(f"vskip {name}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader stopped early (`| head`): end quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
