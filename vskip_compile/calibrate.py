"""Calibration: which visual-row operator updates are "answer-silent", and a plan from them.

    calib = CalibSet.build(model, prompt_batches)            # the model's own greedy answers
    scores = score_candidates(model, calib)                   # exact ablation + first-order
    sel = select(scores.candidates(...), full_flops, budget=0.4, measure=...)  # + repair

A candidate is one operator ("attn" / "ffn", or "both" for whole-layer freezes) of one layer.
Its exact score is the mean over samples of |Δ log p(answer tokens)| when only its visual-row
update is removed (one forward under `reference.applied` with a one-op plan); the first-order
estimate is |Σ_visual rows grad·(−update)| of the same objective, for all candidates from one
backward. The targets are the model's own greedy answer tokens (teacher-forced after the
prompt: under a plan, text rows compute what the model computes, so the teacher-forced rows are
exactly what decoding on the plan's KV cache computes).

Selection uses the FLOPs model: each candidate's real saving at the calibration layout (S, V),
cheapest harm per saved FLOP first. Effects are not additive, so the joint plan is re-measured
(answer agreement with the full model) and repaired greedily: drop the most harmful candidate,
refill the budget from the order, until the agreement holds or the budget cannot be met.

The selection (Candidate, candidates, order, Selection, select) is selection.py's, plain
Python over the scores; it is re-exported here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

from .archs import Adapter, adapter_for
from .core import refuse_recurrent
from .flops import TextDims, model_flops
from .forkpool import fork_map
from . import reference
from .plan import SkipPlan
from .selection import Candidate, Selection, candidates, order, select

__all__ = ["CalibBatch", "CalibSet", "Candidate", "Scores", "Selection", "agreement", "answer_logprobs", "calibrate",
           "candidates", "exact_scores", "first_order_scores", "greedy", "order", "plan_from_selection",
           "score_candidates", "select", "spearman"]

OPS_BY_GRANULARITY = {"op": ("attn", "ffn"), "layer": ("both",)}
_SKIP = {"attn": "skip_attn", "ffn": "skip_ffn", "both": "skip_both"}


# -- calibration data ------------------------------------------------------------------------------
def _extend(inputs: dict[str, Any], tokens: torch.Tensor) -> dict[str, Any]:
    """HF forward inputs with text tokens [B, n] appended to input_ids (and its masks)."""
    out = dict(inputs)
    out["input_ids"] = torch.cat([inputs["input_ids"], tokens], dim=1)  # [B, S+n]
    ones = torch.ones_like(tokens)
    if inputs.get("attention_mask") is not None:
        out["attention_mask"] = torch.cat([inputs["attention_mask"], ones.to(inputs["attention_mask"].dtype)], dim=1)
    if inputs.get("mm_token_type_ids") is not None:
        mm = inputs["mm_token_type_ids"]
        out["mm_token_type_ids"] = torch.cat([mm, torch.zeros_like(tokens, dtype=mm.dtype)], dim=1)
    return out


@dataclass
class CalibBatch:
    """Prompt + the model's greedy answer tokens, teacher-forced; one uniform layout."""

    inputs: dict[str, Any]  # HF forward kwargs of prompt + targets
    targets: torch.Tensor  # [B, T]
    prompt_len: int
    spans: tuple[tuple[int, int], ...]  # visual rows (the same for every batch row)

    @property
    def size(self) -> int:
        return int(self.targets.shape[0])


