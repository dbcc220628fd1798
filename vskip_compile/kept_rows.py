"""Layout as data: the kept-row inputs of a layout-polymorphic prefill graph, and their marker.

One compiled prefill serves every layout because the layout enters the graph as tensors:

    kept_index [B, K] int64  per batch row, the rows a skipped operator still computes (its
                             text rows), padded to the batch's K with one of that row's
                             frozen rows (a visual or padding row);
    kept_valid [B, K] bool   False at those padding entries: their results are dropped.

`torch.ops.vskip.kept_rows(x, kept_index, kept_valid)` marks them in the graph (DecoderCore
calls it on its input embeddings): eagerly it returns a copy of x (custom ops may not alias),
the skip passes find it, read the index and validity nodes from its arguments and replace it
by x. K >= 2 and S >= 2 always (`MIN_ROWS`): torch specializes sizes 0 and 1, so a size-1
kept count would compile a graph of its own.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .layout import LayoutError, VisualLayout

MIN_ROWS = 2  # smallest sequence length and kept count a polymorphic graph is traced for


@torch.library.custom_op("vskip::kept_rows", mutates_args=())
def kept_rows(x: torch.Tensor, kept_index: torch.Tensor, kept_valid: torch.Tensor) -> torch.Tensor:
    """Identity on x that names the graph's kept-row inputs (see module doc)."""
    return x.clone()


@kept_rows.register_fake
def _(x, kept_index, kept_valid):
    # the index belongs to x's batch: one batch symbol for both (sizes traced apart otherwise)
    torch._check(kept_index.shape[0] == x.shape[0])
    torch._check(kept_valid.shape[0] == x.shape[0])
    torch._check(kept_valid.shape[1] == kept_index.shape[1])
    return torch.empty_like(x)


def frozen_rows(layout: VisualLayout, scope: str = "visual", pads: Sequence[int] | None = None,
                rows: str = "visual") -> list[set[int]]:
    """Per batch row, the rows a skipped operator leaves unchanged: its visual rows of the
    modality `rows` selects (or, with scope 'prefix_through_visual', every row through the last
    of them) and its left padding."""
    out = []
    for r in range(layout.batch_size):
        pad = pads[r] if pads else 0
        frozen = {i for a, b in layout.row(r).frozen_spans(scope, rows) for i in range(a, b)}
        out.append(frozen | set(range(pad)))
    return out


def kept_inputs(
    layout: VisualLayout, scope: str = "visual", pads: Sequence[int] | None = None, device=None, rows: str = "visual"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept_index [B, K], kept_valid [B, K]) of a layout, K = max(MIN_ROWS, most kept rows).

    A row with fewer kept rows is padded with its first frozen row (valid False): such a row
    has one, since K <= S and a row keeping all S rows needs no padding.
    """
    if pads is not None and len(pads) != layout.batch_size:
        raise LayoutError(f"{len(pads)} padding counts for a batch of {layout.batch_size} rows")
    if layout.seq_len < MIN_ROWS:
        raise LayoutError(f"a polymorphic prefill needs S >= {MIN_ROWS} rows, got {layout.seq_len} (pad on the left)")
    frozen = frozen_rows(layout, scope, pads, rows)
    kept = [[i for i in range(layout.seq_len) if i not in f] for f in frozen]
    k = max(MIN_ROWS, max(len(row) for row in kept))
    index, valid = [], []
    for row, f in zip(kept, frozen):
        filler = min(f) if f else 0
        index.append(row + [filler] * (k - len(row)))
        valid.append([True] * len(row) + [False] * (k - len(row)))
    return (
        torch.tensor(index, dtype=torch.int64, device=device),  # [B, K]
        torch.tensor(valid, dtype=torch.bool, device=device),  # [B, K]
    )


def mark_polymorphic(args: tuple[torch.Tensor, ...], batched: bool) -> None:
    """Mark the sizes a polymorphic prefill is traced symbolic in: S on every sequence axis,
    K on the kept-row inputs, and the batch when there is more than one row.

    args: (inputs_embeds [B, S, D], position_ids [.., B, S], kept_index [B, K], kept_valid [B, K],
    attention_mask [B, S], *deepstack [B, S, D], blocks [B, S] if any)."""
    embeds, position_ids, kept_index, kept_valid, mask, *deepstack = args
    for x, seq_axis in [(embeds, 1), (position_ids, position_ids.ndim - 1), (mask, 1), *[(d, 1) for d in deepstack]]:
        torch._dynamo.mark_dynamic(x, seq_axis)
        if batched:
            torch._dynamo.mark_dynamic(x, seq_axis - 1)
    for x in (kept_index, kept_valid):
        torch._dynamo.mark_dynamic(x, 1)
        if batched:
            torch._dynamo.mark_dynamic(x, 0)


def no_duck_sizes():
    """Tracing without duck sizing: equal example sizes (a text-only row keeps K = S rows)
    must not become one symbol, or the next layout would fail the guard."""
    return torch.fx.experimental._config.patch(use_duck_shape=False)
