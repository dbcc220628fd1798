"""Host-side glue of the ONNX runner, in numpy: what the graphs cannot hold because it is
data-dependent (it decides shapes or reads token ids), reimplemented from transformers 5.24
and from vskip_compile (kept_rows, padding) without torch.

- the visual layout of input_ids, and the layout as data the prefill graph takes: kept-row
  indices and validity (twin of vskip_compile.kept_rows.kept_inputs), left padding and
  per-row rebased positions (twin of vskip_compile.padding.rebase_positions),
- Qwen M-RoPE position ids (`get_rope_index`: images, Qwen2.5-VL and Qwen3-VL videos),
- LLaVA-NeXT any-resolution bookkeeping (views per image, unpadding, newline rows),
- scattering vision features into the image-token rows (HF's masked_scatter order).

No torch, no transformers: tested against HF's implementations and the torch originals in
tests/test_export_onnx.py.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

from ..layout import LayoutError, VisualLayout

MIN_ROWS = 2  # vskip_compile.kept_rows.MIN_ROWS: smallest S and K of a polymorphic prefill


def layout_of(input_ids: np.ndarray, visual_ids: Sequence[int], video_ids: Sequence[int] = ()) -> VisualLayout:
    """Visual spans of input_ids [B, S] (rows whose token is one of visual_ids) and their kind
    (video where the token is one of video_ids), per batch row (Adapter.layout)."""
    codes = np.isin(input_ids, np.asarray(visual_ids)).astype(np.int64)  # [B, S]: 0 text, 1 image, 2 video
    codes[np.isin(input_ids, np.asarray(list(video_ids), dtype=np.int64))] = 2
    return VisualLayout.from_codes(codes.tolist())


# -- layout as data ---------------------------------------------------------------------------
def left_padding(attention_mask: np.ndarray | None, batch: int) -> list[int]:
    """Leading padding positions per row of attention_mask [B, S] (all 0 without a mask);
    anything but left padding (zeros, then ones to the end) is refused, naming the row."""
    if attention_mask is None:
        return [0] * batch
    keep = np.asarray(attention_mask).astype(bool)  # [B, S]
    pads = np.cumprod(~keep, axis=1).sum(axis=1).tolist()  # leading zeros per row
    for row, pad in enumerate(pads):
        if pad == keep.shape[1] or not keep[row, pad:].all():
            raise LayoutError(f"batch row {row}: attention_mask is not left padding (zeros, then ones to the end); "
                              "pad prompts on the left (processor padding_side='left')")
    return pads


def kept_inputs(layout: VisualLayout, scope: str = "visual", pads: Sequence[int] | None = None,
                rows: str = "visual") -> tuple[np.ndarray, np.ndarray]:
    """(kept_index [B, K] int64, kept_valid [B, K] bool), K = max(MIN_ROWS, most kept rows):
    per row the rows a skipped operator computes (not visual, or with scope
    'prefix_through_visual' after the last visual row, and not left padding), padded with the
    row's first frozen row (valid False); `rows` selects the modality a plan freezes. Same arrays
    as kept_rows.kept_inputs."""
    if pads is not None and len(pads) != layout.batch_size:
        raise LayoutError(f"{len(pads)} padding counts for a batch of {layout.batch_size} rows")
    if layout.seq_len < MIN_ROWS:
        raise LayoutError(f"a polymorphic prefill needs S >= {MIN_ROWS} rows, got {layout.seq_len} (pad on the left)")
    kept, fillers = [], []
    for r in range(layout.batch_size):
        frozen = np.zeros(layout.seq_len, bool)  # [S]
        frozen[: pads[r] if pads else 0] = True
        for a, b in layout.row(r).frozen_spans(scope, rows):
            frozen[a:b] = True
        kept.append(np.flatnonzero(~frozen))
        fillers.append(int(np.argmax(frozen)))  # first frozen row (0 when none: then no filler is needed)
    k = max(MIN_ROWS, max(len(row) for row in kept))
    index = np.array([np.pad(row, (0, k - len(row)), constant_values=f) for row, f in zip(kept, fillers)], np.int64)
    valid = np.arange(k)[None, :] < np.array([len(row) for row in kept])[:, None]  # [B, K]
    return index, valid


def rebase_positions(position_ids: np.ndarray, pads: Sequence[int]) -> np.ndarray:
    """Position ids [B, S] or [3, B, S] with each row's first real token at 0, as the row would
    have alone; padding positions 0 (padding.rebase_positions)."""
    if not any(pads):
        return position_ids
    first = np.asarray(pads)  # [B]
    start = np.take_along_axis(position_ids, np.broadcast_to(first[:, None], position_ids.shape[:-1] + (1,)), -1)
    real = np.arange(position_ids.shape[-1])[None, :] >= first[:, None]  # [B, S]
    return np.where(real, position_ids - start, 0)


def last_positions(position_ids: np.ndarray) -> np.ndarray:
    """Per row, the last prompt token's position ids (each M-RoPE axis): where HF generate's
    decode continues from (padding.last_positions). [B, S] -> [B, 1]; [3, B, S] -> [3, B, 1]."""
    return position_ids[..., -1:].copy()


# -- Qwen M-RoPE ------------------------------------------------------------------------------
def mrope_position_ids(
    input_ids: np.ndarray,
    mm_token_type_ids: np.ndarray,
    image_grid_thw: np.ndarray | None,
    spatial_merge_size: int,
    attention_mask: np.ndarray | None = None,
    video_grid_thw: np.ndarray | None = None,
    second_per_grid_ts: np.ndarray | None = None,
    tokens_per_second: int | None = None,
    split_video_frames: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2.5-VL / Qwen3-VL `get_rope_index` for text, images and videos: returns
    (position_ids [3, B, S] int64, rope deltas [B, 1] int64).

    A text run continues 1-D positions on all three axes; a visual run of grid (t, h, w) gets
    (t_index * interval, row, col) over its merged (h/m, w/m) grid, offset by the running
    position, and advances it by max(h, w) / m. Images: interval 1. Qwen2.5-VL videos
    (tokens_per_second given): interval tokens_per_second * second_per_grid_ts[video] (1 s when
    not given), truncated to an int as HF's `.long()` does. Qwen3-VL videos (split_video_frames):
    each video grid is t grids of one frame, one per run of video tokens (frames come between
    timestamp text). Padding rows (attention_mask 0) get position 0.
    """
    batch, seq_len = input_ids.shape
    position_ids = np.zeros((3, batch, seq_len), dtype=np.int64)
    deltas = np.zeros((batch, 1), dtype=np.int64)
    grids = {1: iter([] if image_grid_thw is None else np.asarray(image_grid_thw).tolist()), 2: iter(_video_grids(
        video_grid_thw, second_per_grid_ts, tokens_per_second, split_video_frames))}
    for b in range(batch):
        keep = np.ones(seq_len, bool) if attention_mask is None else np.asarray(attention_mask[b]).astype(bool)
        types = np.asarray(mm_token_type_ids[b])[keep].tolist()
        chunks, pos = [], 0
        for kind, group in itertools.groupby(types):
            n = len(list(group))
            if kind == 0:
                chunks.append(np.broadcast_to(np.arange(pos, pos + n), (3, n)))
                pos += n
                continue
            if kind not in grids:
                raise ValueError(f"mm_token_type_ids value {kind}; expected 0 (text), 1 (image) or 2 (video)")
            what = "image" if kind == 1 else "video"
            grid = next(grids[kind], None)
            if grid is None:
                raise ValueError(f"input_ids hold more {what} runs than the {what} grids given")
            (t, h, w), interval = grid if kind == 2 else (grid, 1)
            gh, gw = h // spatial_merge_size, w // spatial_merge_size
            temporal = (np.arange(t, dtype=np.float32 if isinstance(interval, float) else np.int64) * interval)
            tt, hh, ww = np.meshgrid(temporal.astype(np.int64), np.arange(gh), np.arange(gw), indexing="ij")
            chunk = np.stack([tt.ravel() + pos, hh.ravel() + pos, ww.ravel() + pos])  # [3, t*gh*gw]
            if chunk.shape[1] != n:
                raise ValueError(f"an {what} of grid {(t, h, w)} has {chunk.shape[1]} tokens, input_ids hold {n}")
            chunks.append(chunk)
            pos += max(h, w) // spatial_merge_size
        llm = np.concatenate(chunks, axis=1) if chunks else np.zeros((3, 0), np.int64)
        position_ids[:, b, keep] = llm
        deltas[b, 0] = (llm.max() + 1 if llm.size else 0) - len(types)
    return position_ids, deltas


