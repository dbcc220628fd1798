"""Count the FLOPs a real torch run does, with the convention of `vskip_compile.flops`.

torch's FlopCounterMode counts matmuls (mm/addmm/bmm, 2 FLOPs per multiply-add) but gives 0
for the CPU SDPA kernels. This is the one place that adds an SDPA rule: QK^T plus softmax·V
over the full S_q x S_kv rectangle, whatever the mask or is_causal (no causal halving), for
every fused SDPA kernel. Used to check that a rewritten graph does the FLOPs the symbolic
model predicts.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from .attention_ops import FUSED_SDPA_OPS

aten = torch.ops.aten


def sdpa_flops(query_shape, key_shape, value_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
    """2·B·Hq·Sq·Skv·(Eqk + Ev): QK^T and softmax·V on the full rectangle (GQA: query heads)."""
    *batch, h_q, s_q, e_qk = query_shape
    s_kv, e_v = value_shape[-2], value_shape[-1]
    b = 1
    for n in batch:
        b *= n
    return 2 * b * h_q * s_q * s_kv * (e_qk + e_v)


def flop_counter() -> FlopCounterMode:
    """A silent FlopCounterMode that also counts the fused SDPA kernels."""
    return FlopCounterMode(display=False, custom_mapping={op.overloadpacket: sdpa_flops for op in FUSED_SDPA_OPS})


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Total FLOPs of one call fn(*args, **kwargs), under no_grad."""
    with torch.no_grad(), flop_counter() as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()
