"""What every `vskip` subcommand shares: UsageError, argparse number types, JSON and console output."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable

from ..errors import VSkipError
from ..flops import DimsError, TextDims
from ..plan import SkipPlan


class UsageError(VSkipError, ValueError):
    """Bad command-line input (a missing file, a file that is not JSON, a bad number)."""


MAX_ROWS = 1 << 24  # no decoder has a context this long: a larger row count is a typo


def read_json(path: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: not a JSON file ({e})") from e


def load_plan(path: str) -> SkipPlan:
    return SkipPlan.load(path)


def add_model_args(p: argparse.ArgumentParser, required: bool) -> None:
    which = p.add_mutually_exclusive_group(required=required)
    which.add_argument("--preset", help="a known model, e.g. qwen3-vl-8b (see `vskip flops --list-presets`)")
    which.add_argument("--config", metavar="config.json", help="any Hugging Face config.json")


def model_dims(args: argparse.Namespace) -> tuple[str, TextDims, int | None]:
    """(model label, dims, max_position_embeddings or None) from --preset or --config."""
    if args.preset is not None:
        from ..presets import get_preset

        preset = get_preset(args.preset)
        return preset.name, preset.dims, preset.max_positions
    cfg = read_json(args.config)
    if not isinstance(cfg, dict):
        raise UsageError(f"{args.config}: a config.json is a JSON object, got {type(cfg).__name__}")
    try:
        dims = TextDims.from_hf_config(cfg)
    except (DimsError, TypeError, ValueError) as e:  # transformers' own field checks raise these
        raise DimsError(f"{args.config}: {' '.join(str(e).split())}") from e
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    limit = text.get("max_position_embeddings")
    return args.config, dims, limit if isinstance(limit, int) and not isinstance(limit, bool) else None


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
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


def float_in(low: float, high: float | None = None, low_open: bool = False) -> Callable[[str], float]:
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


nonneg_int = int_in(0)
pos_int = int_in(1)
row_count = int_in(0, MAX_ROWS)
port = int_in(1, 65535)


def make_console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr)


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


def write_or_print(obj: Any, out: str | None) -> None:
    if out is None:
        print_json(obj)
        return
    Path(out).write_text(json.dumps(obj, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)


def model_dir_of(args: argparse.Namespace) -> Path:
    if args.model_dir:
        return Path(args.model_dir)
    from ..zoo.easyvqa import MODEL_DIR

    return MODEL_DIR


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {value}")
    return value


def command_line(args: argparse.Namespace) -> str:
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


