"""Prefill time on each method's real implementation, separate from the accuracy runs.

Plans through `vskip_compile.compile(model, plan, backend)` (the skip-shaped graph: skipped
rows are not computed), token drops through `baselines.prefill` (eager HF layers; dropped rows
are gathered out of the sequence, so later layers run fewer rows). One question per call
(batch 1, the whole prompt, last-row logits only), after a warm-up call that compiles;
methods interleaved per question; per question the fastest of a few repeats, then the median
over a fixed subset of questions.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .. import baselines, reference, runtime
from ..archs import adapter_for
from ..core import KVCache
from .harness import EvalError, Harness
from .methods import Method

TIME_BACKENDS = ("eager", "inductor")


@dataclass
class Timing:
    """One method's prefill times on the timing questions."""

    timed_by: str  # the implementation that was timed
    ms: list[float] = field(default_factory=list)  # per question: the fastest of the repeats
    cache_info: runtime.CacheInfo | None = None  # CompiledVLM's graph cache after timing (plans)
    max_abs_diff: float | None = None  # timed path vs the accuracy runs' reference semantics (plans)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.ms)

    def quartiles_ms(self) -> list[float]:
        if len(self.ms) < 2:
            return [self.ms[0], self.ms[0]]
        q = statistics.quantiles(self.ms, n=4)
        return [q[0], q[2]]


FULL_ON_BASELINES = "full@baselines.prefill"  # the full model timed on the token-dropping implementation
INPUT_PREP = "input_prep@adapter.prefill_inputs"  # the part every method's time shares


def compiled_timed_by(backend: str) -> str:
    return f"vskip_compile.compile(backend={backend})"


BASELINE_TIMED_BY = "baselines.prefill (eager HF layers, dropped rows leave the sequence)"


def prefill_runner(model, method: Method, backend: str = "eager", adapter=None, cache_size: int = 8,
                   ) -> tuple[Callable[[dict[str, Any]], torch.Tensor], str, runtime.CompiledVLM | None]:
    """(run, timed_by, compiled) for one method's real implementation: run(hf_inputs) is one
    prefill returning the last-row logits [B, vocab] (its K/V cache filled, as a server would).

    Plans (the full model included): `vskip_compile.compile(model, plan, backend)`, the rows a
    plan skips are not computed. Token drops: `baselines.prefill`, the rows leave the sequence."""
    adapter = adapter or adapter_for(model)
    if method.drop is None:
        cm = runtime.compile(model, method.plan, backend=backend, adapter=adapter, cache_size=cache_size)
        return (lambda x: cm(**x, logits_to_keep=1).logits[:, -1]), compiled_timed_by(backend), cm
    drop = method.drop

    @torch.no_grad()
    def run(x: dict[str, Any]) -> torch.Tensor:
        p = adapter.prefill_inputs(model, **x)
        return baselines.prefill(model, p, drop, KVCache(), adapter)[0]

    return run, BASELINE_TIMED_BY, None


def timing_implementations(backend: str) -> dict[str, str]:
    """What each `timed_by` value means, for the results' meta."""
    compiled = (f"the full model and opskip/shortv plans: the vskip FX rewrite (rows a plan skips are not "
                f"computed) run by torch.compile's {backend!r} backend")
    dropping = ("VTW/FastV: eager HF decoder layers; at layer K the dropped visual rows are gathered out of the "
                "hidden state, positions and K/V (a shorter sequence, not a mask); FastV's layer K-1 runs eager "
                "attention to rank the visual rows")
    if backend == "eager":
        compiled += " (no inductor fusion: eager kernels, like the baselines)"
    else:
        dropping += ("; not compiled, so its times are not comparable with the compiled plans' in absolute terms: "
                     "compare prefill_speedup (each method against the full model on its own implementation)")
    return {compiled_timed_by(backend): compiled, BASELINE_TIMED_BY: dropping,
            "adapter.prefill_inputs": "input preparation (embeddings, positions, DeepStack from cached vision "
                                      "outputs), included in every method's time"}


def _input_prep_runner(model, adapter) -> Callable[[dict[str, Any]], Any]:
    @torch.no_grad()
    def run(x: dict[str, Any]) -> Any:
        return adapter.prefill_inputs(model, **x)

    return run


