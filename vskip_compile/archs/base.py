"""Adapter: what the rest of the project needs to know about one HF VLM architecture.

The base class works on any HF `*ForConditionalGeneration` VLM whose language model is a
stack of decoder layers with `self_attn` and `mlp` children and whose config names an image
token id. Architecture classes override only what differs (extra visual token ids, the shape
of default position ids, DeepStack).

How a decoder layer is called (transformers 5.24; what a traceable core reproduces)
-----------------------------------------------------------------------------------
    lm = adapter.language_model(model)            # has .layers, a final norm, .rotary_emb
    p = adapter.prefill_inputs(model, **hf_inputs)
    h = scale_embeddings(p.inputs_embeds, embedding_multiplier(lm))  # [B, S, D] (vskip_compile.outside)
    cos, sin = lm.rotary_emb(h, p.position_ids)                # each [B, S, head_dim]
    mask = create_causal_mask(config=lm.config, inputs_embeds=h, attention_mask=p.attention_mask,
                              cache=None, position_ids=None)   # transformers.masking_utils
    for i, layer in enumerate(lm.layers):
        h = layer(h, attention_mask=mask, position_embeddings=(cos, sin),
                  position_ids=None, cache=None, use_cache=False)   # returns a tensor in 5.24
        if p.deepstack is not None and i < len(p.deepstack):
            h = h + p.deepstack[i]                             # Qwen3-VL only
    logits = adapter.lm_head(model)(final_norm(lm)(h))        # head + the VLM's logit transforms

Inside a layer: `h1 = h + self_attn(hidden_states=input_layernorm(h), attention_mask=mask,
position_embeddings=(cos, sin))[0]`; `h2 = h1 + mlp(post_attention_layernorm(h1))`.
The keyword is `cache=` (not `past_key_values=`) in 5.24. In eager mode with SDPA and no
padding `create_causal_mask` returns None (SDPA's is_causal); under torch.export it is an
explicit boolean [B, 1, S, S] mask. Qwen position ids are M-RoPE ids [3, B, S]: the rotary
embedding takes them as they are. Qwen2.5-VL's model keeps a per-layer-type mask mapping
(`config.layer_types`), all "full_attention" unless sliding windows are configured.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from ..layout import VisualLayout
from ..errors import VSkipError
from ..outside import logits_head
from ..plan import PlanError


class AdapterError(VSkipError, ValueError):
    """A model does not fit what an adapter needs (structure, image token, inputs)."""


@dataclass
class PrefillInputs:
    """Everything the language model's prefill takes, computed outside any graph.

    inputs_embeds: [B, S, D], vision features already merged into the image rows.
    position_ids:  what the language model's rotary embedding takes: [B, S] (llama-like) or
                   M-RoPE ids [3, B, S] (Qwen).
    deepstack:     Qwen3-VL only: deepstack[i] is [B, S, D], the DeepStack features at the
                   visual rows and exactly 0 elsewhere; it is added to the output of decoder
                   layer i, so injection is a plain add. None for other architectures.
    attention_mask: the 2D [B, S] padding mask the caller gave, or None.
    layout:        the visual spans of input_ids.
    blocks:        [B, S] int64, the bidirectional blocks of a model that hands its language
                   model a precomputed mask (Gemma 3's images, vskip_compile.archs.blocks),
                   or None: plain causal attention.
    """

    inputs_embeds: torch.Tensor
    position_ids: torch.Tensor
    deepstack: tuple[torch.Tensor, ...] | None
    attention_mask: torch.Tensor | None
    layout: VisualLayout
    blocks: torch.Tensor | None = None

    def require_causal(self, what: str) -> None:
        """Refuse (AdapterError) these inputs in a path that builds plain causal masks only."""
        if self.blocks is not None:
            raise AdapterError(f"{what} builds causal attention masks only; this model's mask has bidirectional "
                               "blocks (image rows that attend to each other): use vskip_compile.compile")


class _Captured(Exception):
    """Raised by the capture hook to stop the model right before its language model."""

    def __init__(self, kwargs: dict[str, Any]):
        super().__init__("language model inputs captured")
        self.kwargs = kwargs


# config.layer_types entries of decoder layers that are not attention (LFM2, Qwen3.5, hybrids).
NOT_ATTENTION = ("conv", "linear_attention", "mamba")
# Other names HF gives a layer's operator children (LFM2: feed_forward), named in refusals only.
CHILD_ALIASES = {"mlp": ("feed_forward",)}

# HF forward arguments that make no sense for a prefill capture.
_NOT_FORWARDED = ("labels", "logits_to_keep", "return_dict")


class Adapter:
    """Base adapter. Stateless: one instance serves any number of models."""

    name = "base"
    model_types: tuple[str, ...] = ()  # config.model_type values this class is registered for
    # The ONNX vision graphs of this family (export/vision.py): "qwen" (one per patch grid, with
    # DeepStack outputs), "llava" (one per image), "llava_next" (one per view count); None: none.
    vision_export: str | None = None

    # -- structure -------------------------------------------------------------------------
    def language_model(self, model) -> torch.nn.Module:
        """The decoder stack (has .layers, a final norm and usually .rotary_emb). Every layer
        needs `self_attn` and `mlp` children, except a recurrent layer (vskip_compile.core.
        RECURRENT_TYPES: Qwen3.5's linear attention), whose token mixer is another child: it
        needs its `mlp`. A layer of another type (LFM2's short convolutions) is refused, naming
        its type."""
        from ..core import RECURRENT_TYPES

        inner = getattr(model, "model", None)
        lm = getattr(inner, "language_model", None)
        if lm is None and hasattr(model, "get_decoder"):
            lm = model.get_decoder()
        if lm is None or not isinstance(getattr(lm, "layers", None), torch.nn.ModuleList):
            raise AdapterError(f"{type(model).__name__}: no language model with a .layers ModuleList found")
        types = list(getattr(getattr(lm, "config", None), "layer_types", None) or ())
        types += [None] * (len(lm.layers) - len(types))
        for i, (layer, kind) in enumerate(zip(lm.layers, types)):  # the more basic refusal first
            if (kind in NOT_ATTENTION and kind not in RECURRENT_TYPES
                    and not isinstance(getattr(layer, "self_attn", None), torch.nn.Module)):
                raise AdapterError(
                    f"{type(model).__name__}: decoder layer {i} ({type(layer).__name__}) is a {kind!r} layer "
                    "(config.layer_types), not attention: the vskip core carries K/V and linear-attention "
                    "states only, not this layer's state, so neither its prefill nor its decoding is reproduced"
                )
        for i, (layer, kind) in enumerate(zip(lm.layers, types)):
            needed = ("mlp",) if kind in RECURRENT_TYPES else ("self_attn", "mlp")
            missing = [c for c in needed if not isinstance(getattr(layer, c, None), torch.nn.Module)]
            if missing:
                named = [a for c in missing for a in CHILD_ALIASES.get(c, ()) if isinstance(getattr(layer, a, None), torch.nn.Module)]
                also = f" (it has {' / '.join(named)}; vskip finds a layer's operators as self_attn and mlp)" if named else ""
                raise AdapterError(
                    f"{type(model).__name__}: decoder layer {i} ({type(layer).__name__}) has no "
                    f"{' / '.join(missing)} child module{also}"
                )
        return lm

    def layers(self, model) -> torch.nn.ModuleList:
        return self.language_model(model).layers

    def lm_head(self, model) -> torch.nn.Module:
        """The output embeddings, with what the model's forward does to their logits (Granite
        / logits_scaling, Gemma-2-style soft-capping: vskip_compile.outside.LogitsHead)."""
        head = model.get_output_embeddings()
        if head is None:
            raise AdapterError(f"{type(model).__name__} has no output embeddings (lm_head)")
        return logits_head(model, head)

    def text_config(self, model) -> dict[str, Any]:
        """The text config as a plain dict; head_dim filled in from the attention module
        when the config does not name it (Qwen2.5-VL derives it)."""
        d = model.config.get_text_config().to_dict()
        if d.get("head_dim") is None:
            attn = next(layer.self_attn for layer in self.layers(model) if hasattr(layer, "self_attn"))
            d["head_dim"] = int(attn.head_dim)
        return d

    def architecture(self, model) -> str:
        """String stamped into plans: the HF class name."""
        return type(model).__name__

    def architecture_aliases(self, model) -> tuple[str, ...]:
        """Other names a plan may carry for this architecture: HF model_type and, for a
        registered adapter, its name (never "generic", which names no architecture)."""
        names = (getattr(model.config, "model_type", None),) + ((self.name,) if self.model_types else ())
        return tuple(dict.fromkeys(n for n in names if n))

    def check_plan(self, model, plan) -> None:
        """Refuse (PlanError) a plan made for another model, and one that skips the attention
        of a recurrent (linear-attention) layer: its token mixer reads every row into its state."""
        from ..core import recurrent_layers

        plan.check_model(
            self.architecture(model), len(self.layers(model)), self.text_config(model),
            aliases=self.architecture_aliases(model),
        )
        lm = self.language_model(model)
        for i, recurrent in enumerate(recurrent_layers(lm)):
            if recurrent and plan.skips_attn(i):
                raise PlanError(
                    f"the plan has {plan.ops[i]} at layer {i}, a linear-attention layer "
                    f"({lm.config.layer_types[i]!r}): its token mixer needs every row to build its recurrent state, "
                    "so only 'full' or 'skip_ffn' apply there"
                )

    # -- visual rows -----------------------------------------------------------------------
    def image_token_id(self, model) -> int:
        cfg = model.config
        for key in ("image_token_id", "image_token_index"):
            value = getattr(cfg, key, None)
            if isinstance(value, int):
                return value
        raise AdapterError(f"{type(model).__name__}: config names no image_token_id / image_token_index")

    def video_token_id(self, model) -> int | None:
        """The video placeholder id, when the config names one (Qwen, LLaVA-NeXT-Video ...)."""
        cfg = model.config
        for key in ("video_token_id", "video_token_index"):
            value = getattr(cfg, key, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return None

    def visual_token_ids(self, model) -> tuple[int, ...]:
        """Token ids whose rows are visual: the image placeholder, and the video one if any."""
        video = self.video_token_id(model)
        return (self.image_token_id(model),) + (() if video is None else (video,))

    def layout(self, model, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor | None = None) -> VisualLayout:
        """Visual spans of input_ids [B, S] and their modality; zero images give rows with no
        spans. A row is an image row by the image token id, a video row by the video token id;
        `mm_token_type_ids` (the processor's marks: 1 image, 2 video) adds rows the ids do not
        name and must agree with them where both do."""
        if input_ids.ndim != 2:
            raise AdapterError(f"input_ids must be [B, S], got shape {tuple(input_ids.shape)}")
        codes = (input_ids == self.image_token_id(model)).long()  # [B, S]: 0 text, 1 image, 2 video
        video = self.video_token_id(model)
        if video is not None:
            codes = torch.where(input_ids == video, 2, codes)
        if mm_token_type_ids is not None:
            marks = torch.as_tensor(mm_token_type_ids).to(codes.device).long()  # [B, S]
            if marks.shape != codes.shape:
                raise AdapterError(f"mm_token_type_ids has shape {tuple(marks.shape)}, input_ids {tuple(codes.shape)}")
            clash = (codes != 0) & (marks != 0) & (codes != marks)
            if bool(clash.any()):
                r, s = (int(i) for i in clash.nonzero()[0])
                raise AdapterError(f"mm_token_type_ids marks row {r} position {s} as {int(marks[r, s])}, its token id "
                                   f"{int(input_ids[r, s])} says {int(codes[r, s])} (1 image, 2 video)")
            codes = torch.where(codes == 0, marks, codes)
        return VisualLayout.from_codes(codes.tolist())

    # -- prefill inputs --------------------------------------------------------------------
    def capture_language_model_kwargs(self, model, **hf_inputs) -> dict[str, Any]:
        """Run the HF model up to its language model and return the kwargs it would get.

        Reuses HF's own vision tower, feature merge and position-id code for every
        architecture: a forward pre-hook on the language model raises with its kwargs.
        Where the decoder is the model's base model itself and merges the image rows in its own
        forward (Chameleon's ChameleonModel embeds its VQ image tokens), the first decoder
        layer's input is what the layers get: inputs_embeds and position ids from there.
        """
        lm = self.language_model(model)
        captured = self._capture(model, lm, inspect.signature(lm.forward), hf_inputs)
        if captured.get("inputs_embeds") is not None or lm is not getattr(model, "model", None) or not len(lm.layers):
            return captured
        first = self._capture(model, lm.layers[0], inspect.signature(lm.layers[0].forward), hf_inputs)
        embeds, position_ids = first.get("hidden_states"), first.get("position_ids")
        if isinstance(position_ids, torch.Tensor) and position_ids.ndim == 2 and embeds is not None:
            position_ids = position_ids.expand(embeds.shape[0], -1)  # [1, S] -> [B, S]
        return {"inputs_embeds": embeds, "position_ids": position_ids, "attention_mask": hf_inputs.get("attention_mask")}

    @staticmethod
    def _capture(model, module, signature, hf_inputs) -> dict[str, Any]:
        """The kwargs `module` gets when the model runs on hf_inputs (stopped there)."""
        def hook(module, args, kwargs):
            bound = signature.bind_partial(*args, **kwargs).arguments
            extra = bound.pop("kwargs", {})
            raise _Captured({**bound, **extra})

        handle = module.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            model(**{k: v for k, v in hf_inputs.items() if k not in _NOT_FORWARDED})
        except _Captured as captured:
            return captured.kwargs
        finally:
            handle.remove()
        raise AdapterError(f"{type(model).__name__} returned without calling {type(module).__name__}")

    def default_position_ids(self, batch: int, seq_len: int, device) -> torch.Tensor:
        """What the language model computes when given no position ids (no cache): [B, S]."""
        return torch.arange(seq_len, device=device).expand(batch, seq_len)

    def mrope(self, model) -> bool:
        """Whether the rotary embedding takes M-RoPE position ids [3, B, S] (t, h, w) rather
        than [B, S]: the text config's rope parameters name an mrope_section."""
        rope = getattr(model.config.get_text_config(), "rope_parameters", None) or {}
        return "mrope_section" in rope

    def text_position_ids(self, model, positions: torch.Tensor) -> torch.Tensor:
        """Rotary position ids of text rows at `positions` [B, T] (decoding, question suffixes):
        [B, T], or [axes, B, T] with M-RoPE (text rows have equal positions on every axis)."""
        from ..core import rope_axes

        return positions[None].expand(rope_axes(self.language_model(model)), -1, -1) if self.mrope(model) else positions

    def video_rope(self, model) -> dict[str, Any] | None:
        """How the ONNX runner's host gives video frames their M-RoPE ids (export/host.py):
        tokens_per_second (frames spaced by second_per_grid_ts) and split_frames (one grid per
        frame, frames between timestamp text); None: the family takes no video."""
        return None

    def layer_inputs(self, captured: dict[str, Any], inputs_embeds: torch.Tensor):
        """Granite 4 Vision's convention: `deepstack_features` {layer i: [N, D]} added to the rows
        `vision_mask` [B, S, 1] marks *before* decoder layer i (the image rows of inputs_embeds are
        zero; layer 0's features are the image embedding). Returned as (inputs_embeds with layer
        0's added, DeepStack injections after layers 0.. as `deepstack` gives them, or None); the
        same adds in the same order as HF (h + 0 on text rows). Other models: unchanged, None."""
        features = captured.get("deepstack_features")
        if not features:
            return inputs_embeds, None
        mask = captured.get("vision_mask")
        if mask is None:
            raise AdapterError("the language model got per-layer features (deepstack_features) without vision_mask")
        mask = mask.to(inputs_embeds.device)  # [B, S, 1]
        zeros = torch.zeros_like(inputs_embeds)  # [B, S, D]
        full = {int(i): zeros.masked_scatter(mask, f.to(inputs_embeds.device, inputs_embeds.dtype))
                for i, f in features.items()}
        if 0 in full:
            inputs_embeds = inputs_embeds + full[0]
        last = max(full)
        return inputs_embeds, (tuple(full.get(i + 1, zeros) for i in range(last)) or None)

    def deepstack(self, captured: dict[str, Any], inputs_embeds: torch.Tensor):
        """Full-size DeepStack injections [B, S, D] each, or None when the language model gets
        none. HF's convention (Qwen3-VL, GraniteDocling): `deepstack_visual_embeds[i]` [N, D]
        is added to the rows `visual_pos_masks` [B, S] marks after decoder layer i."""
        embeds = captured.get("deepstack_visual_embeds")
        if embeds is None:
            return None
        mask = captured.get("visual_pos_masks")
        if mask is None:
            raise AdapterError("the language model got DeepStack features (deepstack_visual_embeds) without "
                               "visual_pos_masks")
        mask = mask.to(inputs_embeds.device)[..., None]  # [B, S, 1]
        zeros = torch.zeros_like(inputs_embeds)  # [B, S, D]
        # masked_scatter fills the masked rows in row-major order, as HF's h[mask, :] += e does.
        return tuple(zeros.masked_scatter(mask, e.to(inputs_embeds.device, inputs_embeds.dtype)) for e in embeds)

    def prefill_inputs(self, model, **hf_inputs) -> PrefillInputs:
        """Language-model inputs for a prefill of `hf_inputs` (the HF forward's kwargs).

        Runs the vision tower; gradients follow the caller's grad mode.
        """
        input_ids = hf_inputs.get("input_ids")
        if input_ids is None:
            raise AdapterError("prefill_inputs needs input_ids to find the visual rows")
        captured = self.capture_language_model_kwargs(model, **hf_inputs)
        embeds = captured.get("inputs_embeds")
        if embeds is None:
            raise AdapterError(f"{type(model).__name__} called its language model without inputs_embeds")
        embeds, injections = self.layer_inputs(captured, embeds)
        batch, seq_len, _ = embeds.shape  # [B, S, D]
        position_ids = captured.get("position_ids")
        if position_ids is None:
            position_ids = self.default_position_ids(batch, seq_len, embeds.device)
        mask, blocks = captured.get("attention_mask"), None
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.ndim == 2):
            from ..core import attention_windows
            from .blocks import MaskError, attention_blocks

            mask, precomputed = hf_inputs.get("attention_mask"), mask  # the caller's 2D padding mask
            lm = self.language_model(model)
            windows = attention_windows(lm)  # a structure the core does not build: its own CoreError
            try:
                blocks = attention_blocks(lm, precomputed, mask, batch, seq_len, windows)
            except MaskError as e:
                raise AdapterError(f"{type(model).__name__} passes its language model a precomputed attention mask "
                                   f"that the vskip core does not rebuild: {e}") from e
        return PrefillInputs(
            inputs_embeds=embeds,
            position_ids=position_ids,
            deepstack=injections if injections is not None else self.deepstack(captured, embeds),
            attention_mask=mask,
            layout=self.layout(model, input_ids, hf_inputs.get("mm_token_type_ids")),
            blocks=blocks,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
