"""A tiny random model of any registered HF VLM family, from its own config class (no hub).

The registry sweep (vskip_compile.check) needs a small model of every image-text-to-text
family without writing one per family: the family's config class is built with its defaults
and shrunk generically, field by field, wherever a field of that name exists:

- text configs (they have a vocab_size): hidden 64, FFN 128, 2 layers, 4 heads of 16, 2 KV
  heads, MoE down to 4 experts (2 per token) of width 32, a sliding window of 8 rows (so
  windows are exercised on short prompts), layer_types cut to the layer count keeping one
  layer of each kind (per-layer lists such as layer_rope_theta cut alike), M-RoPE sections
  rescaled to the new head_dim / 2;
- vision / audio / projector configs: hidden 32, FFN 64, 1 layer (or depth), 2 heads, output
  widths that feed the text model set to its hidden size, a fixed image_size cut to 8x8 patches;
- token ids above the small vocabulary (256) are moved into 200..255.

A family whose constraints this does not meet fails to build: the sweep records that as a
limitation of the sweep, never as a verdict on vskip.
"""

from __future__ import annotations

from typing import Any

import torch

VOCAB = 256
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=2048)
MOE = dict(num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
           shared_expert_intermediate_size=32, first_k_dense_replace=1, n_shared_experts=1)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, depth=1, num_attention_heads=2, num_heads=2,
              embed_dim=32, head_dim=16)
OUT_WIDTHS = ("out_hidden_size", "projection_dim", "text_hidden_size", "output_dim")
SLIDING_WINDOW = 8
PER_LAYER = ("layer_rope_theta",)  # per-layer lists cut with layer_types (MuseGlimmer: 0 = a NoPE layer)
MAX_PARAMETERS = 200_000_000  # 0.8 GB fp32; more means the shrink missed a part (and risks memory)
IMAGE_PATCHES = 8  # per side, for vision towers with a fixed image_size
SUB_CONFIG_KEYS = ("text_config", "vision_config", "audio_config", "projector_config", "perceiver_config",
                   "qformer_config", "vq_config", "encoder_config", "decoder_config")


# Rope fields that the real checkpoints' config.json set and the config classes' defaults leave
# to the modeling code (GLM-4V reads mrope_section with a default that only fits the real
# partial rotary factor): without them a family's default config does not even run.
CHECKPOINT_ROPE = {
    "glm4v": {"partial_rotary_factor": 0.5, "mrope_section": [8, 12, 12]},
    "glm4v_moe": {"partial_rotary_factor": 0.5, "mrope_section": [8, 12, 12]},
    "glm46v": {"partial_rotary_factor": 0.5, "mrope_section": [8, 12, 12]},
    "qwen2_5_vl": {"mrope_section": [16, 24, 24]},
}


def registered_families() -> dict[str, str]:
    """model_type -> class name of transformers' image-text-to-text registry (each entry)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return dict(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


def tiny_config(model_type: str):
    """The family's config class with its defaults, shrunk (see module doc)."""
    from transformers import CONFIG_MAPPING

    config = CONFIG_MAPPING[model_type]()
    text = config.get_text_config()
    if model_type in CHECKPOINT_ROPE and isinstance(getattr(text, "rope_parameters", None), dict):
        text.rope_parameters.update(CHECKPOINT_ROPE[model_type])
    _shrink_text(text)
    for key in SUB_CONFIG_KEYS:
        sub = getattr(config, key, None)
        if sub is not None and sub is not text and hasattr(sub, "to_dict"):
            _shrink_other(sub, text.hidden_size)
    if config is not text:
        _shrink_other(config, text.hidden_size, top=True)
    _move_token_ids([config] + [text] * (config is not text))
    return config


def build_family(model_type: str, seed: int = 0):
    """A tiny random model of the registry's class for model_type, eval mode, SDPA attention."""
    import transformers

    name = registered_families()[model_type]
    config = tiny_config(model_type)
    cls = getattr(transformers, name)
    config._attn_implementation = "sdpa"
    try:
        with torch.device("meta"):  # size first: a sub-config the shrink did not reach can be huge
            size = sum(p.numel() for p in cls(config).parameters())
    except (ValueError, NotImplementedError):  # a class without SDPA support: its eager attention
        config._attn_implementation = "eager"
        with torch.device("meta"):
            size = sum(p.numel() for p in cls(config).parameters())
    if size > MAX_PARAMETERS:
        raise ValueError(f"the shrunk {name} still has {size / 1e6:.0f} M parameters (> {MAX_PARAMETERS / 1e6:.0f} M): "
                         "a sub-config the generic shrink does not reach")
    torch.manual_seed(seed)
    return cls(config).float().eval()


