"""`vskip demo`: the shipped model, its plan, FLOPs cut and answers full vs skip."""

from __future__ import annotations

import argparse

from .common import int_in, make_console


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the shipped model: plan, FLOPs cut, answers full vs skip")
    p.add_argument("-n", type=int_in(1, 100), default=4, help="how many test questions (1..100)")
    p.add_argument("--backend", default="inductor", choices=["inductor", "eager"],
                   help="inner compiler of the skip-shaped prefill graph")
    p.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from ..demo import run

    return run(make_console(), n=args.n, backend=args.backend)
