"""Random prefill inputs for any HF VLM, built by asking the model (no processor, no hub).

    inputs, info = probe_inputs(model, seed=0)

One random image goes through the family's own image processor class (transformers' auto
mapping, default settings); the model's `get_image_features` says how many rows of features
it yields, which is the number of image tokens to place in input_ids (text, image tokens,
text). `mm_token_type_ids` / `token_type_ids`, where the forward takes them (and pixels are
given), are 1 at the image rows (Qwen's M-RoPE, Gemma 3's bidirectional image attention). When no pixel inputs
can be built this way, the image tokens go in without pixels (`info["pixels"]` False): the
language model still sees visual rows at the image-token positions, so a parity check of
the compiled decoder stays meaningful, but the vision tower is not exercised.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from .base import Adapter, AdapterError

IMAGE_TOKENS_WITHOUT_PIXELS = 16
TEXT_BEFORE, TEXT_AFTER = 3, 5
DEFAULT_SIDE = 112
MAX_IMAGE_TOKENS = 1024  # more rows than this from one image: the probe refuses (too slow to check)


def _forward_params(model) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def _image_processor(model):
    """The family's image processor class with its defaults, or None."""
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING

    try:
        entry = IMAGE_PROCESSOR_MAPPING[type(model.config)]
    except KeyError:
        return None
    if isinstance(entry, dict):  # backends: PIL first (torchvision is not a dependency)
        classes = [entry[k] for k in sorted(entry, key=lambda k: k != "pil")]
    else:
        classes = list(entry) if isinstance(entry, tuple) else [entry]
    for cls in classes:
        if cls is None:
            continue
        try:
            return cls()
        except (ImportError, ValueError, TypeError):  # a backend whose library is missing: the next one
            continue
    return None


VISION_KEYS = ("vision_config", "vq_config")  # an image tower, or a VQ-VAE that turns images into tokens


def _vision_config(model):
    """The config's vision_config (or vq_config: Chameleon, Emu3), or the first one below a
    sub-config (T5Gemma2's encoder)."""
    from .shrink import _nested_configs

    for key in VISION_KEYS:
        vision = getattr(model.config, key, None)
        if vision is not None:
            return vision
    return next((sub for key, sub in _nested_configs(model.config) if key in VISION_KEYS), None)


def _fixed_side(vision) -> int | None:
    """The side in pixels a fixed-resolution tower takes: image_size, a VQ-VAE's resolution, a
    timm tower's img_size kwarg; None for dynamic-resolution towers."""
    args = getattr(vision, "model_args", None)
    timm_side = args.get("img_size") if isinstance(args, dict) else None
    if isinstance(timm_side, (list, tuple)) and timm_side:
        timm_side = timm_side[0]  # (height, width)
    for side in (getattr(vision, "image_size", None), getattr(vision, "resolution", None), timm_side):
        if isinstance(side, int) and not isinstance(side, bool):
            return side
    return None


def _image_size(model) -> tuple[int, int]:
    """The tower's fixed side (_fixed_side, or the first of an image_size list), else 112 px
    (dynamic-resolution towers: a few tokens)."""
    vision = _vision_config(model)
    side = getattr(vision, "image_size", None)
    side = side[0] if isinstance(side, (list, tuple)) and side else _fixed_side(vision)
    side = side if isinstance(side, int) and 0 < side <= 1024 else DEFAULT_SIDE
    return side, side


# processor attribute -> vision config fields that give it
_PATCH_FIELDS = {"patch_size": ("patch_size",), "merge_size": ("spatial_merge_size", "merge_size"),
                 "temporal_patch_size": ("temporal_patch_size",)}


def _match_patches(model, processor) -> None:
    """A default-constructed processor told the vision config's patch geometry (a processor
    saved with the model already has it), and a dynamic-resolution processor's lower area bound
    brought down to the probe image (Emu3's 512 x 512 would make one image thousands of tokens)."""
    vision = _vision_config(model)
    for attr, fields in _PATCH_FIELDS.items():
        values = [getattr(vision, f, None) for f in fields]
        value = next((v for v in values if isinstance(v, int)), None)
        if value is not None and isinstance(getattr(processor, attr, None), int):
            setattr(processor, attr, value)
    height, width = _image_size(model)
    if isinstance(getattr(processor, "min_pixels", None), int) and processor.min_pixels > height * width:
        processor.min_pixels = height * width
        if isinstance(getattr(processor, "size", None), dict) and "min_pixels" in processor.size:
            processor.size = {**processor.size, "min_pixels": height * width}


def _fixed_size(model, processor, side: int) -> dict[str, Any]:
    """Size overrides that make a fixed-resolution processor produce the tower's side
    (_fixed_side: a shrunk or fine-tuned tower): each pixel-size field of `size` / `crop_size`,
    and a tiling processor's tile_size (Perception LM), set to side. Nothing for
    dynamic-resolution towers (Qwen's area bounds)."""
    if _fixed_side(_vision_config(model)) is None:
        return {}
    out: dict[str, Any] = {}
    for attr in ("size", "crop_size"):
        value = getattr(processor, attr, None)
        fields = {k: getattr(value, k, None) for k in ("height", "width", "shortest_edge", "longest_edge")}
        fields = {k: side for k, v in fields.items() if isinstance(v, int)}
        if fields:
            out[attr] = fields
    if isinstance(getattr(processor, "tile_size", None), int):  # one tile: the probe image has the tower's side
        out["tile_size"] = side
        if isinstance(getattr(processor, "max_num_tiles", None), int):
            out["max_num_tiles"] = 1
    return out


