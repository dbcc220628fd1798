"""`python -m vskip_compile.lmms` prints the task folder to pass to lmms-eval's --include_path."""

from . import TASKS_DIR

print(TASKS_DIR)
