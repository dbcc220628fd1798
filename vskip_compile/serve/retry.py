"""The HTTP front's retries: a request whose replica died is sent again to another one.

Inference is idempotent (greedy, or sampled with the request's fixed seed), so the second
replica gives the same events; those already passed on ("start", tokens) are skipped, and no
replica within retry_s is a NoReplica (the front's 503 with Retry-After). No Ray import at
module level: the unit tests drive `retrying` with plain async generators.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator


def _retriable() -> tuple[type[BaseException], ...]:
    """Errors of a handle call that mean "that replica is gone or cannot take it": try another."""
    from ray.exceptions import ActorUnavailableError, RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

    return (RayActorError, ActorUnavailableError, ReplicaUnavailableError, DeploymentUnavailableError,
            BackPressureError)


class NoReplica(Exception):
    """No replica could take the request within retry_s (a 503 with Retry-After)."""


async def retrying(call, retry_s: float, on_retry=None, backoff_s: float = 0.5) -> AsyncIterator[dict[str, Any]]:
    """A replica's events for one request (`call()` starts it: an async iterator of events);
    when the replica dies (a _retriable error), `call()` again, skipping the "start" and
    "token" events already passed on: the same request gives the same events (greedy, or
    sampled with its fixed seed). NoReplica when no replica has started it within retry_s
    of the first try (a replica that has started it may take its time: batches queue)."""
    deadline = time.monotonic() + retry_s
    passed = 0  # "start" + "token" events already passed on
    attempt = 0
    while True:
        attempt += 1
        seen = 0
        stream = call()
        try:
            while True:
                try:
                    if seen == 0:
                        event = await asyncio.wait_for(stream.__anext__(), timeout=max(0.0, deadline - time.monotonic()))
                    else:
                        event = await stream.__anext__()
                except StopAsyncIteration:
                    return
                if event["type"] in ("start", "token"):
                    seen += 1
                    if seen <= passed:
                        continue  # passed on before the replica died: the same again
                    passed = seen
                if event["type"] == "done":
                    event["info"]["attempts"] = attempt
                yield event
        except asyncio.TimeoutError:
            if hasattr(stream, "cancel"):
                stream.cancel()
            raise NoReplica(f"no replica could take the request within {retry_s:g} s "
                            f"({attempt} attempt(s); the last got no answer)") from None
        except _retriable() as e:
            if time.monotonic() >= deadline:
                raise NoReplica(f"no replica could take the request within {retry_s:g} s "
                                f"({attempt} attempt(s); the last: {type(e).__name__})") from e
            if on_retry is not None:
                on_retry(attempt, e)
            await asyncio.sleep(min(backoff_s * attempt, 2.0, max(0.0, deadline - time.monotonic())))
