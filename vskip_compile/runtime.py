"""CompiledVLM: `model(**inputs)` and `generate()` with a skip-shaped, compiled prefill.

    cm = vskip_compile.compile(model, plan, backend="inductor")
    logits = cm(**inputs).logits
    tokens = cm.generate(**inputs, max_new_tokens=16)

Prefill: the adapter computes the language model's inputs outside any graph (vision tower,
merge, M-RoPE ids, DeepStack) and the layout; the DecoderCore is compiled with the `vskip`
backend, specialized to (layout, plan, dtype, device), and cached in a bounded LRU. Decode:
the unmodified model, one token at a time, on a DynamicCache filled with the prefill's K/V
(every row, visual rows included), so decoding is exactly the model's own.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from transformers import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .archs import PrefillInputs, adapter_for
from .core import DecoderCore
from .layout import VisualLayout
from .plan import SkipPlan

BACKENDS = ("inductor", "eager", "tensorrt")

# Generation options of HF generate() that this greedy loop does not implement: refused, not ignored.
_UNSUPPORTED_GENERATE = (
    "generation_config",
    "logits_processor",
    "stopping_criteria",
    "streamer",
    "num_return_sequences",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "typical_p",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "length_penalty",
    "min_length",
    "min_new_tokens",
    "max_length",
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


class CompileError(ValueError):
    """compile() or a CompiledVLM call got something it cannot serve correctly."""


class CacheInfo(NamedTuple):
    hits: int
    misses: int
    maxsize: int
    currsize: int


@dataclass(frozen=True)
class _GraphKey:
    layout: VisualLayout
    plan: SkipPlan
    dtype: torch.dtype
    device: torch.device
    logits_to_keep: int


class CompiledVLM:
    """A HF VLM whose prefill runs through specialized skip-shaped graphs.

    Holds the model (not a copy): weights are shared, and the model itself stays unmodified.
    """

    def __init__(self, model, plan: SkipPlan, backend: str = "inductor", adapter=None, cache_size: int = 8):
        if backend not in BACKENDS:
            raise CompileError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
        if backend == "tensorrt":
            from .backend import _check_tensorrt

            _check_tensorrt()
        if cache_size < 1:
            raise CompileError(f"cache_size must be >= 1, got {cache_size}")
        self.model = model
        self.plan = plan
        self.backend = backend
        self.adapter = adapter or adapter_for(model)
        self.adapter.check_plan(model, plan)
        self.cache_size = cache_size
        self._graphs: OrderedDict[_GraphKey, Any] = OrderedDict()
        self._cores: dict[tuple[int, int], DecoderCore] = {}
        self._hits = 0
        self._misses = 0

    # -- graph cache ----------------------------------------------------------------------
    def cache_info(self) -> CacheInfo:
        return CacheInfo(self._hits, self._misses, self.cache_size, len(self._graphs))

    def cache_clear(self) -> None:
        """Drops this object's graphs. Dynamo keeps its compiled entries until torch._dynamo.reset()."""
        self._graphs.clear()
        self._hits = self._misses = 0

    def _core(self, logits_to_keep: int, num_deepstack: int) -> DecoderCore:
        key = (logits_to_keep, num_deepstack)
        if key not in self._cores:
            self._cores[key] = DecoderCore.from_model(self.model, self.adapter, logits_to_keep, num_deepstack)
        return self._cores[key]

    def _graph(self, key: _GraphKey, num_deepstack: int):
        """The compiled prefill for key: LRU hit, or a new torch.compile (compiled on first call)."""
        if key in self._graphs:
            self._hits += 1
            self._graphs.move_to_end(key)
            return self._graphs[key]
        self._misses += 1
        options = {"plan": self.plan, "layout": key.layout, "inner": self.backend}
        # isolate_recompiles: each specialization owns its Dynamo cache entry instead of sharing
        # DecoderCore.forward's 8-entry limit; recompile_limit=1 with fullgraph turns a guard
        # failure (inputs that do not match the key) into an error, never an unskipped run.
        graph = torch.compile(
            self._core(key.logits_to_keep, num_deepstack),
            backend="vskip",
            options=options,
            fullgraph=True,
            dynamic=False,
            isolate_recompiles=True,
            recompile_limit=1,
        )
        self._graphs[key] = graph
        if len(self._graphs) > self.cache_size:
            self._graphs.popitem(last=False)
        return graph

    # -- prefill --------------------------------------------------------------------------
    def _prefill_inputs(self, inputs: dict[str, Any]) -> PrefillInputs:
        if "input_ids" not in inputs:
            raise CompileError("CompiledVLM needs input_ids (it finds the visual rows from them)")
        if self.model.training:
            raise CompileError("CompiledVLM runs inference only: call model.eval() first")
        mask = inputs.get("attention_mask")
        if mask is not None and not bool(mask.all()):
            raise CompileError(
                "padded batches (attention_mask with zeros) are not supported: the compiled prefill uses "
                "a plain causal mask; run rows of different lengths separately"
            )
        return self.adapter.prefill_inputs(self.model, **inputs)

    def _prefill(self, p: PrefillInputs, logits_to_keep: int):
        """Logits [B, n, V] and per-layer (k, v) [B, KV, S, E] for the whole batch.

        A batch whose rows have different layouts runs one graph per distinct layout (rows
        grouped, results put back in the original order); rows without visual tokens run the
        uncompiled core, which is the unmodified model.
        """
        layout = p.layout
        groups: dict[tuple, list[int]] = {}
        for row, spans in enumerate(layout.spans):
            groups.setdefault(spans, []).append(row)
        deepstack = p.deepstack or ()
        outputs: list[tuple[list[int], tuple[torch.Tensor, ...]]] = []
        for spans, rows in groups.items():
            if len(groups) == 1:
                args = (p.inputs_embeds, p.position_ids, *deepstack)
            else:
                index = torch.tensor(rows, device=p.inputs_embeds.device)
                args = (
                    p.inputs_embeds.index_select(0, index),  # [b, S, D]
                    p.position_ids.index_select(p.position_ids.ndim - 2, index),  # [b, S] or [3, b, S]
                    *(d.index_select(0, index) for d in deepstack),  # [b, S, D]
                )
            if spans:
                sub = VisualLayout(layout.seq_len, (spans,) * len(rows))
                key = _GraphKey(sub, self.plan, p.inputs_embeds.dtype, p.inputs_embeds.device, logits_to_keep)
                run = self._graph(key, len(deepstack))
            else:
                run = self._core(logits_to_keep, len(deepstack))
            outputs.append((rows, run(*args)))
        if len(outputs) == 1:
            out = outputs[0][1]
        else:
            order = torch.tensor([r for rows, _ in outputs for r in rows]).argsort()
            out = tuple(
                torch.cat([o[i] for _, o in outputs]).index_select(0, order.to(outputs[0][1][i].device))
                for i in range(len(outputs[0][1]))
            )
        logits, kv = out[0], out[1:]
        return logits, [(kv[2 * i], kv[2 * i + 1]) for i in range(len(kv) // 2)]

    def _cache(self, kv) -> DynamicCache:
        return DynamicCache(ddp_cache_data=kv, config=self.adapter.language_model(self.model).config)

    # -- public API -----------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, **inputs) -> CausalLMOutputWithPast:
        """HF-style forward of a prefill under the plan: `.logits` [B, S, V] (or the last
        `logits_to_keep` rows) and `.cache`, a DynamicCache holding every row's K/V."""
        logits_to_keep = int(inputs.pop("logits_to_keep", 0))
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
        **inputs,
    ) -> torch.Tensor:
        """Greedy decoding, HF-style: returns [B, S + n] token ids (prompt included); rows that
        reached an EOS are filled with pad_token_id until every row has finished."""
        refused = sorted(k for k in inputs if k in _UNSUPPORTED_GENERATE)
        if do_sample or num_beams != 1 or not use_cache or refused:
            what = refused or [f"do_sample={do_sample}", f"num_beams={num_beams}", f"use_cache={use_cache}"]
            raise CompileError(f"CompiledVLM.generate is greedy decoding only; unsupported: {', '.join(map(str, what))}")
        gen = self.model.generation_config
        _check_generation_config(gen)
        max_new_tokens = gen.max_new_tokens if max_new_tokens is None else max_new_tokens
        if max_new_tokens is None or max_new_tokens < 1:
            raise CompileError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        eos_token_id = gen.eos_token_id if eos_token_id is None else eos_token_id
        eos = torch.tensor([] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        pad_token_id = gen.pad_token_id if pad_token_id is None else pad_token_id
        if pad_token_id is None and len(eos):
            pad_token_id = int(eos[0])

        input_ids = inputs["input_ids"] if "input_ids" in inputs else None
        if input_ids is not None and not self.adapter.layout(self.model, input_ids).has_visual:
            kw = dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
            return self.model.generate(**inputs, **kw)

        p = self._prefill_inputs(inputs)
        logits, kv = self._prefill(p, logits_to_keep=1)
        cache = self._cache(kv)
        input_ids = inputs["input_ids"]
        eos = eos.to(input_ids.device)
        last_position = p.position_ids[..., -1:]  # [B, 1] or [3, B, 1]: the last prompt token is text
        tokens = []
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for t in range(max_new_tokens):
            if t:
                step = self.model(
                    input_ids=tokens[-1][:, None],  # [B, 1]
                    cache=cache,
                    position_ids=last_position + t,
                    use_cache=True,
                )
                logits = step.logits
            next_token = logits[:, -1, :].argmax(dim=-1)  # [B]
            if pad_token_id is not None:
                next_token = torch.where(finished, torch.full_like(next_token, pad_token_id), next_token)
            tokens.append(next_token)
            finished |= torch.isin(next_token, eos)
            if bool(finished.all()):
                break
        return torch.cat([input_ids, torch.stack(tokens, dim=1)], dim=1)  # [B, S + n]

    def __repr__(self) -> str:
        return f"CompiledVLM({type(self.model).__name__}, {self.plan}, backend={self.backend!r}, {self.cache_info()})"


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


def compile(model, plan: SkipPlan, backend: str = "inductor", adapter=None, cache_size: int = 8) -> CompiledVLM:
    """Compile `model`'s prefill under `plan` (backend: "inductor", "eager" or "tensorrt").

    Refuses a plan made for another model and an unknown backend here, before any input.
    Graphs are specialized and compiled lazily, one per input layout.
    """
    return CompiledVLM(model, plan, backend=backend, adapter=adapter, cache_size=cache_size)
