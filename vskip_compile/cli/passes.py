"""`vskip passes`: the ordered list of graph passes the compiler runs."""

from __future__ import annotations

import argparse


def add_passes(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("passes", help="the ordered list of graph passes the compiler runs")
    p.set_defaults(run=run_passes)


def run_passes(args: argparse.Namespace) -> int:
    from ..passes import describe_passes

    print(describe_passes())
    return 0
