"""CompiledVLM: `model(**inputs)` and `generate()` with a skip-shaped, compiled prefill.

    cm = vskip_compile.compile(model, plan, backend="inductor")
    logits = cm(**inputs).logits
    tokens = cm.generate(**inputs, max_new_tokens=16)

Prefill: the adapter computes the language model's inputs outside any graph (vision tower,
merge, M-RoPE ids, DeepStack) and the layout; the DecoderCore is compiled with the `vskip`
backend, one polymorphic graph per (plan, dtype, device, batch bucket) that takes the kept
rows as data, and cached in a bounded LRU (graph_cache.py).

Decode: the unmodified model's decoder layers, one token at a time, as core.DecodeStep
compiled with the same inner backend (inductor; eager runs AOT autograd's graph as is;
tensorrt) and no skip passes: decoding does not depend on the plan. The step runs over
preallocated K/V buffers of T slots, T = prompt + new tokens rounded up to `decode_bucket`,
so one static graph serves every prompt of a similar length (decode_state.DecodeRun). Decode
graphs are cached in their own bounded LRU keyed by (T, batch bucket, dtype, device):
`decode_cache_info()`. What generate() accepts is checked in generate_options.py; left
padding and per-row positions are padding.py's.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .archs import PrefillInputs, adapter_for
from .backend import vskip
from .config import CompileConfig, CompileError
from .core import DecodeStep, DecoderCore, model_trace_errors, recurrent_chunks, recurrent_layers, rope_axes
from .decode_state import DecodeRun, decode_batch_bucket
from .decoding import decode_loop
from .generate_options import (
    UNSUPPORTED_GENERATE,
    check_generation_config,
    check_model_inputs,
    check_prompt,
    generation_options,
    is_int,
    sampling_defaults,
)
from .graph_cache import RECOMPILE_LIMIT, CacheInfo, CountedBackend, DecodeKey, GraphLRU, PrefillKey, RecompileWarning
from .kept_rows import MIN_ROWS, kept_inputs, mark_polymorphic, no_duck_sizes
from .padding import last_positions, left_pad_batch, left_padding, pad_left, rebase_positions, row_pads
from .plan import SkipPlan
from .sampling import Sampler

# Re-exported: these names lived here before runtime.py was split by concept.
__all__ = ["CacheInfo", "CompileError", "CompiledVLM", "RecompileWarning", "check_model_inputs", "check_prompt",
           "compile", "decode_batch_bucket", "last_positions", "left_pad_batch", "left_padding", "rebase_positions"]


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
        self._lm = self.adapter.language_model(model)  # found once: every prefill and decode reads it
        self._recurrent = recurrent_layers(self._lm)  # layers whose pair is a (conv, recurrent) state, not K/V
        self._graphs = GraphLRU(config.cache_size)  # PrefillKey -> compiled prefill
        self._decode_graphs = GraphLRU(config.cache_size)  # DecodeKey -> compiled decode step
        self._cores: dict[tuple[int, int, bool], DecoderCore] = {}
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

    def _core(self, logits_to_keep: int, num_deepstack: int, blocks: bool) -> DecoderCore:
        key = (logits_to_keep, num_deepstack, blocks)
        core = self._cores.get(key)
        if core is None:  # setdefault is atomic: two threads racing here end up sharing one core
            layout_inputs = self.config.specialize is None
            core = DecoderCore.from_model(self.model, self.adapter, logits_to_keep, num_deepstack, layout_inputs,
                                          self.config.attention, blocks)
            core = self._cores.setdefault(key, core)
        return core

    def _graph(self, key: PrefillKey):
        """The compiled polymorphic prefill for key: LRU hit, or a new torch.compile (compiled
        on its first call, with the sequence, kept-row and, batched, batch sizes symbolic)."""
        options = {"plan": self.plan, "layout": key.layout, "inner": self.config.backend}

        def build():
            core = self._core(key.logits_to_keep, key.num_deepstack, key.blocks)
            backend = CountedBackend(lambda gm, ex: vskip(gm, ex, options=options), self._graphs, "prefill graph",
                               DecoderCore.forward.__code__)
            # isolate_recompiles: each entry owns its Dynamo cache instead of sharing
            # DecoderCore.forward's; a recompile (a guard that failed) is counted and warned about.
            return torch.compile(core, backend=backend, fullgraph=True, dynamic=False, isolate_recompiles=True,
                                 recompile_limit=RECOMPILE_LIMIT)

        return self._graphs.get(key, build)

    def _decode_graph(self, key: DecodeKey):
        """The compiled decode step for key (one module, one compiled graph per key). Static
        shapes; a recompile is counted in decode_cache_info() and warned about."""
        if self._decode_step is None:
            self._decode_step = DecodeStep(self._lm, self.adapter.lm_head(self.model))
        return self._decode_graphs.get(
            key,
            lambda: torch.compile(
                self._decode_step,
                backend=CountedBackend(_decode_backend(self.config.backend), self._decode_graphs, "decode graph", DecodeStep.forward.__code__),
                fullgraph=True,
                dynamic=False,
                isolate_recompiles=True,
                recompile_limit=RECOMPILE_LIMIT,
            ),
        )

    def _decode_run(self, kv, position_ids: torch.Tensor, max_new_tokens: int, pads: list[int]) -> DecodeRun:
        """Decode state after a prefill of kv (per layer [B, KV, S, E]; recurrent layers their
        states) for max_new_tokens tokens: the last prefill token's K/V is in the cache, so
        max_new_tokens - 1 steps each add one row; capacity is that rounded up to decode_bucket."""
        k0 = next(k for (k, _), r in zip(kv, self._recurrent) if not r)  # [B, KV, S, E]
        batch, _, seq_len, _ = k0.shape
        needed = seq_len + max_new_tokens - 1
        bucket = self.config.decode_bucket
        capacity = -(-needed // bucket) * bucket
        batch_bucket = decode_batch_bucket(batch)
        graph = self._decode_graph(DecodeKey(capacity, batch_bucket, k0.dtype, k0.device))
        axes = rope_axes(self._lm)
        return DecodeRun(graph, kv, last_positions(position_ids, axes), capacity, pads, batch_bucket,  # [B, 1] or [3, B, 1]
                         self._recurrent)

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
        blocks = () if p.blocks is None else (p.blocks.to(embeds.device),)  # [B, S], last
        key = PrefillKey(self.plan, embeds.dtype, embeds.device, logits_to_keep, len(deepstack), batch > 1,
                         blocks=bool(blocks), chunks=recurrent_chunks(self._recurrent, seq_len))
        args = (embeds, position_ids, kept_index, kept_valid, mask, *deepstack, *blocks)
        mark_polymorphic(args, batched=batch > 1)
        with no_duck_sizes(), model_trace_errors(self._lm):
            logits, *kv = self._graph(key)(*args)
        pairs = [(kv[2 * i], kv[2 * i + 1]) for i in range(len(kv) // 2)]
        if grow:  # K/V rows only: a recurrent state has none (the padding row, masked, left it as it was)
            pairs = [pair if r else (pair[0][:, :, grow:], pair[1][:, :, grow:]) for pair, r in zip(pairs, self._recurrent)]
        return logits, pairs

    def _prefill_static(self, p: PrefillInputs, logits_to_keep: int):
        """specialize="layout": the graph of this exact layout (constant row offsets, static
        shapes), compiled for each new one. Unpadded batches of one layout only."""
        if (p.attention_mask is not None and not bool(p.attention_mask.all())) or not p.layout.is_uniform:
            raise CompileError(f"specialize='layout' runs unpadded batches of one layout, got {p.layout}")
        deepstack = tuple(p.deepstack or ())
        blocks = () if p.blocks is None else (p.blocks,)  # [B, S], last
        embeds = p.inputs_embeds
        key = PrefillKey(self.plan, embeds.dtype, embeds.device, logits_to_keep, len(deepstack), embeds.shape[0] > 1,
                         p.layout, bool(blocks))
        with model_trace_errors(self._lm):
            logits, *kv = self._graph(key)(embeds, p.position_ids, *deepstack, *blocks)
        return logits, [(kv[2 * i], kv[2 * i + 1]) for i in range(len(kv) // 2)]

    def _cache(self, kv) -> DynamicCache:
        """A DynamicCache of the prefill: each layer's K/V, a recurrent layer's conv and recurrent state."""
        if not any(self._recurrent):
            return DynamicCache(ddp_cache_data=kv, config=self._lm.config)
        cache = DynamicCache(ddp_cache_data=[(None, None) if r else pair for pair, r in zip(kv, self._recurrent)],
                             config=self._lm.config)
        for i, ((conv, state), r) in enumerate(zip(kv, self._recurrent)):
            if r:
                cache.update_conv_state(conv, i)  # [B, C, W]: its width is the kernel's
                cache.update_recurrent_state(state, i)
        return cache

    # -- public API -----------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, **inputs) -> CausalLMOutputWithPast:
        """HF-style forward of a prefill under the plan: `.logits` [B, S, V] (or the last
        `logits_to_keep` rows) and `.cache`, a DynamicCache holding every row's K/V."""
        logits_to_keep = inputs.pop("logits_to_keep", 0)
        if not is_int(logits_to_keep) or logits_to_keep < 0:
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
        refused = sorted(k for k in inputs if k in UNSUPPORTED_GENERATE or k in generation_options())
        check_model_inputs(self.model, {k: v for k, v in inputs.items() if k not in refused}, "CompiledVLM.generate()")
        if num_beams != 1 or not use_cache or refused:
            what = refused or [f"num_beams={num_beams}", f"use_cache={use_cache}"]
            raise CompileError(f"CompiledVLM.generate does not support: {', '.join(map(str, what))} "
                               "(greedy or sampled decoding, one sequence per row)")
        gen = self.model.generation_config
        check_generation_config(gen)
        options = {"do_sample": do_sample, "temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p,
                   "repetition_penalty": repetition_penalty, "seed": seed, "stop_strings": stop_strings}
        try:
            Sampler.resolve(options)  # the call's own options, before anything else is looked at
        except ValueError as e:
            raise CompileError(f"CompiledVLM.generate: {e}") from e
        max_new_tokens = gen.max_new_tokens if max_new_tokens is None else max_new_tokens
        if not is_int(max_new_tokens) or max_new_tokens < 1:
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
                                    defaults=sampling_defaults(gen))
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
