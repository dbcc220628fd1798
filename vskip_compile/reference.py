"""The eager reference semantics of a skip plan: the oracle every compiled path is tested against.

    with reference.applied(model, plan):
        logits = model(**inputs).logits          # prefill under the plan
        out = model.generate(**inputs)           # prefill under the plan, decode unmodified

Mechanism (simple on purpose): forward hooks on the `self_attn` / `mlp` modules of the layers
the plan skips replace the module's output by exact zeros at the frozen rows, so the residual
add leaves those rows unchanged (h + 0 == h). The attention module still runs on every row,
so keys and values of the frozen rows are computed from their current hidden state, and text
rows are exactly what the unmodified model computes. A pre-hook on the top model computes
the layout from each call's input_ids; calls that continue from a filled cache (decoding) and
calls whose length differs from that layout's are left untouched. Model-specific injections
(Qwen3-VL DeepStack) happen outside these modules and stay.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from .archs import Adapter, adapter_for
from .layout import LayoutError, Span, VisualLayout
from .plan import SkipPlan
from .errors import VSkipError


class ReferenceCallError(VSkipError, RuntimeError):
    """The reference hooks saw a call they cannot serve correctly."""


@dataclass
class _CallState:
    frozen: tuple[Span, ...] | None = None  # rows to freeze in the current top-level call
    seq_len: int | None = None
    in_call: bool = False


def _filled_cache(kwargs: dict[str, Any]) -> bool:
    """True when the call continues from a cache that already holds tokens (decoding)."""
    for key in ("cache", "past_key_values"):
        cache = kwargs.get(key)
        if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
            return True
    return False


def _zero_rows(output, spans: tuple[Span, ...]):
    """output (a tensor [B, S, D] or a tuple starting with one) with exact zeros at spans."""
    first = output[0] if isinstance(output, tuple) else output
    keep = torch.ones(first.shape[1], dtype=torch.bool, device=first.device)
    for a, b in spans:
        keep[a:b] = False
    zeroed = first.masked_fill(~keep[None, :, None], 0.0)  # [B, S, D]
    return (zeroed, *output[1:]) if isinstance(output, tuple) else zeroed


@contextlib.contextmanager
def applied(model, plan: SkipPlan, adapter: Adapter | None = None) -> Iterator[None]:
    """Inside the block, prefill calls of `model` follow `plan`; on exit the model is unchanged.

    Refuses (PlanError) a plan made for another model, and (ReferenceCallError) a prefill whose
    batch rows have different visual layouts or that has no input_ids.
    """
    adapter = adapter or adapter_for(model)
    adapter.check_plan(model, plan)
    state = _CallState()

    def top_pre_hook(module, args, kwargs):
        state.in_call = True
        state.frozen = state.seq_len = None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if _filled_cache(kwargs):
            return  # decode step: the unmodified model
        if input_ids is None:
            raise ReferenceCallError("reference.applied needs input_ids to find the visual rows of a prefill")
        layout: VisualLayout = adapter.layout(model, input_ids, kwargs.get("mm_token_type_ids"))
        try:
            state.frozen = layout.frozen_spans(plan.scope, plan.rows)
        except LayoutError as e:
            raise ReferenceCallError(
                f"reference.applied: batch rows have different visual layouts ({layout}); "
                f"run them separately or pad them to the same layout"
            ) from e
        state.seq_len = layout.seq_len

    def top_post_hook(module, args, kwargs, output):
        state.in_call = False
        state.frozen = state.seq_len = None

    def freeze_hook(module, args, output):
        if not state.in_call:
            raise ReferenceCallError(
                "reference.applied: a decoder module ran outside a call of the top model; "
                "call model(...) or model.generate(...)"
            )
        if not state.frozen:
            return None
        first = output[0] if isinstance(output, tuple) else output
        if first.shape[1] != state.seq_len:
            return None  # not the prefill this layout describes
        return _zero_rows(output, state.frozen)

    handles = [
        model.register_forward_pre_hook(top_pre_hook, with_kwargs=True),
        model.register_forward_hook(top_post_hook, with_kwargs=True, always_call=True),
    ]
    try:
        with hooked(adapter.layers(model), plan, freeze_hook):
            yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def hooked(layers, plan: SkipPlan, hook) -> Iterator[None]:
    """Inside the block, `hook` is a forward hook of every operator `plan` skips: the `self_attn`
    module of a layer that skips attention, the `mlp` module of one that skips its FFN."""
    handles = []
    try:
        for i, layer in enumerate(layers):
            if plan.skips_attn(i):
                handles.append(layer.self_attn.register_forward_hook(hook))
            if plan.skips_ffn(i):
                handles.append(layer.mlp.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
