"""A tiny random model of any registered HF VLM family, from its own config class (no hub).

The registry sweep (vskip_compile.check) needs a small model of every image-text-to-text
family without writing one per family: the family's config class is built with its defaults
and shrunk generically, field by field, wherever a field of that name exists. Every nested
PreTrainedConfig is reached (sub-configs of sub-configs too); those under a text-config name
(text_config, decoder, generator, text_encoder) are shrunk as text, the others as vision:

- text configs: hidden 64, FFN 128, 2 layers, 4 heads of 16, 2 KV heads, MoE down to 4
  experts (2 per token, one routing group) of width 32, also where the class leaves these
  sizes None; a sliding window of 8 rows (so windows are exercised on short prompts, and
  sliding layers whose window is left None get one); the kept layers are one of each kind
  (each distinct layer_types x mlp_layer_types entry, mlp_layer_types derived dense-then-MoE
  where left None), then the last ones, per-layer lists such as layer_rope_theta cut alike; latent attention (qk_rope_head_dim ...) shrunk with
  head_dim and partial_rotary_factor tied as the defaults tie them; M-RoPE sections rescaled to
  the rotary half;
- per-layer overrides (transformers' per_layer_config) follow their kept layers, renumbered,
  with tiny sizes;
- vision / audio / projector configs: hidden 32, FFN 64, 1 layer (or depth), 2 heads, output
  widths that feed the text model set to its hidden size, a fixed image_size cut to 8x8 patches;
- widths tied across configs: a width field equal to another config's default hidden size
  takes that config's tiny one (what feeds the text model, what cross-attends to the tower);
  a composite config's own hidden_size / vocab_size are its text model's;
- token ids above the small vocabulary (256) are moved into 200..255 (aliased fields too), and
  an image placeholder id the class declares but leaves None gets a free id there;
- values real checkpoints set and the class leaves to the modeling code: CHECKPOINT_ROPE,
  CHECKPOINT_FIELDS (per family: the only model_type-keyed rules); M-RoPE defaults of the
  modeling code fitted at build time to the tiny rotary width;
- timm towers (a config naming a timm `architecture`, its kwargs in `model_args`: TimmWrapper,
  Gemma 3n's vision): the checkpoint's architecture kept, made tiny through the kwargs timm
  takes for that model family (TIMM_TINY), built without weights (pretrained=False: timm never
  reaches a hub); the config's hidden_size is then the tiny tower's output width;
- VQ image tokenizers (a `channel_multiplier` list: one halving per level): 32 base channels and
  a `resolution` of 8 latent rows, so one image yields 8 x 8 codes.

A family whose constraints this does not meet fails to build: the sweep records that as a
limitation of the sweep, never as a verdict on vskip.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch

VOCAB = 256
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=2048)
MOE = dict(num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
           shared_expert_intermediate_size=32, first_k_dense_replace=1, n_shared_experts=1, n_group=1, topk_group=1)
MLA = dict(qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, kv_lora_rank=32, q_lora_rank=32)  # latent attention
MOE_SIZES = dict(num_experts=4, num_experts_per_tok=2, top_k_experts=2, moe_intermediate_size=32)  # also where None
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, depth=1, num_attention_heads=2, num_heads=2,
              num_key_value_heads=2, embed_dim=32, head_dim=16, base_channels=32)  # base_channels: a VQ-VAE's
OUT_WIDTHS = ("out_hidden_size", "projection_dim", "text_hidden_size", "output_dim")
SLIDING_WINDOW = 8
PER_LAYER = ("layer_rope_theta", "activation_sparsity_pattern")  # per-layer lists cut with layer_types (MuseGlimmer:
# 0 = a NoPE layer; Gemma 3n's sparse FFN layers)
MAX_PARAMETERS = 200_000_000  # 0.8 GB fp32; more means the shrink missed a part (and risks memory)
IMAGE_PATCHES = 8  # per side, for vision towers with a fixed image_size
TEXT_CONFIG_KEYS = ("text_config", "decoder", "generator", "text_encoder")  # transformers' get_text_config names
PER_LAYER_KINDS = ("layer_types", "mlp_layer_types")  # per-layer lists whose kinds the tiny model keeps
PLACEHOLDER_KEYS = ("image_token_id", "image_token_index")
# timm architecture name prefix -> the kwargs (timm's own, for that model family) of a tiny tower;
# a config's own grid kwargs (img_size, ref_feat_shape) follow 8 x 8 patches (_shrink_timm)
TIMM_TINY = {
    "vit_": dict(embed_dim=32, depth=1, num_heads=2),  # VisionTransformer / Eva (Perception Encoder)
    "fastvit_mci3": dict(layers=(1,) * 5, embed_dims=(8, 16, 32, 32, 32)),  # 5 stages; attention dims % 32 == 0
    "fastvit_mci4": dict(layers=(1,) * 5, embed_dims=(8, 16, 32, 32, 32)),
    "mobilenetv5_": dict(channel_multiplier=0.125),  # Gemma 3n: channels / 8 (its 2048-wide fusion output is fixed)
}
# name parts of int fields that are no width (a count, a size in pixels or tokens), for _tie_widths
NOT_WIDTHS = ("num", "token", "max", "vocab", "position", "image", "patch", "codebook", "layer")


# Rope fields that the real checkpoints' config.json set and the config classes' defaults leave
# to the modeling code (GLM-4V reads mrope_section with a default that only fits the real
# partial rotary factor): without them a family's default config does not even run.
CHECKPOINT_ROPE = {
    "glm4v": {"partial_rotary_factor": 0.5, "mrope_section": [8, 12, 12]},
    "glm4v_moe": {"partial_rotary_factor": 0.5, "mrope_section": [8, 12, 12]},
    "glm46v": {"partial_rotary_factor": 0.5, "mrope_section": [8, 12, 12]},
    "glmga": {"partial_rotary_factor": 0.5, "mrope_section": [8, 12, 12]},  # glm4v_text, GLM-4.1V's checkpoint
    "qwen2_5_vl": {"mrope_section": [16, 24, 24]},
    "hunyuan_vl": {"mrope_section": [16, 16, 16, 16]},  # HunyuanOCR's xdrope_section (4 axes, head_dim 128)
}

IMAGE_CODES = 64  # a VQ tokenizer's tiny codebook: codes at ids IMAGE_CODE_IDS.. of the tiny vocabulary
IMAGE_CODE_IDS = 100
IMAGE_PLACEHOLDER = 199


def _image_vocabulary(codebook: str, name: str, letters: bool = False, extra: dict | None = None) -> dict:
    """CHECKPOINT_FIELDS of a model that tokenizes images with a VQ-VAE (Chameleon, Emu3): the
    tokenizer's vocabulary_map (which the model reads to turn codes into token ids; the config
    class leaves it None), naming IMAGE_CODES codes as that tokenizer names them (Chameleon spells
    the digits as letters A-J), the <image> placeholder, and the codebook cut to IMAGE_CODES."""
    def spelled(i: int) -> str:
        return name.format("".join(chr(ord("A") + int(d)) for d in str(i)) if letters else i)

    vocabulary = {"<image>": IMAGE_PLACEHOLDER, **(extra or {}),
                  **{spelled(i): IMAGE_CODE_IDS + i for i in range(IMAGE_CODES)}}
    return {codebook: IMAGE_CODES, "vocabulary_map": vocabulary, "image_token_id": IMAGE_PLACEHOLDER}


# Other fields in the same situation (the config class has no value its modeling code can run
# with; a checkpoint's config.json sets it), "path.to.field": value from the top config. The
# Omni thinkers' get_rope_index reads vision_start_token_id, which only the checkpoints' thinker
# configs carry (Qwen's <|vision_start|>, 151652); Qwen4-Exp's indexed-attention layers need the
# QSA indexer sizes its class leaves None (tiny values here, within its validation: one key head);
# Step3p7 builds a sliding-window mask in every forward, from a window only its checkpoint sets.
CHECKPOINT_FIELDS = {
    "step3p7": {"text_config.sliding_window": SLIDING_WINDOW},
    "chameleon": _image_vocabulary("vq_config.num_embeddings", "IMGIMG{}Z", letters=True),
    "emu3": _image_vocabulary("vq_config.codebook_size", "<|visual token{:06d}|>", extra={"<|extra_200|>": 198}),  # eol
    # Perception LM: the checkpoints' Perception Encoder (timm Eva) at the real sizes, which the
    # timm shrink then cuts; the default TimmWrapperConfig (a resnet50, no embed_dim) does not build
    "perception_lm": {"vision_config.architecture": "vit_pe_core_large_patch14_336",
                      "vision_config.model_args": {"embed_dim": 1024, "depth": 23, "img_size": (448, 448),
                                                   "ref_feat_shape": (32, 32), "global_pool": ""},
                      "vision_config.do_pooling": False, "projector_pooling_ratio": 2},
    # Granite 4 Vision: which vision layers feed which LLM layers (DeepStack) and the Q-Former's
    # window ratio are the checkpoint's; here the last tower layer feeds layer 0, the spatial groups
    # layer 1 (the tiny text model has 2); a 14-px patch makes the tower's side (8 x 8 patches, 112
    # px) divide the anyres grid's 336-px tiles, and 8 patches split into 2 x 2 windows
    "granite4_vision": {"deepstack_layer_map": [(-1, 0)], "spatial_target_layers": [1, 1, 1, 1],
                        "downsample_rate": "1/2", "vision_config.patch_size": 14},
    # Cohere Compass: RoPE per layer type (M-RoPE, interleaved), only in its checkpoint
    "cohere_compass": {"text_config.rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [24, 20, 20]}}},
    "qwen2_5_omni_thinker": {"vision_start_token_id": 151652},
    "qwen3_omni_moe_thinker": {"vision_start_token_id": 151652},
    "qwen4_exp": {"text_config.indexer_n_heads": 2, "text_config.indexer_kv_heads": 1,
                  "text_config.indexer_head_dim": 16, "text_config.indexer_budget": 8,
                  "text_config.indexer_compress_ratio": 4},
}


def registered_families() -> dict[str, str]:
    """model_type -> class name of transformers' image-text-to-text registry (each entry)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return dict(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