def _video_grids(video_grid_thw, second_per_grid_ts, tokens_per_second, split_frames: bool):
    """Per run of video tokens, its ((t, h, w), temporal interval), in order (see mrope_position_ids)."""
    if video_grid_thw is None:
        return []
    grids = np.asarray(video_grid_thw).tolist()
    if split_frames:  # Qwen3-VL: a (t, h, w) video is t one-frame grids
        return [((1, h, w), 1) for t, h, w in grids for _ in range(t)]
    if tokens_per_second is None:
        raise ValueError("Qwen2.5-VL video positions need tokens_per_second (vision_config)")
    if second_per_grid_ts is None:
        return [(tuple(g), tokens_per_second) for g in grids]  # HF: 1 second per grid when not given
    seconds = np.asarray(second_per_grid_ts, dtype=np.float32).tolist()
    if len(seconds) != len(grids):
        raise ValueError(f"{len(seconds)} second_per_grid_ts values for {len(grids)} videos")
    return [(tuple(g), float(np.float32(tokens_per_second) * np.float32(s))) for g, s in zip(grids, seconds)]


# -- LLaVA-NeXT any-resolution ------------------------------------------------------------------
def select_best_resolution(original_size: Sequence[int], possible: Sequence[Sequence[int]]) -> tuple[int, int]:
    """transformers.image_processing_utils.select_best_resolution: (height, width)."""
    oh, ow = original_size
    best, best_eff, best_waste = None, 0, float("inf")
    for h, w in possible:
        scale = min(w / ow, h / oh)
        eff = min(int(ow * scale) * int(oh * scale), ow * oh)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (h, w), eff, waste
    return best


