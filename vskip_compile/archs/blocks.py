"""Bidirectional attention blocks: a model's own precomputed mask, as one id per row.

Some VLMs hand their language model a precomputed mask (a mapping per layer type, or one 4D
tensor) in which the rows of one image attend to each other in both directions (Gemma 3,
ShieldGemma 2: `token_type_ids`), or a whole prefix does (PaliGemma). The core rebuilds such a
mask from `blocks` [B, S], one id per row (vskip_compile.core.block_mask): query q sees key k
when k <= q or blocks[q] == blocks[k], windowed on sliding layers; a row alone in its block is
plain causal. The ids are read off the model's mask (the last key each row sees), and the
rebuilt mask is checked equal to the model's on every real query row of every layer: a mask
of any other form is refused, naming the layer and the first entry that differs.

Semantics under a plan: a skipped operator's kept query rows take their rows of this mask
(the model's own mask restricted to them); keys and values stay on every row.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import VSkipError


class MaskError(VSkipError, ValueError):
    """A precomputed attention mask the core does not rebuild."""


def allowed(mask: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
    """mask (boolean, or additive float: 0 allowed, a large negative not) as boolean [B, 1, S, S]."""
    ok = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    if ok.ndim != 4 or ok.shape[-2:] != (seq_len, seq_len):
        raise MaskError(f"a precomputed attention mask of shape {tuple(mask.shape)}; expected [B, 1, {seq_len}, {seq_len}]")
    return ok.expand(batch, 1, seq_len, seq_len)


def layer_masks(language_model: nn.Module, mask) -> list[torch.Tensor | None]:
    """Per decoder layer, the mask the model hands it: from a mapping by layer type (None there:
    HF's own causal fast path), or one tensor for every layer."""
    n = len(language_model.layers)
    if isinstance(mask, torch.Tensor):
        return [mask] * n
    if not isinstance(mask, dict):
        raise MaskError(f"a precomputed attention mask of type {type(mask).__name__}; expected a tensor or a mapping "
                        "of layer type to tensor")
    types = list(getattr(language_model.config, "layer_types", None) or ["full_attention"] * n)[:n]
    missing = sorted(set(types) - set(mask))
    if missing:
        raise MaskError(f"the mask mapping has no entry for layer type(s) {missing} (it has {sorted(mask)})")
    for t in types:
        if mask[t] is not None and not isinstance(mask[t], torch.Tensor):
            raise MaskError(f"the mask for {t!r} layers is a {type(mask[t]).__name__}; expected a tensor "
                            "(SDPA or eager attention)")
    return [mask[t] for t in types]


def attention_blocks(language_model: nn.Module, mask, padding: torch.Tensor | None, batch: int, seq_len: int,
                     windows: tuple[int | None, ...]) -> torch.Tensor | None:
    """blocks [B, S] (int64) for the model's precomputed `mask`, or None when it is plain causal;
    `padding` [B, S] the 2D padding mask (1 real, 0 padding) or None, `windows` per layer
    (vskip_compile.core.attention_windows). Raises MaskError when no blocks rebuild the mask."""
    from ..core import block_mask, causal_mask, windowed

    per_layer = layer_masks(language_model, mask)
    given = {i: allowed(m, batch, seq_len) for i, m in enumerate(per_layer) if m is not None}  # [B, 1, S, S] each
    if not given:
        return None
    first = next(iter(given.values()))
    real = (torch.ones(batch, seq_len, dtype=torch.bool) if padding is None else padding.bool()).to(first.device)
    rows = torch.arange(seq_len, device=real.device)  # [S]
    full = [a for i, a in given.items() if windows[i] is None]
    seen = (full or [first])[0][:, 0]  # [B, S, S]: a window cuts past keys only, never the last one
    last = torch.where(seen, rows, -1).amax(dim=-1)  # [B, S]: the last key each row sees
    blocks = torch.where(real, last, rows.expand(batch, seq_len))  # padding rows: alone in their block
    if bool((real & (blocks < rows)).any()):
        b, q = (int(v) for v in (real & (blocks < rows)).nonzero()[0])
        raise MaskError(f"batch row {b}, query {q} does not see itself in the precomputed attention mask")
    if bool((blocks == rows).all()):
        blocks = None
    ours_all = causal_mask(seq_len, real.device) if blocks is None else block_mask(blocks)  # [1 or B, 1, S, S]
    ours_all = ours_all & real[:, None, None, :]  # never a padding key
    types = getattr(language_model.config, "layer_types", None)
    for i in range(len(per_layer)):
        theirs = given[i] if i in given else windowed(causal_mask(seq_len, real.device), windows[i])  # None: HF's causal
        ours = windowed(ours_all, windows[i])
        differ = (ours != (theirs & real[:, None, None, :])) & real[:, None, :, None]  # real query rows
        if bool(differ.any()):
            b, _, q, k = (int(v) for v in differ.nonzero()[0])
            kind = f" ({types[i]})" if types else ""
            raise MaskError(
                f"decoder layer {i}{kind}: the model's attention mask is neither causal nor causal with "
                f"bidirectional blocks (batch row {b}: query {q}, key {k} is {'allowed' if bool(theirs[b, 0, q, k]) else 'masked'} "
                f"there, the rebuilt mask says otherwise)"
            )
    return blocks