def _count_rows(features: Any) -> int:
    """Rows of image features: a tensor [..., D] (all but the last dim), a list/tuple of
    them, or a model output with pooler_output / last_hidden_state, or with per-layer
    features only (Granite 4 Vision's deepstack_features: (LLM layer, per-image features)
    pairs, each layer's features one row per image token)."""
    if getattr(features, "pooler_output", None) is not None:
        features = features.pooler_output
    elif getattr(features, "last_hidden_state", None) is not None:
        features = features.last_hidden_state
    elif getattr(features, "deepstack_features", None):
        features = features.deepstack_features[0][1]
    if isinstance(features, torch.Tensor):
        return int(features.numel() // features.shape[-1])
    if isinstance(features, (list, tuple)):
        return sum(_count_rows(f) for f in features)
    raise TypeError(f"image features of type {type(features).__name__}")


def _side_text_inputs(get, given: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Required text inputs of the image-feature call other than the prompt (InstructBLIP's
    qformer_input_ids: the instruction for its Q-Former): a few random ids, all attended."""
    out = {}
    for name, param in inspect.signature(get).parameters.items():
        if param.default is inspect.Parameter.empty and name not in given and name.endswith("input_ids"):
            ids = torch.randint(4, 200, (1, TEXT_BEFORE + TEXT_AFTER), generator=gen)  # [1, T]
            out[name] = ids
            out[name.replace("input_ids", "attention_mask")] = torch.ones_like(ids)
    return out


def pixel_inputs(model, seed: int = 0, processor=None) -> tuple[dict[str, torch.Tensor], int]:
    """Image-processor outputs for one random image and the image tokens it yields (asked from
    the model's get_image_features). processor: the model directory's own image processor,
    else the family's class with defaults. Raises (any error) when the family does not fit."""
    if processor is None:
        processor = _image_processor(model)
        if processor is None:
            raise AdapterError(f"no image processor class registered for {type(model.config).__name__}")
        _match_patches(model, processor)
    height, width = _image_size(model)
    gen = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, height, width), generator=gen, dtype=torch.uint8)
    sizes = _fixed_size(model, processor, height)
    try:
        out = processor(images=[image], return_tensors="pt", **sizes)
    except ValueError as e:  # a processor that takes PIL / numpy images only (Emu3's): the same image, [H, W, 3]
        if "numpy" not in str(e):
            raise
        out = processor(images=[image.permute(1, 2, 0).numpy()], return_tensors="pt", **sizes)
    dtype = next(model.parameters()).dtype
    kw = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in out.items() if isinstance(v, torch.Tensor)}
    inner = getattr(model, "model", model)
    get = getattr(model, "get_image_features", None) or getattr(inner, "get_image_features")
    params = set(inspect.signature(get).parameters)
    kw.update(_side_text_inputs(get, kw, gen))
    with torch.no_grad():
        features = get(**{k: v for k, v in kw.items() if k in params or "kwargs" in params})
    n = _count_rows(features)
    if not 0 < n <= MAX_IMAGE_TOKENS:
        raise AdapterError(f"one image yields {n} image-feature rows (outside 1..{MAX_IMAGE_TOKENS})")
    forward = _forward_params(model)
    return {k: v for k, v in kw.items() if k in forward}, n


def probe_inputs(model, adapter: Adapter | None = None, seed: int = 0, pixels: bool = True,
                 processor=None) -> tuple[dict, dict]:
    """(HF forward inputs of one prompt, info): text, one image's tokens, text."""
    from .registry import adapter_for

    adapter = adapter or adapter_for(model)
    token = adapter.image_token_id(model)
    kw, n, why = {}, IMAGE_TOKENS_WITHOUT_PIXELS, None
    if pixels:
        try:
            kw, n = pixel_inputs(model, seed, processor)
        except Exception as e:  # the family's processor or feature call does not fit: no pixels, say why
            kw, why = {}, f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"
    vocab = model.config.get_text_config().vocab_size
    special = {v for k, v in vars(model.config).items() if k.endswith(("_token_id", "_token_index")) and isinstance(v, int)}
    text_ids = [t for t in range(4, min(vocab, 200)) if t not in special] or [t for t in range(vocab) if t != token]
    gen = torch.Generator().manual_seed(seed)

    def text(k: int) -> list[int]:
        return [text_ids[i] for i in torch.randint(0, len(text_ids), (k,), generator=gen).tolist()]

    ids = torch.tensor([text(TEXT_BEFORE) + [token] * n + text(TEXT_AFTER)])  # [1, S]
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **kw}
    forward = _forward_params(model)
    for key in ("mm_token_type_ids", "token_type_ids"):
        if key in forward and kw:  # without pixels the image tokens are plain text to the model
            inputs[key] = (ids == token).to(torch.int32 if key == "mm_token_type_ids" else torch.long)
    if getattr(model.config, "is_encoder_decoder", False) and "decoder_input_ids" in forward:
        inputs["decoder_input_ids"] = torch.tensor([text(TEXT_AFTER)])  # [1, T]: the decoder's own text
    return inputs, {"pixels": bool(kw), "image_tokens": n, "no_pixels_reason": why}
