"""Where the sequence lives in a tensor, and constant-offset slicing of the kept rows.

`Rows(axis, inner)`: dim `axis` of the tensor has size outer·S·inner, sequence index s at
flat position (o·S + s)·inner + i. A [B, S, D] hidden state is Rows(1); after a view to
[B*S, D] for mm it is Rows(0) with outer = B; a [B, S*H] merge would be Rows(1, inner=H).
Restricting to the kept rows turns that size into outer·S_kept·inner.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import fx

from vskip_compile.layout import Span

from .base import VALUE_META, SkipPassError, aten, fake_mode_of, shape

_SLICE_END = 9223372036854775807


@dataclass(frozen=True)
class Rows:
    """The sequence axis of a tensor and its inner stride (see module doc)."""

    axis: int
    inner: int = 1


@dataclass(frozen=True)
class Geometry:
    """Row spans of one rewrite: the full sequence S and the spans it keeps and freezes."""

    seq_len: int
    kept: tuple[Span, ...]
    frozen: tuple[Span, ...]

    @property
    def kept_len(self) -> int:
        return sum(b - a for a, b in self.kept)

    def outer(self, size: int, rows: Rows, what: str) -> int:
        block = self.seq_len * rows.inner
        if size % block:
            raise SkipPassError(f"{what}: axis {rows.axis} of size {size} does not hold S={self.seq_len} rows x {rows.inner}")
        return size // block

    def scaled(self, size: int) -> int:
        """Size of an axis holding the sequence once the frozen rows are cut."""
        return size // self.seq_len * self.kept_len

    def kept_pieces(self, size: int, rows: Rows, what: str) -> list[tuple[int, int]]:
        """[start, end) ranges of the kept rows along the axis, adjacent ranges merged."""
        outer, inner, s = self.outer(size, rows, what), rows.inner, self.seq_len
        return _merge([((o * s + a) * inner, (o * s + b) * inner) for o in range(outer) for a, b in self.kept])

    def merge_pieces(self, size: int, rows: Rows, what: str) -> list[tuple[str, int, int]]:
        """Pieces ('kept'|'full', start, end) that rebuild the full axis: kept rows from the
        restricted tensor (offsets in its coordinates), frozen rows from the full one."""
        outer, inner, s, sk = self.outer(size, rows, what), rows.inner, self.seq_len, self.kept_len
        spans = sorted([(a, b, True) for a, b in self.kept] + [(a, b, False) for a, b in self.frozen])
        pieces: list[tuple[str, int, int]] = []
        for o in range(outer):
            off = 0
            for a, b, kept in spans:
                if kept:
                    pieces.append(("kept", (o * sk + off) * inner, (o * sk + off + b - a) * inner))
                    off += b - a
                else:
                    pieces.append(("full", (o * s + a) * inner, (o * s + b) * inner))
        merged: list[tuple[str, int, int]] = []
        for src, a, b in pieces:
            if merged and merged[-1][0] == src and merged[-1][2] == a:
                merged[-1] = (src, merged[-1][1], b)
            else:
                merged.append((src, a, b))
        return merged


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in ranges:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


@dataclass
class Builder:
    """Inserts nodes at the graph's insert point with provenance meta and fake values."""

    graph: fx.Graph
    fake_mode: Any = None
    _slices: dict[tuple[fx.Node, Rows], fx.Node] = field(default_factory=dict)

    @classmethod
    def for_graph(cls, graph: fx.Graph) -> "Builder":
        return cls(graph, fake_mode_of(graph))

    def call(self, target: Any, args: tuple, kwargs: dict | None = None, like: fx.Node | None = None) -> fx.Node:
        node = self.graph.call_function(target, tuple(args), dict(kwargs or {}))
        if like is not None:
            node.meta.update({k: v for k, v in like.meta.items() if k not in VALUE_META})
        node.meta["vskip"] = True
        self.set_val(node)
        return node

    def set_val(self, node: fx.Node) -> None:
        if self.fake_mode is None:
            return
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get("val"))
        with self.fake_mode:
            node.meta["val"] = node.target(*args, **kwargs)

    def cat(self, parts: list[fx.Node], dim: int, like: fx.Node) -> fx.Node:
        return parts[0] if len(parts) == 1 else self.call(aten.cat.default, (parts, dim), like=like)

    def slice(self, x: fx.Node, dim: int, start: int, end: int, like: fx.Node) -> fx.Node:
        if start == 0 and end == shape(x)[dim]:
            return x
        return self.call(aten.slice.Tensor, (x, dim, start, end), like=like)

    def slice_rows(self, x: fx.Node, rows: Rows, geo: Geometry) -> fx.Node:
        """x restricted to the kept rows: cat of constant-offset slices along rows.axis."""
        key = (x, rows)
        if key not in self._slices:
            size = shape(x)[rows.axis]
            parts = [self.slice(x, rows.axis, a, b, like=x) for a, b in geo.kept_pieces(size, rows, x.name)]
            self._slices[key] = self.cat(parts, rows.axis, like=x)  # [.., outer*S_kept*inner, ..]
        return self._slices[key]

    def merge_rows(self, kept: fx.Node, full: fx.Node, rows: Rows, geo: Geometry, like: fx.Node) -> fx.Node:
        """Full-size tensor: kept rows from `kept`, frozen rows from `full` (constant-offset cat)."""
        size = shape(full)[rows.axis]
        parts = [
            self.slice(kept if src == "kept" else full, rows.axis, a, b, like=like)
            for src, a, b in geo.merge_pieces(size, rows, like.name)
        ]
        return self.cat(parts, rows.axis, like=like)  # [.., outer*S*inner, ..]