def tiny_config(model_type: str):
    """The family's config class with its defaults, shrunk (see module doc)."""
    from transformers import CONFIG_MAPPING

    config = CONFIG_MAPPING[model_type]()
    for path, value in CHECKPOINT_FIELDS.get(model_type, {}).items():
        *parents, name = path.split(".")
        target = config
        for parent in parents:
            target = getattr(target, parent)
        setattr(target, name, copy.deepcopy(value))  # the shrink edits nested values in place
    nested = list(_nested_configs(config))
    text = config.get_text_config()
    if not hasattr(text, "num_hidden_layers"):  # a wrapper of a VLM (PI0's vlm_config): its text config
        text = next((sub for key, sub in nested if key in TEXT_CONFIG_KEYS), text)
    configs = [config] + [sub for _, sub in nested]
    widths = [(text, _get(text, "hidden_size"))] + [(sub, _get(sub, "hidden_size")) for sub in configs if sub is not text]
    if model_type in CHECKPOINT_ROPE and isinstance(getattr(text, "rope_parameters", None), dict):
        text.rope_parameters.update(CHECKPOINT_ROPE[model_type])
    texts = [text] * hasattr(text, "num_hidden_layers")
    texts += [sub for key, sub in nested if sub is not text and key in TEXT_CONFIG_KEYS and hasattr(sub, "num_hidden_layers")]
    for sub in texts:
        _shrink_text(sub)
    others = [(key, sub) for key, sub in nested if not any(sub is t for t in texts)]
    for key, sub in others:
        _shrink_other(sub, text.hidden_size, key)
    if config is not text:
        _shrink_other(config, text.hidden_size, top=True)
    for sub in texts:  # a text model's own widths (it is fed, it does not feed another)
        _tie_widths(sub, [(c, w) for c, w in widths if c is sub])
    for sub in [config] * (config is not text) + [c for _, c in others]:  # the text config first where equal
        _tie_widths(sub, [(c, w) for c, w in widths if c is not sub])
    _move_token_ids(configs)
    _set_placeholder_ids(config, configs)
    tokens = _get(config, "mm_tokens_per_image")  # image tokens pooled from the patch grid (Gemma 3: 16 x 16)
    if isinstance(tokens, int) and tokens > (IMAGE_PATCHES // 2) ** 2:
        config.mm_tokens_per_image = (IMAGE_PATCHES // 2) ** 2  # 2 x 2 pooling of the 8 x 8 patches
    return config


def _nested_configs(config):
    """(attribute name, config) of every PreTrainedConfig below config, depth first, each once."""
    from transformers import PreTrainedConfig

    seen = {id(config)}

    def walk(cfg):
        for key, value in sorted(vars(cfg).items()):
            if isinstance(value, PreTrainedConfig) and id(value) not in seen:
                seen.add(id(value))
                yield key, value
                yield from walk(value)

    yield from walk(config)


def build_family(model_type: str, seed: int = 0):
    """A tiny random model of the registry's class for model_type, eval mode, SDPA attention."""
    import transformers

    name = registered_families()[model_type]
    config = tiny_config(model_type)
    cls = getattr(transformers, name)
    config._attn_implementation = "sdpa"
    text = config.get_text_config()
    try:
        meta = _meta_model(cls, config)  # size first: a sub-config the shrink did not reach can be huge
    except Exception:
        if not _declared_mrope(text):
            raise
        meta = _meta_model(cls, config)
    if _fit_default_mrope(meta, text):
        meta = _meta_model(cls, config)
    size = sum(p.numel() for p in meta.parameters())
    if size > MAX_PARAMETERS:
        raise ValueError(f"the shrunk {name} still has {size / 1e6:.0f} M parameters (> {MAX_PARAMETERS / 1e6:.0f} M): "
                         "a sub-config the generic shrink does not reach")
    torch.manual_seed(seed)
    return cls(config).float().eval()


def _meta_model(cls, config):
    """cls(config) on the meta device; a class without SDPA support with its eager attention."""
    try:
        with torch.device("meta"):
            return cls(config)
    except (ValueError, NotImplementedError):
        config._attn_implementation = "eager"
        with torch.device("meta"):
            return cls(config)


def _declared_mrope(text) -> bool:
    """M-RoPE the text config class declares (mrope_section among its rope keys) and leaves to a
    modeling default that does not even build at the tiny width (ERNIE-4.5-VL's pre-rotation):
    equal sections of the rotary half (the first two stay equal: ERNIE stacks its h and w parts).
    True when set."""
    rope = getattr(text, "rope_parameters", None)
    declared = "mrope_section" in (getattr(text, "ignore_keys_at_rope_validation", None) or ())
    if not declared or not isinstance(rope, dict) or "mrope_section" in rope or any(
            isinstance(v, dict) for v in rope.values()):
        return False
    rope["mrope_section"] = rescale_sections([1, 1, 1], _rotary_half(text, rope))
    return True


def _fit_default_mrope(model, text) -> bool:
    """M-RoPE sections the modeling code defaults to (rope_parameters.get("mrope_section", [8, 12, 12])
    in GLM-OCR, PaddleOCR-VL: the real checkpoints' rotary width) rescaled into the text config when
    they do not sum to the tiny model's rotary frequencies (the rotary module's inv_freq length).
    True when the config changed (the model must be built again)."""
    rope = getattr(text, "rope_parameters", None)
    if not isinstance(rope, dict) or "mrope_section" in rope or any(isinstance(v, dict) for v in rope.values()):
        return False
    for module in model.modules():
        section, inv_freq = getattr(module, "mrope_section", None), getattr(module, "inv_freq", None)
        if isinstance(section, (list, tuple)) and isinstance(inv_freq, torch.Tensor):
            if sum(section) != inv_freq.shape[-1]:  # inv_freq [rotary_dim / 2]
                rope["mrope_section"] = rescale_sections(list(section), inv_freq.shape[-1])
                return True
            return False
    return False


def _get(cfg, key: str, default: Any = None) -> Any:
    """cfg.key, or default where the config has none or refuses a global read (a per-layer attribute)."""
    try:
        return getattr(cfg, key, default)
    except Exception:  # transformers' per-layer attributes raise on a global read
        return default


def _set(cfg, key: str, value: Any) -> None:
    """cfg.key = value where the config has an int there (a list is per-layer or per-stage: left
    alone; an attribute that refuses a global read, per-layer in the config class, too)."""
    current = _get(cfg, key)
    if isinstance(current, int) and not isinstance(current, bool):
        setattr(cfg, key, value)


def _shrink_text(cfg) -> None:
    overrides = _take_per_layer_overrides(cfg)
    picked = _pick_layers(cfg, TEXT["num_hidden_layers"])
    mla = {key: _get(cfg, key) for key in ("head_dim", "qk_rope_head_dim", "qk_nope_head_dim")}
    mha = _get(cfg, "num_key_value_heads") == _get(cfg, "num_attention_heads")
    for key, value in {**TEXT, **MOE}.items():
        _set(cfg, key, value)
    if isinstance(mla["qk_rope_head_dim"], int):
        _shrink_latent_attention(cfg, **mla)
        if mha:  # latent attention expands K and V per query head: no KV groups
            _set(cfg, "num_key_value_heads", cfg.num_attention_heads)
    if "head_dim" in vars(cfg) and cfg.head_dim is None:  # modeling code that reads it (HunYuan-VL): derived
        cfg.head_dim = TEXT["head_dim"]  # = hidden_size / num_attention_heads, what the others derive
    for key, value in MOE_SIZES.items():  # MoE sizes the class leaves to the checkpoint (Diffusion Gemma's
        if key in vars(cfg) and vars(cfg)[key] is None:  # router); a model without MoE blocks ignores them
            setattr(cfg, key, value)
    for key in [k for k in vars(cfg) if k.startswith("vocab_size")]:  # Gemma 3n's vocab_size_per_layer_input too
        _set(cfg, key, VOCAB)
    for key in ("sliding_window", "attention_chunk_size"):
        _set(cfg, key, SLIDING_WINDOW)
    if "sliding_attention" in (_get(cfg, "layer_types") or ()) and "sliding_window" in vars(cfg) and (
            cfg.sliding_window is None):  # sliding layers with the window left to the checkpoint (Step3p7)
        cfg.sliding_window = SLIDING_WINDOW
    if "mlp_layer_types" in vars(cfg) and cfg.mlp_layer_types is None:  # left to the checkpoint (DeepSeek-OCR 2)
        dense = _get(cfg, "first_k_dense_replace", MOE["first_k_dense_replace"])
        cfg.mlp_layer_types = ["dense" if i < dense else "sparse" for i in range(len(picked))]  # dense, then MoE
    for key in PER_LAYER_KINDS + PER_LAYER:
        value = _get(cfg, key)
        if isinstance(value, (list, tuple)) and value and max(picked) < len(value):
            setattr(cfg, key, [value[i] for i in picked])
    cfg.num_hidden_layers = len(picked)
    if isinstance(_get(cfg, "intermediate_size"), list):  # one FFN width per layer (Gemma 3n)
        cfg.intermediate_size = [TEXT["intermediate_size"]] * len(picked)
    shared = _get(cfg, "num_kv_shared_layers")  # trailing layers reusing an earlier layer's K/V (Gemma 3n: 15):
    if isinstance(shared, int) and shared > 0:  # each type keeps a producing layer before them
        kinds = len(set(_get(cfg, "layer_types") or [None]))
        cfg.num_kv_shared_layers = max(0, min(shared, len(picked) - kinds))
    for key in ("mlp_only_layers", "full_attn_idxs", "swa_layers", "no_rope_layers"):
        value = getattr(cfg, key, None)
        if isinstance(value, list):
            setattr(cfg, key, [v for v in value if isinstance(v, int) and v < cfg.num_hidden_layers] or value[:0])
    rope = getattr(cfg, "rope_parameters", None)
    for params in (rope.values() if isinstance(rope, dict) and all(isinstance(v, dict) for v in rope.values())
                   else [rope]):
        if isinstance(params, dict) and isinstance(params.get("mrope_section"), list):
            params["mrope_section"] = rescale_sections(params["mrope_section"], _rotary_half(cfg, params))
    sizes = {**TEXT, **MOE, **MLA, "sliding_window": SLIDING_WINDOW, "num_key_value_heads": _get(cfg, "num_key_value_heads")}
    _put_per_layer_overrides(cfg, overrides, picked, sizes)


def _shrink_latent_attention(cfg, head_dim, qk_rope_head_dim, qk_nope_head_dim) -> None:
    """Multi-head latent attention (DeepSeek-V3 style: q/kv low-rank, a rotary and a plain part per
    head): the small sizes, keeping how the default ties head_dim to them (= the rotary part in
    DeepSeek-V3 / Kimi, = rotary + plain in others) and a partial_rotary_factor that is the rotary
    part's share of head_dim; a part of width 0 (no rotary part) stays 0."""
    for key, value in MLA.items():
        _set(cfg, key, value if _get(cfg, key) != 0 else 0)
    rope, nope = cfg.qk_rope_head_dim, _get(cfg, "qk_nope_head_dim", 0) or 0
    if head_dim == qk_rope_head_dim:
        cfg.head_dim = rope
    elif head_dim == 0:
        cfg.head_dim = 0
    elif isinstance(qk_nope_head_dim, int) and head_dim == qk_nope_head_dim + qk_rope_head_dim:
        cfg.head_dim = nope + rope
    _set(cfg, "qk_head_dim", nope + rope)
    rope_params = getattr(cfg, "rope_parameters", None)
    for params in (rope_params.values() if isinstance(rope_params, dict) else ()):
        if isinstance(params, dict) and head_dim and params.get("partial_rotary_factor") == qk_rope_head_dim / head_dim:
            params["partial_rotary_factor"] = rope / cfg.head_dim
    if isinstance(rope_params, dict) and head_dim and rope_params.get("partial_rotary_factor") == (
            qk_rope_head_dim / head_dim):
        rope_params["partial_rotary_factor"] = rope / cfg.head_dim


def _pick_layers(cfg, layers: int) -> list[int]:
    """Indices of the layers the tiny model keeps: one layer of each kind (each distinct entry of
    layer_types x mlp_layer_types), in the model's order, then the last layers up to `layers`."""
    count = _get(cfg, "num_hidden_layers")
    lists = [v for v in (_get(cfg, key) for key in PER_LAYER_KINDS) if isinstance(v, (list, tuple)) and v]
    if not lists:
        return list(range(min(layers, count)))
    count = len(lists[0])
    lists = [v for v in lists if len(v) == count]
    first: dict[tuple, int] = {}
    for i in range(count):
        first.setdefault(tuple(v[i] for v in lists), i)
    picked = set(first.values())
    for i in range(count - 1, -1, -1):  # fill from the end (the last layer is often a kind of its own)
        if len(picked) >= layers:
            break
        picked.add(i)
    return sorted(picked)


def _take_per_layer_overrides(cfg) -> dict[int, dict[str, Any]]:
    """A heterogeneous config's per-layer overrides (transformers' per_layer_config: layer index ->
    fields that differ from the global ones, e.g. Gemma 4's wider full-attention heads), removed so
    that the shrink reads and sets the global fields; _put_per_layer_overrides puts them back."""
    spec = cfg.__dict__.get("_heterogeneity_spec")
    if spec is None:
        return {}
    overrides = copy.deepcopy(spec.per_layer_overrides)
    cfg.per_layer_config = None
    return overrides


def _put_per_layer_overrides(cfg, overrides: dict[int, dict[str, Any]], picked: list[int], sizes: dict) -> None:
    """The kept layers' overrides, renumbered; an int override of a field the shrink sets gets the
    tiny value (an override equal to the global value then drops out)."""
    if not overrides:
        return
    kept = {}
    for new, old in enumerate(picked):
        fields = {k: (sizes[k] if k in sizes and isinstance(v, int) and not isinstance(v, bool) else v)
                  for k, v in overrides.get(old, {}).items()}
        if fields:
            kept[new] = fields
    cfg.per_layer_config = kept


def _rotary_half(cfg, params: dict) -> int:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    factor = params.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)) or 1.0
    return int(head_dim * factor) // 2


