"""VisualLayout: where the visual rows are, as static ints.

Computed outside any graph (from input_ids, by the architecture adapter). Hashable: it keys
the specialized graphs of a compiled model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence
from .errors import VSkipError

Span = tuple[int, int]  # half-open [start, end) row range of one image's visual tokens


class LayoutError(VSkipError, ValueError):
    """A layout is malformed or does not fit the inputs or graph it is used with."""


def spans_from_mask(mask: Sequence[bool | int]) -> tuple[Span, ...]:
    """Maximal runs of true values in one row's visual-token mask."""
    spans: list[Span] = []
    start = None
    for i, v in enumerate(mask):
        if v and start is None:
            start = i
        elif not v and start is not None:
            spans.append((start, i))
            start = None
    if start is not None:
        spans.append((start, len(mask)))
    return tuple(spans)


@dataclass(frozen=True)
class VisualLayout:
    """Sequence length and, per batch row, the visual spans (sorted, disjoint, half-open)."""

    seq_len: int
    spans: tuple[tuple[Span, ...], ...]  # one tuple of spans per batch row

    def __post_init__(self) -> None:
        spans = tuple(tuple((int(a), int(b)) for a, b in row) for row in self.spans)
        object.__setattr__(self, "spans", spans)
        if self.seq_len < 1:
            raise LayoutError(f"seq_len must be >= 1, got {self.seq_len}")
        if not spans:
            raise LayoutError("a layout needs at least one batch row")
        for r, row in enumerate(spans):
            prev_end = 0
            for a, b in row:
                if not (prev_end <= a < b <= self.seq_len):
                    raise LayoutError(
                        f"batch row {r}: span ({a}, {b}) is empty, unsorted, overlapping or "
                        f"outside 0..{self.seq_len}"
                    )
                prev_end = b

    @classmethod
    def from_masks(cls, masks: Iterable[Sequence[bool | int]]) -> "VisualLayout":
        """From one boolean visual-token mask per batch row (equal lengths)."""
        masks = [list(m) for m in masks]
        lengths = {len(m) for m in masks}
        if len(lengths) != 1:
            raise LayoutError(f"batch rows have different lengths {sorted(lengths)}")
        return cls(lengths.pop(), tuple(spans_from_mask(m) for m in masks))

    @classmethod
    def single(cls, seq_len: int, spans: Iterable[Span], batch_size: int = 1) -> "VisualLayout":
        row = tuple(spans)
        return cls(seq_len, (row,) * batch_size)

    @property
    def batch_size(self) -> int:
        return len(self.spans)

    @property
    def is_uniform(self) -> bool:
        """Every batch row has the same spans: one static graph serves the whole batch."""
        return all(row == self.spans[0] for row in self.spans)

    @property
    def row_spans(self) -> tuple[Span, ...]:
        """The spans shared by every batch row; refuses a non-uniform batch."""
        if not self.is_uniform:
            raise LayoutError(f"batch rows have different visual spans: {self.spans}")
        return self.spans[0]

    @property
    def num_visual(self) -> int:
        """Visual rows per batch row (uniform layouts only)."""
        return sum(b - a for a, b in self.row_spans)

    @property
    def has_visual(self) -> bool:
        return any(row for row in self.spans)

    def visual_mask(self) -> list[bool]:
        """Per-position visual flag of the shared row layout."""
        mask = [False] * self.seq_len
        for a, b in self.row_spans:
            mask[a:b] = [True] * (b - a)
        return mask

    def frozen_spans(self, scope: str = "visual") -> tuple[Span, ...]:
        """Rows a skipped operator leaves unchanged: the visual spans, or with
        scope 'prefix_through_visual' everything from row 0 through the last visual row."""
        spans = self.row_spans
        if scope == "visual" or not spans:
            return spans
        if scope == "prefix_through_visual":
            return ((0, spans[-1][1]),)
        raise LayoutError(f"unknown scope {scope!r}")

    def kept_spans(self, scope: str = "visual") -> tuple[Span, ...]:
        """Complement of frozen_spans: rows a skipped operator still computes."""
        kept, prev = [], 0
        for a, b in self.frozen_spans(scope):
            if a > prev:
                kept.append((prev, a))
            prev = b
        if prev < self.seq_len:
            kept.append((prev, self.seq_len))
        return tuple(kept)

    def __str__(self) -> str:
        rows = "; ".join(",".join(f"{a}:{b}" for a, b in row) or "-" for row in self.spans)
        return f"VisualLayout(S={self.seq_len}, B={self.batch_size}, visual=[{rows}])"
