"""lmms-eval plugin: the `vskip` model (a HF VLM with a skip plan) and an offline easy-VQA task.

    LMMS_EVAL_PLUGINS=vskip_compile.lmms python -m lmms_eval --model vskip \\
        --model_args pretrained=DIR,plan=PLAN.json,backend=inductor \\
        --tasks easyvqa --include_path "$(python -m vskip_compile.lmms)" --limit 200

lmms-eval 0.7 reads `LMMS_EVAL_PLUGINS`: it imports `<plugin>.models` for AVAILABLE_MODELS
(model name -> class name in `<plugin>.models.<name>`) and looks up `<plugin>.tasks`. Its
task manager is built before that tasks folder is added, so tasks still need
`--include_path` (TASKS_DIR, printed by `python -m vskip_compile.lmms`).

Importing this package imports neither lmms_eval nor torch.
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"

__all__ = ["TASKS_DIR"]