def anyres_num_views(image_size: Sequence[int], pinpoints: Sequence[Sequence[int]], tile: int) -> int:
    """Views of one image: the base view plus the tiles of its best resolution."""
    h, w = select_best_resolution(image_size, pinpoints)
    return -(-h // tile) * -(-w // tile) + 1


def pack_anyres(
    features: np.ndarray, image_size: Sequence[int], pinpoints, tile: int, side: int, newline: np.ndarray | None
) -> np.ndarray:
    """LlavaNextModel.pack_image_features for one image: features [views, side*side, D] ->
    [tokens, D] (base view, then the unpadded tile grid with a newline row after each row)."""
    if features.shape[0] == 1:
        out = features[0]
        return out if newline is None else np.concatenate([out, newline[None]], 0)
    base, tiles = features[0], features[1:]
    bh, bw = select_best_resolution(image_size, pinpoints)
    gh, gw = bh // tile, bw // tile
    dim = features.shape[-1]
    grid = tiles.reshape(gh, gw, side, side, dim).transpose(4, 0, 2, 1, 3).reshape(dim, gh * side, gw * side)
    oh, ow = image_size
    ch, cw = grid.shape[1:]
    if ow / oh > cw / ch:  # unpad_image: crop the padding the resize to the pinpoint added
        new_h = int(round(oh * (cw / ow), 7))
        pad = (ch - new_h) // 2
        grid = grid[:, pad : ch - pad, :]
    else:
        new_w = int(round(ow * (ch / oh), 7))
        pad = (cw - new_w) // 2
        grid = grid[:, :, pad : cw - pad]
    if newline is not None:
        nl = np.broadcast_to(newline[:, None, None], (dim, grid.shape[1], 1))
        grid = np.concatenate([grid, nl], axis=2)  # [D, H', W'+1]
    return np.concatenate([base, grid.reshape(dim, -1).T], axis=0)


# -- merging ------------------------------------------------------------------------------------
def scatter_rows(embeds: np.ndarray, mask: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """embeds [B, S, D] with rows [N, D] written into the True positions of mask [B, S] in
    row-major order (HF's masked_scatter); refuses a count mismatch."""
    n = int(mask.sum())
    if n != rows.shape[0]:
        raise ValueError(f"input_ids hold {n} image tokens but the vision encoder gave {rows.shape[0]} features")
    out = embeds.copy()
    out[mask] = rows.astype(embeds.dtype, copy=False)
    return out
