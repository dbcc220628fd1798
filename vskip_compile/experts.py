"""MoE experts in traced prefill graphs: the row-wise "batched_mm" implementation.

HF MoE experts modules (`@use_experts_implementation`, e.g. Qwen3-VL-MoE's
`Qwen3VLMoeTextExperts`) pick their forward at each call from `config._experts_implementation`:

- "eager" loops over the experts hit, with `nonzero` / `torch.where`: data-dependent shapes,
  no fullgraph trace;
- "grouped_mm" (transformers' default where the kernel exists, CPU included) sorts the
  (token, expert) pairs of the whole sequence by expert and un-sorts the result: traceable,
  but the sort mixes rows, so the skip passes cannot prove it row-wise and refuse it;
- "batched_mm" repeats each token top-k times, gathers each pair's expert weights
  (`gate_up_proj[expert_ids]`), multiplies with bmm and sums the top-k weighted outputs of each
  token: every op is per (token, expert) pair, so the passes restrict it to the kept rows.

All three compute the same function (only the summation order differs, and batched_mm does
exactly top-k expert FFNs per token, the FLOPs model's count). DecoderCore switches the
experts to "batched_mm" while it is traced and restores the model's setting afterwards (under
Dynamo the two writes are traced side effects whose net effect is nothing); eager calls keep
the model's own implementation.
"""

from __future__ import annotations

from torch import nn

TRACEABLE_EXPERTS = "batched_mm"
_FIELD = "_experts_implementation_internal"  # what PretrainedConfig._experts_implementation reads


def experts_configs(module: nn.Module) -> tuple:
    """The configs that module's `@use_experts_implementation` experts dispatch on, once each."""
    found: dict[int, object] = {}
    for m in module.modules():
        cfg = getattr(m, "config", None)
        if hasattr(m, "has_gate") and hasattr(m, "is_transposed") and hasattr(cfg, _FIELD):
            found[id(cfg)] = cfg
    return tuple(found.values())


def use_traceable_experts(configs: tuple) -> list:
    """Set every config to TRACEABLE_EXPERTS; returns the previous values for restore_experts."""
    saved = [getattr(cfg, _FIELD) for cfg in configs]
    for cfg in configs:
        object.__setattr__(cfg, _FIELD, TRACEABLE_EXPERTS)
    return saved


def restore_experts(configs: tuple, saved: list) -> None:
    for cfg, value in zip(configs, saved):
        object.__setattr__(cfg, _FIELD, value)
