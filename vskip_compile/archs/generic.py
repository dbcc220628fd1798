"""The generic adapter: no overrides, for any VLM class with no registered adapter."""

from __future__ import annotations

from .base import Adapter


class GenericAdapter(Adapter):
    """Needs only: model.model.language_model (or get_decoder()) with .layers whose layers
    have self_attn and mlp children, an image_token_id / image_token_index in the config,
    and a language model that takes inputs_embeds, position_ids and a 2D padding mask."""

    name = "generic"