@dataclass
class CalibSet:
    batches: list[CalibBatch]
    num_visual: int
    prompt_lens: list[int]  # one per sample
    visual_ids: tuple[int, ...] = ()  # never targets: an appended image token would need features

    @property
    def size(self) -> int:
        return sum(b.size for b in self.batches)

    @property
    def seq_len(self) -> int:
        """The calibration layout's S: the median prompt length."""
        lens = sorted(self.prompt_lens)
        return lens[len(lens) // 2]

    @classmethod
    @torch.no_grad()
    def build(cls, model, prompt_batches: Iterable[dict[str, Any]], n_targets: int = 2,
              adapter: Adapter | None = None) -> "CalibSet":
        """From HF input batches without padding (each one visual layout); targets = the full
        model's first n_targets greedy tokens (for easy-VQA: the answer word and <|im_end|>)."""
        adapter = adapter or adapter_for(model)
        visual_ids = tuple(adapter.visual_token_ids(model))
        batches, lens, num_visual = [], [], None
        for inputs in prompt_batches:
            mask = inputs.get("attention_mask")
            if mask is not None and not bool(mask.all()):
                raise ValueError("calibration batches take no padding: group prompts by length")
            layout = adapter.layout(model, inputs["input_ids"])
            spans = layout.row_spans
            if num_visual is None:
                num_visual = layout.num_visual
            targets = torch.empty(inputs["input_ids"].shape[0], 0, dtype=torch.long)
            for _ in range(n_targets):
                logits = model(**_extend(inputs, targets), logits_to_keep=1).logits[:, -1]  # [B, vocab]
                targets = torch.cat([targets, greedy(logits, visual_ids)[:, None]], dim=1)
            S = inputs["input_ids"].shape[1]
            batches.append(CalibBatch(_extend(inputs, targets), targets, S, spans))
            lens += [S] * targets.shape[0]
        if not batches:
            raise ValueError("no calibration samples")
        return cls(batches, int(num_visual), lens, visual_ids)


def greedy(logits: torch.Tensor, banned: Sequence[int] = ()) -> torch.Tensor:
    """argmax over the last dim, never a banned (visual placeholder) id. A trained model does
    not emit those; a random test model may."""
    if banned:
        logits = logits.clone()
        logits[..., list(banned)] = float("-inf")
    return logits.argmax(-1)


# -- measuring --------------------------------------------------------------------------------------
def answer_logprobs(model, batch: CalibBatch, plan: SkipPlan | None = None, adapter: Adapter | None = None) -> torch.Tensor:
    """log p over the vocabulary at the rows that predict the targets: [B, T, vocab]."""
    T = batch.targets.shape[1]
    if plan is None or plan.is_full:
        logits = model(**batch.inputs, logits_to_keep=T + 1).logits
    else:
        with reference.applied(model, plan, adapter):
            logits = model(**batch.inputs, logits_to_keep=T + 1).logits
    return torch.log_softmax(logits[:, :-1].float(), dim=-1)  # [B, T, vocab]


def _target_logp(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return logp.gather(-1, targets[..., None])[..., 0].sum(-1)  # [B]


@torch.no_grad()
def agreement(model, calib: CalibSet, plan: SkipPlan, adapter: Adapter | None = None) -> float:
    """Fraction of samples whose greedy answer tokens under `plan` equal the full model's."""
    same = 0
    for b in calib.batches:
        pred = greedy(answer_logprobs(model, b, plan, adapter), calib.visual_ids)  # [B, T]
        same += int((pred == b.targets).all(dim=1).sum())
    return same / calib.size


def _plan(num_layers: int, chosen: Iterable[tuple[int, str]], **kw: Any) -> SkipPlan:
    ops = [set() for _ in range(num_layers)]
    for layer, op in chosen:
        ops[layer] |= {"attn", "ffn"} if op == "both" else {op}
    names = ["skip_both" if o == {"attn", "ffn"} else _SKIP[next(iter(o))] if o else "full" for o in ops]
    return SkipPlan.from_ops(names, **kw)


@dataclass
class Scores:
    """Per candidate (layer, op): exact |Δlog p|, KL(full‖ablated), agreement alone, first-order."""

    exact: dict[tuple[int, str], float] = field(default_factory=dict)
    kl: dict[tuple[int, str], float] = field(default_factory=dict)
    agree: dict[tuple[int, str], float] = field(default_factory=dict)
    first_order: dict[tuple[int, str], float] = field(default_factory=dict)

    def spearman(self) -> float:
        keys = [k for k in self.exact if k in self.first_order]
        return spearman([self.exact[k] for k in keys], [self.first_order[k] for k in keys])


@torch.no_grad()
def _ablate(model, calib: CalibSet, full: list[torch.Tensor], key: tuple[int, str], adapter: Adapter) -> tuple[float, float, float]:
    """(mean |Δ log p(targets)|, mean KL(full‖ablated), agreement) with only `key` removed."""
    plan = _plan(len(adapter.layers(model)), [key])
    dlogp = kl = same = 0.0
    for b, lp_full in zip(calib.batches, full):
        lp = answer_logprobs(model, b, plan, adapter)
        dlogp += float((_target_logp(lp, b.targets) - _target_logp(lp_full, b.targets)).abs().sum())
        kl += float((lp_full.exp() * (lp_full - lp)).sum(-1).sum())
        same += int((greedy(lp, calib.visual_ids) == b.targets).all(dim=1).sum())
    return dlogp / calib.size, kl / calib.size, same / calib.size


@torch.no_grad()
def exact_scores(model, calib: CalibSet, ops: Sequence[str] = ("attn", "ffn"), adapter: Adapter | None = None,
                 progress: Callable[[Iterable], Iterable] | None = None, workers: int = 1) -> Scores:
    """One forward per candidate with only its visual-row update removed (candidates split
    over `workers` forked single-threaded processes when > 1)."""
    adapter = adapter or adapter_for(model)
    refuse_recurrent(adapter.language_model(model), "calibration (its candidates and FLOPs model count attention per layer)")
    L = len(adapter.layers(model))
    full = [answer_logprobs(model, b, None, adapter) for b in calib.batches]
    keys = [(layer, op) for layer in range(L) for op in ops]
    if workers > 1:
        results = fork_map(lambda key: _ablate(model, calib, full, key, adapter), keys, workers)
        results = list(progress(results) if progress else results)
    else:
        results = [_ablate(model, calib, full, key, adapter) for key in (progress(keys) if progress else keys)]
    out = Scores()
    for key, (dlogp, kl, agree) in zip(keys, results):
        out.exact[key], out.kl[key], out.agree[key] = dlogp, kl, agree
    return out


def first_order_scores(model, calib: CalibSet, adapter: Adapter | None = None) -> dict[tuple[int, str], float]:
    """|Σ_visual rows grad·(−update)| per sample, averaged, for every (layer, attn|ffn): one
    backward of Σ log p(targets) per batch. A zero probe added to each module output gives
    ∂J/∂update; only the probes' gradients are computed (no weight gradients)."""
    adapter = adapter or adapter_for(model)
    refuse_recurrent(adapter.language_model(model), "first-order calibration (it hooks every layer's self_attn)")
    layers = adapter.layers(model)
    acc: dict[tuple[int, str], float] = {(i, op): 0.0 for i in range(len(layers)) for op in ("attn", "ffn")}
    for b in calib.batches:
        saved: dict[tuple[int, str], torch.Tensor] = {}  # the module's output (the update)
        probes: dict[tuple[int, str], torch.Tensor] = {}  # a zero added to it: d J / d probe = d J / d update

        def hook_for(key):
            def hook(module, args, output):
                first = output[0] if isinstance(output, tuple) else output  # [B, S, D]
                probe = torch.zeros_like(first, requires_grad=True)
                saved[key], probes[key] = first.detach(), probe
                out = first + probe
                return (out, *output[1:]) if isinstance(output, tuple) else out
            return hook

        handles = []
        for i, layer in enumerate(layers):
            handles.append(layer.self_attn.register_forward_hook(hook_for((i, "attn"))))
            handles.append(layer.mlp.register_forward_hook(hook_for((i, "ffn"))))
        try:
            with torch.enable_grad():
                lp = answer_logprobs(model, b, None, adapter)
                objective = _target_logp(lp, b.targets).sum()
                keys = list(saved)
                grads = torch.autograd.grad(objective, [probes[k] for k in keys])
        finally:
            for h in handles:
                h.remove()
        visual = torch.zeros(saved[keys[0]].shape[1], dtype=torch.bool)
        for a, e in b.spans:
            visual[a:e] = True
        for key, g in zip(keys, grads):
            update = saved[key]
            est = -(g[:, visual] * update[:, visual]).sum(dim=(1, 2))  # [B]
            acc[key] += float(est.abs().sum())
    return {k: v / calib.size for k, v in acc.items()}


def score_candidates(model, calib: CalibSet, granularity: str = "op", adapter: Adapter | None = None,
                     progress: Callable[[Iterable], Iterable] | None = None, workers: int = 1) -> Scores:
    """Exact scores for the granularity's candidates, plus first-order estimates (op level)."""
    scores = exact_scores(model, calib, OPS_BY_GRANULARITY[granularity], adapter, progress, workers)
    if granularity == "op":
        scores.first_order = first_order_scores(model, calib, adapter)
    return scores


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); nan if a side is constant."""
    def ranks(x):
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(list(a)), ranks(list(b))
    n = len(ra)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = math.sqrt(sum((x - ma) ** 2 for x in ra))
    vb = math.sqrt(sum((y - mb) ** 2 for y in rb))
    return cov / (va * vb) if va and vb else float("nan")


# -- the whole thing --------------------------------------------------------------------------------
def plan_from_selection(model, sel: Selection, *, name: str, provenance: dict[str, Any],
                        adapter: Adapter | None = None) -> SkipPlan:
    """The selection as a SkipPlan stamped with the model (architecture + text-config hash)."""
    adapter = adapter or adapter_for(model)
    L = len(adapter.layers(model))
    plan = _plan(L, [c.key for c in sel.chosen], name=name, provenance=provenance)
    return plan.with_model(adapter.architecture(model), adapter.text_config(model))


def calibrate(
    model, calib: CalibSet, budgets: Sequence[float | None], *, granularity: str = "op", fidelity: float = 0.995,
    name_prefix: str | None = None, extra_provenance: dict[str, Any] | None = None, adapter: Adapter | None = None,
    progress: Callable[[Iterable], Iterable] | None = None, scores: Scores | None = None,
) -> list[SkipPlan]:
    """One plan per budget (None: fidelity-only selection), scored once, each re-measured and
    repaired on the calibration set. Plans carry their provenance."""
    adapter = adapter or adapter_for(model)
    dims = TextDims.from_hf_config(model.config)
    S_cal, V_cal = calib.seq_len, calib.num_visual
    full_flops = int(model_flops(dims, None, S_cal, V_cal))
    scores = scores or score_candidates(model, calib, granularity, adapter, progress)
    cands = candidates(scores.exact, dims, S_cal, V_cal)
    L = len(adapter.layers(model))
    cache: dict[SkipPlan, float] = {}

    def measure(chosen: list[Candidate]) -> float:
        plan = _plan(L, [c.key for c in chosen])
        if plan not in cache:
            cache[plan] = agreement(model, calib, plan, adapter)
        return cache[plan]

    rho = scores.spearman() if scores.first_order else None
    prefix = name_prefix or ("opskip" if granularity == "op" else "shortv")
    plans = []
    for budget in budgets:
        sel = select(cands, full_flops, budget=budget, fidelity=fidelity, measure=measure)
        tag = f"b{round(100 * budget)}" if budget is not None else f"f{round(1000 * fidelity)}"
        prov = {
            "method": "opskip" if granularity == "op" else "shortv",
            "criterion": "mean |delta log p(answer tokens)| when one visual-row update is removed",
            "split": "train",
            "samples": calib.size,
            "answer_tokens": int(calib.batches[0].targets.shape[1]),
            "layout": {"S": S_cal, "V": V_cal},
            "budget": budget,
            "fidelity_target": fidelity,
            "fidelity": sel.fidelity,
            "budget_met": sel.budget_met,
            "fidelity_met": sel.fidelity_met,
            "flops_cut": sel.cut,
            "spearman_exact_vs_first_order": rho,
            "scores": [
                {"layer": c.layer, "op": c.op, "exact": scores.exact[c.key], "kl": scores.kl[c.key],
                 "agreement": scores.agree[c.key], "first_order": scores.first_order.get(c.key), "saving": c.saving}
                for c in sorted(cands, key=lambda c: c.key)
            ],
            "repair": sel.history,
            **(extra_provenance or {}),
        }
        plans.append(plan_from_selection(model, sel, name=f"{prefix}-{tag}", provenance=prov, adapter=adapter))
    return plans