@torch.no_grad()
def time_prefill(model, methods: Sequence[Method], inputs: Sequence[dict[str, Any]], *, backend: str = "eager",
                 repeats: int = 3, adapter=None, progress: bool = True, check_atol: float = 1e-3) -> dict[str, Timing]:
    """Per method name, its prefill times on `inputs` (HF forward inputs of one question each).

    Each method is warmed up first (one call per distinct prompt, which compiles its graphs);
    plans' timed logits are checked against the reference semantics there (EvalError past
    `check_atol`). Then `repeats` rounds over the questions, every method on a question before
    the next question, in an order rotated per question, so load on a shared CPU hits all
    methods alike. Also times the full model on the token-dropping implementation, under
    FULL_ON_BASELINES, so each method has a full model on its own implementation to compare with,
    and, under INPUT_PREP, the language-model input preparation (embeddings, positions,
    DeepStack from cached vision outputs) that every method's time includes."""
    if backend not in TIME_BACKENDS:
        raise ValueError(f"unknown timing backend {backend!r}; expected one of {', '.join(TIME_BACKENDS)}")
    if not inputs:
        raise ValueError("time_prefill needs at least one question")
    adapter = adapter or adapter_for(model)
    L = len(adapter.layers(model))
    todo = list(methods) + [Method(FULL_ON_BASELINES, "full", None, drop=baselines.TokenDrop(L)),  # K = L: no drop
                            Method(INPUT_PREP, "full", None)]
    # one graph per distinct prompt: enough cache that timing never recompiles
    distinct = {tuple(x["input_ids"][0].tolist()) for x in inputs}
    runners, out = {}, {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo) * (len(inputs) + repeats * len(inputs)), desc="prefill timing", unit="call")
    for m in todo:
        if m.name == INPUT_PREP:
            run, timed_by, cm = _input_prep_runner(model, adapter), "adapter.prefill_inputs", None
        else:
            run, timed_by, cm = prefill_runner(model, m, backend, adapter, cache_size=max(8, len(distinct)))
        runners[m.name] = (run, cm)
        out[m.name] = Timing(timed_by)
        for k, x in enumerate(inputs):  # warm-up: compiles every graph timing will use
            logits = run(x)
            if k == 0 and m.plan is not None:
                with reference.applied(model, m.plan, adapter):
                    ref = model(**x, logits_to_keep=1).logits[:, -1]
                diff = float((logits - ref).abs().max())
                out[m.name].max_abs_diff = diff
                if not diff <= check_atol:
                    raise EvalError(f"{m.name}: compiled prefill logits differ from the reference semantics by {diff:.3g}")
            if bar is not None:
                bar.update()
    best = {m.name: [float("inf")] * len(inputs) for m in todo}
    for r in range(repeats):
        for k, x in enumerate(inputs):
            shift = (r * len(inputs) + k) % len(todo)
            for m in todo[shift:] + todo[:shift]:
                run = runners[m.name][0]
                t0 = time.perf_counter()
                run(x)
                best[m.name][k] = min(best[m.name][k], 1000 * (time.perf_counter() - t0))
                if bar is not None:
                    bar.update()
    if bar is not None:
        bar.close()
    for m in todo:
        out[m.name].ms = best[m.name]
        cm = runners[m.name][1]
        out[m.name].cache_info = cm.cache_info() if cm is not None else None
    return out


def timing_subset(h: Harness, indices: Sequence[int], n: int) -> list[int]:
    """n questions, evenly spaced over `indices`, all of the most common prompt length (one
    visual layout: one compiled graph per plan, so warm-up stays short)."""
    if n <= 0 or not indices:
        return []
    length, _ = Counter(h.prompt_len(q) for q in indices).most_common(1)[0]
    same = [q for q in indices if h.prompt_len(q) == length]
    step = max(1, len(same) // n)
    return same[::step][:n]


def add_timings(rows: list[dict[str, Any]], timings: dict[str, Timing]) -> dict[str, Any]:
    """Fill each row's prefill_ms_per_question, prefill_speedup, timed_by (and the timing keys
    of the JSON rows) from `timings`; returns the timing summary for the results' meta."""
    full_by = {}
    for r in rows:
        if r["family"] == "full" and r["method"] in timings:
            full_by[timings[r["method"]].timed_by] = timings[r["method"]].median_ms
    if FULL_ON_BASELINES in timings:
        full_by[timings[FULL_ON_BASELINES].timed_by] = timings[FULL_ON_BASELINES].median_ms
    for r in rows:
        t = timings.get(r["method"])
        if t is None:
            continue
        ms = t.median_ms
        full = full_by.get(t.timed_by)
        r.update({
            "prefill_ms_per_question": ms,
            "prefill_speedup": full / ms if full else None,
            "timed_by": t.timed_by,
            "prefill_ms_quartiles": t.quartiles_ms(),
            "timed_questions": len(t.ms),
        })
        if t.cache_info is not None:
            r["compiled_graphs"] = t.cache_info.misses
        if t.max_abs_diff is not None:
            r["timed_vs_reference_max_abs_logit_diff"] = t.max_abs_diff
    meta: dict[str, Any] = {"full_model_prefill_ms_by_implementation": full_by}
    if INPUT_PREP in timings:
        meta["input_prep_ms"] = timings[INPUT_PREP].median_ms  # included in every method's time
    return meta
