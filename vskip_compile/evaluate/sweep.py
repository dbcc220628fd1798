"""sweep: every method on every question, batch by batch, into one table row per method.

Every method runs on a batch before the next batch, so CPU contention hits all methods alike;
batches may be spread over forked single-threaded workers (vskip_compile.forkpool). FLOPs:
the symbolic model at each question's real layout (S, V), summed over the questions.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

import torch

from .. import baselines, reference
from ..flops import TextDims
from ..forkpool import fork_map
from .harness import Harness
from .methods import Method
from .shared import shared_generate


def run_batch(h: Harness, methods: Sequence[Method], part: Sequence[int]) -> dict[str, dict[str, float]]:
    """Per method: correct, agree (with the first method), n, seconds, flops, full_flops."""
    from ..zoo import easyvqa

    dims = TextDims.from_hf_config(h.model.config)
    b = h.batch(part)
    lens = [h.prompt_len(q) for q in b.questions]
    full_per_len = {S_value: methods[0].flops(dims, S_value, h.num_visual) for S_value in set(lens)}
    full_flops = sum(full_per_len[S_value] for S_value in lens)
    out, first = {}, None
    for m in methods:
        tokens, sec = shared_generate(h.model, b, m.spec, easyvqa.MAX_NEW_TOKENS, h.eos, h.adapter)
        answers = [h.answer(row) for row in tokens]
        first = answers if first is None else first
        per_len = {S_value: m.flops(dims, S_value, h.num_visual) for S_value in set(lens)}
        out[m.name] = {
            "correct": sum(a == h.samples[q][2] for a, q in zip(answers, b.questions)),
            "agree": sum(a == f for a, f in zip(answers, first)),
            "n": len(b.questions),
            "seconds": sec,
            "flops": sum(per_len[S_value] for S_value in lens),
            "full_flops": full_flops,
        }
    return out


def sweep(h: Harness, methods: Sequence[Method], *, indices: Sequence[int] | None = None, images_per_batch: int = 32,
          workers: int = 1, progress: bool = True) -> list[dict[str, Any]]:
    """Every method on every question: one table row per method (the first must be "full").

    workers > 1 forks that many single-threaded processes (the model is shared copy-on-write);
    under CPU contention several single-threaded workers beat one multi-threaded process."""
    if not methods or methods[0].family != "full":
        raise ValueError("the first method must be the full model (accuracy kept is relative to it)")
    indices = list(range(len(h.samples))) if indices is None else list(indices)
    groups = h.image_groups(indices, images_per_batch)
    totals = {m.name: defaultdict(float) for m in methods}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(indices), desc=f"eval {len(methods)} methods", unit="q", smoothing=0.1)

    def add(result):
        for name, tally in result.items():
            for key, value in tally.items():
                totals[name][key] += value
        if bar is not None:
            bar.update(int(next(iter(result.values()))["n"]))

    if workers > 1:
        for result in fork_map(lambda part: run_batch(h, methods, part), groups, workers, ordered=False):
            add(result)
    else:
        for part in groups:
            add(run_batch(h, methods, part))
    if bar is not None:
        bar.close()
    full = totals[methods[0].name]
    full_acc = full["correct"] / full["n"]
    rows = []
    for m in methods:
        t = totals[m.name]
        acc = t["correct"] / t["n"]
        rows.append({
            "method": m.name,
            "family": m.family,
            "budget": m.budget,
            "params": m.params(),
            "accuracy": acc,
            "accuracy_kept": acc / full_acc if full_acc else float("nan"),
            "agreement_with_full": t["agree"] / t["n"],
            "flops_cut": 1 - t["flops"] / t["full_flops"],
            "prefill_ms_per_question": None,  # set by add_timings (a real implementation's time)
            "n": int(t["n"]),
            "prefill_speedup": None,
            "timed_by": None,
            "harness_prefill_ms_per_question": 1000 * t["seconds"] / t["n"],
        })
    return rows


@torch.no_grad()
def verify_against_unbatched(h: Harness, methods: Sequence[Method], indices: Sequence[int]) -> dict[str, int]:
    """Per method, the questions whose harness answer (shared prefix, batched, cached vision)
    differs from an independent run of one question at a time: plans through
    `reference.applied` + `easyvqa.predict` (pixels, HF generate), drops through
    `baselines.generate` on the whole prompt."""
    from ..zoo import easyvqa

    mismatches = {}
    for m in methods:
        batched = {}
        for b in h.batches(indices, images_per_batch=len(indices)):
            tokens, _ = shared_generate(h.model, b, m.spec, easyvqa.MAX_NEW_TOKENS, h.eos, h.adapter)
            batched.update({q: h.answer(row) for q, row in zip(b.questions, tokens)})
        bad = 0
        for q in indices:
            path, question, _ = h.samples[q]
            if m.drop is None:
                with reference.applied(h.model, m.plan, h.adapter):
                    single = easyvqa.predict(h.model, h.processor, [path], [question])[0]
            else:
                p = h.adapter.prefill_inputs(h.model, **h.full_inputs(q))
                single = h.answer(baselines.generate(h.model, p, m.drop, easyvqa.MAX_NEW_TOKENS, h.eos, h.adapter)[0])
            bad += single != batched[q]
        mismatches[m.name] = bad
    return mismatches
