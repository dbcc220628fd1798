"""The bounded, counted caches of CompiledVLM's compiled graphs (prefill and decode).

A GraphLRU maps a key (PrefillKey, DecodeKey) to a torch.compile'd module, counts hits and
misses, and evicts the least recently used graph; CountedBackend wraps the torch.compile
backend of its entries so that every graph Dynamo compiles is counted and a recompile is
warned about, naming the guard that failed.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from .layout import VisualLayout
from .plan import SkipPlan

RECOMPILE_LIMIT = 4  # graphs one cache entry may compile (each recompile is counted and warned about)


class CacheInfo(NamedTuple):
    hits: int
    misses: int
    maxsize: int
    currsize: int
    compiles: int = 0  # graphs Dynamo compiled for this cache's entries (a recompile adds one)


@dataclass(frozen=True)
class PrefillKey:
    """One polymorphic prefill graph: every layout, length and padding of its batch bucket."""

    plan: SkipPlan
    dtype: torch.dtype
    device: torch.device
    logits_to_keep: int
    num_deepstack: int
    batched: bool  # batch bucket: False for one row, True for 2 or more (the batch size is symbolic)
    layout: VisualLayout | None = None  # specialize="layout": the one layout of a static graph
    blocks: bool = False  # the bidirectional-blocks input (vskip_compile.archs.blocks) is there
    chunks: int | None = None  # recurrent layers: the chunks of the sequence (core.recurrent_chunks); S symbolic within


@dataclass(frozen=True)
class DecodeKey:
    capacity: int  # T, the K/V slots of the decode graph
    batch: int
    dtype: torch.dtype
    device: torch.device


class GraphLRU:
    """A bounded map of compiled graphs with hit/miss counters.

    Locked: a server calls one CompiledVLM from several threads (vskip serve runs one thread
    for known layouts and one that compiles new ones), and a lookup-then-evict sequence must
    not interleave. `build` only wraps torch.compile (compiling happens on the first call,
    outside the lock), so the lock is held for microseconds.
    """

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self.graphs: OrderedDict[Any, Any] = OrderedDict()
        self.hits = self.misses = 0
        self.compiles = 0  # counted by CountedBackend, the backend wrapper of this cache's graphs
        self._lock = threading.Lock()

    def get(self, key, build):
        with self._lock:
            if key in self.graphs:
                self.hits += 1
                self.graphs.move_to_end(key)
                return self.graphs[key]
            self.misses += 1
            graph = self.graphs[key] = build()
            if len(self.graphs) > self.maxsize:
                self.graphs.popitem(last=False)
            return graph

    def info(self) -> CacheInfo:
        with self._lock:
            return CacheInfo(self.hits, self.misses, self.maxsize, len(self.graphs), self.compiles)

    def clear(self) -> None:
        with self._lock:
            self.graphs.clear()
            self.hits = self.misses = self.compiles = 0


class CountedBackend:
    """A torch.compile backend that counts the graphs Dynamo hands it into `cache.compiles`
    and warns, naming the guard that failed, when one cache entry compiles again."""

    def __init__(self, backend, cache: GraphLRU, what: str, code):
        self.backend = torch._dynamo.lookup_backend(backend) if isinstance(backend, str) else backend
        self.cache, self.what, self.code = cache, what, code
        self.graphs = 0

    def __call__(self, gm, example_inputs, **kwargs):
        with self.cache._lock:
            self.cache.compiles += 1
            self.graphs += 1
        if self.graphs > 1:
            failures = torch._dynamo.utils.guard_failures.get(self.code) or ["(reason not recorded)"]
            warnings.warn(f"vskip: {self.what} recompiled (graph {self.graphs} of this entry): guard failed: {failures[-1]}",
                          RecompileWarning, stacklevel=2)
        return self.backend(gm, example_inputs, **kwargs)


class RecompileWarning(UserWarning):
    """A compiled graph was compiled again for inputs its guards refused."""

