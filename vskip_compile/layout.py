"""VisualLayout: where the visual rows are, and of which modality, as static ints.

Computed outside any graph (from input_ids, by the architecture adapter). Hashable: it keys
the specialized graphs of a compiled model. Each span is an image's or a video's run of
tokens (`kinds`): a plan may freeze only one modality's rows (plan field `rows`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence
from .errors import VSkipError

Span = tuple[int, int]  # half-open [start, end) row range of one image's visual tokens
KINDS = ("image", "video")  # modality of a span; codes 1 and 2 (0 = text), as HF's mm_token_type_ids
ROWS = ("visual",) + KINDS  # which spans a skip freezes: every visual span, or one modality's


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


def spans_from_codes(codes: Sequence[int]) -> tuple[tuple[Span, ...], tuple[str, ...]]:
    """Maximal runs of one nonzero modality code (1 image, 2 video) in one row, and their kinds.
    An image right after a video (no text between) is a span of its own."""
    spans: list[Span] = []
    kinds: list[str] = []
    start, current = None, 0
    for i, code in enumerate(list(codes) + [0]):
        code = int(code)
        if code not in (0, 1, 2):
            raise LayoutError(f"modality code {code} at position {i}; expected 0 (text), 1 (image) or 2 (video)")
        if code != current and start is not None:
            spans.append((start, i))
            kinds.append(KINDS[current - 1])
            start = None
        if code and start is None:
            start = i
        current = code
    return tuple(spans), tuple(kinds)


@dataclass(frozen=True)
class VisualLayout:
    """Sequence length and, per batch row, the visual spans (sorted, disjoint, half-open)."""

    seq_len: int
    spans: tuple[tuple[Span, ...], ...]  # one tuple of spans per batch row
    kinds: tuple[tuple[str, ...], ...] | None = None  # per row, per span: "image" or "video" (None: all images)

    def __post_init__(self) -> None:
        spans = tuple(tuple((int(a), int(b)) for a, b in row) for row in self.spans)
        object.__setattr__(self, "spans", spans)
        kinds = self.kinds if self.kinds is not None else tuple(("image",) * len(row) for row in spans)
        kinds = tuple(tuple(row) for row in kinds)
        object.__setattr__(self, "kinds", kinds)  # explicit: equal layouts compare and hash equal
        if len(kinds) != len(spans) or any(len(k) != len(s) for k, s in zip(kinds, spans)):
            raise LayoutError(f"kinds {kinds} do not match the spans {spans} (one kind per span)")
        for r, row in enumerate(kinds):
            for kind in row:
                if kind not in KINDS:
                    raise LayoutError(f"batch row {r}: unknown span kind {kind!r}; expected one of {', '.join(KINDS)}")
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
    def from_codes(cls, rows: Iterable[Sequence[int]]) -> "VisualLayout":
        """From per-position modality codes per batch row (0 text, 1 image, 2 video; the values
        of HF's mm_token_type_ids), equal lengths."""
        rows = [list(r) for r in rows]
        lengths = {len(r) for r in rows}
        if len(lengths) != 1:
            raise LayoutError(f"batch rows have different lengths {sorted(lengths)}")
        parsed = [spans_from_codes(r) for r in rows]
        return cls(lengths.pop(), tuple(p[0] for p in parsed), tuple(p[1] for p in parsed))

    @classmethod
    def single(cls, seq_len: int, spans: Iterable[Span], batch_size: int = 1,
               kinds: Iterable[str] | None = None) -> "VisualLayout":
        row = tuple(spans)
        kind_row = tuple(kinds) if kinds is not None else ("image",) * len(row)
        return cls(seq_len, (row,) * batch_size, (kind_row,) * batch_size)

    def row(self, r: int) -> "VisualLayout":
        """Batch row r alone (its spans and their kinds)."""
        return VisualLayout(self.seq_len, (self.spans[r],), (self.kinds[r],))

    @property
    def batch_size(self) -> int:
        return len(self.spans)

    @property
    def is_uniform(self) -> bool:
        """Every batch row has the same spans: one static graph serves the whole batch."""
        return all(row == self.spans[0] for row in self.spans) and all(k == self.kinds[0] for k in self.kinds)

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

    def num_rows(self, rows: str = "visual") -> int:
        """Rows per batch row of the spans `rows` selects (uniform layouts only)."""
        return sum(b - a for a, b in self.selected_spans(rows))

    def selected_spans(self, rows: str = "visual") -> tuple[Span, ...]:
        """The shared row spans of the modality `rows` names ("visual": every span)."""
        if rows not in ROWS:
            raise LayoutError(f"unknown rows {rows!r}; expected one of {', '.join(ROWS)}")
        spans = self.row_spans
        if rows == "visual":
            return spans
        return tuple(s for s, k in zip(spans, self.kinds[0]) if k == rows)

    @property
    def has_visual(self) -> bool:
        return any(row for row in self.spans)

    def visual_mask(self) -> list[bool]:
        """Per-position visual flag of the shared row layout."""
        mask = [False] * self.seq_len
        for a, b in self.row_spans:
            mask[a:b] = [True] * (b - a)
        return mask

    def frozen_spans(self, scope: str = "visual", rows: str = "visual") -> tuple[Span, ...]:
        """Rows a skipped operator leaves unchanged: the spans `rows` selects (every visual
        span, or only the image / video ones), or with scope 'prefix_through_visual'
        everything from row 0 through the last selected row."""
        spans = self.selected_spans(rows)
        if scope == "visual" or not spans:
            return spans
        if scope == "prefix_through_visual":
            return ((0, spans[-1][1]),)
        raise LayoutError(f"unknown scope {scope!r}")

    def kept_spans(self, scope: str = "visual", rows: str = "visual") -> tuple[Span, ...]:
        """Complement of frozen_spans: rows a skipped operator still computes."""
        kept, prev = [], 0
        for a, b in self.frozen_spans(scope, rows):
            if a > prev:
                kept.append((prev, a))
            prev = b
        if prev < self.seq_len:
            kept.append((prev, self.seq_len))
        return tuple(kept)

    def __str__(self) -> str:
        def span(a: int, b: int, kind: str) -> str:
            return f"{a}:{b}" if kind == "image" else f"{a}:{b}{kind[0]}"  # video spans marked "v"

        rows = "; ".join(",".join(span(a, b, k) for (a, b), k in zip(row, kinds)) or "-"
                         for row, kinds in zip(self.spans, self.kinds))
        return f"VisualLayout(S={self.seq_len}, B={self.batch_size}, visual=[{rows}])"
