"""The eval's outputs: results.json (meta + rows), results.csv, the Pareto plot, a text table."""

from __future__ import annotations

import csv
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

NOTES = (
    "Accuracy: exact match of the greedy answer (up to 3 new tokens, stopped at <|im_end|>) with the "
    "easy-VQA label. accuracy_kept = accuracy / full-model accuracy. flops_cut: decoder prefill FLOPs "
    "(vskip_compile.flops convention) saved, summed over the questions at each one's real layout. "
    "prefill_ms_per_question: median over a fixed subset of test questions (meta 'timing') of the "
    "prefill wall time of one question (batch 1, whole prompt from cached vision-tower outputs, input "
    "embedding/positions included, last-row logits only; fastest of a few interleaved repeats) on each "
    "method's real implementation, named in 'timed_by': the full model and opskip/shortv plans through "
    "vskip_compile.compile (skipped rows are not computed), VTW/FastV through baselines.prefill (eager HF "
    "layers; dropped rows leave the sequence). prefill_speedup: the full model's time on the same "
    "implementation over the method's (meta 'timing' has the full model on both, and input_prep_ms, the "
    "input preparation every method's time includes). "
    "harness_prefill_ms_per_question (JSON only): the accuracy runs' amortized shared-prefix prefill time, "
    "where plans run the reference semantics (skipped updates computed, then zeroed): no saving, not a "
    "speed measurement. Budgets choose each method's setting at the calibration "
    "layout: plans were calibrated on train samples; VTW's K and FastV's kept ratio are the least "
    "aggressive settings that cut at least the budget."
)


TABLE_COLUMNS = (
    "method", "budget", "params", "accuracy", "accuracy_kept", "agreement_with_full", "flops_cut",
    "prefill_ms_per_question", "n", "prefill_speedup", "timed_by",
)

def write_results(rows: list[dict[str, Any]], out_dir: Path, meta: dict[str, Any]) -> dict[str, Path]:
    """results.json (meta + rows), results.csv (TABLE_COLUMNS), pareto.png (needs matplotlib)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "csv": out_dir / "results.csv", "png": out_dir / "pareto.png"}
    paths["json"].write_text(json.dumps({**meta, "columns": list(TABLE_COLUMNS), "rows": rows}, indent=2) + "\n")
    with paths["csv"].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=TABLE_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    try:
        pareto_plot(rows, paths["png"], title=meta.get("title", "easy-VQA"))
    except ModuleNotFoundError as e:  # the plot is the one output that needs the eval extra
        if e.name != "matplotlib":
            raise
        del paths["png"]
        print(f"pareto.png not written: matplotlib is not installed (pip install 'vskip-compile[eval]'); "
              f"{paths['json'].name} and {paths['csv'].name} hold every figure", file=sys.stderr)
    return paths


def pareto_plot(rows: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Accuracy kept vs FLOPs cut, one curve per method family (full model at the origin)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    by_family: dict[str, list[dict[str, Any]]] = defaultdict(list)
    full = next((r for r in rows if r["family"] == "full"), None)
    for r in rows:
        if r["family"] != "full":
            by_family[r["family"]].append(r)
    for family, rs in by_family.items():
        rs = sorted(rs, key=lambda r: r["flops_cut"])
        pts = ([full] if full else []) + rs
        ax.plot([100 * r["flops_cut"] for r in pts], [100 * r["accuracy_kept"] for r in pts], marker="o", label=family)
    ax.axhline(99.5, color="gray", lw=0.8, ls="--", label="99.5% kept")
    ax.set_xlabel("decoder prefill FLOPs cut (%)")
    ax.set_ylabel("accuracy kept (% of full model)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Plain-text table for logs and reports."""
    head = (f"{'method':<12} {'budget':>6} {'acc':>7} {'kept':>7} {'agree':>7} {'cut':>7} {'ms/q':>7} "
            f"{'speedup':>7}  timed by")
    lines = [head]
    for r in rows:
        b = "" if r["budget"] is None else f"{r['budget']:.2f}"
        ms, x = r.get("prefill_ms_per_question"), r.get("prefill_speedup")
        ms = f"{ms:7.3f}" if ms is not None else f"{'-':>7}"
        x = f"{x:6.3f}x" if x is not None else f"{'-':>7}"
        lines.append(f"{r['method']:<12} {b:>6} {r['accuracy']:7.4f} {100 * r['accuracy_kept']:6.2f}% "
                     f"{100 * r['agreement_with_full']:6.2f}% {100 * r['flops_cut']:6.2f}% {ms} {x}  "
                     f"{r.get('timed_by') or 'not timed'}")
    return "\n".join(lines)
