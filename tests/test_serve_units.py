"""The serving parts that need no model and no Ray cluster: the Batcher (batches across
requests, a late request joins the next prefill, errors reach every request of a batch) and
the Ingress's retry loop (a request whose replica died is sent again without repeating what
was streamed; no replica within retry_s: NoReplica, the 503). Fast: fake engines and replicas."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from vskip_compile.serve.batcher import Batcher, Closed
from vskip_compile.runtime import left_pad_batch
from vskip_compile.serve.engine import Answer, bucket


class _Engine:
    """Records each batch; the first batch blocks until `gate` is set."""

    def __init__(self, block_first: bool = False):
        self.batches: list[list[str]] = []
        self.gate = threading.Event()
        self.block_first = block_first

    def run(self, prepared, sinks):
        self.batches.append(list(prepared))
        if self.block_first and len(self.batches) == 1:
            assert self.gate.wait(10)
        for p, sink in zip(prepared, sinks):
            sink.token(7, p)
            sink.done(Answer(p, [7], "stop", {}), "")


async def _one(batcher: Batcher, item: str) -> list[tuple]:
    return [event async for event in batcher.submit(item)]


def test_batcher_groups_waiting_requests_and_late_ones_join_the_next_prefill():
    engine = _Engine(block_first=True)

    async def main():
        batcher = Batcher(engine.run, max_batch_size=4, max_wait_s=0.05)
        first = asyncio.create_task(_one(batcher, "a"))
        await asyncio.sleep(0.3)  # "a" runs alone (nothing else came within 50 ms) and blocks
        late = [asyncio.create_task(_one(batcher, x)) for x in "bcdef"]
        await asyncio.sleep(0.2)  # they arrive while "a" decodes
        engine.gate.set()
        return await asyncio.gather(first, *late)

    results = asyncio.run(main())
    assert engine.batches == [["a"], ["b", "c", "d", "e"], ["f"]]  # the next prefill takes all that waited, up to 4
    for item, events in zip("abcdef", results):
        assert events[0] == ("token", 7, item) and events[-1][0] == "done" and events[-1][1].text == item
    assert results[1][-1][1].info["queue_s"] >= 0.1  # waited for the batch before it


def test_batcher_waits_at_most_max_wait_for_company():
    engine = _Engine()

    async def main():
        batcher = Batcher(engine.run, max_batch_size=8, max_wait_s=0.2)
        start = time.perf_counter()
        events = await _one(batcher, "x")
        return time.perf_counter() - start, events

    elapsed, events = asyncio.run(main())
    assert 0.15 <= elapsed < 2.0 and engine.batches == [["x"]]
    assert 0.15 <= events[-1][1].info["queue_s"] < 2.0


def test_batcher_error_reaches_every_request_of_the_batch_and_drain_refuses_new_ones():
    def run(prepared, sinks):
        raise RuntimeError("engine broke")

    async def main():
        batcher = Batcher(run, max_batch_size=4, max_wait_s=0.05)
        outcomes = await asyncio.gather(_one(batcher, "a"), _one(batcher, "b"), return_exceptions=True)
        assert await batcher.drain(1.0)
        with pytest.raises(Closed):
            await _one(batcher, "c")
        return outcomes

    outcomes = asyncio.run(main())
    assert all(isinstance(o, RuntimeError) and "engine broke" in str(o) for o in outcomes)


def test_bucket_and_left_pad_batch():
    import torch

    assert [bucket(n, 8) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 8]
    a = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
         "pixel_values": torch.ones(4, 2)}
    b = {"input_ids": torch.tensor([[8]]), "attention_mask": torch.ones(1, 1, dtype=torch.long),
         "pixel_values": torch.zeros(2, 2)}
    out = left_pad_batch([a, b], pad_token_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert out["pixel_values"].shape == (6, 2)


# -- the Ingress's retry loop ---------------------------------------------------------------------
pytest.importorskip("ray")


class _Replica:
    """An async iterator of events that raises `die` after `die_after` events."""

    def __init__(self, events, die_after=None, hang=False):
        self.events, self.die_after, self.hang = list(events), die_after, hang
        self.i = 0

    def __aiter__(self):
        return self

    async def __anext__(self):
        from ray.exceptions import ActorDiedError

        if self.hang:
            await asyncio.sleep(60)
        if self.die_after is not None and self.i == self.die_after:
            raise ActorDiedError()
        if self.i == len(self.events):
            raise StopAsyncIteration
        self.i += 1
        return dict(self.events[self.i - 1])

    def cancel(self):
        pass


def _events(n_tokens: int):
    return ([{"type": "start"}] + [{"type": "token", "id": i, "delta": f"t{i}"} for i in range(n_tokens)]
            + [{"type": "done", "info": {}}])


def test_retry_resumes_on_another_replica_without_repeating_tokens():
    from vskip_compile.serve.app import retrying

    replicas = iter([_Replica(_events(4), die_after=3), _Replica(_events(4), die_after=0), _Replica(_events(4))])
    retries = []

    async def main():
        return [e async for e in retrying(lambda: next(replicas), 10.0, lambda a, e: retries.append(a), backoff_s=0.01)]

    got = asyncio.run(main())
    assert [e["type"] for e in got] == ["start", "token", "token", "token", "token", "done"]
    assert [e["delta"] for e in got if e["type"] == "token"] == ["t0", "t1", "t2", "t3"]
    assert got[-1]["info"]["attempts"] == 3 and retries == [1, 2]


def test_no_replica_within_retry_s_is_no_replica():
    from vskip_compile.serve.app import NoReplica, retrying

    async def drain(call, retry_s):
        return [e async for e in retrying(call, retry_s, backoff_s=0.01)]

    start = time.perf_counter()
    with pytest.raises(NoReplica, match="no replica could take the request within 0.3 s"):
        asyncio.run(drain(lambda: _Replica(_events(1), die_after=0), 0.3))  # every replica dies at once
    with pytest.raises(NoReplica, match="the last got no answer"):
        asyncio.run(drain(lambda: _Replica(_events(1), hang=True), 0.3))  # none answers
    assert time.perf_counter() - start < 10