def _set(cfg, key: str, value: Any) -> None:
    """cfg.key = value where the config has an int there (a list is per-layer or per-stage: left
    alone; an attribute that refuses a global read, per-layer in the config class, too)."""
    try:
        current = getattr(cfg, key, None)
    except Exception:  # transformers' per-layer attributes raise on a global read
        return
    if isinstance(current, int) and not isinstance(current, bool):
        setattr(cfg, key, value)


def _shrink_text(cfg) -> None:
    for key, value in {**TEXT, **MOE}.items():
        _set(cfg, key, value)
    _set(cfg, "vocab_size", VOCAB)
    for key in ("sliding_window", "attention_chunk_size"):
        _set(cfg, key, SLIDING_WINDOW)
    layers = cfg.num_hidden_layers
    types = getattr(cfg, "layer_types", None)
    if isinstance(types, (list, tuple)) and types:
        kinds = list(dict.fromkeys(types))  # one layer of each kind, in the model's order
        kept = [types.index(k) for k in kinds] + [len(types) - 1] * max(0, layers - len(kinds))  # layer indices
        kept = kept[:max(layers, len(kinds))]
        for key in PER_LAYER:  # the kept layers' own values
            value = getattr(cfg, key, None)
            if isinstance(value, list) and len(value) == len(types):
                setattr(cfg, key, [value[i] for i in kept])
        cfg.layer_types = [types[i] for i in kept]
        cfg.num_hidden_layers = len(cfg.layer_types)
    for key in ("mlp_only_layers", "full_attn_idxs", "swa_layers", "no_rope_layers"):
        value = getattr(cfg, key, None)
        if isinstance(value, list):
            setattr(cfg, key, [v for v in value if isinstance(v, int) and v < cfg.num_hidden_layers] or value[:0])
    rope = getattr(cfg, "rope_parameters", None)
    for params in (rope.values() if isinstance(rope, dict) and all(isinstance(v, dict) for v in rope.values())
                   else [rope]):
        if isinstance(params, dict) and isinstance(params.get("mrope_section"), list):
            params["mrope_section"] = rescale_sections(params["mrope_section"], _rotary_half(cfg, params))


def _rotary_half(cfg, params: dict) -> int:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    factor = params.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)) or 1.0
    return int(head_dim * factor) // 2


def rescale_sections(sections: list[int], total: int) -> list[int]:
    """Sections (M-RoPE: t, h, w) summing to total, in the same proportions, each >= 1."""
    scaled = [max(1, round(s * total / sum(sections))) for s in sections]
    scaled[-1] += total - sum(scaled)
    return scaled


def _shrink_other(cfg, text_hidden: int, top: bool = False) -> None:
    if not top:
        for key, value in VISION.items():
            _set(cfg, key, value)
        for key in ("num_hidden_layers", "depth"):
            if getattr(cfg, key, None):
                setattr(cfg, key, 1)
        for key in ("deepstack_visual_indexes", "fullatt_block_indexes", "intermediate_layers_indices"):
            if isinstance(getattr(cfg, key, None), list):
                setattr(cfg, key, [0])
        vf = getattr(cfg, "vision_feature_layer", None)
        if isinstance(vf, int) and vf >= 0:
            cfg.vision_feature_layer = 0
        side, patch = getattr(cfg, "image_size", None), getattr(cfg, "patch_size", None)
        if isinstance(side, int) and isinstance(patch, int) and side > IMAGE_PATCHES * patch:
            cfg.image_size = IMAGE_PATCHES * patch  # fixed-resolution towers: 8x8 patches
    for key in OUT_WIDTHS:
        _set(cfg, key, text_hidden)
    vf = getattr(cfg, "vision_feature_layer", None)
    if isinstance(vf, int) and top:
        cfg.vision_feature_layer = -1
    elif isinstance(vf, list) and top:
        cfg.vision_feature_layer = [-1]


def _move_token_ids(configs: list) -> None:
    """Token ids at or above 200 moved to distinct ids in 200..255 (one id stays one id across
    the configs: image_token_id and image_token_index of one model remain equal)."""
    free = iter(range(VOCAB - 1, 199, -1))
    moved: dict[int, int] = {}
    for cfg in configs:
        for key in sorted(vars(cfg)):
            value = getattr(cfg, key)
            if (key.endswith("_token_id") or key.endswith("_token_index")) and isinstance(value, int) and not isinstance(
                value, bool
            ) and value >= VOCAB - 56:
                if value not in moved:
                    moved[value] = next(free)
                setattr(cfg, key, moved[value])
