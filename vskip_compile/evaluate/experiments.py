"""The easy-VQA experiments end to end: calibrate plans on train samples, evaluate on the test split.

`vskip calibrate` and `vskip eval` parse their flags and call these; everything they decide
(which samples, which methods, what is verified and timed, what the outputs record) is here.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ..errors import VSkipError
from .methods import METHODS


class SampleCountError(VSkipError, ValueError):
    """More calibration samples asked for than the train split has (or none)."""


def file_sha(path: Path) -> str | None:
    """sha256 of a file (the weights, for provenance), None when it is absent."""
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def list_sha(xs: Iterable[Any]) -> str:
    """A short hash of a JSON list (the calibration sample indices, for provenance)."""
    return hashlib.sha256(json.dumps(list(xs)).encode()).hexdigest()[:16]


def calibrate_easyvqa(
    model_dir: Path,
    *,
    samples: int = 256,
    seed: int = 0,
    batch_size: int = 128,
    budgets: Sequence[float] | None = None,
    fidelity: float = 0.995,
    granularities: Sequence[str] = ("op",),
    workers: int = 2,
    out_dir: Path | None = None,
    command: str | None = None,
    log: Callable[[str], None] = print,
    progress: Callable[[Iterable, str], Iterable] | None = None,
):
    """Score the candidates on `samples` train questions (picked by `seed`), write one plan per
    budget and granularity under out_dir (default <model_dir>/plans). budgets None: one plan,
    the largest that keeps `fidelity`. Returns (calibration set, one report dict per plan)."""
    from .. import calibrate, load
    from ..zoo import easyvqa
    from .harness import Harness

    model, processor = load(model_dir)
    train = easyvqa.train_set()
    if not 0 < samples <= len(train):
        raise SampleCountError(f"--samples must be in 1..{len(train)}")
    picked = sorted(random.Random(seed).sample(range(len(train)), samples))
    h = Harness(model, processor, [train[i] for i in picked])
    calib = calibrate.CalibSet.build(model, list(h.prompt_batches(range(len(picked)), batch_size)))
    out_dir = Path(out_dir) if out_dir else Path(model_dir) / "plans"
    out_dir.mkdir(parents=True, exist_ok=True)
    extra = {"seed": seed, "train_indices_sha": list_sha(picked), "command": command,
             "weights_sha256": file_sha(Path(model_dir) / "model.safetensors")}
    report = []
    for gran in granularities:
        bar = (lambda xs, gran=gran: progress(xs, f"ablate {gran}")) if progress else None
        scores = calibrate.score_candidates(model, calib, gran, progress=bar, workers=workers)
        plans = calibrate.calibrate(model, calib, list(budgets) if budgets else [None], granularity=gran,
                                    fidelity=fidelity, scores=scores, extra_provenance=extra)
        for plan in plans:
            path = out_dir / f"{plan.name}.json"
            plan.save(path)
            pv = plan.provenance
            report.append({"plan": plan.name, "ops": str(plan), "flops_cut": pv["flops_cut"], "fidelity": pv["fidelity"],
                           "fidelity_met": pv["fidelity_met"], "path": str(path)})
        if gran == "op":
            log(f"Spearman rank correlation, exact ablation vs first-order estimate: {scores.spearman():.3f}")
    return calib, report


@dataclass(frozen=True)
class EvalSettings:
    """What `vskip eval` runs (its flags, with the same defaults)."""

    budgets: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6)
    methods: tuple[str, ...] = METHODS
    limit: int | None = None  # first N test questions only
    images_per_batch: int = 32
    workers: int = 2
    verify: int = 24  # questions checked one at a time against independent runs first (0: none)
    fastv_layer: int = 2
    time_samples: int = 32  # questions whose prefill is timed (0: no timing)
    time_backend: str = "eager"
    time_repeats: int = 3


def evaluate_easyvqa(model_dir: Path, settings: EvalSettings = EvalSettings(), *, plans_dir: Path | None = None,
                     out_dir: Path | None = None, command: str | None = None):
    """The full model, the shipped plans and the baselines on the easy-VQA test split: verified
    against one-at-a-time runs, swept, timed, written (results.json, .csv, pareto.png under
    out_dir, default <model_dir>/eval). Returns (table rows, written paths)."""
    import torch

    from .. import load
    from ..flops import hf_text_config
    from ..plan import config_hash
    from ..zoo import easyvqa
    from . import report, sweep, timing
    from .harness import EvalError, Harness
    from .methods import build_methods, calibration_seq_len, median

    s = settings
    model, processor = load(model_dir)
    plans_dir = Path(plans_dir) if plans_dir else Path(model_dir) / "plans"
    out_dir = Path(out_dir) if out_dir else Path(model_dir) / "eval"
    test = easyvqa.test_set()
    indices = list(range(min(s.limit, len(test)) if s.limit else len(test)))
    t0 = time.time()
    h = Harness(model, processor, test)
    S_cal = calibration_seq_len(plans_dir) or median([h.prompt_len(q) for q in indices])
    methods = build_methods(model, s.budgets, plans_dir, s.methods, S_cal, h.num_visual, fastv_layer=s.fastv_layer)
    mismatches = {}
    if s.verify:
        step = max(1, len(indices) // s.verify)
        mismatches = sweep.verify_against_unbatched(h, methods, indices[::step][: s.verify])
        if any(mismatches.values()):
            raise EvalError(f"harness answers differ from one-at-a-time runs: {mismatches}")
    rows = sweep.sweep(h, methods, indices=indices, images_per_batch=s.images_per_batch, workers=s.workers)
    timed = timing.timing_subset(h, indices, s.time_samples)
    timing_meta: dict = {"questions": 0}
    if timed:
        repeats = max(1, s.time_repeats)
        timings = timing.time_prefill(model, methods, [h.full_inputs(q) for q in timed], backend=s.time_backend,
                                      repeats=repeats, adapter=h.adapter)
        timing_meta = {
            "questions": len(timed),
            "question_indices": timed,
            "layout": {"S": h.prompt_len(timed[0]), "V": h.num_visual},
            "backend": s.time_backend,
            "repeats": repeats,
            **timing.add_timings(rows, timings),
            "implementations": timing.timing_implementations(s.time_backend),
        }
    meta = {
        "title": f"easy-VQA test ({len(indices)} questions), {type(model).__name__}",
        "command": command,
        "model_dir": str(model_dir),
        "weights_sha256": file_sha(Path(model_dir) / "model.safetensors"),
        "model": {"architecture": type(model).__name__, "config_hash": config_hash(hf_text_config(model.config))},
        "questions": len(indices),
        "budgets": list(s.budgets),
        "calibration_layout": {"S": S_cal, "V": h.num_visual},
        "verified_questions": s.verify,
        "verify_mismatches": mismatches,
        "threads": torch.get_num_threads(),
        "workers": s.workers,
        "timing": timing_meta,
        "seconds": round(time.time() - t0, 1),
        "notes": report.NOTES,
    }
    return rows, report.write_results(rows, out_dir, meta)