def rescale_sections(sections: list[int], total: int) -> list[int]:
    """Sections (M-RoPE: t, h, w) summing to total, in the same proportions, each >= 1."""
    scaled = [max(1, round(s * total / sum(sections))) for s in sections]
    scaled[-1] += total - sum(scaled)
    return scaled


def _shrink_other(cfg, text_hidden: int, key: str = "", top: bool = False) -> None:
    """A vision / audio / projector config (or the top config, top=True: output widths only)."""
    if not top:
        overrides = _take_per_layer_overrides(cfg)
        multiplier = getattr(cfg, "channel_multiplier", None)  # a VQ-VAE: one halving per level
        levels = len(multiplier) if isinstance(multiplier, (list, tuple)) and multiplier else 0
        # Emu3's VQ attention runs on the last level's channels, named hidden_size: kept tied
        tied = levels and _get(cfg, "hidden_size") == (_get(cfg, "base_channels") or 0) * multiplier[-1]
        for name, value in VISION.items():
            _set(cfg, name, value)
        if levels and isinstance(_get(cfg, "resolution"), int):
            cfg.resolution = IMAGE_PATCHES * 2 ** (levels - 1)  # 8 x 8 codes per image
        if tied:
            cfg.hidden_size = cfg.base_channels * multiplier[-1]
        for name in ("num_hidden_layers", "depth"):
            if _get(cfg, name):
                setattr(cfg, name, 1)
        for name in ("deepstack_visual_indexes", "fullatt_block_indexes", "intermediate_layers_indices"):
            value = getattr(cfg, name, None)
            if isinstance(value, list) or (isinstance(value, tuple) and value):  # Cohere Compass: a tuple
                setattr(cfg, name, [0])
        vf = getattr(cfg, "vision_feature_layer", None)
        if isinstance(vf, int) and vf >= 0:
            cfg.vision_feature_layer = 0
        side, patch = getattr(cfg, "image_size", None), getattr(cfg, "patch_size", None)
        if isinstance(side, int) and isinstance(patch, int) and side > IMAGE_PATCHES * patch:
            cfg.image_size = IMAGE_PATCHES * patch  # fixed-resolution towers: 8x8 patches
        if key == "vision_config" and isinstance(_get(cfg, "embed_dim"), int):
            _set(cfg, "hidden_size", text_hidden)  # Qwen2-VL's naming: embed_dim the tower, hidden_size its output
        if isinstance(getattr(cfg, "architecture", None), str) and "model_args" in vars(cfg):
            _shrink_timm(cfg)
        _put_per_layer_overrides(cfg, overrides, [0], {**VISION, "num_hidden_layers": 1})
    else:  # a composite config's own sizes are its text model's (Ovis2's visual embedding table)
        _set(cfg, "hidden_size", text_hidden)
        _set(cfg, "vocab_size", VOCAB)
    for name in OUT_WIDTHS:
        _set(cfg, name, text_hidden)
    vf = getattr(cfg, "vision_feature_layer", None)
    if isinstance(vf, int) and top:
        cfg.vision_feature_layer = -1
    elif isinstance(vf, list) and top:
        cfg.vision_feature_layer = [-1]


