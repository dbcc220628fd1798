"""Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE: M-RoPE position ids, DeepStack.

Video rows (config.video_token_id) are found by the base adapter; their M-RoPE ids (Qwen2.5-VL
spaces frames by `second_per_grid_ts`, Qwen3-VL gives each frame its own grid between
timestamp text) come from HF's get_rope_index, captured like the image ones."""

from __future__ import annotations

from typing import Any

import torch

from .base import Adapter


class Qwen2_5_VLAdapter(Adapter):
    """Position ids are M-RoPE ids [3, B, S], computed by HF's get_rope_index (captured)."""

    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    vision_export = "qwen"

    def video_rope(self, model) -> dict[str, Any]:
        # frames spaced by tokens_per_second * second_per_grid_ts
        return {"tokens_per_second": int(model.config.vision_config.tokens_per_second), "split_frames": False}

    def mrope(self, model) -> bool:
        return True

    def default_position_ids(self, batch: int, seq_len: int, device) -> torch.Tensor:
        # Text only: the text model expands arange to its 3 rotary sections.
        return torch.arange(seq_len, device=device).expand(3, batch, seq_len)  # [3, B, S]


class Qwen3VLAdapter(Qwen2_5_VLAdapter):
    """Adds DeepStack: features of some vision blocks are added to the visual rows after
    the first len(deepstack) decoder layers (Qwen3VLTextModel._deepstack_process).
    The base adapter reads them (HF's deepstack_visual_embeds / visual_pos_masks)."""

    name = "qwen3_vl"
    model_types = ("qwen3_vl",)

    def video_rope(self, model) -> dict[str, Any]:
        return {"tokens_per_second": None, "split_frames": True}  # one grid per frame, between timestamp text


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    """Qwen3-VL-MoE: Qwen3-VL's inputs (M-RoPE, DeepStack); sparse-MoE FFNs in the decoder,
    which the traced core runs with the row-wise experts implementation (vskip_compile.experts)."""

    name = "qwen3_vl_moe"
    model_types = ("qwen3_vl_moe",)


# -- small configs: the tiny test models (vskip_compile.testing) and the easy-VQA model (zoo) ------
QWEN_MROPE_SECTION = (16, 24, 24)  # the real checkpoints' M-RoPE sections (t, h, w), head_dim 128


def small_rope_parameters(head_dim: int, interleaved: bool) -> dict[str, Any]:
    """rope_parameters of a small Qwen text config: the real M-RoPE proportions rescaled to sum
    to head_dim / 2, as the rotary needs; interleaved (t, h, w, t, h, w, ...) on Qwen3-VL."""
    from .shrink import rescale_sections

    rope = {"rope_type": "default", "rope_theta": 10000.0,
            "mrope_section": rescale_sections(list(QWEN_MROPE_SECTION), head_dim // 2)}
    return {**rope, "mrope_interleaved": True} if interleaved else rope


def small_vision_config(depth: int, width: int, heads: int, ffn: int, out_width: int, patch: int, merge: int,
                        temporal_patch: int, **extra: Any) -> dict[str, Any]:
    """vision_config fields of a small Qwen2.5-VL / Qwen3-VL tower (out_width: the text
    model's hidden size, which the merger projects to); `extra` adds the family's own fields
    (Qwen2.5-VL windows, Qwen3-VL position embeddings and DeepStack blocks)."""
    return dict(depth=depth, hidden_size=width, num_heads=heads, intermediate_size=ffn, out_hidden_size=out_width,
                patch_size=patch, spatial_merge_size=merge, temporal_patch_size=temporal_patch, **extra)
