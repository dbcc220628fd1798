"""Evaluation harness: easy-VQA accuracy vs decoder-prefill FLOPs for plans and baselines.

    h = Harness(model, processor, easyvqa.test_set())
    table = sweep(h, methods)              # every method on every question, batch by batch
    write_results(table, out_dir, command)  # JSON + CSV + Pareto PNG

Speed (2 CPU cores): the vision tower runs once per image (its outputs are cached and passed
as `mm_encoder_outputs`); questions are grouped by prompt length, so a batch has no padding
and one visual layout (the reference hooks and the token-dropping loop need that); every
method runs on a batch before the next batch, so CPU contention hits all methods alike.

Accuracy: a SkipPlan (the full model, operator-level plans, ShortV-like layer freezes) runs
the reference semantics (skipped updates zeroed at the frozen rows, as `reference.applied`)
in the shared-prefix runner; a TokenDrop (VTW, FastV) drops rows there as `baselines.generate`
does. FLOPs: the symbolic model at each question's real layout (S, V), summed over the questions.

Prefill time (`time_prefill`), separate from the accuracy runs, on each method's real
implementation: plans through `vskip_compile.compile(model, plan, backend)` (the skip-shaped
graph: skipped rows are not computed), token drops through `baselines.prefill` (eager HF
layers; dropped rows are gathered out of the sequence, so later layers run fewer rows). One
question per call (batch 1, the whole prompt, last-row logits only), after a warm-up call
that compiles; methods interleaved per question; per question the fastest of a few repeats,
then the median over a fixed subset of questions.
"""

from __future__ import annotations

import contextlib
import csv
import json
import statistics
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from . import baselines, reference, runtime
from .archs import PrefillInputs, adapter_for
from .baselines import TokenDrop
from .core import KVCache, causal_mask, rope_position_ids
from .decoding import decode_loop
from .flops import TextDims, model_flops
from .plan import SkipPlan
from .errors import VSkipError

METHODS = ("opskip", "shortv", "vtw", "fastv")
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


class EvalError(VSkipError, RuntimeError):
    """The harness disagrees with an independent run: its numbers would not be trustworthy."""
TABLE_COLUMNS = (
    "method", "budget", "params", "accuracy", "accuracy_kept", "agreement_with_full", "flops_cut",
    "prefill_ms_per_question", "n", "prefill_speedup", "timed_by",
)
TIME_BACKENDS = ("eager", "inductor")


