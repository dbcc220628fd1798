"""`vskip check`: can a local model be compiled with visual skipping (vskip_compile.check)."""

from __future__ import annotations

import argparse
import dataclasses

from .common import UsageError, int_in, print_json


def add_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="can a local model be compiled with visual skipping? per-layer report + parity verdict")
    p.add_argument("model_dir", nargs="?", help="a local Hugging Face model directory (loaded offline)")
    p.add_argument("--all-registered", action="store_true",
                   help="sweep transformers' image-text-to-text registry with a tiny random model per family")
    p.add_argument("--families", nargs="+", metavar="MODEL_TYPE", help="with --all-registered: only these families")
    p.add_argument("--backend", default="eager", choices=["eager", "inductor"], help="inner compiler of the parity check")
    p.add_argument("--seed", type=int_in(0), default=0, help="seed of the random inputs and plan")
    p.add_argument("--json", action="store_true", help="the report as JSON")
    p.set_defaults(run=run_check)


def run_check(args: argparse.Namespace) -> int:
    """Exit 0 only when the model is supported (--all-registered: when no family fails)."""
    from .. import check

    if args.all_registered == (args.model_dir is not None):
        raise UsageError("give a MODEL_DIR or --all-registered (one of them)")
    if args.families and not args.all_registered:
        raise UsageError("--families goes with --all-registered")
    if args.all_registered:
        from ..archs.shrink import registered_families

        unknown = sorted(set(args.families or ()) - set(registered_families()))
        if unknown:
            raise UsageError(f"--families: not in the image-text-to-text registry: {', '.join(unknown)}")
        if args.json:
            results = check.sweep(args.families, seed=args.seed, backend=args.backend)
            print_json([dataclasses.asdict(r) for r in results])
        else:
            print(check.TABLE_HEADER, flush=True)
            results = check.sweep(args.families, seed=args.seed, backend=args.backend,
                                  on_result=lambda r: print(check.table_row(r), flush=True))
            print(f"\n{check.summary(results)}")
        return 1 if any(r.verdict == "fail" for r in results) else 0
    report = check.check_dir(args.model_dir, seed=args.seed, backend=args.backend)
    if args.json:
        print_json(report.to_dict())
    else:
        print(report.render())
    return 0 if report.supported else 1
