"""Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE: M-RoPE position ids, DeepStack.

Video rows (config.video_token_id) are found by the base adapter; their M-RoPE ids (Qwen2.5-VL
spaces frames by `second_per_grid_ts`, Qwen3-VL gives each frame its own grid between
timestamp text) come from HF's get_rope_index, captured like the image ones."""

from __future__ import annotations

from typing import Any

import torch

from .base import Adapter, AdapterError


class Qwen2_5_VLAdapter(Adapter):
    """Position ids are M-RoPE ids [3, B, S], computed by HF's get_rope_index (captured)."""

    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)

    def mrope(self, model) -> bool:
        return True

    def default_position_ids(self, batch: int, seq_len: int, device) -> torch.Tensor:
        # Text only: the text model expands arange to its 3 rotary sections.
        return torch.arange(seq_len, device=device).expand(3, batch, seq_len)  # [3, B, S]


class Qwen3VLAdapter(Qwen2_5_VLAdapter):
    """Adds DeepStack: features of some vision blocks are added to the visual rows after
    the first len(deepstack) decoder layers (Qwen3VLTextModel._deepstack_process)."""

    name = "qwen3_vl"
    model_types = ("qwen3_vl",)

    def deepstack(self, captured: dict[str, Any], inputs_embeds: torch.Tensor):
        embeds = captured.get("deepstack_visual_embeds")
        if embeds is None:
            return None
        mask = captured.get("visual_pos_masks")
        if mask is None:
            raise AdapterError("Qwen3-VL passed DeepStack features without visual_pos_masks")
        mask = mask.to(inputs_embeds.device)[..., None]  # [B, S, 1]
        zeros = torch.zeros_like(inputs_embeds)  # [B, S, D]
        # masked_scatter fills the masked rows in row-major order, as HF's h[mask, :] += e does.
        return tuple(zeros.masked_scatter(mask, e.to(inputs_embeds.device, inputs_embeds.dtype)) for e in embeds)


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    """Qwen3-VL-MoE: Qwen3-VL's inputs (M-RoPE, DeepStack); sparse-MoE FFNs in the decoder,
    which the traced core runs with the row-wise experts implementation (vskip_compile.experts)."""

    name = "qwen3_vl_moe"
    model_types = ("qwen3_vl_moe",)
