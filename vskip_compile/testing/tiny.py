"""Tiny random models of the real Hugging Face VLM classes, built in code (no hub).

Every architecture the project supports has one here, so tests run the real HF modeling code
(vision tower, merge, M-RoPE, DeepStack, GQA) on a model small enough for 2 CPU cores.

Shared text shape: 4 decoder layers, hidden 64, 4 heads of 16, 2 KV heads (GQA), FFN 128,
vocabulary 128. The MoE model (Qwen3-VL-MoE, in MOE_TINY_ARCHS, not in TINY_ARCHS: it is
slower to trace and the tests parametrized over TINY_ARCHS need not pay for it) has 8 experts
of width 32, top-2 routing, in layers 0-2; layer 3 keeps a dense MLP (`mlp_only_layers`).
Ids 0..3 are special (0 pad, 1 bos, 2 eos); text tokens are drawn from 4..99;
image/video/vision-start/end ids live in 100..127 (Qwen's defaults would be in a 151k
vocabulary).
"""

from __future__ import annotations

import torch

TINY_ARCHS = ("qwen2_5_vl", "qwen3_vl", "llava", "llava_next")
MOE_TINY_ARCHS = ("qwen3_vl_moe",)
ALL_TINY_ARCHS = TINY_ARCHS + MOE_TINY_ARCHS
_QWEN_ARCHS = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")

VOCAB = 128
IMAGE_TOKEN_ID = 120
VIDEO_TOKEN_ID = 121
VISION_START_ID = 122
VISION_END_ID = 123
TEXT_TOKENS = (4, 100)  # half-open range text tokens are drawn from

_TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
_QWEN_IDS = dict(
    image_token_id=IMAGE_TOKEN_ID,
    video_token_id=VIDEO_TOKEN_ID,
    vision_start_token_id=VISION_START_ID,
    vision_end_token_id=VISION_END_ID,
)
# Qwen images: an 8x8 grid of 4-pixel patches, merged 2x2 -> 16 visual tokens per image.
_QWEN_PATCH, _QWEN_GRID, _QWEN_MERGE, _QWEN_TPATCH = 4, 8, 2, 2
# The Qwen vision towers (archs.qwen.small_vision_config after depth): width 32, 2 heads, FFN 64,
# out to the text hidden size.
_QWEN_VISION = (32, 2, 64, 64, _QWEN_PATCH, _QWEN_MERGE, _QWEN_TPATCH)
# LLaVA: a 16x16 image in 4-pixel patches -> 16 tokens ("default" drops CLS).
_CLIP = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=16,
    patch_size=4,
    projection_dim=32,
)
# LLaVA-NeXT: base 16x16 view plus any-resolution tiles of a 16x28 image (unpadded, with a
# newline token per feature row).
_NEXT_PINPOINTS = [[16, 32], [32, 16]]
_NEXT_IMAGE_SIZE = (16, 28)


