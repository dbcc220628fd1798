"""LLaVA and LLaVA-NeXT: llama-like text model, [B, S] position ids, nothing injected.

LLaVA-NeXT's image spans include its `image_newline` rows (one per feature row of each
any-resolution tile): they are image-token rows in input_ids, so they are visual rows and a
skip plan freezes them like the patch rows.
"""

from __future__ import annotations

from .base import Adapter


class LlavaAdapter(Adapter):
    name = "llava"
    model_types = ("llava",)
    vision_export = "llava"


class LlavaNextAdapter(Adapter):
    name = "llava_next"
    model_types = ("llava_next",)
    vision_export = "llava_next"
