"""Engine: one model under one plan, answering batches of requests of any layout. No Ray here.

    engine = Engine(model_dir, plan, engine="inductor")
    prepared = engine.prepare(chat)              # processor, layout, limits (RequestError: 4xx)
    answers = engine.run([p1, p2, p3], sinks)    # ONE left-padded prefill + one batched decode

Requests of different prompt lengths and image positions share one batch: their processor
outputs are left-padded into one batch (attention_mask 0 at the padding) and run by ONE
`CompiledVLM.generate` call through the polymorphic prefill graph of the batch bucket, each
row with its own sampling options, seed, stop strings and token budget (row_options). The
prefill runs the batch's real rows only; CompiledVLM pads the decode batch to 1, 2, 4, ... rows
with empty ones, which bounds the decode graphs (one per batch bucket and K/V capacity). The
ONNX engine, whose decode graphs the manifest lists per batch, gets copies of the last request
that stop after one token instead. No request compiles anything of its own.

A row's tokens reach its sink as they are decoded (`sink.token`), and its answer as soon as the
row finishes (`sink.done`: EOS, a stop string, its own max_tokens), while the rest of the batch
goes on decoding.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from .. import video
from ..config import SERVE_ENGINES, CompileConfig
from ..layout import VisualLayout
from ..modeldir import load
from ..plan import SkipPlan
from ..decode_state import decode_batch_bucket
from ..padding import left_pad_batch
from ..runtime import CompiledVLM
from .request import Chat, Limits, RequestError


@dataclass
class Prepared:
    """One request, processed: batch-1 model inputs, their layout and what the plan saves."""

    chat: Chat
    inputs: dict[str, torch.Tensor]
    layout: VisualLayout  # batch size 1
    prompt_tokens: int
    visual_flops_saved: int = 0  # decoder prefill FLOPs the plan saves on this request (flops.py model)


@dataclass
class Answer:
    text: str
    new_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_tokens)
    info: dict[str, Any] = field(default_factory=dict)  # layout, batch, prefill_s, decode_s, compiles, ...


class Sink(Protocol):
    """Where one request's output goes, from the engine's run thread."""

    def token(self, token_id: int, delta: str) -> None: ...  # one per generated token; delta may be ""

    def done(self, answer: Answer, delta: str) -> None: ...  # the answer, and the text not yet sent


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
        self.timing.prefill_end = time.perf_counter()
        self.timing.prefill_s = self.timing.prefill_end - self.timing.start
        return out


def _timed_onnx_runner(engine_dir: str | Path, threads: int | None):
    from ..export.runner import OnnxRunner

    class TimedOnnxRunner(OnnxRunner):
        """OnnxRunner that records, per thread, how long its last prefill took."""

        timing = threading.local()

        def prefill(self, **inputs):
            start = time.perf_counter()
            out = super().prefill(**inputs)
            self.timing.prefill_end = time.perf_counter()
            self.timing.prefill_s = self.timing.prefill_end - start
            return out

    return TimedOnnxRunner(engine_dir, threads=threads)


def _visual_flops_saved(config, plan: SkipPlan):
    """layout -> decoder prefill FLOPs the plan saves on it (flops.py's symbolic model, in S,
    V and P, turned into a plain function once)."""
    import sympy

    from .. import flops

    dims = flops.TextDims.from_hf_config(config)
    saved = sympy.lambdify((flops.S, flops.V, flops.P), flops.model_flops(dims) - flops.model_flops(dims, plan))

    def of(layout: VisualLayout) -> int:
        spans = layout.spans[0]
        visual = sum(b - a for a, b in spans)
        prefix = spans[-1][0] - (visual - (spans[-1][1] - spans[-1][0])) if spans else 0  # text rows before the last image
        return int(saved(layout.seq_len, visual, prefix))

    return of


class Engine:
    """A model, its processor and a compiled model (or ONNX runner) under one plan.

    Thread use: `prepare` may run in any thread; `run` in one thread at a time (the server's
    run thread).
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
        threads: int | None = None,
    ):
        if engine not in SERVE_ENGINES:
            raise ValueError(f"unknown engine {engine!r}; expected one of {', '.join(SERVE_ENGINES)}")
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.model_dir = Path(model_dir)
        self.model, self.processor = load(model_dir)
        self.tokenizer = self.processor.tokenizer
        self.plan = plan
        self.engine = engine
        self.limits = limits
        self.max_batch_size = max_batch_size
        self.name = self.model_dir.name
        gen = self.model.generation_config
        eos = gen.eos_token_id
        self.eos_ids = set([] if eos is None else [eos] if isinstance(eos, int) else eos)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else gen.pad_token_id if gen.pad_token_id is not None else 0)
        if engine == "onnx":
            if engine_dir is None:
                raise ValueError("engine 'onnx' needs engine_dir (a directory written by export_onnx)")
            self.runner = _timed_onnx_runner(engine_dir, threads)
            have = SkipPlan.from_dict(self.runner.manifest["plan"])
            if tuple(have.ops) != tuple(plan.ops) or have.scope != plan.scope or have.rows != plan.rows:
                raise ValueError(f"{engine_dir} was exported for plan {have}, not {plan}")
            self.cm = None
            self.max_context = int(self.runner.rt["max_cache_len"])
        else:
            self.runner = None
            self.cm = _TimedVLM(self.model, plan, CompileConfig(backend=engine, cache_size=64))  # decode graphs: per batch size and K/V capacity
            text = self.model.config.get_text_config()
            self.max_context = int(getattr(text, "max_position_embeddings", 1 << 30))
        self.adapter = self.cm.adapter if self.cm is not None else None
        self._flops_saved = _visual_flops_saved(self.model.config, plan)

    # -- requests ---------------------------------------------------------------------------
    def prepare(self, chat: Chat) -> Prepared:
        """Processor outputs and layout for one request, or RequestError: too many tokens,
        no visual tokens, a prompt longer than the ONNX engine's max_seq_len, sampling options
        the ONNX engine does not run."""
        if self.runner is not None:
            asked = [k for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty") if k in chat.sampling]
            if asked:
                raise RequestError(400, f"{', '.join(asked)}: engine 'onnx' decodes greedily (its runner has no logits "
                                        "processors); serve with --engine inductor or eager to sample")
        try:
            prompt = self.processor.apply_chat_template(chat.messages, add_generation_prompt=True, tokenize=False)
            inputs = video.process(self.processor, prompt, chat.images, chat.videos, "pt")
        except (ValueError, TypeError) as e:  # e.g. an image too small for the patch grid; VideoError is a ValueError
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
        return Prepared(chat=chat, inputs=inputs, layout=layout, prompt_tokens=n, visual_flops_saved=self._flops_saved(layout))

    def _layout(self, input_ids: torch.Tensor) -> VisualLayout:
        if self.adapter is not None:
            return self.adapter.layout(self.model, input_ids)
        from ..export import host

        return host.layout_of(input_ids.numpy(), self.runner.rt["visual_token_ids"])

    # -- batches ----------------------------------------------------------------------------
    def batch_size(self, n: int) -> int:
        return bucket(n, self.max_batch_size)

    def _row_options(self, p: Prepared) -> dict[str, Any]:
        return {**p.chat.sampling, "stop_strings": list(p.chat.stop) or None, "max_new_tokens": p.chat.max_tokens}

    def run(self, batch: list[Prepared], sinks: list[Sink] | None = None) -> list[Answer]:
        """Answers for requests of any layouts: ONE left-padded prefill, one batched decode
        loop. Each sink (one per request) gets its tokens as decoded and its answer when its
        row finishes."""
        if not batch or len(batch) > self.max_batch_size:
            raise ValueError(f"a batch has 1..{self.max_batch_size} requests, got {len(batch)}")
        size = self.batch_size(len(batch))
        if self.runner is not None and not self._onnx_has(size):
            answers = [a for i, p in enumerate(batch)  # no decode graph for this batch size: row by row
                       for a in self._run_batch([p], 1, None if sinks is None else [sinks[i]])]
        else:
            answers = self._run_batch(batch, size, sinks)
        return answers

    def _onnx_has(self, size: int) -> bool:
        return f"b{size}" in self.runner.manifest["graphs"]["decode"]  # the prefill takes any batch

    def compiles(self) -> int:
        """Graphs compiled so far (prefill + decode; the ONNX engine compiles none)."""
        if self.cm is None:
            return 0
        return self.cm.cache_info().compiles + self.cm.decode_cache_info().compiles

    def _run_batch(self, batch: list[Prepared], size: int, sinks: list[Sink] | None) -> list[Answer]:
        # The torch engines prefill the real rows alone (the prefill graph is symbolic in the
        # batch; CompiledVLM pads its decode batch to a power of two itself). The ONNX engine's
        # decode graphs exist per bucket: pad the batch to it with copies that stop at once.
        rows = batch if self.cm is not None else batch + [batch[-1]] * (size - len(batch))
        options = [self._row_options(p) for p in batch]
        options += [{**options[-1], "stop_strings": None, "max_new_tokens": 1}] * (len(rows) - len(batch))
        inputs = left_pad_batch([p.inputs for p in rows], self.pad_token_id)
        max_new = max(p.chat.max_tokens for p in batch)
        compiles = self.compiles()
        info = {"batch": len(batch), "batch_padded": len(rows) if self.cm is None else decode_batch_bucket(len(rows))}
        stream = _RowStream(self, batch, sinks, info)
        start = time.perf_counter()
        if self.cm is not None:
            self.cm.generate(**inputs, max_new_tokens=max_new, row_options=options, tokenizer=self.tokenizer,
                             pad_token_id=self.pad_token_id, streamer=stream)
        else:  # the runner returns every token at the end: they reach the sinks then
            out = torch.as_tensor(self.runner.generate(**inputs, max_new_tokens=max_new))
            stream.put(inputs["input_ids"])
            for t in range(inputs["input_ids"].shape[1], out.shape[1]):
                stream.put(out[:, t])
        stream.end()
        info["batch_s"] = round(time.perf_counter() - start, 6)
        return stream.answers

    def answer(self, new: list[int], chat: Chat) -> tuple[str, list[int], str]:
        """(text, token ids, finish_reason) of a row's new tokens: up to and including the first
        EOS, the text cut before the first stop string (OpenAI's rule: the stop string is not
        part of the answer)."""
        reason = "length"
        new = new[: chat.max_tokens]  # the ONNX runner decodes the whole batch to the longest budget
        for i, t in enumerate(new):
            if t in self.eos_ids:
                new, reason = new[: i + 1], "stop"
                break
        text_ids = new[:-1] if reason == "stop" else new
        text, cut = self._text(text_ids, chat.stop)
        return text, new, "stop" if cut else reason

    def _text(self, ids: list[int], stop: tuple[str, ...]) -> tuple[str, bool]:
        """Decoded text (special tokens skipped, stripped), cut before the first stop string."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cut = False
        hits = [i for i in (text.find(s) for s in stop) if i >= 0]
        if hits:
            text, cut = text[: min(hits)], True
        return text.strip(), cut

    def cache_info(self) -> dict[str, int]:
        """Graph cache counters (the torch engines), or ONNX sessions opened."""
        if self.cm is not None:
            return {**self.cm.cache_info()._asdict(), "decode_compiles": self.cm.decode_cache_info().compiles}
        graphs = self.runner.manifest["graphs"]
        return {"prefill_graphs": len(graphs["prefill"]), "decode_graphs": len(graphs["decode"])}


class _RowStream:
    """The decode loop's streamer for one engine batch (HF's put/end, plus `finished`): keeps
    each real row's new tokens, sends each token's text delta to the row's sink, and the
    row's Answer as soon as the row finishes.

    The deltas of a row concatenate to its answer's text: a delta holds back what the final
    text may still drop or change (leading and trailing whitespace, a tail that could begin a
    stop string, an incomplete UTF-8 character)."""

    def __init__(self, engine: Engine, batch: list[Prepared], sinks: list[Sink] | None, info: dict[str, Any]):
        self.engine, self.batch, self.sinks, self.info = engine, batch, sinks, info
        self.new: list[list[int]] = [[] for _ in batch]
        self.sent = [""] * len(batch)
        self.answers: list[Answer | None] = [None] * len(batch)
        self.started = False
        self.compiles_before = engine.compiles()
        self.timing = engine.cm.timing if engine.cm is not None else engine.runner.timing

    def put(self, value: torch.Tensor) -> None:
        if not self.started:  # HF's streamer protocol: the prompt first
            self.started = True
            return
        for i in range(len(self.batch)):
            if self.answers[i] is None:
                token = int(value[i])
                self.new[i].append(token)
                if self.sinks is not None:
                    self.sinks[i].token(token, self._delta(i))

    def _delta(self, i: int) -> str:
        chat = self.batch[i].chat
        ids = [t for t in self.new[i] if t not in self.engine.eos_ids]
        text = self.engine.tokenizer.decode(ids, skip_special_tokens=True).lstrip()
        hits = [k for k in (text.find(s) for s in chat.stop) if k >= 0]
        if hits:
            text = text[: min(hits)]
        safe = text.rstrip().rstrip("\ufffd")
        for s in chat.stop:  # a tail that may be the start of a stop string waits
            for n in range(min(len(s) - 1, len(safe)), 0, -1):
                if safe.endswith(s[:n]):
                    safe = safe[:-n]
                    break
        if not safe.startswith(self.sent[i]) or len(safe) <= len(self.sent[i]):
            return ""
        delta = safe[len(self.sent[i]):]
        self.sent[i] = safe
        return delta

    def finished(self, mask: torch.Tensor) -> None:
        for i in range(len(self.batch)):
            if self.answers[i] is None and bool(mask[i]):
                self._finish(i)

    def _finish(self, i: int) -> None:
        p = self.batch[i]
        text, ids, reason = self.engine.answer(self.new[i], p.chat)
        info = {**self.info, "layout": layout_name(p.layout), "prefill_s": round(self.timing.prefill_s, 6),
                "decode_s": round(max(0.0, time.perf_counter() - self.timing.prefill_end), 6),
                "compiles": self.engine.compiles() - self.compiles_before, "visual_flops_saved": p.visual_flops_saved}
        if p.chat.sampling.get("seed") is not None:
            info["seed"] = p.chat.sampling["seed"]
        answer = self.answers[i] = Answer(text, ids, reason, info)
        if self.sinks is not None:
            rest = text[len(self.sent[i]):] if text.startswith(self.sent[i]) else ""
            self.sinks[i].done(answer, rest)

    def end(self) -> None:
        for i in range(len(self.batch)):
            if self.answers[i] is None:
                self._finish(i)