def _shrink_timm(cfg) -> None:
    """A timm tower's config (TimmWrapperConfig, Gemma 3n's vision config): its model_args with the
    TIMM_TINY kwargs of its architecture's family, the grid kwargs it already has (img_size,
    ref_feat_shape) at 8 x 8 patches, and hidden_size (what the projector reads) the width of
    the tower timm builds from them (on the meta device, pretrained=False: no weights, no hub)."""
    try:
        import timm
    except ImportError as e:  # timm, or the torchvision it imports (pyproject.toml says why it is no dependency)
        raise ImportError(f"a timm tower ({cfg.architecture}) needs timm, which does not import here: {e}") from e

    args = dict(cfg.model_args or {})
    for prefix, tiny in TIMM_TINY.items():
        if cfg.architecture.startswith(prefix):
            args.update(tiny)
            break
    found = re.search(r"patch(\d+)", cfg.architecture)
    patch = args.get("patch_size") or (int(found.group(1)) if found else None)
    if patch and "img_size" in args:
        args["img_size"] = (IMAGE_PATCHES * patch,) * 2
    if "ref_feat_shape" in args:  # the RoPE grid the checkpoint was trained at: the tiny grid
        args["ref_feat_shape"] = (IMAGE_PATCHES,) * 2
    cfg.model_args = args
    with torch.device("meta"):
        tower = timm.create_model(cfg.architecture, pretrained=False, num_classes=0, **args)
    if isinstance(_get(cfg, "hidden_size"), int):
        cfg.hidden_size = tower.num_features


