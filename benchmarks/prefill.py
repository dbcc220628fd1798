"""Prefill benchmark at real layer widths (same as `vskip bench`).

    python benchmarks/prefill.py [--models qwen3-vl-8b llava-1.5-7b] [--visual 576 1024] [--layers 2] [--repeats 5] [--json]
"""

import sys

from vskip_compile.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