# -- data -------------------------------------------------------------------------------------------
class Harness:
    """easy-VQA questions as (image prefix, question suffix) batches with cached vision outputs.

    Every prompt is `prefix + suffix`: the prefix (chat header, the image's visual tokens,
    <|vision_end|>) is the same token sequence for every question; causal attention makes its
    states independent of the question, so it runs once per image and its K/V are shared by
    that image's questions (as in training). Suffixes are right-padded: a real row never
    attends to a pad (pads come after it), and decode steps mask the pads out.
    """

    def __init__(self, model, processor, samples: Sequence[tuple[str, str, str]]):
        from .zoo import easyvqa

        self.model, self.processor, self.samples = model, processor, list(samples)
        self.adapter = adapter_for(model)
        tok = processor.tokenizer
        self.eos, self.pad = tok.eos_token_id, tok.pad_token_id
        first = easyvqa.build_inputs(processor, self.samples[0][0], self.samples[0][1])
        self.grid = first["image_grid_thw"]  # [1, 3]: every easy-VQA image has this grid
        merge = model.config.vision_config.spatial_merge_size
        self.num_visual = int(self.grid.prod()) // merge**2
        image_token = processor.image_token
        ids = [
            tok(easyvqa.prompt_text(processor, q).replace(image_token, image_token * self.num_visual))["input_ids"]
            for _, q, _ in self.samples
        ]
        if ids[0] != first["input_ids"][0].tolist():
            raise AssertionError("harness prompt ids differ from the processor's")
        cut = ids[0].index(model.config.vision_end_token_id) + 1
        self.prefix_ids = ids[0][:cut]
        if any(row[:cut] != self.prefix_ids for row in ids):
            raise AssertionError("easy-VQA prompts do not share one image prefix")
        self.suffix_ids = [row[cut:] for row in ids]
        paths = sorted({p for p, _, _ in self.samples})
        self.image_of = {p: i for i, p in enumerate(paths)}
        self.paths = paths
        self._features: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        self._out_cls = None

    def prompt_len(self, q: int) -> int:
        return len(self.prefix_ids) + len(self.suffix_ids[q])

    def full_inputs(self, q: int) -> dict[str, Any]:
        """HF forward inputs of one whole prompt (batch 1, cached vision outputs)."""
        ids = torch.tensor([self.prefix_ids + self.suffix_ids[q]])  # [1, S]
        kw = self._prefix_kwargs([self.image_of[self.samples[q][0]]])
        kw.update(input_ids=ids, attention_mask=torch.ones_like(ids),
                  mm_token_type_ids=(ids == self.model.config.image_token_id).to(torch.int32))
        return kw

    @torch.no_grad()
    def encode_images(self, image_indices: Sequence[int], chunk: int = 128) -> None:
        """Vision tower outputs of the images not cached yet (merged tokens + DeepStack)."""
        from .zoo import easyvqa

        todo = [i for i in dict.fromkeys(image_indices) if i not in self._features]
        ip = self.processor.image_processor
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            px = ip(images=[easyvqa.open_image(self.paths[i]) for i in part], return_tensors="pt")
            out = self.model.model.get_image_features(px["pixel_values"], px["image_grid_thw"], return_dict=True)
            self._out_cls = type(out)
            for j, i in enumerate(part):
                self._features[i] = (out.pooler_output[j], [lvl[j] for lvl in out.deepstack_features])

    def _prefix_kwargs(self, images: Sequence[int]) -> dict[str, Any]:
        self.encode_images(images)
        feats = [self._features[i] for i in images]
        levels = len(feats[0][1])
        mm = self._out_cls(
            pooler_output=tuple(f[0] for f in feats),
            deepstack_features=[tuple(f[1][k] for f in feats) for k in range(levels)],
        )
        return {"image_grid_thw": self.grid.expand(len(images), 3).clone(), "mm_encoder_outputs": {"image": mm}}

    def image_groups(self, indices: Sequence[int], images_per_batch: int) -> list[list[int]]:
        """Question indices in groups of whole images (an image's questions stay together)."""
        by_image: dict[int, list[int]] = defaultdict(list)
        for q in indices:
            by_image[self.image_of[self.samples[q][0]]].append(q)
        images = sorted(by_image)
        return [[q for i in images[s : s + images_per_batch] for q in by_image[i]]
                for s in range(0, len(images), images_per_batch)]

    def batches(self, indices: Sequence[int], images_per_batch: int) -> Iterator["Batch"]:
        """Batches of whole images: their prefix inputs once, all their questions' suffixes."""
        for part in self.image_groups(indices, images_per_batch):
            yield self.batch(part)

    def batch(self, part: Sequence[int]) -> "Batch":
        imgs = list(dict.fromkeys(self.image_of[self.samples[q][0]] for q in part))
        slot = {i: j for j, i in enumerate(imgs)}
        owner = torch.tensor([slot[self.image_of[self.samples[q][0]]] for q in part])  # [Q]
        lengths = torch.tensor([len(self.suffix_ids[q]) for q in part])  # [Q]
        suffix = torch.full((len(part), int(lengths.max())), self.pad, dtype=torch.long)  # [Q, Ls]
        for r, q in enumerate(part):
            suffix[r, : lengths[r]] = torch.tensor(self.suffix_ids[q])
        prefix_ids = torch.tensor([self.prefix_ids] * len(imgs))  # [I, P]
        kw = self._prefix_kwargs(imgs)
        kw.update(input_ids=prefix_ids, attention_mask=torch.ones_like(prefix_ids),
                  mm_token_type_ids=(prefix_ids == self.model.config.image_token_id).to(torch.int32))
        with torch.no_grad():
            prefix = self.adapter.prefill_inputs(self.model, **kw)
        return Batch(list(part), prefix, suffix, lengths, owner)

    def prompt_batches(self, indices: Sequence[int], batch_size: int) -> Iterator[dict[str, Any]]:
        """Whole prompts as HF forward inputs, grouped by length (no padding, one layout per batch)."""
        groups: dict[int, list[int]] = defaultdict(list)
        for q in indices:
            groups[self.prompt_len(q)].append(q)
        for length in sorted(groups):
            for start in range(0, len(groups[length]), batch_size):
                part = groups[length][start : start + batch_size]
                ids = torch.tensor([self.prefix_ids + self.suffix_ids[q] for q in part])  # [B, S]
                kw = self._prefix_kwargs([self.image_of[self.samples[q][0]] for q in part])
                kw.update(input_ids=ids, attention_mask=torch.ones_like(ids),
                          mm_token_type_ids=(ids == self.model.config.image_token_id).to(torch.int32))
                yield kw

    def answer(self, tokens: torch.Tensor) -> str:
        from .zoo import easyvqa

        return easyvqa.parse_answer(self.processor, tokens)


