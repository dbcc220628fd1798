"""CompiledVLM: `model(**inputs)` and `generate()` with a skip-shaped, compiled prefill.

    cm = vskip_compile.compile(model, plan, backend="inductor")
    logits = cm(**inputs).logits
    tokens = cm.generate(**inputs, max_new_tokens=16)

Prefill: the adapter computes the language model's inputs outside any graph (vision tower,
merge, M-RoPE ids, DeepStack) and the layout; the DecoderCore is compiled with the `vskip`
backend, specialized to (layout, plan, dtype, device), and cached in a bounded LRU.

Decode: the unmodified model's decoder layers, one token at a time, as core.DecodeStep
compiled with the same inner backend (inductor; eager runs AOT autograd's graph as is;
tensorrt) and no skip passes: decoding does not depend on the plan. The step runs over
preallocated K/V buffers of T slots, T = prompt + new tokens rounded up to `decode_bucket`,
so one static graph serves every prompt of a similar length; the prefill's K/V (every row,
visual rows included) fill slots 0..S-1, each step's new K/V is written at the next slot
outside the graph, and past_mask marks the filled slots. Decode graphs are cached in their
own bounded LRU keyed by (T, batch bucket, dtype, device): `decode_cache_info()`.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from transformers import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .archs import PrefillInputs, adapter_for
from .backend import vskip
from .config import CompileConfig, CompileError
from .core import DecodeStep, DecoderCore, rope_position_ids
from .decoding import decode_loop
from .kept_rows import MIN_ROWS, kept_inputs, mark_polymorphic, no_duck_sizes
from .layout import VisualLayout
from .plan import SkipPlan
from .sampling import SAMPLING_DEFAULTS, Sampler

RECOMPILE_LIMIT = 4  # graphs one cache entry may compile (each recompile is counted and warned about)

# Generation options of HF generate() that this decode loop does not implement: refused by name,
# not ignored (every other GenerationConfig field is refused too: see _generation_options).
_UNSUPPORTED_GENERATE = (
    "generation_config",
    "num_return_sequences",
    "typical_p",
    "epsilon_cutoff",
    "eta_cutoff",
    "top_h",
    "no_repeat_ngram_size",
    "length_penalty",
    "min_length",
    "min_new_tokens",
    "max_length",
    "bad_words_ids",
    "sequence_bias",
    "suppress_tokens",
    "return_dict_in_generate",
    "output_scores",
    "output_logits",
    "assistant_model",
    "prompt_lookup_num_tokens",
)


# generation_config fields that make HF's greedy search differ from a plain argmax loop.
_GREEDY_CHANGING_CONFIG = (
    "repetition_penalty",
    "no_repeat_ngram_size",
    "min_length",
    "min_new_tokens",
    "bad_words_ids",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "suppress_tokens",
    "begin_suppress_tokens",
    "sequence_bias",
)


class CacheInfo(NamedTuple):
    hits: int
    misses: int
    maxsize: int
    currsize: int
    compiles: int = 0  # graphs Dynamo compiled for this cache's entries (a recompile adds one)


@dataclass(frozen=True)
class _GraphKey:
    """One polymorphic prefill graph: every layout, length and padding of its batch bucket."""

    plan: SkipPlan
    dtype: torch.dtype
    device: torch.device
    logits_to_keep: int
    num_deepstack: int
    batched: bool  # batch bucket: False for one row, True for 2 or more (the batch size is symbolic)
    layout: VisualLayout | None = None  # specialize="layout": the one layout of a static graph


@dataclass(frozen=True)
class _DecodeKey:
    capacity: int  # T, the K/V slots of the decode graph
    batch: int
    dtype: torch.dtype
    device: torch.device


class _LRU:
    """A bounded map of compiled graphs with hit/miss counters.

    Locked: a server calls one CompiledVLM from several threads (vskip serve runs one thread
    for known layouts and one that compiles new ones), and a lookup-then-evict sequence must
    not interleave. `build` only wraps torch.compile (compiling happens on the first call,
    outside the lock), so the lock is held for microseconds.
    """

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self.graphs: OrderedDict[Any, Any] = OrderedDict()
        self.hits = self.misses = 0
        self.compiles = 0  # counted by _Counted, the backend wrapper of this cache's graphs
        self._lock = threading.Lock()

    def get(self, key, build):
        with self._lock:
            if key in self.graphs:
                self.hits += 1
                self.graphs.move_to_end(key)
                return self.graphs[key]
            self.misses += 1
            graph = self.graphs[key] = build()
            if len(self.graphs) > self.maxsize:
                self.graphs.popitem(last=False)
            return graph

    def info(self) -> CacheInfo:
        with self._lock:
            return CacheInfo(self.hits, self.misses, self.maxsize, len(self.graphs), self.compiles)

    def clear(self) -> None:
        with self._lock:
            self.graphs.clear()
            self.hits = self.misses = self.compiles = 0


class _Counted:
    """A torch.compile backend that counts the graphs Dynamo hands it into `cache.compiles`
    and warns, naming the guard that failed, when one cache entry compiles again."""

    def __init__(self, backend, cache: _LRU, what: str, code):
        self.backend = torch._dynamo.lookup_backend(backend) if isinstance(backend, str) else backend
        self.cache, self.what, self.code = cache, what, code
        self.graphs = 0

    def __call__(self, gm, example_inputs, **kwargs):
        with self.cache._lock:
            self.cache.compiles += 1
            self.graphs += 1
        if self.graphs > 1:
            failures = torch._dynamo.utils.guard_failures.get(self.code) or ["(reason not recorded)"]
            warnings.warn(f"vskip: {self.what} recompiled (graph {self.graphs} of this entry): guard failed: {failures[-1]}",
                          RecompileWarning, stacklevel=2)
        return self.backend(gm, example_inputs, **kwargs)


class RecompileWarning(UserWarning):
    """A compiled graph was compiled again for inputs its guards refused."""


def _decode_backend(inner: str):
    """The torch.compile backend of the decode step for an inner backend name: the same
    compiler as the prefill's, without the skip passes (decoding is the unmodified model)."""
    if inner == "inductor":
        return "inductor"
    if inner == "eager":
        return "aot_eager"  # AOT autograd's aten graph run as is, as the vskip backend's eager inner
    from torch._dynamo.backends.common import aot_autograd

    from .backend import _tensorrt_compiler

    return aot_autograd(fw_compiler=_tensorrt_compiler)


