"""`python -m vskip_compile` is the `vskip` command."""

from .cli import main

raise SystemExit(main())
