"""`vskip plan show | validate | import | export`: skip-plan files."""

from __future__ import annotations

import argparse
import dataclasses
import json

from ..flops import TextDims, hf_text_config
from ..plan import SkipPlan
from .common import UsageError, load_plan, make_console, pos_int, print_json, read_json, write_or_print


def add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="inspect and check skip-plan files")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="{show,validate,import,export,migrate}")

    show = verbs.add_parser("show", help="the plan's layers, ops and provenance")
    show.add_argument("plan", metavar="PLAN.json")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(run=run_plan_show)

    val = verbs.add_parser("validate", help="check a plan file, optionally against a model")
    val.add_argument("plan", metavar="PLAN.json")
    which = val.add_mutually_exclusive_group()
    which.add_argument("--layers", type=pos_int, help="the model's decoder layer count")
    which.add_argument("--preset", help="a known model (layer count and architecture)")
    which.add_argument("--config", metavar="config.json",
                       help="a Hugging Face config.json (layer count, architecture and config hash)")
    val.set_defaults(run=run_plan_validate)

    imp = verbs.add_parser("import", help="an OpSkip policy (configs/<family>/preset{N}.json) -> a plan")
    imp.add_argument("policy", metavar="POLICY.json")
    imp.add_argument("--out", metavar="PLAN.json", help="write the plan here (default: print it)")
    imp.add_argument("--layers", type=pos_int, help="the model's decoder layer count, checked")
    imp.set_defaults(run=run_plan_import)

    exp = verbs.add_parser("export", help="a plan -> an OpSkip policy")
    exp.add_argument("plan", metavar="PLAN.json")
    exp.add_argument("--out", metavar="POLICY.json", help="write the policy here (default: print it)")
    exp.set_defaults(run=run_plan_export)

    mig = verbs.add_parser("migrate", help="a plan file of an older schema version -> the current one")
    mig.add_argument("plan", metavar="PLAN.json")
    mig.add_argument("--out", metavar="PLAN.json", help="write the plan here (default: print it)")
    mig.set_defaults(run=run_plan_migrate)


def run_plan_show(args: argparse.Namespace) -> int:
    plan = load_plan(args.plan)
    if args.json:
        print_json(plan.to_dict())
        return 0
    from rich.table import Table

    console = make_console()
    console.print(str(plan))
    console.print(f"version {plan.version}, scope {plan.scope}, rows {plan.rows}, model {json.dumps(plan.model)}")
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
    plan = load_plan(args.plan)
    against = ""
    # Architecture names are HF class names (config.json "architectures", as adapters stamp
    # them). --layers and --preset carry no text config: a config hash is checked only with --config.
    model = dict(plan.model or {})
    no_hash = dataclasses.replace(plan, model={k: v for k, v in model.items() if k != "config_hash"})
    if args.layers is not None:
        no_hash.check_model(model.get("architecture", ""), args.layers, {})
        against = f" for a {args.layers}-layer model"
    elif args.preset is not None:
        from ..presets import get_preset

        preset = get_preset(args.preset)
        no_hash.check_model(preset.architecture, preset.dims.layers, {}, aliases=preset.aliases)
        against = f" for preset {preset.name}"
    elif args.config is not None:
        cfg = read_json(args.config)
        if not isinstance(cfg, dict):
            raise UsageError(f"{args.config}: a config.json is a JSON object, got {type(cfg).__name__}")
        dims = TextDims.from_hf_config(cfg)
        text = hf_text_config(cfg) if model.get("config_hash") else {}
        arch = (cfg.get("architectures") or [model.get("architecture", "")])[0]
        plan.check_model(arch, dims.layers, text, aliases=[cfg["model_type"]] if isinstance(cfg.get("model_type"), str) else [])
        against = f" for {args.config}"
    print(f"valid{against}: {plan}")
    return 0


def run_plan_import(args: argparse.Namespace) -> int:
    plan = SkipPlan.from_opskip(read_json(args.policy), num_layers=args.layers)
    write_or_print(plan.to_dict(), args.out)
    return 0


def run_plan_export(args: argparse.Namespace) -> int:
    write_or_print(load_plan(args.plan).to_opskip(), args.out)
    return 0


def run_plan_migrate(args: argparse.Namespace) -> int:
    write_or_print(load_plan(args.plan).to_dict(), args.out)  # load migrates; to_dict writes the current version
    return 0