def decode_batch_bucket(batch: int) -> int:
    """The decode graph's batch for a batch of `batch` rows: the next power of two, so a
    service compiles decode graphs for 1, 2, 4, 8, ... rows only; the prefill, symbolic in the
    batch, runs the real rows alone (decode steps are cheap, prefill rows are not)."""
    return 1 << (batch - 1).bit_length()


class _DecodeRun:
    """One generate call's decode state: K/V buffers of the graph's T slots, the filled-slot
    mask, the next slot and the last position ids.

    step(embeds [B, 1, D]) runs the compiled DecodeStep, writes the new K/V at slot n (outside
    the graph: the graph stays free of in-place updates) and returns logits [B, 1, V].
    """

    def __init__(self, graph, kv: list[tuple[torch.Tensor, torch.Tensor]], last_position: torch.Tensor, capacity: int,
                 pads: list[int], batch_bucket: int | None = None):
        batch, kv_heads, seq_len, head_dim = kv[0][0].shape  # [B, KV, S, E]
        if seq_len >= capacity:
            raise CompileError(f"a prefill of {seq_len} rows leaves no decode slot in a cache of {capacity}")
        self.graph = graph
        self.capacity = capacity
        self.batch = batch
        self.bucket = batch_bucket or batch  # rows batch.. are empty: no key but their own new one
        self.buffers: list[torch.Tensor] = []
        for k, v in kv:
            for x in (k, v):
                buf = x.new_zeros(self.bucket, kv_heads, capacity, head_dim)  # [Bb, KV, T, E]
                buf[:batch, :, :seq_len] = x
                self.buffers.append(buf)
        self.past_mask = torch.zeros(self.bucket, capacity, dtype=torch.bool, device=kv[0][0].device)  # [Bb, T]
        self.past_mask[:batch, :seq_len] = True
        for row, pad in enumerate(pads):
            self.past_mask[row, :pad] = False  # left padding: never a key
        self.n = seq_len
        empty = self.bucket - batch
        dim = last_position.ndim - 2  # the batch axis of [B, 1] or [3, B, 1]
        empty_rows = torch.zeros_like(last_position.narrow(dim, 0, 1)).repeat_interleave(empty, dim)
        self.position = torch.cat([last_position, empty_rows], dim)  # [Bb, 1] or [3, Bb, 1]

    def step(self, embeds: torch.Tensor) -> torch.Tensor:
        if self.n >= self.capacity:
            raise CompileError(f"decode cache of {self.capacity} slots is full")
        self.position = self.position + 1
        if self.bucket > self.batch:
            embeds = torch.cat([embeds, embeds.new_zeros(self.bucket - self.batch, *embeds.shape[1:])])  # [Bb, 1, D]
        logits, *new_kv = self.graph(embeds, self.position, self.past_mask, *self.buffers)
        for buf, new in zip(self.buffers, new_kv):
            buf[:, :, self.n] = new[:, :, 0]  # [Bb, KV, E] into slot n
        self.past_mask[:, self.n] = True
        self.n += 1
        return logits[: self.batch]  # [B, 1, V]


