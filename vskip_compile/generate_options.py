"""What CompiledVLM's forward and generate() accept: model inputs, prompts, HF options.

HF generate options this decode loop does not implement are refused by name (never ignored),
keyword arguments that are not inputs of the model's forward are refused as typos, prompts are
checked against the vocabulary and max_position_embeddings, and a model generation_config
that would change HF's greedy search is refused; sampling defaults come from it as in HF.
"""

from __future__ import annotations

from typing import Any

import torch

from .config import CompileError
from .sampling import SAMPLING_DEFAULTS


# Generation options of HF generate() that this decode loop does not implement: refused by name,
# not ignored (every other GenerationConfig field is refused too: see _generation_options).
UNSUPPORTED_GENERATE = (
    "generation_config",
    "num_return_sequences",
    "typical_p",
    "epsilon_cutoff",
    "eta_cutoff",
    "top_h",
    "no_repeat_ngram_size",
    "length_penalty",
    "min_length",
    "min_new_tokens",
    "max_length",
    "bad_words_ids",
    "sequence_bias",
    "suppress_tokens",
    "return_dict_in_generate",
    "output_scores",
    "output_logits",
    "assistant_model",
    "prompt_lookup_num_tokens",
)


# generation_config fields that make HF's greedy search differ from a plain argmax loop.
_GREEDY_CHANGING_CONFIG = (
    "repetition_penalty",
    "no_repeat_ngram_size",
    "min_length",
    "min_new_tokens",
    "bad_words_ids",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "suppress_tokens",
    "begin_suppress_tokens",
    "sequence_bias",
)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def generation_options() -> frozenset[str]:
    """Names of HF GenerationConfig fields: generate() options, not model inputs."""
    from transformers import GenerationConfig

    return frozenset(k for k in GenerationConfig().to_dict() if not k.startswith("_"))


def check_model_inputs(model, inputs: dict[str, Any], where: str) -> None:
    """Refuse keyword arguments that are not inputs of the model's forward, as HF generate
    does: a typo such as `max_new_token=1` would otherwise be ignored."""
    import inspect

    params = inspect.signature(model.forward).parameters
    known = {k for k, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    unknown = sorted(k for k in inputs if k not in known)
    if unknown:
        raise CompileError(
            f"{where}: unknown keyword argument(s) {', '.join(unknown)}: not inputs of "
            f"{type(model).__name__}.forward nor supported generate options (a typo?)"
        )


def check_prompt(model, inputs: dict[str, Any], max_new_tokens: int) -> None:
    """Refuse input_ids that are not a [B, S] integer tensor of the vocabulary, a mask of
    another shape, and a prompt (plus the tokens to generate) longer than the model's
    max_position_embeddings: positions past it are untrained, and the decode cache is
    sized by prompt + new tokens."""
    ids = inputs.get("input_ids")
    if ids is None:
        raise CompileError("CompiledVLM needs input_ids (it finds the visual rows from them)")
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        what = f"a {ids.ndim}-D {ids.dtype} tensor" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise CompileError(f"input_ids must be a 2-D integer tensor [batch, seq_len], got {what}")
    batch, seq_len = ids.shape
    if batch == 0 or seq_len == 0:
        raise CompileError(f"input_ids is empty (shape {list(ids.shape)})")
    text = model.config.get_text_config()
    vocab = getattr(text, "vocab_size", None)
    if vocab is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise CompileError(f"input_ids holds token ids outside the vocabulary 0..{vocab - 1} "
                           f"(min {int(ids.min())}, max {int(ids.max())})")
    mask = inputs.get("attention_mask")
    if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(ids.shape)):
        shape = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise CompileError(f"attention_mask must be a tensor of input_ids' shape {list(ids.shape)}, got {shape}")
    limit = getattr(text, "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len + max(max_new_tokens - 1, 0) > limit:
        if seq_len > limit:
            raise CompileError(f"the prompt has {seq_len} tokens, more than the model's max_position_embeddings {limit}")
        raise CompileError(
            f"max_new_tokens={max_new_tokens} with a {seq_len}-token prompt exceeds the model's "
            f"max_position_embeddings {limit}: at most {limit - seq_len + 1} new tokens"
        )



def sampling_defaults(gen) -> dict[str, Any]:
    """What HF generate samples with when temperature, top_k, top_p, min_p are not passed: the
    model's generation_config, else transformers' global defaults (top_k 50, as HF merges them
    in GenerationMixin._prepare_generation_config)."""
    global_defaults = gen._get_default_generation_params()
    return {k: getattr(gen, k, None) if getattr(gen, k, None) is not None else global_defaults.get(k)
            for k in SAMPLING_DEFAULTS}


def check_generation_config(gen) -> None:
    """Refuse a model generation_config whose logits processors HF would apply to greedy search."""
    from transformers import GenerationConfig

    default = GenerationConfig()
    changed = [k for k in _GREEDY_CHANGING_CONFIG if getattr(gen, k, None) != getattr(default, k, None)]
    if changed:
        raise CompileError(
            f"the model's generation_config sets {', '.join(changed)}: HF generate would apply them, "
            "CompiledVLM.generate (plain greedy) does not"
        )

