"""A generate call's decode state: preallocated K/V buffers, the filled-slot mask, positions.

The decode graph (core.DecodeStep, compiled with static shapes) reads K/V buffers of T slots,
T = prompt + new tokens rounded up to the decode bucket, and a batch of decode_batch_bucket(B)
rows; DecodeRun fills slots 0..S-1 with the prefill's K/V and writes each step's new K/V at the
next slot outside the graph, so the graph stays free of in-place updates. A recurrent layer's
pair is its (conv, recurrent) state: no slots, replaced by the step's new states.
"""

from __future__ import annotations

import torch

from .config import CompileError


def decode_batch_bucket(batch: int) -> int:
    """The decode graph's batch for a batch of `batch` rows: the next power of two, so a
    service compiles decode graphs for 1, 2, 4, 8, ... rows only; the prefill, symbolic in the
    batch, runs the real rows alone (decode steps are cheap, prefill rows are not)."""
    return 1 << (batch - 1).bit_length()


class DecodeRun:
    """One generate call's decode state: K/V buffers of the graph's T slots, the filled-slot
    mask, the next slot and the last position ids.

    step(embeds [B, 1, D]) runs the compiled DecodeStep, writes the new K/V at slot n (outside
    the graph: the graph stays free of in-place updates) and returns logits [B, 1, V].
    """

    def __init__(self, graph, kv: list[tuple[torch.Tensor, torch.Tensor]], last_position: torch.Tensor, capacity: int,
                 pads: list[int], batch_bucket: int | None = None, recurrent: tuple[bool, ...] = ()):
        recurrent = tuple(recurrent) or (False,) * len(kv)
        attention = [pair for pair, r in zip(kv, recurrent) if not r]
        if not attention:
            raise CompileError("a decode state needs at least one attention layer's K/V (every layer is recurrent)")
        batch, _, seq_len, _ = attention[0][0].shape  # [B, KV, S, E]
        if seq_len >= capacity:
            raise CompileError(f"a prefill of {seq_len} rows leaves no decode slot in a cache of {capacity}")
        self.graph = graph
        self.capacity = capacity
        self.batch = batch
        self.bucket = batch_bucket or batch  # rows batch.. are empty: no key but their own new one
        self.buffers: list[torch.Tensor] = []
        self.states = [r for r in recurrent for _ in (0, 1)]  # per buffer: a recurrent state (no slots)
        for (k, v), r in zip(kv, recurrent):
            for x in (k, v):  # each its own heads and width (latent attention: V narrower than K)
                if r:
                    buf = x.new_zeros(self.bucket, *x.shape[1:])  # [Bb, C, W] or [Bb, H, Dk, Dv]
                    buf[:batch] = x
                else:
                    buf = x.new_zeros(self.bucket, x.shape[1], capacity, x.shape[3])  # [Bb, KV, T, E]
                    buf[:batch, :, :seq_len] = x
                self.buffers.append(buf)
        self.past_mask = torch.zeros(self.bucket, capacity, dtype=torch.bool, device=kv[0][0].device)  # [Bb, T]
        self.past_mask[:batch, :seq_len] = True
        for row, pad in enumerate(pads):
            self.past_mask[row, :pad] = False  # left padding: never a key
        self.n = seq_len
        empty = self.bucket - batch
        dim = last_position.ndim - 2  # the batch axis of [B, 1] or [3, B, 1]
        empty_rows = torch.zeros_like(last_position.narrow(dim, 0, 1)).repeat_interleave(empty, dim)
        self.position = torch.cat([last_position, empty_rows], dim)  # [Bb, 1] or [3, Bb, 1]

    def step(self, embeds: torch.Tensor) -> torch.Tensor:
        if self.n >= self.capacity:
            raise CompileError(f"decode cache of {self.capacity} slots is full")
        self.position = self.position + 1
        if self.bucket > self.batch:
            embeds = torch.cat([embeds, embeds.new_zeros(self.bucket - self.batch, *embeds.shape[1:])])  # [Bb, 1, D]
        logits, *new_kv = self.graph(embeds, self.position, self.past_mask, *self.buffers)
        for buf, new, state in zip(self.buffers, new_kv, self.states):
            if state:
                buf.copy_(new)  # the step's conv / recurrent state
            else:
                buf[:, :, self.n] = new[:, :, 0]  # [Bb, KV, E] into slot n
        self.past_mask[:, self.n] = True
        self.n += 1
        return logits[: self.batch]  # [B, 1, V]
