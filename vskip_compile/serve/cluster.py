"""Ray around the serving application: a local instance that comes up, drain and stop, replicas.

`app.start` deploys the application on the instance init_local_ray (or `--address`) gives;
drain/stop shut it down gracefully; replica_actors/running_replicas/kill_replica are for the
fault tests and the load benchmark.
"""

from __future__ import annotations

import logging
from typing import Any

import ray
from ray import serve

APP_NAME = "vskip"
logger = logging.getLogger("ray.serve")


def init_local_ray(num_cpus: int | None = None, attempts: int = 3, **kwargs: Any) -> None:
    """Start a new local Ray instance (`ray.init(address="local")`: never one that `ray start`
    left running on this machine), retried when its node does not come up.

    Why: Ray 2.60's raylet waits a fixed 15-20 s (RAY_agent_register_timeout_ms does not change
    it; upstream issue ray-project/ray#65983) for its dashboard agent to write its port files and
    aborts when the agent is late; the driver then raises "The current node timed out during
    startup". On a small saturated machine (2 cores, other jobs) that happened to 7 starts in 15
    here; a later attempt usually makes it (the agent's imports are in the page cache by then),
    once only the third, and once at load 10 all three failed (about 2 minutes each). Processes
    a failed attempt left behind (GCS server, log monitor, ...: children of this process that
    were not there before it) are ended, by pid, before the next one. The last attempt's
    exception is raised.
    """
    import psutil  # vendored by Ray (ray/thirdparty_files)

    me = psutil.Process()
    for attempt in range(1, attempts + 1):
        before = {p.pid for p in me.children(recursive=True)}
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)
            return
        except Exception as e:  # noqa: BLE001 - Ray raises a plain Exception when its node does not come up
            if attempt == attempts:
                raise
            logger.warning("local Ray did not start (attempt %d of %d): %s: %s", attempt, attempts, type(e).__name__, e)
            ray.shutdown()
            left = [p for p in me.children(recursive=True) if p.pid not in before]
            for p in left:
                try:
                    p.terminate()
                except psutil.NoSuchProcess:
                    pass
            for p in psutil.wait_procs(left, timeout=10)[1]:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass


def _proxy_location() -> str:
    """Serve's HTTP proxies on every node, unless nodes share an address (several Ray nodes on
    one machine, as in the loopback cluster test): their proxies would fight for one port."""
    addresses = [n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")]
    return "EveryNode" if len(addresses) == len(set(addresses)) else "HeadOnly"


def drain(timeout_s: float | None = None) -> int:
    """Graceful shutdown, first half: the HTTP front refuses new requests (503, Retry-After) and
    waits for those in flight, at most timeout_s (default: the application's drain_s). Returns
    how many were still in flight (0 also when no application is running)."""
    if not ray.is_initialized() or APP_NAME not in serve.status().applications:
        return 0
    return serve.get_app_handle(APP_NAME).drain.remote(timeout_s).result()


def stop(drain_first: bool = True, timeout_s: float | None = None) -> None:
    """Drain the requests in flight (drain_first), then delete the application, stop Serve and
    disconnect from (or stop) Ray. `vskip serve` stops this way on Ctrl-C."""
    if drain_first and ray.is_initialized():
        try:
            left = drain(timeout_s)
        except Exception as e:  # noqa: BLE001 - a broken application must not keep Serve from stopping
            logger.warning("drain failed (%s: %s); stopping anyway", type(e).__name__, e)
        else:
            if left:
                logger.warning("stopping with %d request(s) still in flight", left)
    serve.shutdown()
    ray.shutdown()


def replica_actors() -> list[str]:
    """Names of this application's live model replica actors (namespace "serve"), for fault tests."""
    names = ray.util.list_named_actors(all_namespaces=True)
    return [a["name"] for a in names if a["namespace"] == "serve" and a["name"].startswith("SERVE_REPLICA::")
            and f"{APP_NAME}#VLMServer#" in a["name"]]


def running_replicas() -> int:
    """Model replicas of this application that Ray Serve reports RUNNING (0 while it has none)."""
    app_status = serve.status().applications.get(APP_NAME)
    if app_status is None:
        return 0
    deployment = app_status.deployments.get("VLMServer")
    return 0 if deployment is None else deployment.replica_states.get("RUNNING", 0)


def kill_replica(name: str) -> None:
    """ray.kill one replica actor; Ray Serve's controller notices and starts a new one."""
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
