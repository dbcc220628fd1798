"""Left-padded batches: per-row padding, positions rebased as if each row ran alone.

CompiledVLM runs rows of any layout and length as one left-padded batch: left_padding reads
(and checks) each row's padding from the attention mask, rebase_positions starts each row's
positions at its first real token, last_positions is where decoding continues, pad_left adds
padding rows in front of prefill inputs, and left_pad_batch batches processor outputs of
different lengths (the serving engine's and the tests' batcher).
"""

from __future__ import annotations

import torch

from .archs import PrefillInputs
from .config import CompileError
from .core import rope_position_ids
from .layout import VisualLayout


def left_padding(mask: torch.Tensor | None) -> list[int] | None:
    """Per batch row, how many leading positions a 2D attention mask pads; None when no row is
    padded. Anything but left padding (zeros, then ones to the end) is refused."""
    if mask is None or bool(mask.all()):
        return None
    keep = mask.bool()  # [B, S]
    pads = (~keep).long().cumprod(dim=1).sum(dim=1).tolist()  # leading zeros per row
    for row, pad in enumerate(pads):
        if pad == keep.shape[1] or not bool(keep[row, pad:].all()):
            raise CompileError(
                f"batch row {row}: attention_mask is not left padding (zeros, then ones to the end); "
                "pad decoder prompts on the left (processor padding_side='left')"
            )
    return pads


def left_pad_batch(rows: list[dict[str, torch.Tensor]], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Batch-1 processor outputs of different lengths as one left-padded batch: every [1, S]
    tensor (input_ids, attention_mask, mm_token_type_ids, ...) padded on the left (input_ids
    with pad_token_id, the others with 0: attention_mask 0 marks the padding); other tensors
    (pixel_values, image_grid_thw, ...) concatenated in row order."""
    width = max(int(r["input_ids"].shape[1]) for r in rows)
    out = {}
    for key in rows[0]:
        parts = []
        for r in rows:
            t = r[key]
            seq_len = int(r["input_ids"].shape[1])
            if t.ndim == 2 and t.shape[0] == 1 and t.shape[1] == seq_len and width > seq_len:
                fill = pad_token_id if key == "input_ids" else 0
                t = torch.cat([t.new_full((1, width - seq_len), fill), t], dim=1)  # [1, width]
            parts.append(t)
        out[key] = torch.cat(parts)
    return out


def row_pads(p: PrefillInputs) -> list[int]:
    """Left padding of each batch row of p (zeros when it has none)."""
    return left_padding(p.attention_mask) or [0] * p.inputs_embeds.shape[0]


def rebase_positions(position_ids: torch.Tensor, pads: list[int]) -> torch.Tensor:
    """Position ids [B, S] or [3|4, B, S] with each row's first real token at 0, as the row
    would have alone; padding positions 0 (their rows are never keys)."""
    if not any(pads):
        return position_ids
    seq_len = position_ids.shape[-1]
    first = torch.tensor(pads, device=position_ids.device)  # [B]
    start = position_ids.gather(-1, first.expand(*position_ids.shape[:-1])[..., None])  # [.., B, 1]
    real = torch.arange(seq_len, device=position_ids.device)[None, :] >= first[:, None]  # [B, S]
    return torch.where(real, position_ids - start, torch.zeros_like(position_ids))


def last_positions(position_ids: torch.Tensor, axes: int = 3) -> torch.Tensor:
    """Per row, the position decoding continues from: the last prompt token's, on each M-RoPE
    axis, as HF generate (transformers 5.24) feeds its rotary embedding (checked with a hook on
    Qwen2.5-VL / Qwen3-VL prompts that end on an image and on a video whose temporal ids run past
    the text after it: HF steps from the last token's ids, not from the rope deltas' max + 1).
    [B, S] -> [B, 1]; [3|4, B, S] -> [3, B, 1]."""
    return rope_position_ids(position_ids, axes)[..., -1:]


def pad_left(p: PrefillInputs, n: int) -> PrefillInputs:
    """p with n padding rows in front (zero embeddings, positions and DeepStack; spans shifted)."""

    def rows(x: torch.Tensor) -> torch.Tensor:  # [B, S, D] -> [B, n + S, D]
        return torch.cat([x.new_zeros(x.shape[0], n, x.shape[2]), x], dim=1)

    batch = p.inputs_embeds.shape[0]
    mask = p.attention_mask if p.attention_mask is not None else torch.ones(batch, p.layout.seq_len, dtype=torch.long)
    layout = VisualLayout(p.layout.seq_len + n, tuple(tuple((a + n, b + n) for a, b in row) for row in p.layout.spans),
                          p.layout.kinds)
    return PrefillInputs(
        inputs_embeds=rows(p.inputs_embeds),
        position_ids=torch.cat([p.position_ids.new_zeros(*p.position_ids.shape[:-1], n), p.position_ids], dim=-1),
        deepstack=None if p.deepstack is None else tuple(rows(d) for d in p.deepstack),
        attention_mask=torch.cat([mask.new_zeros(batch, n), mask.to(p.inputs_embeds.device)], dim=1),  # [B, n + S]
        layout=layout,
        # [B, n + S]: the new rows alone in their blocks (ids are row indices: shifted by n)
        blocks=None if p.blocks is None else torch.cat([torch.arange(n).expand(batch, n).to(p.blocks), p.blocks + n], dim=1),
    )