def _tie_widths(cfg, sources: list) -> None:
    """Width fields (named *hidden*, *_dim) of cfg that equal a source config's default
    hidden_size get that config's tiny hidden_size: what feeds the text model (Dots3's
    adapter_out_dim), what cross-attends to the vision tower (BLIP-2's Q-Former
    encoder_hidden_size), a text model's embedding width (OPT's word_embed_proj_dim).
    sources: (config, its default hidden_size), the first match wins; cfg's own hidden_size,
    head_dim, embed_dim stay."""
    for name, value in list(vars(cfg).items()):
        if (not isinstance(value, int) or isinstance(value, bool) or name in ("hidden_size", "head_dim", "embed_dim")
                or not ("hidden" in name or name.endswith("_dim")) or any(w in name for w in NOT_WIDTHS)):
            continue
        source = next((other for other, default in sources if default == value), None)
        if source is not None and isinstance(_get(source, "hidden_size"), int):
            setattr(cfg, name, source.hidden_size)


def _token_keys(cfg) -> list[str]:
    """Fields holding token ids: named so, or aliased so (Molmo2: image_token_id -> image_patch_id)."""
    suffixes = ("_token_id", "_token_index")
    aliased = {v for k, v in getattr(cfg, "attribute_map", {}).items() if k.endswith(suffixes)}
    return sorted(k for k in vars(cfg) if k.endswith(suffixes) or k in aliased)


