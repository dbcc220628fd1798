"""Batcher: requests of any layout into batches, one batch at a time in one run thread. No Ray.

    batcher = Batcher(engine.run, max_batch_size=8, max_wait_s=0.02)
    async for event in batcher.submit(prepared):      # ("token", id, delta) ..., ("done", answer, delta)
        ...

A batch starts with the oldest waiting request and takes every request waiting then, up to
max_batch_size; when fewer are waiting it waits for more until max_wait_s after the oldest one
arrived. The batch runs in the run thread (engine.run: one left-padded prefill, one batched
decode) while new requests queue: they join the next batch's prefill, together with whatever
else arrived meanwhile, without waiting again. That is continuous batching at the granularity
of the compiled graphs: a decode graph has a static batch and K/V capacity, so rows join at a
prefill, not in the middle of a decode; rows leave early (a finished row's answer goes out at
once while the others decode).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable


class Closed(RuntimeError):
    """The batcher is draining (shutting down) and takes no new request."""


@dataclass
class _Item:
    prepared: Any
    sink: "_QueueSink"
    arrived: float = field(default_factory=time.perf_counter)


class _QueueSink:
    """An engine Sink that hands events from the run thread to the request's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False  # the client left before its batch started
        self.queue_s = 0.0

    def _put(self, event: tuple) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    def token(self, token_id: int, delta: str) -> None:
        self._put(("token", token_id, delta))

    def done(self, answer, delta: str) -> None:
        answer.info["queue_s"] = round(self.queue_s, 6)
        self._put(("done", answer, delta))

    def error(self, exc: BaseException) -> None:
        self._put(("error", exc))


class Batcher:
    """See the module doc. `run(prepared_list, sinks)` is called in one thread, one batch at a
    time; `on_batch(size)`, if given, is called with each batch's request count."""

    def __init__(self, run: Callable[[list, list], Any], max_batch_size: int, max_wait_s: float,
                 on_batch: Callable[[int], None] | None = None):
        if max_batch_size < 1 or max_wait_s < 0:
            raise ValueError("max_batch_size must be >= 1 and max_wait_s >= 0")
        self.run = run
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.on_batch = on_batch
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="vskip-run")
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._closed = False
        self.running = 0  # requests in the batch now running
        self.batches = 0

    @property
    def waiting(self) -> int:
        return 0 if self._queue is None else self._queue.qsize()

    async def submit(self, prepared) -> AsyncIterator[tuple]:
        """Events of one request: ("token", id, delta) per generated token, then ("done",
        answer, delta); an engine failure raises here."""
        if self._closed:
            raise Closed("the replica is shutting down")
        loop = asyncio.get_running_loop()
        if self._queue is None:
            self._queue = asyncio.Queue()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._loop())
        sink = _QueueSink(loop)
        self._queue.put_nowait(_Item(prepared, sink))
        try:
            while True:
                event = await sink.queue.get()
                if event[0] == "error":
                    raise event[1]
                yield event
                if event[0] == "done":
                    return
        finally:
            sink.cancelled = True  # a batch not yet started leaves it out

    async def _next_batch(self) -> list[_Item]:
        first = await self._queue.get()
        batch = [first]
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            left = first.arrived + self.max_wait_s - time.perf_counter()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except asyncio.TimeoutError:
                break
        return [item for item in batch if not item.sink.cancelled]

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            now = time.perf_counter()
            for item in batch:
                item.sink.queue_s = now - item.arrived
            self.running = len(batch)
            self.batches += 1
            if self.on_batch is not None:
                self.on_batch(len(batch))
            sinks = [item.sink for item in batch]
            try:
                await loop.run_in_executor(self.pool, self.run, [item.prepared for item in batch], sinks)
            except Exception as e:  # noqa: BLE001 - the batch's failure is each of its requests' error
                for sink in sinks:
                    sink.error(e)
            finally:
                self.running = 0

    async def drain(self, timeout_s: float) -> bool:
        """Take no new request; wait until every queued and running one has been answered
        (True), or timeout_s passed (False)."""
        self._closed = True
        deadline = time.perf_counter() + timeout_s
        while self.waiting or self.running:
            if time.perf_counter() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True