@dataclass
class Batch:
    questions: list[int]
    prefix: PrefillInputs  # [I, P] image prefixes (vision merged, positions, DeepStack)
    suffix: torch.Tensor  # [Q, Ls] right-padded question suffixes
    lengths: torch.Tensor  # [Q] real suffix lengths
    owner: torch.Tensor  # [Q] index of each question's image in the prefix batch


# -- the shared-prefix runner ------------------------------------------------------------------------
@torch.no_grad()
def shared_generate(model, b: Batch, method: SkipPlan | TokenDrop, max_new_tokens: int, eos: int,
                    adapter=None) -> tuple[torch.Tensor, float]:
    """(greedy new tokens [Q, n], prefill seconds) for every question of a batch.

    Plans: the prefix runs with the skipped updates zeroed at the frozen rows (the reference
    semantics), suffixes and decoding run the unmodified layers. VTW: the prefix drops its
    visual rows at layer K. FastV: the ranking needs each question's last row, so the prefix
    is shared only up to layer K-1; from layer K each question runs its kept rows itself.
    The layers, the row drops, FastV's ranking and the decode steps are the baselines' own
    (`baselines.run_layer`, `drop_rows`, `rank_visual`, `decode_steps`, `decoding.decode_loop`)."""
    adapter = adapter or adapter_for(model)
    lm = adapter.language_model(model)
    layers = lm.layers
    L = len(layers)
    plan = method if isinstance(method, SkipPlan) else None
    drop = method if isinstance(method, TokenDrop) and method.layer < L else None
    fastv = drop is not None and drop.keep_ratio > 0
    J = drop.layer if fastv else L  # layers whose prefix is shared
    p = b.prefix
    spans = p.layout.row_spans
    Q, Ls = b.suffix.shape
    dev = p.inputs_embeds.device
    t0 = time.perf_counter()

    # prefix, once per image: layers < J
    x = p.inputs_embeds  # [I, P, D]
    pos = rope_position_ids(p.position_ids)  # [3, I, P] or [I, P]
    next_pos = baselines.next_positions(pos)  # [I]
    deepstack = list(p.deepstack or ())
    pe = lm.rotary_emb(x, pos)
    cache = KVCache()
    frozen = p.layout.frozen_spans(plan.scope) if plan is not None else ()

    def zero(module, args, output):  # the reference semantics: exact zeros at the frozen rows
        return reference._zero_rows(output, frozen)

    with reference.hooked(layers, plan, zero) if plan is not None else contextlib.nullcontext():
        for i in range(J):
            if drop is not None and not fastv and i == drop.layer:
                rows = baselines.kept_rows(spans, x.shape[1], None, 0, x.shape[0], dev)  # [I, P-V]
                x, pos, deepstack, pe = baselines.drop_rows(lm, rows, x, pos, deepstack)
            x = baselines.run_layer(layers[i], x, causal_mask(x.shape[1], dev), pe, cache)
            if i < len(deepstack):
                x = x + deepstack[i]
    for i in range(J):
        k, v = cache.kv[i]
        cache.kv[i] = (k[b.owner], v[b.owner])  # [Q, KV, P_i, E]

    # suffixes, per question: layers < J on the shared prefix K/V
    xs = model.get_input_embeddings()(b.suffix)  # [Q, Ls, D]
    spos = next_pos[b.owner][:, None] + torch.arange(Ls, device=dev)  # [Q, Ls]
    spos_r = adapter.text_position_ids(spos)  # [3, Q, Ls] or [Q, Ls]
    pe_s = lm.rotary_emb(xs, spos_r)
    last = b.lengths - 1  # [Q] last real suffix row
    scores = None
    for i in range(J):
        mask = causal_mask(Ls, dev, past=cache.get_seq_length(i))  # [1, 1, Ls, kvp + Ls]
        if fastv and i == J - 1:
            xs, scores = baselines.rank_visual(layers[i], xs, mask, pe_s, cache, spans, last)  # scores [Q, V]
        else:
            xs = baselines.run_layer(layers[i], xs, mask, pe_s, cache)
    suffix_valid = torch.arange(Ls, device=dev)[None] < b.lengths[:, None]  # [Q, Ls]
    valid = {i: torch.cat([torch.ones(Q, cache.get_seq_length(i) - Ls, dtype=torch.bool, device=dev), suffix_valid], 1)
             for i in range(J)}

    if fastv:  # from layer K, each question runs its kept rows
        P = x.shape[1]
        xf = torch.cat([x[b.owner], xs], dim=1)  # [Q, P + Ls, D]
        pf = torch.cat([pos[..., b.owner, :], spos_r], dim=-1)
        ds = [torch.cat([d[b.owner], torch.zeros_like(xs)], dim=1) for d in deepstack]
        rows = baselines.kept_rows(spans, P + Ls, scores, drop.keep(p.layout.num_visual), Q, dev)  # [Q, S']
        xf, pf, ds, pe_f = baselines.drop_rows(lm, rows, xf, pf, ds)
        Sp = xf.shape[1]
        for i in range(J, L):
            xf = baselines.run_layer(layers[i], xf, causal_mask(Sp, dev), pe_f, cache)
            if i < len(ds):
                xf = xf + ds[i]
            valid[i] = torch.cat([torch.ones(Q, Sp - Ls, dtype=torch.bool, device=dev), suffix_valid], 1)
        xs = xf[:, Sp - Ls :]
    h = lm.norm(xs[torch.arange(Q), last])  # [Q, D]
    logits = adapter.lm_head(model)(h)  # [Q, vocab]
    seconds = time.perf_counter() - t0

    position = spos[torch.arange(Q), last] + 1  # [Q]
    step = baselines.decode_steps(model, cache, position, adapter, valid)
    tokens = decode_loop(logits, step, max_new_tokens, baselines.eos_ids(eos, dev))
    return torch.stack(tokens, dim=1), seconds


