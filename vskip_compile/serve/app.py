"""The Ray Serve deployment: HTTP in, per-layout batches, compiled model (or ONNX runner) out.

    POST /v1/chat/completions   OpenAI chat completion, one or more base64 images + text, greedy
    GET  /health                 replica status, graph cache, layouts compiled here

Request path in a replica: parse and validate (4xx on bad input, nothing queued) -> the
processor and the layout, in a worker thread -> `@serve.batch` collects up to
collect * max_batch_size requests -> the batch handler groups them by layout, at most
max_batch_size rows a group; every group is one stacked prefill -> one future per request.

Why two threads: a group whose (layout, batch size) already ran here goes to the run thread;
any other group goes to the compile thread, where its first call compiles the specialized
prefill (tens of seconds on a small CPU). The batch handler waits for its run-thread groups
(so requests pile up into the next batch while the model is busy: that is what makes batches
large under load) but not for compile-thread groups: their requests get their answers when
the compile finishes, and the replica keeps serving every other layout meanwhile. Requests of
a layout still compiling also go to the compile thread, behind it, and hit its cache there.
"""

# No `from __future__ import annotations` here: FastAPI reads the handler annotations (Request)
# at route registration, and string annotations do not resolve inside a Serve ingress class.
import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import metrics

from ..layout import LayoutError
from ..plan import SkipPlan
from ..config import CompileError
from .engine import Engine, Prepared
from .request import Limits, RequestError, completion_body, error_body, parse_chat

APP_NAME = "vskip"
logger = logging.getLogger("ray.serve")
_SECONDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]


@dataclass
class ServeOptions:
    """Everything a replica needs; plain data, so Ray ships it to any node of a cluster.

    model_dir (and engine_dir) must exist at the same path on every node that runs a replica.
    """

    model_dir: str
    plan: dict[str, Any]  # SkipPlan.to_dict(): the plan travels with the deployment
    engine: str = "inductor"  # inductor | eager | onnx
    engine_dir: str | None = None  # ONNX engine directory (engine "onnx")
    replicas: int = 1
    replica_cpus: float = 1.0
    threads: int = 1  # torch / onnxruntime intra-op threads per replica
    max_batch_size: int = 8  # rows of one stacked prefill
    collect: int = 4  # one @serve.batch call takes up to collect * max_batch_size requests (several layouts)
    batch_wait_s: float = 0.02
    max_layouts: int = 32
    max_ongoing_requests: int = 64
    limits: Limits = field(default_factory=Limits)


app = FastAPI(title="vskip serve")