def _move_token_ids(configs: list) -> None:
    """Token ids at or above 200 moved to distinct ids in 200..255 (one id stays one id across
    the configs: image_token_id and image_token_index of one model remain equal)."""
    free = iter(range(VOCAB - 1, 199, -1))
    moved: dict[int, int] = {}
    for cfg in configs:
        for key in _token_keys(cfg):
            value = _get(cfg, key)
            if isinstance(value, int) and not isinstance(value, bool) and value >= VOCAB - 56:
                if value not in moved:
                    moved[value] = next(free)
                setattr(cfg, key, moved[value])


def _set_placeholder_ids(config, configs: list) -> None:
    """An image placeholder id the config class declares and leaves None (BLIP-2, InstructBLIP,
    MiniCPM-V: the processor of a real checkpoint puts one such token per image-feature row and
    its config.json names it; with None the model drops the image) set to a free id in 200..255."""
    if not any(k in vars(config) or k in getattr(config, "attribute_map", {}) for k in PLACEHOLDER_KEYS):
        return
    if any(isinstance(_get(config, k), int) for k in PLACEHOLDER_KEYS):
        return
    used = {_get(cfg, k) for cfg in configs for k in _token_keys(cfg)}
    free = max(set(range(VOCAB - 56, VOCAB)) - used)
    for key in PLACEHOLDER_KEYS:
        if key in vars(config) or key in getattr(config, "attribute_map", {}):
            setattr(config, key, free)