class CompiledVLM:
    """A HF VLM whose prefill runs through specialized skip-shaped graphs.

    Holds the model (not a copy): weights are shared, and the model itself stays unmodified.
    `config` (vskip_compile.config.CompileConfig) names the backend, bounds each graph cache
    (prefill and decode separately) and the decode K/V capacity rounding.
    """

    def __init__(self, model, plan: SkipPlan, config: CompileConfig = CompileConfig(), adapter=None):
        if not isinstance(config, CompileConfig):
            raise CompileError(f"config must be a CompileConfig, got {type(config).__name__}")
        if config.backend == "tensorrt":
            from .backend import _check_tensorrt

            _check_tensorrt()
        if (config.attention == "flex" and config.backend == "inductor" and config.specialize is None
                and _device(model).type == "cpu"):
            raise CompileError(
                "attention='flex' with backend='inductor' on CPU needs specialize='layout': torch 2.13's CPU flex "
                "template miscompiles dynamic shapes (it renames size symbols by plain string replacement, "
                "cpp_flex_attention_template.py); use a GPU, static graphs, or attention='sdpa'"
            )
        self.config = config
        self.model = model
        self.plan = plan
        self.adapter = adapter or adapter_for(model)
        self.adapter.check_plan(model, plan)
        self._graphs = _LRU(config.cache_size)  # _GraphKey -> compiled prefill
        self._decode_graphs = _LRU(config.cache_size)  # _DecodeKey -> compiled decode step
        self._cores: dict[tuple[int, int], DecoderCore] = {}
        self._decode_step: DecodeStep | None = None

    # -- graph caches ---------------------------------------------------------------------
    def cache_info(self) -> CacheInfo:
        """The prefill graphs' cache."""
        return self._graphs.info()

    def decode_cache_info(self) -> CacheInfo:
        """The decode graphs' cache (one graph per K/V capacity, batch size, dtype, device)."""
        return self._decode_graphs.info()

    def cache_clear(self) -> None:
        """Drops this object's graphs, prefill and decode. Dynamo keeps its compiled entries
        until torch._dynamo.reset()."""
        self._graphs.clear()
        self._decode_graphs.clear()

    def _core(self, logits_to_keep: int, num_deepstack: int) -> DecoderCore:
        key = (logits_to_keep, num_deepstack)
        core = self._cores.get(key)
        if core is None:  # setdefault is atomic: two threads racing here end up sharing one core
            layout_inputs = self.config.specialize is None
            core = DecoderCore.from_model(self.model, self.adapter, logits_to_keep, num_deepstack, layout_inputs,
                                          self.config.attention)
            core = self._cores.setdefault(key, core)
        return core

    def _graph(self, key: _GraphKey):
        """The compiled polymorphic prefill for key: LRU hit, or a new torch.compile (compiled
        on its first call, with the sequence, kept-row and, batched, batch sizes symbolic)."""
        options = {"plan": self.plan, "layout": key.layout, "inner": self.config.backend}

        def build():
            core = self._core(key.logits_to_keep, key.num_deepstack)
            backend = _Counted(lambda gm, ex: vskip(gm, ex, options=options), self._graphs, "prefill graph",
                               DecoderCore.forward.__code__)
            # isolate_recompiles: each entry owns its Dynamo cache instead of sharing
            # DecoderCore.forward's; a recompile (a guard that failed) is counted and warned about.
            return torch.compile(core, backend=backend, fullgraph=True, dynamic=False, isolate_recompiles=True,
                                 recompile_limit=RECOMPILE_LIMIT)

        return self._graphs.get(key, build)

    def _decode_graph(self, key: _DecodeKey):
        """The compiled decode step for key (one module, one compiled graph per key). Static
        shapes; a recompile is counted in decode_cache_info() and warned about."""
        if self._decode_step is None:
            self._decode_step = DecodeStep(self.adapter.language_model(self.model), self.adapter.lm_head(self.model))
        return self._decode_graphs.get(
            key,
            lambda: torch.compile(
                self._decode_step,
                backend=_Counted(_decode_backend(self.config.backend), self._decode_graphs, "decode graph", DecodeStep.forward.__code__),
                fullgraph=True,
                dynamic=False,
                isolate_recompiles=True,
                recompile_limit=RECOMPILE_LIMIT,
            ),
        )

    def _decode_run(self, kv, position_ids: torch.Tensor, max_new_tokens: int, pads: list[int]) -> _DecodeRun:
        """Decode state after a prefill of kv (per layer [B, KV, S, E]) for max_new_tokens
        tokens: the last prefill token's K/V is in the cache, so max_new_tokens - 1 steps each
        add one row; capacity is that rounded up to decode_bucket."""
        k0 = kv[0][0]  # [B, KV, S, E]
        batch, _, seq_len, _ = k0.shape
        needed = seq_len + max_new_tokens - 1
        bucket = self.config.decode_bucket
        capacity = -(-needed // bucket) * bucket
        batch_bucket = decode_batch_bucket(batch)
        graph = self._decode_graph(_DecodeKey(capacity, batch_bucket, k0.dtype, k0.device))
        return _DecodeRun(graph, kv, last_positions(position_ids), capacity, pads, batch_bucket)  # [B, 1] or [3, B, 1]

    # -- prefill --------------------------------------------------------------------------
    def _prefill_inputs(self, inputs: dict[str, Any], left_padded: bool = False) -> PrefillInputs:
        if "input_ids" not in inputs:
            raise CompileError("CompiledVLM needs input_ids (it finds the visual rows from them)")
        if self.model.training:
            raise CompileError("CompiledVLM runs inference only: call model.eval() first")
        mask = inputs.get("attention_mask")
        if not left_padded and mask is not None and not bool(mask.all()):
            raise CompileError(
                "padded batches (attention_mask with zeros) are not supported by a forward call: its "
                "logits and cache would hold padding rows; generate() takes left-padded batches"
            )
        return self.adapter.prefill_inputs(self.model, **inputs)

    def _prefill(self, p: PrefillInputs, logits_to_keep: int):
        """Logits [B, n, V] and per-layer (k, v) [B, KV, S, E] of the whole batch in ONE call
        of the polymorphic graph: rows of any layout and left padding (padding rows are
        frozen, never keys of a real row; each row's positions start at 0 as if alone)."""
        if self.config.specialize == "layout":
            return self._prefill_static(p, logits_to_keep)
        pads = row_pads(p)
        grow = max(0, MIN_ROWS - p.inputs_embeds.shape[1])
        if grow:  # a one-row prompt: one padding row in front, cut off the outputs below
            p, pads = pad_left(p, grow), [pad + grow for pad in pads]
        embeds = p.inputs_embeds
        batch, seq_len, _ = embeds.shape
        deepstack = tuple(p.deepstack or ())
        kept_index, kept_valid = kept_inputs(p.layout, self.plan.scope, pads, device=embeds.device, rows=self.plan.rows)
        mask = torch.arange(seq_len, device=embeds.device)[None, :] >= torch.tensor(pads, device=embeds.device)[:, None]  # [B, S]
        position_ids = rebase_positions(p.position_ids, pads)
        key = _GraphKey(self.plan, embeds.dtype, embeds.device, logits_to_keep, len(deepstack), batch > 1)
        args = (embeds, position_ids, kept_index, kept_valid, mask, *deepstack)
        mark_polymorphic(args, batched=batch > 1)
        with no_duck_sizes():
            logits, *kv = self._graph(key)(*args)
        if grow:
            kv = [x[:, :, grow:] for x in kv]
        return logits, [(kv[2 * i], kv[2 * i + 1]) for i in range(len(kv) // 2)]

    def _prefill_static(self, p: PrefillInputs, logits_to_keep: int):
        """specialize="layout": the graph of this exact layout (constant row offsets, static
        shapes), compiled for each new one. Unpadded batches of one layout only."""
        if (p.attention_mask is not None and not bool(p.attention_mask.all())) or not p.layout.is_uniform:
            raise CompileError(f"specialize='layout' runs unpadded batches of one layout, got {p.layout}")
        deepstack = tuple(p.deepstack or ())
        embeds = p.inputs_embeds
        key = _GraphKey(self.plan, embeds.dtype, embeds.device, logits_to_keep, len(deepstack), embeds.shape[0] > 1, p.layout)
        logits, *kv = self._graph(key)(embeds, p.position_ids, *deepstack)
        return logits, [(kv[2 * i], kv[2 * i + 1]) for i in range(len(kv) // 2)]

    def _cache(self, kv) -> DynamicCache:
        return DynamicCache(ddp_cache_data=kv, config=self.adapter.language_model(self.model).config)

    # -- public API -----------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, **inputs) -> CausalLMOutputWithPast:
        """HF-style forward of a prefill under the plan: `.logits` [B, S, V] (or the last
        `logits_to_keep` rows) and `.cache`, a DynamicCache holding every row's K/V."""
        logits_to_keep = inputs.pop("logits_to_keep", 0)
        if not _is_int(logits_to_keep) or logits_to_keep < 0:
            raise CompileError(f"logits_to_keep must be a non-negative int, got {logits_to_keep!r}")
        check_model_inputs(self.model, inputs, "CompiledVLM()")
        check_prompt(self.model, inputs, 0)
        input_ids = inputs.get("input_ids")
        if input_ids is not None and not self.adapter.layout(self.model, input_ids).has_visual:
            return self.model(**inputs, logits_to_keep=logits_to_keep)
        p = self._prefill_inputs(inputs)
        logits, kv = self._prefill(p, logits_to_keep)
        return CausalLMOutputWithPast(logits=logits, cache=self._cache(kv))

    @torch.no_grad()
    def generate(
        self,
        max_new_tokens: int | None = None,
        do_sample: bool = False,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        num_beams: int = 1,
        use_cache: bool = True,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        repetition_penalty: float | None = None,
        stop_strings: str | list[str] | None = None,
        tokenizer=None,
        logits_processor=None,
        stopping_criteria=None,
        streamer=None,
        seed: int | None = None,
        row_options: list[dict[str, Any]] | None = None,
        **inputs,
    ) -> torch.Tensor:
        """HF-style generate: returns [B, S + n] token ids (prompt included); rows that finished
        (EOS, a stop string, their own max_new_tokens) are filled with pad_token_id until every
        row has finished. A left-padded batch (attention_mask zeros, then ones) runs as one
        batch, rows of any layout together: padding rows are never keys of a real row, so every
        row gets the tokens it gets alone.

        Greedy by default (argmax, bit-identical to the plain greedy loop). Sampling and
        processing as HF generate does them, with transformers' own processors and warpers:
        do_sample, temperature, top_k, top_p, min_p (unset ones of a sampled row take the
        model's generation_config values, as in HF: top_k 50 unless it says otherwise),
        repetition_penalty, logits_processor (a
        LogitsProcessorList, applied after the repetition penalty and before the warpers, as
        HF orders them), stop_strings (with tokenizer=), stopping_criteria (a
        StoppingCriteriaList, called with the whole batch), streamer (HF's put/end; put gets the
        prompt ids, then each step's tokens [B]; a streamer that also has `finished(mask)` gets
        the rows finished so far after each step). vskip extensions: seed (each sampled row
        gets its own torch.Generator seeded with it; without a seed, torch's global RNG as HF),
        row_options (one dict per row overriding do_sample, temperature, top_k, top_p, min_p,
        repetition_penalty, seed, stop_strings, max_new_tokens for that row: a server batch).
        Any other HF generate option is refused by name."""
        refused = sorted(k for k in inputs if k in _UNSUPPORTED_GENERATE or k in _generation_options())
        check_model_inputs(self.model, {k: v for k, v in inputs.items() if k not in refused}, "CompiledVLM.generate()")
        if num_beams != 1 or not use_cache or refused:
            what = refused or [f"num_beams={num_beams}", f"use_cache={use_cache}"]
            raise CompileError(f"CompiledVLM.generate does not support: {', '.join(map(str, what))} "
                               "(greedy or sampled decoding, one sequence per row)")
        gen = self.model.generation_config
        _check_generation_config(gen)
        options = {"do_sample": do_sample, "temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p,
                   "repetition_penalty": repetition_penalty, "seed": seed, "stop_strings": stop_strings}
        try:
            Sampler.resolve(options)  # the call's own options, before anything else is looked at
        except ValueError as e:
            raise CompileError(f"CompiledVLM.generate: {e}") from e
        max_new_tokens = gen.max_new_tokens if max_new_tokens is None else max_new_tokens
        if not _is_int(max_new_tokens) or max_new_tokens < 1:
            raise CompileError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        check_prompt(self.model, inputs, max_new_tokens)
        eos_token_id = gen.eos_token_id if eos_token_id is None else eos_token_id
        eos = torch.tensor([] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        pad_token_id = gen.pad_token_id if pad_token_id is None else pad_token_id
        if pad_token_id is None and len(eos):
            pad_token_id = int(eos[0])
        input_ids = inputs["input_ids"]
        try:
            sampler = Sampler.build(input_ids.shape[0], options, row_options, logits_processor=logits_processor,
                                    tokenizer=tokenizer, device=input_ids.device, prompt_len=input_ids.shape[1],
                                    defaults=_sampling_defaults(gen))
        except ValueError as e:
            raise CompileError(f"CompiledVLM.generate: {e}") from e
        too_long = [r.max_new_tokens for r in sampler.rows if (r.max_new_tokens or 0) > max_new_tokens]
        if too_long:
            raise CompileError(f"row_options asks for max_new_tokens={max(too_long)}, more than the call's {max_new_tokens}")

        if not self.adapter.layout(self.model, input_ids).has_visual:
            if not sampler.trivial or stopping_criteria is not None or streamer is not None or seed is not None:
                raise CompileError("a prompt without visual tokens runs HF generate on the model itself: only greedy "
                                   "decoding options are passed through")
            kw = dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
            return self.model.generate(**inputs, **kw)

        left_padding(inputs.get("attention_mask"))  # refuses anything but left padding, naming the row
        p = self._prefill_inputs(inputs, left_padded=True)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        new = self._decode(p, input_ids, max_new_tokens, eos.to(input_ids.device), pad_token_id,
                           None if sampler.trivial else sampler, stopping_criteria, streamer)
        if streamer is not None:
            streamer.end()
        return torch.cat([input_ids, new], dim=1)  # [B, S + n]

    def _decode(self, p: PrefillInputs, input_ids: torch.Tensor, max_new_tokens: int, eos: torch.Tensor,
                pad_token_id: int | None, sampler: Sampler | None = None, stopping_criteria=None,
                streamer=None) -> torch.Tensor:
        """New tokens [B, n] of a (left-padded) batch: prefill skip-shaped, decode compiled.

        The one decode loop. Without a sampler every row takes the argmax (the greedy path);
        with one, each row's processors, RNG and stopping rules choose and end it."""
        logits, kv = self._prefill(p, logits_to_keep=1)
        # Step t sits at the largest prompt position + t (M-RoPE ids [3, B, 1] move on
        # together, as HF's decode does with its rope deltas); padding slots stay masked.
        pads = row_pads(p)
        positions = rebase_positions(p.position_ids, pads)
        decode = self._decode_run(kv, positions, max_new_tokens, pads) if max_new_tokens > 1 else None
        embed = self.model.get_input_embeddings()
        ids = input_ids  # [B, S + t]: what processors and stopping rules read
        track = sampler is not None or stopping_criteria is not None
        last_scores = [logits[:, -1, :]]

        def step(token: torch.Tensor) -> torch.Tensor:
            last_scores[0] = decode.step(embed(token[:, None]))[:, -1, :]  # [B, 1, D] -> [B, V]
            return last_scores[0]

        def pick(scores: torch.Tensor) -> torch.Tensor:
            return scores.argmax(dim=-1) if sampler is None else sampler.pick(ids, scores, pads)  # [B]

        def stop(token: torch.Tensor) -> torch.Tensor:
            nonlocal ids
            finished = torch.zeros_like(token, dtype=torch.bool)
            if track:
                ids = torch.cat([ids, token[:, None]], dim=1)
                if sampler is not None:
                    finished |= sampler.stop(ids, pads)
                if stopping_criteria is not None:
                    finished |= stopping_criteria(ids, last_scores[0]).to(finished.device)
            return finished

        def on_token(token: torch.Tensor, finished: torch.Tensor) -> None:
            streamer.put(token.cpu())
            if hasattr(streamer, "finished"):
                streamer.finished(finished.cpu())

        tokens = decode_loop(logits[:, -1, :], step, max_new_tokens, eos, pad_token_id, pick, stop,
                             on_token if streamer is not None else None)
        return torch.stack(tokens, dim=1)  # [B, n]

    def __repr__(self) -> str:
        return (
            f"CompiledVLM({type(self.model).__name__}, {self.plan}, backend={self.config.backend!r}, "
            f"prefill {self.cache_info()}, decode {self.decode_cache_info()})"
        )


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _generation_options() -> frozenset[str]:
    """Names of HF GenerationConfig fields: generate() options, not model inputs."""
    from transformers import GenerationConfig

    return frozenset(k for k in GenerationConfig().to_dict() if not k.startswith("_"))


def check_model_inputs(model, inputs: dict[str, Any], where: str) -> None:
    """Refuse keyword arguments that are not inputs of the model's forward, as HF generate
    does: a typo such as `max_new_token=1` would otherwise be ignored."""
    import inspect

    params = inspect.signature(model.forward).parameters
    known = {k for k, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    unknown = sorted(k for k in inputs if k not in known)
    if unknown:
        raise CompileError(
            f"{where}: unknown keyword argument(s) {', '.join(unknown)}: not inputs of "
            f"{type(model).__name__}.forward nor supported generate options (a typo?)"
        )


def check_prompt(model, inputs: dict[str, Any], max_new_tokens: int) -> None:
    """Refuse input_ids that are not a [B, S] integer tensor of the vocabulary, a mask of
    another shape, and a prompt (plus the tokens to generate) longer than the model's
    max_position_embeddings: positions past it are untrained, and the decode cache is
    sized by prompt + new tokens."""
    ids = inputs.get("input_ids")
    if ids is None:
        raise CompileError("CompiledVLM needs input_ids (it finds the visual rows from them)")
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        what = f"a {ids.ndim}-D {ids.dtype} tensor" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise CompileError(f"input_ids must be a 2-D integer tensor [batch, seq_len], got {what}")
    batch, seq_len = ids.shape
    if batch == 0 or seq_len == 0:
        raise CompileError(f"input_ids is empty (shape {list(ids.shape)})")
    text = model.config.get_text_config()
    vocab = getattr(text, "vocab_size", None)
    if vocab is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise CompileError(f"input_ids holds token ids outside the vocabulary 0..{vocab - 1} "
                           f"(min {int(ids.min())}, max {int(ids.max())})")
    mask = inputs.get("attention_mask")
    if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(ids.shape)):
        shape = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise CompileError(f"attention_mask must be a tensor of input_ids' shape {list(ids.shape)}, got {shape}")
    limit = getattr(text, "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len + max(max_new_tokens - 1, 0) > limit:
        if seq_len > limit:
            raise CompileError(f"the prompt has {seq_len} tokens, more than the model's max_position_embeddings {limit}")
        raise CompileError(
            f"max_new_tokens={max_new_tokens} with a {seq_len}-token prompt exceeds the model's "
            f"max_position_embeddings {limit}: at most {limit - seq_len + 1} new tokens"
        )


def left_padding(mask: torch.Tensor | None) -> list[int] | None:
    """Per batch row, how many leading positions a 2D attention mask pads; None when no row is
    padded. Anything but left padding (zeros, then ones to the end) is refused."""
    if mask is None or bool(mask.all()):
        return None
    keep = mask.bool()  # [B, S]
    pads = (~keep).long().cumprod(dim=1).sum(dim=1).tolist()  # leading zeros per row
    for row, pad in enumerate(pads):
        if pad == keep.shape[1] or not bool(keep[row, pad:].all()):
            raise CompileError(
                f"batch row {row}: attention_mask is not left padding (zeros, then ones to the end); "
                "pad decoder prompts on the left (processor padding_side='left')"
            )
    return pads


def left_pad_batch(rows: list[dict[str, torch.Tensor]], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Batch-1 processor outputs of different lengths as one left-padded batch: every [1, S]
    tensor (input_ids, attention_mask, mm_token_type_ids, ...) padded on the left (input_ids
    with pad_token_id, the others with 0: attention_mask 0 marks the padding); other tensors
    (pixel_values, image_grid_thw, ...) concatenated in row order."""
    width = max(int(r["input_ids"].shape[1]) for r in rows)
    out = {}
    for key in rows[0]:
        parts = []
        for r in rows:
            t = r[key]
            seq_len = int(r["input_ids"].shape[1])
            if t.ndim == 2 and t.shape[0] == 1 and t.shape[1] == seq_len and width > seq_len:
                fill = pad_token_id if key == "input_ids" else 0
                t = torch.cat([t.new_full((1, width - seq_len), fill), t], dim=1)  # [1, width]
            parts.append(t)
        out[key] = torch.cat(parts)
    return out


def row_pads(p: PrefillInputs) -> list[int]:
    """Left padding of each batch row of p (zeros when it has none)."""
    return left_padding(p.attention_mask) or [0] * p.inputs_embeds.shape[0]


def rebase_positions(position_ids: torch.Tensor, pads: list[int]) -> torch.Tensor:
    """Position ids [B, S] or [3|4, B, S] with each row's first real token at 0, as the row
    would have alone; padding positions 0 (their rows are never keys)."""
    if not any(pads):
        return position_ids
    seq_len = position_ids.shape[-1]
    first = torch.tensor(pads, device=position_ids.device)  # [B]
    start = position_ids.gather(-1, first.expand(*position_ids.shape[:-1])[..., None])  # [.., B, 1]
    real = torch.arange(seq_len, device=position_ids.device)[None, :] >= first[:, None]  # [B, S]
    return torch.where(real, position_ids - start, torch.zeros_like(position_ids))


def last_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """Per row, the position decoding continues from: the last prompt token's, on each M-RoPE
    axis, as HF generate (transformers 5.24) feeds its rotary embedding (checked with a hook on
    Qwen2.5-VL / Qwen3-VL prompts that end on an image and on a video whose temporal ids run past
    the text after it: HF steps from the last token's ids, not from the rope deltas' max + 1).
    [B, S] -> [B, 1]; [3|4, B, S] -> [3, B, 1]."""
    return rope_position_ids(position_ids)[..., -1:]


def pad_left(p: PrefillInputs, n: int) -> PrefillInputs:
    """p with n padding rows in front (zero embeddings, positions and DeepStack; spans shifted)."""

    def rows(x: torch.Tensor) -> torch.Tensor:  # [B, S, D] -> [B, n + S, D]
        return torch.cat([x.new_zeros(x.shape[0], n, x.shape[2]), x], dim=1)

    batch = p.inputs_embeds.shape[0]
    mask = p.attention_mask if p.attention_mask is not None else torch.ones(batch, p.layout.seq_len, dtype=torch.long)
    layout = VisualLayout(p.layout.seq_len + n, tuple(tuple((a + n, b + n) for a, b in row) for row in p.layout.spans),
                          p.layout.kinds)
    return PrefillInputs(
        inputs_embeds=rows(p.inputs_embeds),
        position_ids=torch.cat([p.position_ids.new_zeros(*p.position_ids.shape[:-1], n), p.position_ids], dim=-1),
        deepstack=None if p.deepstack is None else tuple(rows(d) for d in p.deepstack),
        attention_mask=torch.cat([mask.new_zeros(batch, n), mask.to(p.inputs_embeds.device)], dim=1),  # [B, n + S]
        layout=layout,
    )


def _sampling_defaults(gen) -> dict[str, Any]:
    """What HF generate samples with when temperature, top_k, top_p, min_p are not passed: the
    model's generation_config, else transformers' global defaults (top_k 50, as HF merges them
    in GenerationMixin._prepare_generation_config)."""
    global_defaults = gen._get_default_generation_params()
    return {k: getattr(gen, k, None) if getattr(gen, k, None) is not None else global_defaults.get(k)
            for k in SAMPLING_DEFAULTS}


def _check_generation_config(gen) -> None:
    """Refuse a model generation_config whose logits processors HF would apply to greedy search."""
    from transformers import GenerationConfig

    default = GenerationConfig()
    changed = [k for k in _GREEDY_CHANGING_CONFIG if getattr(gen, k, None) != getattr(default, k, None)]
    if changed:
        raise CompileError(
            f"the model's generation_config sets {', '.join(changed)}: HF generate would apply them, "
            "CompiledVLM.generate (plain greedy) does not"
        )


def compile(model, plan: SkipPlan, backend: str | None = None, adapter=None, *, config: CompileConfig | None = None,
            **options) -> CompiledVLM:
    """Compile `model` under `plan` (backend: "inductor", "eager" or "tensorrt"): the prefill
    skip-shaped, the decode step unmodified, both with that backend.

    `config` is a CompileConfig, or its fields come as keywords (backend, cache_size,
    decode_bucket, specialize, attention), not both. Refuses a plan made for another model and an unknown
    backend or option here, before any input. Graphs compile lazily: one prefill graph per
    batch bucket (one row; several rows) serves every layout, length and left padding
    (sequence and kept-row counts are symbolic); decode graphs per K/V capacity (prompt + new
    tokens, rounded up to decode_bucket) and batch size. specialize="layout" compiles a static
    prefill graph per layout instead (for comparison). attention="flex" runs the prefill's
    attention as FlexAttention, its mask computed in the kernel from per-row vectors
    (vskip_compile.flex): no S x S mask.
    """
    return CompiledVLM(model, plan, CompileConfig.of(config, backend=backend, **options), adapter)
