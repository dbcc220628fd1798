"""The README's first command: a model, a plan, the FLOPs cut and the answers it keeps.

Runs on the shipped easy-VQA Qwen3-VL when its weights are in the package, else on a tiny
random Qwen3-VL built in code (answers are then token ids, not words).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .flops import TextDims, plan_report
from .plan import SkipPlan


@dataclass
class DemoCase:
    label: str  # what the row shows (a question, or "random prompt")
    inputs: dict[str, torch.Tensor]
    expected: str | None  # the ground-truth answer where there is one


def _zoo_setup(n: int):
    from .zoo import easyvqa

    model, processor = easyvqa.load()
    plan = _zoo_plan(easyvqa, model.config.text_config.num_hidden_layers)
    cases = [DemoCase(f"{q} [{image.split('/')[-1]}]", easyvqa.build_inputs(processor, image, q), a)
             for image, q, a in easyvqa.test_set()[:n]]

    def decode(ids: torch.Tensor) -> str:
        return easyvqa.parse_answer(processor, ids)

    gen_kw = {"pad_token_id": processor.tokenizer.pad_token_id, "eos_token_id": processor.tokenizer.eos_token_id}
    return "easy-VQA Qwen3-VL (vskip_compile/zoo/easyvqa-qwen3vl)", model, plan, cases, decode, gen_kw


def _hand_plan(layers: int, name: str) -> SkipPlan:
    """Attention skipped in one early-middle layer, both operators in the second half."""
    ops = ["full"] * layers
    ops[layers // 4] = "skip_attn"
    for i in range(layers // 2, layers):
        ops[i] = "skip_both"
    return SkipPlan.from_ops(ops, name=name)


def _zoo_plan(easyvqa, layers: int) -> SkipPlan:
    """The calibrated plan shipped with the model, or a hand-made one while none is shipped."""
    default_plan = getattr(easyvqa, "default_plan", None)
    if default_plan is not None and any((easyvqa.MODEL_DIR / "plans").glob("*.json")):
        return default_plan()
    return _hand_plan(layers, "demo-hand-plan (no calibrated plan shipped yet)")


def _tiny_setup(n: int):
    from .testing.tiny import build_tiny, tiny_inputs

    model = build_tiny("qwen3_vl", seed=0)
    plan = _hand_plan(model.config.text_config.num_hidden_layers, "demo-hand-plan")
    cases = [DemoCase("random prompt", tiny_inputs(model, "qwen3_vl", text_before=2 + i, text_after=3 + i, seed=i), None)
             for i in range(n)]

    def decode(ids: torch.Tensor) -> str:
        return " ".join(str(int(t)) for t in ids)

    return "tiny random Qwen3-VL (built in code; train the zoo model for real answers)", model, plan, cases, decode, {}


def has_zoo_model() -> bool:
    from .zoo import easyvqa

    return (easyvqa.MODEL_DIR / "model.safetensors").exists()


def _timed(fn: Callable[[], Any], repeats: int = 3) -> tuple[Any, float]:
    """Result and best wall time in ms (first call excluded: it may compile)."""
    out = fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return out, best * 1e3


def run(console, n: int = 4, backend: str = "inductor", max_new_tokens: int = 4) -> int:
    """Print the plan, its FLOPs cut and the answers of full / reference / compiled models."""
    from rich.table import Table

    from . import compile as vskip_compile_model
    from . import reference
    from .archs import adapter_for

    title, model, plan, cases, decode, gen_kw = (_zoo_setup if has_zoo_model() else _tiny_setup)(n)
    adapter = adapter_for(model)
    console.rule(f"[bold]vskip demo[/bold]: {title}")
    console.print(str(plan))

    layout = adapter.layout(model, cases[0].inputs["input_ids"])
    dims = TextDims.from_hf_config(model.config)
    report = plan_report(dims, plan, layout.seq_len, layout.num_visual)
    console.print(
        f"decoder prefill FLOPs at S={layout.seq_len} (visual {layout.num_visual}): "
        f"full {report['full'] / 1e6:.2f} MFLOPs, plan {report['plan'] / 1e6:.2f} MFLOPs, "
        f"[bold green]cut {100 * report['reduction']:.1f}%[/bold green]"
    )

    console.print(f"compiling with backend={backend!r} (first call specializes the graph to the layout) ...")
    compiled = vskip_compile_model(model, plan, backend=backend)
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False, **gen_kw)
    table = Table(title=f"greedy answers (max_new_tokens={max_new_tokens})")
    for col in ("input", "expected", "full model", "plan: eager reference", "plan: compiled", "prefill ms full / compiled"):
        table.add_column(col)
    agree = 0
    for case in cases:
        prompt_len = case.inputs["input_ids"].shape[1]
        with torch.inference_mode():
            full = model.generate(**case.inputs, **kw)[0, prompt_len:]
            with reference.applied(model, plan):
                ref = model.generate(**case.inputs, **kw)[0, prompt_len:]
            comp = compiled.generate(**case.inputs, **kw)[0, prompt_len:]
            _, full_ms = _timed(lambda: model(**case.inputs))
            _, comp_ms = _timed(lambda: compiled(**case.inputs))
        agree += bool(torch.equal(ref, comp))
        table.add_row(case.label, case.expected or "-", decode(full), decode(ref), decode(comp),
                      f"{full_ms:.1f} / {comp_ms:.1f}")
    console.print(table, width=max(console.width, 150))
    console.print(f"compiled == eager reference on {agree}/{len(cases)} inputs; graph cache: {compiled.cache_info()}")
    return 0 if agree == len(cases) else 1