# -- methods and the sweep ------------------------------------------------------------------------------
@dataclass
class Method:
    """One row of the table: a plan or a token drop, with the budget it was chosen for."""

    name: str
    family: str  # "full" | "opskip" | "shortv" | "vtw" | "fastv"
    budget: float | None
    plan: SkipPlan | None = None
    drop: TokenDrop | None = None

    @property
    def spec(self) -> SkipPlan | TokenDrop:
        return self.drop if self.drop is not None else self.plan

    def params(self) -> str:
        if self.drop is not None:
            return json.dumps(self.drop.to_dict())
        return str(self.plan) if self.plan is not None else ""

    def flops(self, dims: TextDims, S_value: int, V_value: int) -> int:
        if self.drop is not None:
            return baselines.token_drop_flops(dims, self.drop, S_value, V_value)
        return int(model_flops(dims, self.plan, S_value, V_value))


def run_batch(h: Harness, methods: Sequence[Method], part: Sequence[int]) -> dict[str, dict[str, float]]:
    """Per method: correct, agree (with the first method), n, seconds, flops, full_flops."""
    from .zoo import easyvqa

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


_WORKER: dict[str, Any] = {}


def _worker_init() -> None:
    torch.set_num_threads(1)


def _worker_run(part: list[int]) -> dict[str, dict[str, float]]:
    return run_batch(_WORKER["h"], _WORKER["methods"], part)


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
        import multiprocessing

        _WORKER.update(h=h, methods=list(methods))
        with multiprocessing.get_context("fork").Pool(workers, initializer=_worker_init) as pool:
            for result in pool.imap_unordered(_worker_run, groups):
                add(result)
        _WORKER.clear()
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


