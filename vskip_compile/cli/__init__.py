"""`vskip`: the command line. A thin shell over the Python API; nothing imports it.

One module per subcommand group (flops, plan, demo, experiments: calibrate + eval, bench,
serve, passes; export and run live in vskip_compile.export.cli), their shared argument
types and output helpers in `common`. Adding a subcommand: write `add_<name>(sub)` that
makes its parser with `sub.add_parser(...)` and sets `run=<function(args) -> exit code>`
with `set_defaults`, then list it in SUBCOMMANDS here.
Import heavy modules (torch, transformers) inside the run function so `vskip --help` stays
fast. A problem the user can fix raises a VSkipError (UsageError here): one line on stderr
naming what is wrong, exit code 2; any other exception, or a VSkipError marked `internal`
(a pass that cannot prove its rewrite), is a bug: its traceback, exit code 1.
Numbers are checked by their argparse type (`common.int_in`), so a bad one names its flag.
Rich tables for people, `--json` for machines.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Callable, Sequence

from ..errors import VSkipError
from ..export.cli import add_export, add_run  # imports only argparse
from .bench import add_bench
from .check import add_check
from .demo import add_demo
from .experiments import add_calibrate, add_eval
from .flops import add_flops
from .passes import add_passes
from .plan import add_plan
from .serve import add_serve


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
    """Run one command: 0 on success; a user error (a VSkipError not marked `internal`): one
    line on stderr, 2; any other exception (SkipPassError included) is ours: its traceback, 1.
    Bad arguments exit 2 through argparse."""
    args = build_parser().parse_args(argv)
    name = " ".join(str(x) for x in (args.command, getattr(args, "verb", None)) if x)
    try:
        return args.run(args)
    except BrokenPipeError:  # the reader stopped early (`| head`): end quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:
        if isinstance(e, VSkipError) and not e.internal:
            print(f"vskip {name}: error: {' '.join(str(e).split())}", file=sys.stderr)
            return 2
        traceback.print_exc()  # a bug, not the user's input: show where
        print(f"vskip {name}: internal error (the traceback above is a bug; please report it)", file=sys.stderr)
        return 1
