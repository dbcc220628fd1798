"""Where the sequence lives in a tensor, and how the kept rows are cut out and merged back.

`Rows(axis, inner)`: dim `axis` of the tensor has size outer·S·inner, sequence index s at
flat position (o·S + s)·inner + i. A [B, S, D] hidden state is Rows(1); after a view to
[B*S, D] for mm it is Rows(0) with outer = B; a [B, S*H] merge would be Rows(1, inner=H).
Restricting to the kept rows turns that size into outer·S_kept·inner.

Two geometries cut and merge rows: `IndexGeometry` (layout as data: gather through the
graph's kept-row index, scatter back; S and K may be symbolic) and `Geometry` (one static
layout: constant-offset slices and cats).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
from torch import fx

from vskip_compile.layout import Span

from .base import (VALUE_META, PassContext, Size, SkipPassError, aten, divides, fake_mode_of, is_kept_rows_marker,
                   quotient, shape, tensor_val)


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

    def cut(self, b: "Builder", x: fx.Node, rows: Rows) -> fx.Node:
        """x restricted to the kept rows: cat of constant-offset slices along rows.axis."""
        size = shape(x)[rows.axis]
        parts = [b.slice(x, rows.axis, a, e, like=x) for a, e in self.kept_pieces(size, rows, x.name)]
        return b.cat(parts, rows.axis, like=x)  # [.., outer*S_kept*inner, ..]

    def merge(self, b: "Builder", kept: fx.Node, full: fx.Node, rows: Rows, like: fx.Node) -> fx.Node:
        """Full-size tensor: kept rows from `kept`, frozen rows from `full` (constant-offset cat)."""
        size = shape(full)[rows.axis]
        parts = [
            b.slice(kept if src == "kept" else full, rows.axis, a, e, like=like)
            for src, a, e in self.merge_pieces(size, rows, like.name)
        ]
        return b.cat(parts, rows.axis, like=like)  # [.., outer*S*inner, ..]


@dataclass(frozen=True)
class IndexGeometry:
    """Layout as data: the graph's kept-row index [B, K] and validity [B, K] (the arguments of
    its `vskip.kept_rows` marker), S and K possibly symbolic, B = 1 or a batch symbol.

    A tensor's kept rows are gathered through the index; merging scatters the kept rows into
    the residual, entries that only pad a row to K writing the residual's own value back.
    """

    seq_len: Size
    kept_len: Size
    batch: Size
    index: fx.Node
    valid: fx.Node
    frozen: bool = True  # frozen rows are data: every skipped operator is rewritten
    kept: bool = True  # K >= 1 always (a row keeping nothing is all padding entries)

    @classmethod
    def from_marker(cls, marker: fx.Node) -> "IndexGeometry":
        x, index, valid = marker.args[:3]
        batch, kept = shape(index)
        seq = shape(x)[1]
        if isinstance(batch, int) and batch > 1:
            raise SkipPassError(
                f"{marker.name}: a static batch of {batch} rows: trace layout-polymorphic graphs with batch 1 or a "
                "symbolic batch size, so the batch axis of every cut tensor is known"
            )
        return cls(seq, kept, batch, index, valid)

    def outer(self, size: Size, rows: Rows, what: str) -> Size:
        block = self.seq_len * rows.inner
        if not divides(block, size):
            raise SkipPassError(f"{what}: axis {rows.axis} of size {size} does not hold S={self.seq_len} rows x {rows.inner}")
        outer = quotient(size, block)
        if outer != 1 and outer != self.batch:
            raise SkipPassError(f"{what}: axis {rows.axis} holds {outer} sequences, neither one nor the batch ({self.batch})")
        return outer

    def scaled(self, size: Size) -> Size:
        return quotient(size, self.seq_len) * self.kept_len

    def cut(self, b: "Builder", x: fx.Node, rows: Rows) -> fx.Node:
        """x's kept rows, gathered through the index: [.., outer*K*inner, ..].

        The axis is split into [outer, S, inner] (outer = 1, or the batch folded in), and the
        S dim gathered with the index broadcast over everything but the batch, whose axis is
        the split's outer dim (folded) or axis 0 (size B, or 1 for a tensor every batch row shares).
        """
        xs, axis = list(shape(x)), rows.axis
        if x.target is aten.slice.Tensor and x.args[1] % len(xs) != axis and len(x.args[0].meta["val"].shape) == len(xs):
            # a slice along another dim (CUDA SDPA's bias, padded to an aligned width then cut):
            # gather the padded tensor and slice again, so the kernel keeps its aligned strides
            return b.call(aten.slice.Tensor, (self.cut(b, x.args[0], rows), *x.args[1:]), like=x)
        outer = self.outer(xs[axis], rows, x.name)
        if outer != 1:
            batch_axis = axis  # of the split below
        elif self.batch == 1:
            batch_axis = None
        elif axis > 0 and xs[0] in (1, self.batch):
            batch_axis = 0
        else:
            raise SkipPassError(f"{x.name} {tuple(xs)}: its sequence axis {axis} has no batch axis of size {self.batch} or 1")
        whole = outer == 1 and rows.inner == 1  # the axis is the sequence itself: nothing to split
        if whole:
            v, split, seq = x, xs, axis
        else:
            split = xs[:axis] + [outer, self.seq_len, rows.inner] + xs[axis + 1 :]
            v, seq = b.call(aten.reshape.default, (x, split), like=x), axis + 1  # [.., outer, S, inner, ..]
        if batch_axis is not None and split[batch_axis] == 1:  # shared by every batch row: the kept rows differ per row
            split = [self.batch if d == batch_axis else size for d, size in enumerate(split)]
            v = b.call(aten.expand.default, (v, split), like=x)
        view = [1] * len(split)
        view[seq] = self.kept_len
        if batch_axis is not None:
            view[batch_axis] = self.batch
        index = b.call(aten.view.default, (self.index, view), like=x)  # [B, K] placed at (batch, S)
        index = b.call(aten.expand.default, (index, [self.kept_len if d == seq else size for d, size in enumerate(split)]), like=x)
        out = b.call(aten.gather.default, (v, seq, index), like=x)  # the split with S -> K
        if whole:
            return out
        merged = xs[:axis] + [outer * self.kept_len * rows.inner] + xs[axis + 1 :]
        return b.call(aten.reshape.default, (out, merged), like=x)  # [.., outer*K*inner, ..]

    def merge(self, b: "Builder", kept: fx.Node, full: fx.Node, rows: Rows, like: fx.Node) -> fx.Node:
        """The residual [B, S, D] with its kept rows replaced by `kept` [B, K, D]; entries that
        only pad a row to K point at a frozen row and write that row's own value back."""
        if rows.axis != 1 or len(shape(full)) != 3:
            raise SkipPassError(f"{like.name}: merging expects the residual stream [B, S, D], got {shape(full)}")
        own = b.slice_rows(full, rows, self)  # [B, K, D]
        valid = b.call(aten.unsqueeze.default, (self.valid, -1), like=like)  # [B, K, 1]
        src = b.call(aten.where.self, (valid, kept, own), like=like)  # [B, K, D]
        index = b.call(aten.unsqueeze.default, (self.index, -1), like=like)
        index = b.call(aten.expand.default, (index, [-1, -1, shape(full)[2]]), like=like)  # [B, K, D]
        return b.call(aten.scatter.src, (full, 1, index, src), like=like)  # [B, S, D]