def build_methods(model, budgets: Sequence[float], plans_dir: Path, families: Sequence[str] = METHODS,
                  S_value: int | None = None, V_value: int | None = None, fastv_layer: int = 2) -> list[Method]:
    """The full model, then per family and budget: the shipped plan (opskip / shortv, from
    `plans_dir/<family>-bXX.json`) or the drop chosen to cut at least the budget at (S, V)."""
    adapter = adapter_for(model)
    L = len(adapter.layers(model))
    dims = TextDims.from_hf_config(model.config)
    methods = [Method("full", "full", None, plan=SkipPlan.full(L))]
    for family in families:
        for b in budgets:
            tag = f"{family}-b{round(100 * b)}"
            if family in ("opskip", "shortv"):
                path = Path(plans_dir) / f"{tag}.json"
                if not path.is_file():
                    raise FileNotFoundError(f"no plan {path}: run `vskip calibrate` first")
                plan = SkipPlan.load(path)
                adapter.check_plan(model, plan)
                methods.append(Method(tag, family, b, plan=plan))
            elif family == "vtw":
                methods.append(Method(tag, family, b, drop=baselines.vtw_for_budget(dims, b, S_value, V_value)))
            elif family == "fastv":
                drop = baselines.fastv_for_budget(dims, b, S_value, V_value, layer=fastv_layer)
                methods.append(Method(tag, family, b, drop=drop))
            else:
                raise ValueError(f"unknown method family {family!r}; expected one of {', '.join(METHODS)}")
    return methods


# -- prefill time on each method's real implementation ----------------------------------------------------
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


def prefill_runner(model, method: "Method", backend: str = "eager", adapter=None, cache_size: int = 8,
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
def time_prefill(model, methods: Sequence["Method"], inputs: Sequence[dict[str, Any]], *, backend: str = "eager",
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


def timing_subset(h: "Harness", indices: Sequence[int], n: int) -> list[int]:
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


# -- outputs ------------------------------------------------------------------------------------------------
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


@torch.no_grad()
def verify_against_unbatched(h: Harness, methods: Sequence[Method], indices: Sequence[int]) -> dict[str, int]:
    """Per method, the questions whose harness answer (shared prefix, batched, cached vision)
    differs from an independent run of one question at a time: plans through
    `reference.applied` + `easyvqa.predict` (pixels, HF generate), drops through
    `baselines.generate` on the whole prompt."""
    from .zoo import easyvqa

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


def calibration_seq_len(plans_dir: Path) -> int | None:
    """The calibration layout's S recorded in the shipped opskip plans, if any."""
    for path in sorted(Path(plans_dir).glob("opskip-b*.json")):
        layout = (SkipPlan.load(path).provenance or {}).get("layout") or {}
        if "S" in layout:
            return int(layout["S"])
    return None


def median(xs: Sequence[int]) -> int:
    xs = sorted(xs)
    return xs[len(xs) // 2]

