"""`vskip serve`: an OpenAI-compatible chat endpoint for a VLM under a skip plan, on Ray Serve.

    from vskip_compile.serve import use_loopback
    use_loopback()                                                  # a local Ray, before `import ray`
    from vskip_compile.serve.app import ServeOptions, start, stop   # needs the `serve` extra
    url = start(ServeOptions(model_dir="DIR", plan=plan.to_dict(), engine="inductor"), port=8000)

Modules: `request` (parsing, limits, sampling fields, 4xx errors, response and SSE bodies; no Ray,
no torch), `engine` (model, processor, one generate call per batch of any layouts; no Ray),
`batcher` (requests into batches, one run thread; no Ray), `retry` (a request sent again when its
replica dies; no Ray import), `app` (the Ray Serve application: the HTTP front with drain, the
model replicas, metrics, start), `cluster` (Ray's lifecycle: a local instance, drain/stop, replicas).
"""

from __future__ import annotations

import os
import sys

from .request import Chat, Limits, RequestError, parse_chat

__all__ = ["Chat", "Limits", "RequestError", "parse_chat", "use_loopback"]

# Ray's switch for "no multi-machine cluster": its node address becomes 127.0.0.1 instead of the
# machine's network address (the setting Ray uses on macOS and Windows).
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def use_loopback() -> None:
    """Keep a local Ray instance (and all its internal traffic) on 127.0.0.1.

    Why: a single-machine server has no reason to expose Ray's control ports on the network.
    Not for a cluster (`--address`): other machines must reach this one. Set in the environment
    (inherited by every Ray process started afterwards) and, when this process has imported
    Ray already, in its constants too.
    """
    os.environ[LOOPBACK_ENV] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False