@serve.deployment(name="VLMServer", health_check_period_s=10, health_check_timeout_s=60)
@serve.ingress(app)
class VLMServer:
    """One replica: an Engine (model + compiled model or ONNX runner) behind HTTP."""

    def __init__(self, options: dict[str, Any]):
        import torch

        opts = ServeOptions(**{**options, "limits": Limits(**options["limits"])})
        torch.set_num_threads(opts.threads)
        self.opts = opts
        self.engine = Engine(opts.model_dir, SkipPlan.from_dict(opts.plan), opts.engine, engine_dir=opts.engine_dir,
                             limits=opts.limits, max_batch_size=opts.max_batch_size, max_layouts=opts.max_layouts,
                             threads=opts.threads)
        # A batch holds several layouts under load, so it collects more than one group's worth.
        self._batched.set_max_batch_size(opts.max_batch_size * opts.collect)
        self._batched.set_batch_wait_timeout_s(opts.batch_wait_s)
        self.run_pool = ThreadPoolExecutor(1, thread_name_prefix="vskip-run")
        self.compile_pool = ThreadPoolExecutor(1, thread_name_prefix="vskip-compile")
        self.counts: dict[str, int] = {}
        self._cache_seen = {"hits": 0, "misses": 0}
        self.m_requests = metrics.Counter("vskip_requests", "chat completion requests by HTTP status", tag_keys=("status",))
        self.m_latency = metrics.Histogram("vskip_request_seconds", "request latency in the replica", _SECONDS)
        self.m_prefill = metrics.Histogram("vskip_prefill_seconds", "prefill time of a batch (vision + decoder)", _SECONDS)
        self.m_decode = metrics.Histogram("vskip_decode_seconds", "decode time of a batch", _SECONDS)
        self.m_batch = metrics.Histogram("vskip_batch_size", "requests per layout group", [1, 2, 4, 8, 16, 32, 64])
        self.m_hits = metrics.Counter("vskip_graph_cache_hits", "compiled prefill graphs reused")
        self.m_misses = metrics.Counter("vskip_graph_cache_misses", "compiled prefill graphs built (compiles)")

    # -- HTTP -------------------------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> dict[str, Any]:
        ctx = serve.get_replica_context()
        return {"status": "ok", "replica": ctx.replica_tag, "engine": self.opts.engine, "model": self.engine.name,
                "plan": str(self.engine.plan), "graph_cache": self.engine.cache_info(), "requests": dict(self.counts)}

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request) -> JSONResponse:
        start = time.perf_counter()
        try:
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > self.opts.limits.max_body_bytes:
                raise RequestError(413, f"request body larger than {self.opts.limits.max_body_bytes} bytes")
            raw = await request.body()
            prepared = await asyncio.to_thread(self._prepare, raw)
            answer = await (await self._batched(prepared))
            status, body = 200, completion_body(prepared.chat, prepared.chat.model or self.engine.name, answer.text,
                                                prepared.prompt_tokens, answer.new_ids, answer.finish_reason, answer.info)
        except RequestError as e:
            status, body = e.status, error_body(e.status, e.message)
        except (CompileError, LayoutError) as e:
            status, body = 422, error_body(422, f"{type(e).__name__}: {e}")
        except Exception as e:  # noqa: BLE001 - any other failure is this request's 500, never the replica's end
            logger.exception("request failed")
            status, body = 500, error_body(500, f"internal error: {type(e).__name__}: {e}")
        self.counts[str(status)] = self.counts.get(str(status), 0) + 1
        self.m_requests.inc(tags={"status": str(status)})
        self.m_latency.observe(time.perf_counter() - start)
        return JSONResponse(body, status_code=status)

    def _prepare(self, raw: bytes) -> Prepared:
        return self.engine.prepare(parse_chat(raw, self.opts.limits))

    # -- batching ---------------------------------------------------------------------------
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _batched(self, items: list[Prepared]) -> list[asyncio.Future]:
        """One future per request. Groups by layout (at most max_batch_size rows a group);
        waits for the run-thread groups only."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        by_layout: dict[Any, list[int]] = {}
        for i, p in enumerate(items):
            by_layout.setdefault(p.layout, []).append(i)
        size = self.engine.max_batch_size
        groups = [(layout, idx[k : k + size]) for layout, idx in by_layout.items() for k in range(0, len(idx), size)]
        waits = []
        for layout, idx in groups:
            ready = self.engine.is_ready(layout, len(idx))
            pool = self.run_pool if ready else self.compile_pool
            task = loop.run_in_executor(pool, self.engine.run, [items[i] for i in idx])
            task.add_done_callback(lambda t, idx=idx: self._deliver(t, [futures[i] for i in idx]))
            if ready:
                waits.append(task)
        await asyncio.gather(*waits, return_exceptions=True)
        return futures

    def _deliver(self, task: asyncio.Future, futures: list[asyncio.Future]) -> None:
        """Answers (or the group's error) to the group's requests; metrics of the group."""
        if task.exception() is not None:
            for f in futures:
                if not f.done():  # a request the client gave up on is cancelled
                    f.set_exception(task.exception())
            return
        answers = task.result()
        info = answers[0].info
        self.m_prefill.observe(info["prefill_s"])
        self.m_decode.observe(info["decode_s"])
        self.m_batch.observe(info["batch"])
        cache = self.engine.cache_info()
        for name, counter in (("hits", self.m_hits), ("misses", self.m_misses)):
            if name in cache and cache[name] > self._cache_seen[name]:
                counter.inc(cache[name] - self._cache_seen[name])
                self._cache_seen[name] = cache[name]
        for f, a in zip(futures, answers):
            if not f.done():
                f.set_result(a)


# -- starting it ----------------------------------------------------------------------------
def application(options: ServeOptions):
    """The bound Ray Serve application for `serve.run`."""
    return VLMServer.options(
        num_replicas=options.replicas,
        ray_actor_options={"num_cpus": options.replica_cpus},
        max_ongoing_requests=options.max_ongoing_requests,
    ).bind({**asdict(options), "limits": asdict(options.limits)})


def init_local_ray(num_cpus: int | None = None, attempts: int = 3, **kwargs: Any) -> None:
    """Start a local Ray instance (`ray.init`), retried when its node does not come up.

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
            ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
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


def start(options: ServeOptions, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
          num_cpus: int | None = None, metrics_port: int | None = None) -> str:
    """Start (or join, with address) a Ray instance, deploy, and return the base URL.

    Returns once every replica is up (its model loaded). Graphs compile on first use.
    """
    options.model_dir = str(Path(options.model_dir).resolve())
    if options.engine_dir is not None:
        options.engine_dir = str(Path(options.engine_dir).resolve())
    if not ray.is_initialized():
        if address is not None:
            ray.init(address=address)
        else:
            extra = {} if metrics_port is None else {"_metrics_export_port": metrics_port}
            init_local_ray(num_cpus=num_cpus, **extra)
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(options), name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"


def stop() -> None:
    """Delete the application, stop Serve and disconnect from (or stop) Ray."""
    serve.shutdown()
    ray.shutdown()


def replica_actors() -> list[str]:
    """Names of this application's live replica actors (namespace "serve"), for fault tests."""
    names = ray.util.list_named_actors(all_namespaces=True)
    return [a["name"] for a in names if a["namespace"] == "serve" and a["name"].startswith("SERVE_REPLICA::")
            and f"{APP_NAME}#" in a["name"]]


def running_replicas() -> int:
    """Replicas of this application that Ray Serve reports RUNNING (0 while it has none)."""
    app = serve.status().applications.get(APP_NAME)
    if app is None:
        return 0
    return sum(d.replica_states.get("RUNNING", 0) for d in app.deployments.values())


def kill_replica(name: str) -> None:
    """ray.kill one replica actor; Ray Serve's controller notices and starts a new one."""
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
