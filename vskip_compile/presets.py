"""Text-decoder dimensions of public models, so FLOPs need no download.

Numbers from the models' published config.json files (text_config). LLaVA's text model is
Vicuna-7B, whose config.json leaves these at LlamaConfig's defaults (max_position_embeddings
4096 from the LLaVA config.json).
"""

from __future__ import annotations

from dataclasses import dataclass

from .flops import DimsError, TextDims


@dataclass(frozen=True)
class Preset:
    name: str
    hf_id: str  # the Hugging Face model these dims come from
    architecture: str  # its HF class name: what adapters stamp into plans
    dims: TextDims
    model_type: str  # config.json model_type: a plan (an imported OpSkip policy) may name it instead
    max_positions: int  # text config max_position_embeddings: the longest prefill

    @property
    def aliases(self) -> tuple[str, ...]:
        """Other architecture names a plan for this model may carry (as adapters accept them)."""
        return (self.model_type,)


_VICUNA_7B = TextDims(hidden=4096, heads=32, kv_heads=32, head_dim=128, ffn=11008, layers=32)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("qwen3-vl-8b", "Qwen/Qwen3-VL-8B-Instruct", "Qwen3VLForConditionalGeneration",
               TextDims(hidden=4096, heads=32, kv_heads=8, head_dim=128, ffn=12288, layers=36), "qwen3_vl", 262144),
        Preset("qwen2.5-vl-7b", "Qwen/Qwen2.5-VL-7B-Instruct", "Qwen2_5_VLForConditionalGeneration",
               TextDims(hidden=3584, heads=28, kv_heads=4, head_dim=128, ffn=18944, layers=28), "qwen2_5_vl", 128000),
        Preset("llava-1.5-7b", "llava-hf/llava-1.5-7b-hf", "LlavaForConditionalGeneration", _VICUNA_7B, "llava", 4096),
        Preset("llava-next-7b", "llava-hf/llava-v1.6-vicuna-7b-hf", "LlavaNextForConditionalGeneration", _VICUNA_7B, "llava_next", 4096),
        Preset("qwen3-vl-30b-a3b", "Qwen/Qwen3-VL-30B-A3B-Instruct", "Qwen3VLMoeForConditionalGeneration",
               TextDims(hidden=2048, heads=32, kv_heads=4, head_dim=128, ffn=6144, layers=48,
                        mlp="moe", experts=128, top_k=8, expert_ffn=768), "qwen3_vl_moe", 262144),
    )
}


def get_preset(name: str) -> Preset:
    """The preset called `name`; an unknown name is refused with the list of known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise DimsError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None