def _config(arch: str):
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaNextConfig,
        Qwen2_5_VLConfig,
        Qwen3VLConfig,
        Qwen3VLMoeConfig,
    )

    from ..archs.qwen import small_rope_parameters, small_vision_config

    if arch == "qwen2_5_vl":
        text = dict(_TEXT, rope_parameters=small_rope_parameters(_TEXT["head_dim"], interleaved=False))
        # window_size 16: 2x2 merged tokens per window, so window attention is exercised
        vision = small_vision_config(2, *_QWEN_VISION, window_size=16, fullatt_block_indexes=[1])
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **_QWEN_IDS)
    if arch in ("qwen3_vl", "qwen3_vl_moe"):
        text = dict(_TEXT, rope_parameters=small_rope_parameters(_TEXT["head_dim"], interleaved=True))
        # 64 position embeddings: a perfect square; DeepStack adds after text layers 0 and 1
        vision = small_vision_config(3, *_QWEN_VISION, num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
        if arch == "qwen3_vl":
            return Qwen3VLConfig(text_config=text, vision_config=vision, **_QWEN_IDS)
        moe = dict(
            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[3]
        )
        return Qwen3VLMoeConfig(text_config=dict(text, **moe), vision_config=vision, **_QWEN_IDS)
    text = LlamaConfig(**_TEXT)
    vision = CLIPVisionConfig(**_CLIP)
    common = dict(
        text_config=text,
        vision_config=vision,
        image_token_index=IMAGE_TOKEN_ID,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    if arch == "llava":
        return LlavaConfig(image_seq_length=16, **common)
    if arch == "llava_next":
        return LlavaNextConfig(image_grid_pinpoints=_NEXT_PINPOINTS, **common)
    raise ValueError(f"unknown tiny arch {arch!r}; expected one of {', '.join(ALL_TINY_ARCHS)}")


def build_tiny(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny random `*ForConditionalGeneration` of `arch` in eval mode, SDPA attention (MoE:
    transformers' default experts implementation, "grouped_mm" where it can dispatch)."""
    import transformers

    classes = {
        "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
        "qwen3_vl": "Qwen3VLForConditionalGeneration",
        "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
        "llava": "LlavaForConditionalGeneration",
        "llava_next": "LlavaNextForConditionalGeneration",
    }
    config = _config(arch)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = getattr(transformers, classes[arch])(config)
    return model.to(dtype).eval()


# -- inputs ----------------------------------------------------------------------------------


def _pixels(model, arch: str, n_images: int, gen: torch.Generator) -> tuple[dict, list[int]]:
    """Pixel inputs for n_images images and the number of image tokens each one takes."""
    dtype = next(model.parameters()).dtype
    if n_images == 0:
        return {}, []
    if arch in _QWEN_ARCHS:
        patch_dim = 3 * _QWEN_TPATCH * _QWEN_PATCH * _QWEN_PATCH
        n_patches = _QWEN_GRID * _QWEN_GRID
        pixel_values = torch.randn(n_images * n_patches, patch_dim, generator=gen)  # [N*P, C*T*p*p]
        grid = torch.tensor([[1, _QWEN_GRID, _QWEN_GRID]] * n_images)
        counts = [n_patches // _QWEN_MERGE**2] * n_images
        return {"pixel_values": pixel_values.to(dtype), "image_grid_thw": grid}, counts
    side = _CLIP["image_size"]
    if arch == "llava":
        pixel_values = torch.randn(n_images, 3, side, side, generator=gen)  # [N, C, H, W]
        counts = [(side // _CLIP["patch_size"]) ** 2] * n_images
        return {"pixel_values": pixel_values.to(dtype)}, counts
    if arch == "llava_next":
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        n_views = image_size_to_num_patches(_NEXT_IMAGE_SIZE, _NEXT_PINPOINTS, side)
        pixel_values = torch.randn(n_images, n_views, 3, side, side, generator=gen)  # [N, views, C, H, W]
        image_sizes = torch.tensor([_NEXT_IMAGE_SIZE] * n_images)
        kw = {"pixel_values": pixel_values.to(dtype), "image_sizes": image_sizes}
        with torch.no_grad():  # the packed length (unpadding, newlines) is the model's own rule
            feats = model.model.get_image_features(**kw, return_dict=True).pooler_output
        return kw, [int(f.shape[0]) for f in feats]
    raise ValueError(f"unknown tiny arch {arch!r}; expected one of {', '.join(ALL_TINY_ARCHS)}")


def tiny_inputs(
    model,
    arch: str,
    text_before: int = 3,
    text_after: int = 4,
    n_images: int = 1,
    batch: int = 1,
    seed: int = 0,
    text_between: int = 2,
) -> dict:
    """HF forward/generate inputs: text, image spans (image token repeated), text, per row.

    Every batch row has the same layout (different random text and pixels). text_before and
    text_after may be 0 (image first / last). No vision-start/end tokens are added, so the
    image token rows are exactly the visual spans. Qwen needs text_between >= 1 with several
    images (its M-RoPE groups adjacent image tokens into one image).
    """
    if n_images > 1 and text_between < 1 and arch in _QWEN_ARCHS:
        raise ValueError("Qwen M-RoPE needs text_between >= 1 to tell adjacent images apart")
    gen = torch.Generator().manual_seed(seed)
    pixel_kw, counts = _pixels(model, arch, n_images * batch, gen)
    counts = counts[:n_images]

    def text(n: int) -> list[int]:
        return torch.randint(*TEXT_TOKENS, (n,), generator=gen).tolist()

    rows = []
    for _ in range(batch):
        ids = text(text_before)
        for i, count in enumerate(counts):
            if i:
                ids += text(text_between)
            ids += [IMAGE_TOKEN_ID] * count
        ids += text(text_after)
        rows.append(ids)
    input_ids = torch.tensor(rows)  # [B, S]
    if input_ids.shape[1] == 0:
        raise ValueError("empty sequence: ask for some text or an image")
    out = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    out.update(pixel_kw)
    if arch in _QWEN_ARCHS:
        out["mm_token_type_ids"] = (input_ids == IMAGE_TOKEN_ID).to(torch.int32)
    return out


def tiny_video_inputs(model, arch: str, parts, seed: int = 0, seconds_per_grid: float = 1.0) -> dict:
    """One-row HF inputs of a Qwen model with videos: `parts` in order, each ("text", n),
    ("image",) or ("video", frames). A video of F frames (F even: temporal patches of 2) is
    a (F/2, 8, 8) grid, 16 tokens per temporal patch, written as the processors write it:
    Qwen2.5-VL one run `<vision_start> video x 16*F/2 <vision_end>` (and second_per_grid_ts),
    Qwen3-VL one run per temporal patch, each after a timestamp token (its get_rope_index
    splits the grid per frame and needs text between frames). mm_token_type_ids: 1 image, 2 video.
    """
    if arch not in _QWEN_ARCHS:
        raise ValueError(f"tiny videos are built for {', '.join(_QWEN_ARCHS)}, not {arch!r}")
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    patch_dim = 3 * _QWEN_TPATCH * _QWEN_PATCH * _QWEN_PATCH
    per_step = _QWEN_GRID * _QWEN_GRID // _QWEN_MERGE**2  # tokens per temporal patch

    def text(n: int) -> list[int]:
        return torch.randint(*TEXT_TOKENS, (n,), generator=gen).tolist()

    ids: list[int] = []
    n_images, video_grids = 0, []
    for part in parts:
        kind = part[0]
        if kind == "text":
            ids += text(part[1])
        elif kind == "image":
            n_images += 1
            ids += [IMAGE_TOKEN_ID] * per_step
        elif kind == "video":
            frames = part[1]
            if frames < _QWEN_TPATCH or frames % _QWEN_TPATCH:
                raise ValueError(f"a tiny video needs a positive multiple of {_QWEN_TPATCH} frames, got {frames}")
            steps = frames // _QWEN_TPATCH
            video_grids.append([steps, _QWEN_GRID, _QWEN_GRID])
            if arch == "qwen2_5_vl":
                ids += [VISION_START_ID] + [VIDEO_TOKEN_ID] * (steps * per_step) + [VISION_END_ID]
            else:
                for _ in range(steps):
                    ids += text(1) + [VISION_START_ID] + [VIDEO_TOKEN_ID] * per_step + [VISION_END_ID]
        else:
            raise ValueError(f"unknown part {part!r}; expected ('text', n), ('image',) or ('video', frames)")
    input_ids = torch.tensor([ids])  # [1, S]
    out = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if n_images:
        pixel_kw, _ = _pixels(model, arch, n_images, gen)
        out.update(pixel_kw)
    if video_grids:
        grid = torch.tensor(video_grids)  # [N, 3]
        n_patches = int(grid.prod(-1).sum())
        out["pixel_values_videos"] = torch.randn(n_patches, patch_dim, generator=gen).to(dtype)  # [sum t*h*w, C*T*p*p]
        out["video_grid_thw"] = grid
        if arch == "qwen2_5_vl":
            out["second_per_grid_ts"] = torch.full((len(video_grids),), float(seconds_per_grid))
    out["mm_token_type_ids"] = ((input_ids == IMAGE_TOKEN_ID).int() + 2 * (input_ids == VIDEO_TOKEN_ID).int())
    return out


def left_padded_batch(rows: list[dict]) -> dict:
    """Single-row tiny_inputs dicts of different lengths as one left-padded batch (pad id 0,
    attention_mask 0 at the padding), as a processor with padding_side='left' gives."""
    from ..padding import left_pad_batch

    return left_pad_batch(rows, pad_token_id=0)