def geometry(graph: fx.Graph, ctx: PassContext) -> Geometry | IndexGeometry:
    """The static layout's spans, or (layout as data) the graph's kept-row marker."""
    if ctx.layout is not None:
        lay, scope = ctx.layout, ctx.plan.scope
        return Geometry(lay.seq_len, lay.kept_spans(scope), lay.frozen_spans(scope))
    markers = [n for n in graph.nodes if is_kept_rows_marker(n)]
    if len(markers) != 1:
        raise SkipPassError(
            f"layout as data needs exactly one vskip.kept_rows marker in the graph, found {len(markers)}: "
            "trace a DecoderCore called with kept_index / kept_valid, or pass a static VisualLayout"
        )
    return IndexGeometry.from_marker(markers[0])


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
    _symbols: dict[Any, fx.Node] = field(default_factory=dict)

    @classmethod
    def for_graph(cls, graph: fx.Graph) -> "Builder":
        return cls(graph, fake_mode_of(graph))

    def call(self, target: Any, args: tuple, kwargs: dict | None = None, like: fx.Node | None = None) -> fx.Node:
        node = self.graph.call_function(target, _sizes(tuple(args), self), _sizes(dict(kwargs or {}), self))
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

    def slice_rows(self, x: fx.Node, rows: Rows, geo) -> fx.Node:
        """x restricted to the kept rows (memoized per node and axis)."""
        key = (x, rows)
        if key not in self._slices:
            self._slices[key] = geo.cut(self, x, rows)
        return self._slices[key]

    def merge_rows(self, kept: fx.Node, full: fx.Node, rows: Rows, geo, like: fx.Node) -> fx.Node:
        """Full-size tensor: kept rows from `kept`, frozen rows from `full`."""
        return geo.merge(self, kept, full, rows, like)

    # -- symbolic sizes ---------------------------------------------------------------------
    def size(self, e: Size) -> Any:
        """An int, or a node computing the symbolic size e (from the graph's own size symbols)."""
        if isinstance(e, int):
            return e
        if e.is_Integer:
            return int(e)
        if e.is_Symbol:
            return self._symbol(e)
        if e.is_Mul or e.is_Add:
            fn = operator.mul if e.is_Mul else operator.add
            terms = [self.size(t) for t in e.args]
            out = terms[0]
            for t in terms[1:]:
                out = self._sym_node(fn, (out, t))
            return out
        raise SkipPassError(f"cannot emit the symbolic size {e}")

    def _symbol(self, sym: sympy.Symbol) -> fx.Node:
        if sym in self._symbols:
            return self._symbols[sym]
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        for n in placeholders:  # AOT graphs take their size symbols as SymInt inputs
            v = n.meta.get("val")
            if isinstance(v, torch.SymInt) and v.node.expr == sym:
                self._symbols[sym] = n
                return n
        for n in placeholders:
            v = n.meta.get("val")
            if isinstance(v, torch.Tensor):
                for d, size in enumerate(v.shape):
                    if isinstance(size, torch.SymInt) and size.node.expr == sym:
                        with self.graph.inserting_after(placeholders[-1]):
                            node = self._sym_node(aten.sym_size.int, (n, d))
                        self._symbols[sym] = node
                        return node
        raise SkipPassError(f"no graph input has a dimension of symbolic size {sym}")

    def _sym_node(self, target: Any, args: tuple) -> fx.Node:
        node = self.graph.call_function(target, args)
        node.meta["vskip"] = True
        self.set_val(node)
        return node


def _sizes(x: Any, b: Builder) -> Any:
    """Args with every sympy size replaced by an int or a node computing it."""
    if isinstance(x, sympy.Basic):
        return b.size(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_sizes(v, b) for v in x)
    if isinstance(x, dict):
        return {k: _sizes(v, b) for k, v in x.items()}
    return x
