"""The attention kernels a traced prefill can hold: one list for the passes and the FLOP counter.

`aten.scaled_dot_product_attention` dispatches to one of the fused kernels below (or to its
math form: plain bmm / softmax). CUDA traces reach flash, efficient and cuDNN; CPU traces the
CPU flash kernel. Each entry names the kernel's mask argument and whether that mask is an
additive float bias (True) or may be boolean (False); None: the kernel takes no mask.
"""

from __future__ import annotations

import torch

aten = torch.ops.aten

SDPA_MASKS: dict = {
    op: mask
    for name, mask in (
        ("scaled_dot_product_attention", ("attn_mask", False)),
        ("_scaled_dot_product_flash_attention_for_cpu", ("attn_mask", True)),
        ("_scaled_dot_product_efficient_attention", ("attn_bias", True)),
        ("_scaled_dot_product_flash_attention", (None, False)),
        ("_scaled_dot_product_cudnn_attention", ("attn_bias", True)),
        ("_scaled_dot_product_fused_attention_overrideable", ("attn_bias", True)),
    )
    if (op := getattr(getattr(aten, name, None), "default", None)) is not None
}

FUSED_SDPA_OPS = tuple(op for op in SDPA_MASKS if op is not aten.scaled_dot_product_attention.default)

FLEX_ATTENTION = torch.ops.higher_order.flex_attention
