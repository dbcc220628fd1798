"""Processor for the easy-VQA Qwen3-VL: Qwen2-VL image processor + word-level tokenizer.

Why a subclass of `Qwen3VLProcessor` and not the class itself: in transformers 5.24 the
processor requires a video processor, and without torchvision (not installed here, and not a
dependency of this project) `Qwen3VLProcessor(...)` fails its class check
(`VIDEO_PROCESSOR_MAPPING` is a dummy), and `Qwen3VLVideoProcessor.from_pretrained` raises
"requires the Torchvision library". `EasyVQAQwen3VLProcessor` declares only the image
processor and the tokenizer; everything else (placeholder expansion, `mm_token_type_ids`,
chat template, decoding) is `Qwen3VLProcessor`'s own code. The image processor is the PIL
backend of the Qwen2-VL image processor (`Qwen2VLImageProcessorPil`), the one Qwen3-VL uses,
so the patch order is the one the vision merger expects.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.processing_utils import ProcessorMixin

# Special tokens (ids are their positions: 0..7).
PAD, UNK, IM_START, IM_END = "<pad>", "<unk>", "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
SPECIAL_TOKENS = [PAD, UNK, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]

IMAGE_SIDE = 128  # easy-VQA images are 64x64; upsampled to 128 px
PATCH_SIZE = 8
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class EasyVQAQwen3VLProcessor(Qwen3VLProcessor):
    """`Qwen3VLProcessor` for images and text only (no video processor, see module doc)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = IMAGE_PAD
        self.video_token = VIDEO_PAD
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        self.video_token_id = tokenizer.convert_tokens_to_ids(VIDEO_PAD)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
        self.vision_start_token = VISION_START
        self.vision_end_token = VISION_END
        self.vision_start_token_id = tokenizer.convert_tokens_to_ids(VISION_START)
        self.vision_end_token_id = tokenizer.convert_tokens_to_ids(VISION_END)


def build_vocab(texts) -> dict[str, int]:
    """Word-level vocabulary: special tokens first, then sorted lowercase words and '?'."""
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.Whitespace()
    words = {"user", "assistant", "system"}
    for t in texts:
        words.update(w for w, _ in pre.pre_tokenize_str(t.lower()))
    words -= set(SPECIAL_TOKENS)
    return {tok: i for i, tok in enumerate(SPECIAL_TOKENS + sorted(words))}


def build_processor(vocab: dict[str, int]) -> EasyVQAQwen3VLProcessor:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()  # newlines of the template vanish
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        unk_token=UNK,
        eos_token=IM_END,
        additional_special_tokens=SPECIAL_TOKENS[2:],
        padding_side="left",
        model_max_length=256,
    )
    pixels = IMAGE_SIDE * IMAGE_SIDE
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": pixels, "longest_edge": pixels},
        patch_size=PATCH_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        merge_size=MERGE_SIZE,
    )
    return EasyVQAQwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
