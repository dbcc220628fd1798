"""Choosing a plan from scored candidates under a FLOPs budget: the search half of calibration.

Each candidate (layer, op) carries its harm score and its real FLOPs saving at the calibration
layout (flops.op_savings). `select` takes the least harm per saved FLOP first until the budget
is cut, re-measures the joint set (effects are not additive) and repairs greedily: ban the
most harmful chosen candidate, refill from the order. Plain Python over the scores: no torch,
no model (the measure is the caller's callable).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from .flops import TextDims, op_savings


@dataclass(frozen=True)
class Candidate:
    layer: int
    op: str  # "attn" | "ffn" | "both"
    score: float  # harm: lower is more answer-silent
    saving: int  # FLOPs saved at the calibration layout

    @property
    def key(self) -> tuple[int, str]:
        return (self.layer, self.op)


def candidates(scores: dict[tuple[int, str], float], dims: TextDims, S_value: int, V_value: int) -> list[Candidate]:
    """Candidates with their real savings from the FLOPs model at (S, V)."""
    out = []
    for (layer, op), score in scores.items():
        parts = ("attn", "ffn") if op == "both" else (op,)
        saving = sum(int(op_savings(dims, layer, part, S_value, V_value)) for part in parts)
        out.append(Candidate(layer, op, float(score), saving))
    return out


def order(cands: Iterable[Candidate]) -> list[Candidate]:
    """Least harm per saved FLOP first (ties: lower harm, then earlier layer)."""
    return sorted(cands, key=lambda c: (c.score / max(c.saving, 1), c.score, c.layer, c.op))


@dataclass
class Selection:
    chosen: list[Candidate]
    cut: float  # fraction of full prefill FLOPs saved at the calibration layout
    fidelity: float | None  # measured joint agreement (None: not measured)
    budget_met: bool
    fidelity_met: bool
    history: list[dict[str, Any]]


def _fill(ordered: list[Candidate], chosen: list[Candidate], banned: set, need: int) -> list[Candidate]:
    chosen = list(chosen)
    for c in ordered:
        if sum(x.saving for x in chosen) >= need:
            break
        if c not in chosen and c.key not in banned:
            chosen.append(c)
    return chosen


def select(
    cands: Sequence[Candidate], full_flops: int, *, budget: float | None = None, fidelity: float = 0.995,
    measure: Callable[[list[Candidate]], float] | None = None,
) -> Selection:
    """Choose candidates: with `budget`, cut at least that fraction of `full_flops`, re-measure
    the joint set and repair until measure(chosen) >= fidelity; without a budget, add candidates
    in order while the measured fidelity holds. `measure=None` skips measuring (budget only).

    Repair: ban the chosen candidate with the largest individual harm, refill from the order.
    Each round bans one candidate, so it ends. If no set meets both, the budget-meeting set with
    the best measured fidelity is returned, flagged."""
    ordered = order(cands)
    history: list[dict[str, Any]] = []

    def saved(ch):
        return sum(c.saving for c in ch) / full_flops

    def record(ch, f):
        history.append({"chosen": [list(c.key) for c in ch], "cut": saved(ch), "fidelity": f})

    if budget is None:
        if measure is None:
            raise ValueError("select without a budget needs a measure")
        chosen: list[Candidate] = []
        f_now = 1.0
        for c in ordered:
            f = measure(chosen + [c])
            record(chosen + [c], f)
            if f >= fidelity:
                chosen, f_now = chosen + [c], f
        return Selection(chosen, saved(chosen), f_now, True, True, history)

    need = math.ceil(budget * full_flops)
    banned: set = set()
    chosen = _fill(ordered, [], banned, need)
    best: tuple[float, list[Candidate]] | None = None
    while sum(c.saving for c in chosen) >= need:
        if measure is None:
            return Selection(chosen, saved(chosen), None, True, False, history)
        f = measure(chosen)
        record(chosen, f)
        if f >= fidelity:
            return Selection(chosen, saved(chosen), f, True, True, history)
        if best is None or f > best[0]:
            best = (f, chosen)
        worst = max(chosen, key=lambda c: (c.score, c.saving))
        banned.add(worst.key)
        chosen = _fill(ordered, [c for c in chosen if c is not worst], banned, need)
    if best is None:
        raise ValueError(f"no candidates cut {budget:.0%} of prefill FLOPs (all together cut {saved(ordered):.1%})")
    return Selection(best[1], saved(best[1]), best[0], True, False, history)
