"""Engine: one model under one plan, answering groups of same-layout requests. No Ray here.

    engine = Engine(model_dir, plan, engine="inductor")
    prepared = engine.prepare(chat)              # processor, layout, limits (RequestError: 4xx)
    answers = engine.run([p1, p2, p3])           # one stacked prefill; all must share a layout

The prefill graph is layout-polymorphic (one per batch bucket); groups are still formed per
layout (stacking needs one length) and padded to 1, 2, 4, ... max_batch_size rows (the last row
repeated), which bounds the decode graphs (one per batch size and K/V capacity).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import CompileConfig
from ..layout import VisualLayout
from ..modeldir import load
from ..plan import SkipPlan
from ..runtime import CompiledVLM
from .request import Chat, Limits, RequestError

ENGINES = ("inductor", "eager", "onnx")


@dataclass
class Prepared:
    """One request, processed: batch-1 model inputs and their layout (the batching key)."""

    chat: Chat
    inputs: dict[str, torch.Tensor]
    layout: VisualLayout  # batch size 1
    prompt_tokens: int


@dataclass
class Answer:
    text: str
    new_ids: list[int]
    finish_reason: str  # "stop" (EOS) or "length" (max_tokens)
    info: dict[str, Any] = field(default_factory=dict)  # layout, batch, prefill_s, decode_s


def layout_name(layout: VisualLayout) -> str:
    spans = ",".join(f"{a}:{b}" for a, b in layout.spans[0])
    return f"S={layout.seq_len} visual=[{spans}]"


def bucket(n: int, max_batch_size: int) -> int:
    """Smallest power of two >= n, capped at max_batch_size."""
    b = 1
    while b < n:
        b *= 2
    return min(b, max_batch_size)


class _TimedVLM(CompiledVLM):
    """CompiledVLM that records, per thread, how long its last prefill took (vision tower,
    merge and the compiled decoder prefill: everything before the first token)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.timing = threading.local()

    def _prefill_inputs(self, inputs, **kwargs):
        self.timing.start = time.perf_counter()
        return super()._prefill_inputs(inputs, **kwargs)

    def _prefill(self, p, logits_to_keep):
        out = super()._prefill(p, logits_to_keep)
        self.timing.prefill_s = time.perf_counter() - self.timing.start
        return out


def _timed_onnx_runner(engine_dir: str | Path, threads: int | None):
    from ..export.runner import OnnxRunner

    class TimedOnnxRunner(OnnxRunner):
        """OnnxRunner that records, per thread, how long its last prefill took."""

        timing = threading.local()

        def prefill(self, **inputs):
            start = time.perf_counter()
            out = super().prefill(**inputs)
            self.timing.prefill_s = time.perf_counter() - start
            return out

    return TimedOnnxRunner(engine_dir, threads=threads)


