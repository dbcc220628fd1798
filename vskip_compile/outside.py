"""What HF does outside the decoder layers, reproduced wherever vskip calls the layers itself.

DecoderCore, DecodeStep, the token-dropping baselines and the shared-prefix harness call the
decoder layers, the final norm and the head themselves, so what a HF forward does around them
is done here, in HF's order and dtype:

- the text model's forward scales its input embeddings (Granite: `inputs_embeds *
  embedding_multiplier`, in the embeddings' dtype, before the first layer): `scale_embeddings`,
  applied to what the adapter captured at the text model's input and to decoded tokens'
  embeddings (an ONNX / TensorRT graph holds it: the host feeds unscaled embeddings);
- the text model's final norm, `final_norm` (`norm`, or Persimmon's `final_layernorm`), and which
  layers it gives the rotary embedding, `rotary_layers` (MuseGlimmer's NoPE layers get None);
- the VLM's forward transforms lm_head's logits, in the logits' dtype: MuseGlimmer `logits *
  output_multiplier`, Granite `logits / logits_scaling`, Gemma-2-style soft-capping
  `tanh(logits / cap) * cap`, in that order, then Chameleon's forbidden tokens (its VQ image
  codes: `logits[..., vocabulary_mapping.image_tokens] = dtype min`): `LogitsHead`, which
  `Adapter.lm_head` returns in place of the bare head when there is something to apply.

A config field acts where the forward that HF runs reads it (the text model's forward for the
embeddings, the VLM class's for the logits): its source names it. The config alone does not
say: Cohere2-Vision's text config carries a `logit_scale` its forward never applies, LLaVA-NeXT
over a Granite text model a `logits_scaling` it never applies. Fields known to act outside the
layers that are not reproduced (`NOT_REPRODUCED`) are refused by name where a forward reads them.
"""

from __future__ import annotations

import functools
import inspect
import re

import torch
from torch import nn

from .errors import VSkipError


class OutsideLayersError(VSkipError, NotImplementedError):
    """A model applies something outside its decoder layers that vskip does not reproduce."""


# field -> the value that means "not applied"
EMBEDDING_FIELDS = {"embedding_multiplier": 1.0}  # read by the text model's forward
LOGIT_FIELDS = {"output_multiplier": 1.0, "logits_scaling": 1.0, "final_logit_softcapping": None}  # the VLM's
NOT_REPRODUCED = {"logit_scale": 1.0}  # Cohere's `logits * logit_scale` (no tiny VLM applies it to test against)
FINAL_NORMS = ("norm", "final_layernorm")  # the text model's final norm, by the names HF gives it


@functools.lru_cache(maxsize=None)
def reads(owner: type, field: str) -> bool:
    """Whether owner.forward's source names `field` (decorators unwrapped)."""
    try:
        source = inspect.getsource(owner.forward)
    except (OSError, TypeError) as e:
        raise OutsideLayersError(f"cannot read the source of {owner.__name__}.forward to tell whether it "
                                 f"applies config.{field}") from e
    return re.search(rf"\b{field}\b", source) is not None


def _applied(owner: type, config, fields: dict) -> dict:
    """{field: value} of the fields with a non-neutral value in config that owner.forward reads;
    refuses (OutsideLayersError) a NOT_REPRODUCED field it reads."""
    for field, neutral in NOT_REPRODUCED.items():
        value = getattr(config, field, neutral)
        if value not in (neutral, None) and reads(owner, field):
            raise OutsideLayersError(f"{owner.__name__}: config.{field} = {value!r} is applied outside the decoder "
                                     "layers, which vskip does not reproduce")
    out = {}
    for field, neutral in fields.items():
        value = getattr(config, field, neutral)
        if value != neutral and value is not None and reads(owner, field):
            out[field] = value
    return out


def embedding_multiplier(language_model: nn.Module) -> float:
    """What the text model's forward multiplies its input embeddings by (1.0: nothing)."""
    return _applied(type(language_model), language_model.config, EMBEDDING_FIELDS).get("embedding_multiplier", 1.0)


def scale_embeddings(x: torch.Tensor, multiplier: float) -> torch.Tensor:
    """x [B, S, D] as the text model's first layer sees it (Granite: x * embedding_multiplier)."""
    return x if multiplier == 1.0 else x * multiplier


def final_norm(language_model: nn.Module) -> nn.Module | None:
    """The text model's final norm module (FINAL_NORMS), or None."""
    for name in FINAL_NORMS:
        module = getattr(language_model, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


class LogitsHead(nn.Module):
    """lm_head followed by what the VLM's forward does to its logits, in HF's order and in the
    logits' dtype (python scalars keep it): * output_multiplier, / logits_scaling, soft-cap, the
    forbidden token ids' logits set to the dtype's minimum."""

    def __init__(self, head: nn.Module, output_multiplier: float = 1.0, logits_scaling: float = 1.0,
                 final_logit_softcapping: float | None = None, forbidden: tuple[int, ...] = ()):
        super().__init__()
        self.head = head
        self.output_multiplier = output_multiplier
        self.logits_scaling = logits_scaling
        self.final_logit_softcapping = final_logit_softcapping
        self.register_buffer("forbidden", torch.tensor(list(forbidden), dtype=torch.long), persistent=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.head(h)  # [.., V]
        if self.output_multiplier != 1.0:
            logits = logits * self.output_multiplier
        if self.logits_scaling != 1.0:
            logits = logits / self.logits_scaling
        cap = self.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        if self.forbidden.numel():
            logits = logits.index_fill(-1, self.forbidden.to(logits.device), torch.finfo(logits.dtype).min)
        return logits

    def extra_repr(self) -> str:
        return (f"output_multiplier={self.output_multiplier}, logits_scaling={self.logits_scaling}, "
                f"final_logit_softcapping={self.final_logit_softcapping}, forbidden={self.forbidden.numel()} ids")


def forbidden_tokens(model: nn.Module) -> tuple[int, ...]:
    """Token ids whose logits the VLM's forward sets to the dtype's minimum: Chameleon's image
    codes (`logits[:, :, self.model.vocabulary_mapping.image_tokens] = finfo.min`), where its
    forward names vocabulary_mapping (Emu3 has the mapping and generates image codes)."""
    mapping = getattr(getattr(model, "model", None), "vocabulary_mapping", None)
    if mapping is None or not reads(type(model), "vocabulary_mapping"):
        return ()
    return tuple(int(t) for t in mapping.image_tokens)


def logits_head(model: nn.Module, head: nn.Module) -> nn.Module:
    """head, or a LogitsHead around it when the model's forward transforms its logits."""
    applied = _applied(type(model), model.config.get_text_config(), LOGIT_FIELDS)
    forbidden = forbidden_tokens(model)
    return LogitsHead(head, **applied, forbidden=forbidden) if applied or forbidden else head


def rotary_layers(language_model: nn.Module) -> tuple[bool, ...]:
    """Per decoder layer, whether the text model's forward gives it the rotary embedding:
    MuseGlimmer passes None to its NoPE layers (config.layer_rope_theta[i] == 0). Layers that
    drop it themselves (SmolLM3's no_rope_layers, inside attention) need nothing here."""
    n = len(language_model.layers)
    theta = getattr(language_model.config, "layer_rope_theta", None)
    if not theta or not reads(type(language_model), "layer_rope_theta"):
        return (True,) * n
    if len(theta) < n:
        raise OutsideLayersError(f"{type(language_model).__name__}: config.layer_rope_theta has {len(theta)} entries "
                                 f"for {n} decoder layers")
    return tuple(bool(t) for t in theta[:n])
