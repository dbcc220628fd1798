"""`vskip check`: can this model be compiled with visual skipping, and is the result right?

    report = check_model(model)            # or check_dir("path/to/model")
    report.supported, report.render()

Steps, each of which may end the check with a named reason:
1. inputs: one random prompt with one image (vskip_compile.archs.probe: the model says how
   many image tokens the image yields) and the unmodified model's forward on it;
2. structure: the adapter's language model and prefill inputs, the prefill traced (the same
   DecoderCore graph `compile` builds), and per layer whether the passes can skip attention
   and FFN (each tried alone; a refusal names op, layer and node);
3. parity: a random plan of skippable ops against the eager reference
   (vskip_compile.reference): all logits within ATOL (eager inner backend: the traced graph
   rewritten and run, as that backend runs it, without a second trace) and NEW_TOKENS greedy
   tokens of CompiledVLM.generate equal.

Verdicts: "pass" (every operator skippable and parity holds; a linear-attention layer's
attention counts as not skippable by design: its token mixer needs every row), "refused" (a
VSkipError: the reason names what; or a class whose forward transformers 5.24 breaks for every
input, UPSTREAM_BROKEN), "fail" (parity broken, or a crash inside vskip: a bug), "unbuilt" (the
model's own forward fails on the probe inputs: nothing vskip can be judged on).

`sweep()` runs the check over transformers' image-text-to-text registry with a tiny random
model per family (vskip_compile.archs.shrink); `vskip check --all-registered` prints its table.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .errors import VSkipError
from .plan import SkipPlan

ATOL = 1e-4  # fp32 tiny models: compiled and eager reference differ by reordered sums only
NEW_TOKENS = 3
VERDICTS = ("pass", "refused", "fail", "unbuilt")

# HF classes whose own forward cannot run in transformers 5.24 (the pinned version), whatever the
# inputs: where their forward fails on the probe inputs, the check refuses them naming the bug (a
# transformers that fixes one is checked as usual: the forward then runs).
UPSTREAM_BROKEN = {
    "Llama4ForConditionalGeneration": "transformers 5.24's Llama4ForConditionalGeneration.forward reads "
    "image_outputs from its language model's MoeCausalLMOutputWithPast, which has no such field: every call "
    "with return_dict fails, so there is no reference to check against",
}


@dataclass
class LayerSupport:
    layer: int
    attn: bool
    ffn: bool
    reasons: list[str] = field(default_factory=list)
    recurrent: bool = False  # linear attention: attn is never skippable (its state needs every row)


@dataclass
class CheckReport:
    model: str
    verdict: str = "unbuilt"
    reasons: list[str] = field(default_factory=list)
    adapter: str | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    layers: list[LayerSupport] = field(default_factory=list)
    plan: list[str] | None = None
    parity: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def supported(self) -> bool:
        return self.verdict == "pass"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        lines = [f"model: {self.model}", f"adapter: {self.adapter or '-'}"]
        if self.inputs:
            lines.append("inputs: " + ", ".join(f"{k}={v}" for k, v in self.inputs.items() if v is not None))
        for s in self.layers:
            ops = [op for op, ok in (("attn", s.attn), ("ffn", s.ffn)) if ok]
            lines.append(f"  layer {s.layer}: can skip {', '.join(ops) or 'nothing'}"
                         + (" (linear attention: its attention is not skippable)" if s.recurrent else "")
                         + "".join(f"\n    refused: {r}" for r in s.reasons))
        if self.plan:
            lines.append(f"parity plan: {self.plan}")
        if self.parity:
            lines.append("parity: " + ", ".join(f"{k}={v}" for k, v in self.parity.items()))
        lines.append(f"verdict: {'SUPPORTED' if self.supported else self.verdict.upper()}")
        lines += [f"  reason: {r}" for r in self.reasons]
        return "\n".join(lines)


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


class _Captured:
    """AOT forward compiler that keeps the aten graph and, when it runs, its real arguments
    (parameters and inputs, flat): the graph, rewritten, runs on them as the eager inner
    backend would run it, without tracing again."""

    def __init__(self):
        self.gm = None
        self.args: list | None = None

    def __call__(self, gm, example_inputs):
        from torch._functorch.aot_autograd import make_boxed_func

        self.gm = gm

        def run(*args):
            self.args = list(args)
            return gm(*args)

        return make_boxed_func(run)


def traced_prefill(model, adapter, inputs: dict):
    """The aten graph of the layout-polymorphic prefill (DecoderCore(layout_inputs=True), as
    CompiledVLM traces it; static shapes suffice for the analysis) of one unpadded prompt."""
    from torch._dynamo.backends.common import aot_autograd

    from .core import DecoderCore, model_trace_errors
    from .kept_rows import kept_inputs

    with torch.no_grad():
        p = adapter.prefill_inputs(model, **inputs)
    deepstack = tuple(p.deepstack or ())
    batch, seq_len, _ = p.inputs_embeds.shape  # [B, S, D]
    core = DecoderCore.from_model(model, adapter, 0, len(deepstack), layout_inputs=True,
                                  attention_blocks=p.blocks is not None)
    blocks = () if p.blocks is None else (p.blocks,)  # [B, S], last
    kept_index, kept_valid = kept_inputs(p.layout, "visual", [0] * batch)
    mask = torch.ones(batch, seq_len, dtype=torch.bool)  # [B, S]
    capture = _Captured()
    torch._dynamo.reset()
    compiled = torch.compile(core, backend=aot_autograd(fw_compiler=capture), fullgraph=True, dynamic=False)
    with torch.no_grad(), model_trace_errors(adapter.language_model(model)):
        compiled(p.inputs_embeds, p.position_ids, kept_index, kept_valid, mask, *deepstack, *blocks)
    gm, gm.vskip_args = capture.gm, capture.args  # the real flat arguments of this call
    return gm


def layer_support(gm, num_layers: int, recurrent: tuple[bool, ...] = ()) -> list[LayerSupport]:
    """Per layer: whether the passes rewrite its attention / FFN, each skipped alone. A
    recurrent layer (`recurrent`, vskip_compile.core.recurrent_layers) reports attn False
    without a try: its token mixer needs every row (the plan-level rule, Adapter.check_plan)."""
    from .passes import PassContext, run_passes

    out = []
    for layer in range(num_layers):
        s = LayerSupport(layer, False, False, recurrent=layer < len(recurrent) and recurrent[layer])
        for kind, op in (("attn", "skip_attn"), ("ffn", "skip_ffn")):
            if kind == "attn" and s.recurrent:
                continue
            plan = SkipPlan.from_ops(["full"] * layer + [op] + ["full"] * (num_layers - layer - 1))
            try:
                result = run_passes(gm, PassContext(plan))
                ok = result.counters.get(f"{kind}_rewritten", 0) == 1
                if not ok:
                    s.reasons.append(f"{kind}: the passes rewrote nothing (counters {dict(result.counters)})")
            except VSkipError as e:
                ok = False
                s.reasons.append(f"{kind}: {_one_line(e)}")
            setattr(s, kind, ok)
        out.append(s)
    return out


def random_plan(support: list[LayerSupport], seed: int) -> SkipPlan:
    """A plan of skippable ops, each layer drawn at random, at least one op skipped."""
    rng = random.Random(seed)
    ops = []
    for s in support:
        choices = ["full"] + ["skip_attn"] * s.attn + ["skip_ffn"] * s.ffn + ["skip_both"] * (s.attn and s.ffn)
        ops.append(rng.choice(choices))
    if all(op == "full" for op in ops):
        s = next(s for s in support if s.attn or s.ffn)
        ops[s.layer] = "skip_both" if s.attn and s.ffn else "skip_attn" if s.attn else "skip_ffn"
    return SkipPlan.from_ops(ops)


def parity(model, plan: SkipPlan, inputs: dict, backend: str = "eager", atol: float = ATOL) -> dict[str, Any]:
    """Compiled vs eager reference under plan: max |logit difference| and greedy tokens."""
    from . import compile as vskip_compile
    from . import reference

    cm = vskip_compile(model, plan, backend=backend)
    gen = model.generation_config
    saved = gen.eos_token_id
    with torch.no_grad():
        got = cm(**inputs).logits
        with reference.applied(model, plan):
            want = model(**inputs).logits
            gen.eos_token_id = None  # exactly NEW_TOKENS tokens on both sides, whatever a random model emits
            try:
                want_ids = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
            finally:
                gen.eos_token_id = saved
        full = model(**inputs).logits
    got_ids = cm.generate(**inputs, max_new_tokens=NEW_TOKENS, eos_token_id=[])
    diff = float((got - want).abs().max())
    return {
        "max_abs_logits": diff,
        "atol": atol,
        "skip_changes_logits": bool((want - full).abs().max() > atol),
        "tokens_equal": bool(torch.equal(got_ids[:, : want_ids.shape[1]], want_ids)),
        "ok": diff <= atol and bool(torch.equal(got_ids[:, : want_ids.shape[1]], want_ids)),
    }


def rewritten_logits(gm, plan: SkipPlan) -> torch.Tensor:
    """Logits [B, S, V] of traced_prefill's graph rewritten for plan, run on the arguments it
    was traced with: the output of the eager inner backend, without a second trace."""
    from .passes import PassContext, run_passes

    with torch.no_grad():
        return run_passes(gm, PassContext(plan)).gm(*gm.vskip_args)[0]


def fast_parity(model, gm, plan: SkipPlan, inputs: dict, atol: float = ATOL) -> dict[str, Any]:
    """parity() with the logits of the already traced graph (rewritten_logits) and the greedy
    tokens of CompiledVLM.generate (eager inner backend), against the eager reference."""
    from . import compile as vskip_compile
    from . import reference

    got = rewritten_logits(gm, plan)
    gen = model.generation_config
    saved = gen.eos_token_id
    with torch.no_grad():
        with reference.applied(model, plan):
            want = model(**inputs).logits
            gen.eos_token_id = None  # exactly NEW_TOKENS tokens on both sides
            try:
                want_ids = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
            finally:
                gen.eos_token_id = saved
        full = model(**inputs).logits
    got_ids = vskip_compile(model, plan, backend="eager").generate(**inputs, max_new_tokens=NEW_TOKENS, eos_token_id=[])
    diff = float((got - want).abs().max())
    tokens = bool(torch.equal(got_ids[:, : want_ids.shape[1]], want_ids))
    return {"max_abs_logits": diff, "atol": atol, "skip_changes_logits": bool((want - full).abs().max() > atol),
            "tokens_equal": tokens, "ok": diff <= atol and tokens}


def check_model(model, name: str | None = None, seed: int = 0, backend: str = "eager", inputs: dict | None = None,
                atol: float = ATOL, image_processor=None) -> CheckReport:
    """The check of one loaded model (see module doc); never raises for a model it cannot serve."""
    from .archs import adapter_for
    from .archs.probe import probe_inputs
    from .core import recurrent_layers

    start = time.perf_counter()
    report = CheckReport(name or type(model).__name__)
    stage = "inputs"
    try:
        adapter = adapter_for(model)
        report.adapter = adapter.name
        if inputs is None:
            inputs, report.inputs = probe_inputs(model, adapter, seed, processor=image_processor)
        try:
            with torch.no_grad():
                model(**inputs)
        except Exception as e:  # the model's own forward: not a verdict on vskip
            broken = UPSTREAM_BROKEN.get(type(model).__name__)
            if broken is not None:
                report.verdict = "refused"
                report.reasons.append(f"inputs: {broken} ({_one_line(e)[:200]})")
                return report
            report.reasons.append(f"the unmodified model's forward fails on the probe inputs ({_one_line(e)[:300]})")
            return report
        stage = "structure"
        num_layers = len(adapter.layers(model))
        gm = traced_prefill(model, adapter, inputs)
        report.layers = layer_support(gm, num_layers, recurrent_layers(adapter.language_model(model)))
        if not any(s.attn or s.ffn for s in report.layers):
            report.verdict = "refused"
            report.reasons.append("no operator of any layer can be skipped")
            report.reasons += sorted({r for s in report.layers for r in s.reasons})[:3]
            return report
        stage = "parity"
        plan = random_plan(report.layers, seed)
        report.plan = list(plan.ops)
        report.parity = (fast_parity(model, gm, plan, inputs, atol) if backend == "eager"
                         else parity(model, plan, inputs, backend, atol))
        if not report.parity["ok"]:
            report.verdict = "fail"
            report.reasons.append(f"compiled != eager reference under {list(plan.ops)}: {report.parity}")
        elif any(not ((s.attn or s.recurrent) and s.ffn) for s in report.layers):
            report.verdict = "refused"
            report.reasons += sorted({r for s in report.layers for r in s.reasons})[:3]
        else:
            report.verdict = "pass"
    except VSkipError as e:
        report.verdict = "refused"
        report.reasons.append(f"{stage}: {_one_line(e)}")
    except Exception as e:  # a crash inside vskip on this model: a bug, never a silent pass
        report.verdict = "fail"
        report.reasons.append(f"{stage}: crash {_one_line(e)[:400]}")
    finally:
        report.seconds = round(time.perf_counter() - start, 1)
        torch._dynamo.reset()  # many models in one process: keep clear of dynamo's recompile limit
    return report


def check_dir(model_dir, seed: int = 0, backend: str = "eager") -> CheckReport:
    """check_model on a local model directory (from_pretrained offline, fp32)."""
    from .modeldir import load_model, load_processor

    model = load_model(model_dir, dtype=torch.float32)
    try:  # the directory's own image processor (its patch size, resolution), when it has one
        image_processor = getattr(load_processor(model_dir), "image_processor", None)
    except VSkipError:
        image_processor = None
    return check_model(model, name=str(model_dir), seed=seed, backend=backend, image_processor=image_processor)


# -- the registry sweep ------------------------------------------------------------------------


@dataclass
class FamilyResult:
    family: str
    cls: str
    verdict: str
    reason: str
    seconds: float
    pixels: bool | None = None


def check_family(family: str, seed: int = 0, backend: str = "eager") -> FamilyResult:
    """One registry family: tiny model from its own config class, then check_model."""
    from .archs.shrink import build_family, registered_families

    cls = registered_families()[family]
    start = time.perf_counter()
    try:
        model = build_family(family, seed)
    except Exception as e:  # the generic shrink does not fit this family: a sweep limitation
        return FamilyResult(family, cls, "unbuilt", f"tiny model: {_one_line(e)[:300]}", round(time.perf_counter() - start, 1))
    report = check_model(model, name=family, seed=seed, backend=backend)
    reason = "; ".join(report.reasons)[:500]
    return FamilyResult(family, cls, report.verdict, reason, round(time.perf_counter() - start, 1),
                        report.inputs.get("pixels"))


def sweep(families: list[str] | None = None, seed: int = 0, backend: str = "eager", on_result=None) -> list[FamilyResult]:
    """check_family over the registry (or the given families), in registry order; on_result(r)
    is called as each family finishes (a progress line)."""
    from .archs.shrink import registered_families

    names = list(registered_families()) if families is None else families
    results = []
    for family in names:
        results.append(check_family(family, seed, backend))
        if on_result is not None:
            on_result(results[-1])
    return results


TABLE_HEADER = "| family | class | verdict | pixels | reason |\n|---|---|---|---|---|"


def table_row(r: FamilyResult) -> str:
    pixels = "-" if r.pixels is None else "yes" if r.pixels else "no"
    return f"| {r.family} | {r.cls} | {r.verdict} | {pixels} | {r.reason.replace('|', '/')} |"


def summary(results: list[FamilyResult]) -> str:
    counts = {v: sum(r.verdict == v for r in results) for v in VERDICTS}
    return f"{len(results)} families: " + ", ".join(f"{counts[v]} {v}" for v in VERDICTS)


def sweep_table(results: list[FamilyResult]) -> str:
    """Markdown table plus a one-line summary (counts per verdict)."""
    return "\n".join([TABLE_HEADER, *map(table_row, results), "", summary(results)])