class Engine:
    """A model, its processor and a compiled model (or ONNX runner) under one plan.

    Thread use: `prepare` may run in any thread; `run` in at most two at once (the server's
    run thread and compile thread). The compiled model's graph cache is shared by both.
    """

    def __init__(
        self,
        model_dir: str | Path,
        plan: SkipPlan,
        engine: str = "inductor",
        *,
        engine_dir: str | Path | None = None,
        limits: Limits = Limits(),
        max_batch_size: int = 8,
        max_layouts: int = 32,
        threads: int | None = None,
    ):
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; expected one of {', '.join(ENGINES)}")
        if max_batch_size < 1 or max_layouts < 1:
            raise ValueError("max_batch_size and max_layouts must be >= 1")
        self.model_dir = Path(model_dir)
        self.model, self.processor = load(model_dir)
        self.plan = plan
        self.engine = engine
        self.limits = limits
        self.max_batch_size = max_batch_size
        self.max_layouts = max_layouts
        self.name = self.model_dir.name
        self._lock = threading.Lock()
        gen = self.model.generation_config
        eos = gen.eos_token_id
        self.eos_ids = set([] if eos is None else [eos] if isinstance(eos, int) else eos)
        self.buckets = sorted({bucket(n, max_batch_size) for n in range(1, max_batch_size + 1)})
        if engine == "onnx":
            if engine_dir is None:
                raise ValueError("engine 'onnx' needs engine_dir (a directory written by export_onnx)")
            self.runner = _timed_onnx_runner(engine_dir, threads)
            have = SkipPlan.from_dict(self.runner.manifest["plan"])
            if tuple(have.ops) != tuple(plan.ops) or have.scope != plan.scope:
                raise ValueError(f"{engine_dir} was exported for plan {have}, not {plan}")
            self.cm = None
            self.max_context = int(self.runner.rt["max_cache_len"])
        else:
            self.runner = None
            self.cm = _TimedVLM(self.model, plan, CompileConfig(backend=engine, cache_size=64))  # decode graphs: per batch size and K/V capacity
            text = self.model.config.get_text_config()
            self.max_context = int(getattr(text, "max_position_embeddings", 1 << 30))
        self.adapter = self.cm.adapter if self.cm is not None else None
        # Padded batch sizes that ran here: the server sends groups of these to its run thread and
        # anything else to its compile thread. One polymorphic prefill graph per batch bucket
        # serves every layout, so a new layout compiles nothing and is not a key.
        self._ready: OrderedDict[int, None] = OrderedDict()

    # -- requests ---------------------------------------------------------------------------
    def prepare(self, chat: Chat) -> Prepared:
        """Processor outputs and layout for one request, or RequestError: too many tokens,
        no visual tokens, a prompt longer than the ONNX engine's max_seq_len."""
        try:
            prompt = self.processor.apply_chat_template(chat.messages, add_generation_prompt=True, tokenize=False)
            inputs = dict(self.processor(text=[prompt], images=chat.images, return_tensors="pt"))
        except (ValueError, TypeError) as e:  # e.g. an image too small for the patch grid
            raise RequestError(400, f"the processor refused this input: {e}") from e
        ids = inputs["input_ids"]  # [1, S]
        n = int(ids.shape[1])
        if n + chat.max_tokens > self.max_context:
            raise RequestError(400, f"too many tokens: the prompt has {n} tokens and max_tokens is {chat.max_tokens}; "
                                    f"together they exceed the model's context of {self.max_context}")
        layout = self._layout(ids)
        if not layout.has_visual:
            raise RequestError(400, "the prompt has no image tokens (does the chat template place the image?)")
        if self.runner is not None and n > self.runner.max_seq_len:  # its one prefill graph serves every layout up to it
            raise RequestError(400, f"too many tokens: the prompt has {n} tokens, the ONNX engine's max_seq_len is "
                                    f"{self.runner.max_seq_len}")
        return Prepared(chat=chat, inputs=inputs, layout=layout, prompt_tokens=n)

    def _layout(self, input_ids: torch.Tensor) -> VisualLayout:
        if self.adapter is not None:
            return self.adapter.layout(self.model, input_ids)
        from ..export import host

        return host.layout_of(input_ids.numpy(), self.runner.rt["visual_token_ids"])

    # -- groups -----------------------------------------------------------------------------
    def batch_size(self, n: int) -> int:
        return bucket(n, self.max_batch_size)

    def is_ready(self, layout: VisualLayout, n: int) -> bool:
        """Has a group of n rows (of any layout) run here (its graphs are compiled and cached)?"""
        with self._lock:
            return self.batch_size(n) in self._ready

    def _mark_ready(self, size: int) -> None:
        with self._lock:
            self._ready[size] = None

    def run(self, group: list[Prepared]) -> list[Answer]:
        """Greedy answers for requests of one layout: one stacked prefill, one decode loop."""
        if not group or len(group) > self.max_batch_size:
            raise ValueError(f"a group has 1..{self.max_batch_size} requests, got {len(group)}")
        layout = group[0].layout
        if any(p.layout != layout for p in group):
            raise ValueError("a group mixes layouts")  # the server groups by layout: a bug if seen
        size = self.batch_size(len(group))
        if self.runner is not None and not self._onnx_has(layout, size):
            answers = [a for p in group for a in self._run_stacked([p], 1)]  # no graph for this batch size
        else:
            answers = self._run_stacked(group, size)
        self._mark_ready(size)
        return answers

    def _onnx_has(self, layout: VisualLayout, size: int) -> bool:
        return f"b{size}" in self.runner.manifest["graphs"]["decode"]  # the prefill takes any batch

    def _run_stacked(self, group: list[Prepared], size: int) -> list[Answer]:
        rows = group + [group[-1]] * (size - len(group))  # pad to the bucket with copies
        inputs = {k: torch.cat([p.inputs[k] for p in rows]) for k in group[0].inputs}  # same layout: same S
        max_new = max(p.chat.max_tokens for p in group)
        start = time.perf_counter()
        if self.cm is not None:
            out = self.cm.generate(**inputs, max_new_tokens=max_new)
            prefill_s = self.cm.timing.prefill_s
        else:
            out = torch.as_tensor(self.runner.generate(**inputs, max_new_tokens=max_new))
            prefill_s = self.runner.timing.prefill_s
        total_s = time.perf_counter() - start
        seq_len = group[0].layout.seq_len
        info = {"layout": layout_name(group[0].layout), "batch": len(group), "batch_padded": size,
                "prefill_s": round(prefill_s, 6), "decode_s": round(total_s - prefill_s, 6)}
        return [self._answer(out[r, seq_len:].tolist()[: p.chat.max_tokens], info) for r, p in enumerate(group)]

    def _answer(self, new: list[int], info: dict[str, Any]) -> Answer:
        """Tokens up to and including the first EOS; the text stops before it."""
        for i, t in enumerate(new):
            if t in self.eos_ids:
                text = self.processor.tokenizer.decode(new[:i], skip_special_tokens=True).strip()
                return Answer(text, new[: i + 1], "stop", info)
        return Answer(self.processor.tokenizer.decode(new, skip_special_tokens=True).strip(), new, "length", info)

    def cache_info(self) -> dict[str, int]:
        """Graph cache counters (the torch engines), or ONNX sessions opened."""
        if self.cm is not None:
            return self.cm.cache_info()._asdict()
        graphs = self.runner.manifest["graphs"]
        return {"prefill_graphs": len(graphs["prefill"]), "decode_graphs": len(graphs["decode"])}
