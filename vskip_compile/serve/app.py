"""The Ray Serve application: an HTTP front (Ingress) and the model replicas (VLMServer).

    POST /v1/chat/completions   OpenAI chat completion: base64 images + text; greedy or sampled
                                 (temperature, top_p, top_k, min_p, repetition_penalty, seed, stop);
                                 stream=true: server-sent chat.completion.chunk events
    GET  /health                 one replica's status, graph cache and counters, the front's counters

Request path: the Ingress parses and validates the body (4xx on bad input, nothing reaches a
replica) and fixes a sampled request's seed -> a VLMServer replica (through a deployment
handle, as a stream of events): the processor and the layout in a worker thread -> the
Batcher (any layouts in one batch, up to max_batch_size, waiting at most batch_wait_s) -> ONE
left-padded prefill and one batched decode in the replica's run thread -> each request's
tokens as decoded, its answer when its row finishes.

No request lost: when a replica dies with requests in flight, the Ingress sends each of them
again to another replica (inference is idempotent: greedy, or sampled with a fixed seed; the
tokens already streamed are not sent twice). When no replica takes the request within
retry_s, the answer is 503 with a Retry-After header, never a bare 500. Replicas drain on
shutdown: Serve waits (graceful_shutdown_timeout_s = drain_s) for the requests they hold.

The retries are retry.py's, Ray's lifecycle (local instance, drain, stop, replicas) cluster.py's;
both are re-exported here, where callers have always found them.
"""

# No `from __future__ import annotations` here: FastAPI reads the handler annotations (Request)
# at route registration, and string annotations do not resolve inside a Serve ingress class.
import asyncio
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve import metrics

from ..config import CompileError
from ..layout import LayoutError
from ..plan import SkipPlan
from .batcher import Batcher, Closed
from .engine import Answer, Engine
from .cluster import (APP_NAME, _proxy_location, drain, init_local_ray, kill_replica, replica_actors,
                      running_replicas, stop)
from .request import (Chat, Limits, RequestError, chunk_body, completion_body, error_body, parse_chat, sse,
                      usage)
from .retry import NoReplica, _retriable, retrying

# The cluster and retry names are re-exported: callers have always found them here.
__all__ = ["APP_NAME", "Ingress", "NoReplica", "ServeOptions", "VLMServer", "application", "drain", "init_local_ray",
           "kill_replica", "replica_actors", "retrying", "running_replicas", "start", "stop"]
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
    max_batch_size: int = 8  # requests of one batch (any layouts): one prefill, one decode loop
    batch_wait_s: float = 0.02  # how long a batch waits for more requests after its first one
    max_layouts: int = 32  # kept for compatibility; no effect (one polymorphic prefill graph serves every layout)
    max_ongoing_requests: int = 64  # per replica
    retry_s: float = 60.0  # how long the front tries to place a request on a live replica before a 503
    drain_s: float = 120.0  # how long a replica that is shut down waits for the requests it holds
    limits: Limits = field(default_factory=Limits)


# -- the model replica ----------------------------------------------------------------------
@serve.deployment(name="VLMServer", health_check_period_s=10, health_check_timeout_s=60)
class VLMServer:
    """One replica: an Engine (model + compiled model or ONNX runner) and its Batcher.

    `generate(chat)` is a stream of plain-dict events for the Ingress: "start" (the request is
    prepared and queued), "token" per generated token (id, text delta), then "done" (the answer
    and its serving figures) or "error" (a 4xx/5xx status and message)."""

    def __init__(self, options: dict[str, Any]):
        import torch

        opts = ServeOptions(**{**options, "limits": Limits(**options["limits"])})
        torch.set_num_threads(opts.threads)
        self.opts = opts
        self.engine = Engine(opts.model_dir, SkipPlan.from_dict(opts.plan), opts.engine, engine_dir=opts.engine_dir,
                             limits=opts.limits, max_batch_size=opts.max_batch_size, threads=opts.threads)
        self.m_batch = metrics.Histogram("vskip_batch_size", "requests per batch (any layouts)", [1, 2, 4, 8, 16, 32, 64])
        self.batcher = Batcher(self.engine.run, opts.max_batch_size, opts.batch_wait_s, on_batch=self.m_batch.observe)
        ctx = serve.get_replica_context()
        self.replica = ctx.replica_tag if ctx is not None else "local"
        self.node = ray.get_runtime_context().get_node_id()
        self.counts: dict[str, int] = {}
        self.m_queue = metrics.Histogram("vskip_queue_seconds", "time a request waited for its batch", _SECONDS)
        self.m_prefill = metrics.Histogram("vskip_prefill_seconds", "prefill time of a request's batch (vision + decoder)",
                                           _SECONDS)
        self.m_decode = metrics.Histogram("vskip_decode_seconds", "decode time of a request (prefill end to its last token)",
                                          _SECONDS)
        self.m_tokens = metrics.Counter("vskip_completion_tokens", "tokens generated")
        self.m_compiles = metrics.Counter("vskip_compiles", "graphs compiled (prefill and decode)")
        self.m_flops = metrics.Counter("vskip_visual_flops_saved", "decoder prefill FLOPs the plan saved (flops.py model)")
        self._compiles_seen = 0

    async def generate(self, chat: Chat) -> AsyncIterator[dict[str, Any]]:
        try:
            prepared = await asyncio.to_thread(self.engine.prepare, chat)
        except RequestError as e:
            yield self._count({"type": "error", "status": e.status, "message": e.message})
            return
        yield {"type": "start", "prompt_tokens": prepared.prompt_tokens, "replica": self.replica}
        try:
            async for event in self.batcher.submit(prepared):
                if event[0] == "token":
                    yield {"type": "token", "id": event[1], "delta": event[2]}
                else:
                    yield self._count(self._done(prepared.prompt_tokens, event[1], event[2]))
        except Closed as e:
            yield self._count({"type": "error", "status": 503, "message": str(e)})
        except (CompileError, LayoutError) as e:
            yield self._count({"type": "error", "status": 422, "message": f"{type(e).__name__}: {e}"})
        except Exception as e:  # noqa: BLE001 - any other failure is this request's 500, never the replica's end
            logger.exception("request failed")
            yield self._count({"type": "error", "status": 500, "message": f"internal error: {type(e).__name__}: {e}"})

    def _done(self, prompt_tokens: int, answer: Answer, delta: str) -> dict[str, Any]:
        info = {**answer.info, "replica": self.replica}
        self.m_queue.observe(info["queue_s"])
        self.m_prefill.observe(info["prefill_s"])
        self.m_decode.observe(info["decode_s"])
        for counter, value in ((self.m_tokens, len(answer.new_ids)), (self.m_flops, info["visual_flops_saved"])):
            if value > 0:  # Ray's Counter.inc refuses 0 (an all-full plan saves nothing)
                counter.inc(value)
        compiles = self.engine.compiles()
        if compiles > self._compiles_seen:
            self.m_compiles.inc(compiles - self._compiles_seen)
            self._compiles_seen = compiles
        return {"type": "done", "text": answer.text, "token_ids": answer.new_ids, "finish_reason": answer.finish_reason,
                "delta": delta, "prompt_tokens": prompt_tokens, "info": info}

    def _count(self, event: dict[str, Any]) -> dict[str, Any]:
        key = str(event.get("status", 200))
        self.counts[key] = self.counts.get(key, 0) + 1
        return event

    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "replica": self.replica, "node": self.node, "engine": self.opts.engine,
                "model": self.engine.name, "plan": str(self.engine.plan), "graph_cache": self.engine.cache_info(),
                "batches": self.batcher.batches, "waiting": self.batcher.waiting, "requests": dict(self.counts)}


# -- the HTTP front -------------------------------------------------------------------------
app = FastAPI(title="vskip serve")


@serve.deployment(name="Ingress", max_ongoing_requests=1024)
@serve.ingress(app)
class Ingress:
    """HTTP in, events from a VLMServer replica out; retries a request whose replica died."""

    def __init__(self, model, options: dict[str, Any]):
        self.model = model  # DeploymentHandle of VLMServer
        self.opts = ServeOptions(**{**options, "limits": Limits(**options["limits"])})
        self.counts: dict[str, int] = {}
        self.m_requests = metrics.Counter("vskip_requests", "chat completion requests by HTTP status", tag_keys=("status",))
        self.m_latency = metrics.Histogram("vskip_request_seconds", "request latency at the HTTP front", _SECONDS)
        self.m_retries = metrics.Counter("vskip_retries", "requests sent again after their replica died")
        self.inflight = 0
        self.draining = False

    async def drain(self, timeout_s: float | None = None) -> int:
        """Refuse new requests (503, Retry-After) and wait until the requests in flight are
        answered, at most timeout_s (default: drain_s); returns how many were still in flight
        (0: drained)."""
        self.draining = True
        deadline = time.monotonic() + (self.opts.drain_s if timeout_s is None else timeout_s)
        while self.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.inflight

    @app.get("/health")
    async def health(self) -> JSONResponse:
        try:
            replica = await asyncio.wait_for(self.model.health.remote(), timeout=self.opts.retry_s)
        except (asyncio.TimeoutError, *_retriable()) as e:
            return self._error(503, f"no replica answered: {type(e).__name__}")
        return JSONResponse({**replica, "front": dict(self.counts)})

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request):
        if self.draining:
            return self._finish(time.perf_counter(), self._error(503, "the server is shutting down", retry_after=True))
        self.inflight += 1
        done = True  # a stream's request ends when its last event is sent
        try:
            response = await self._chat(request)
            if isinstance(response, StreamingResponse):
                done = False
            return response
        finally:
            if done:
                self.inflight -= 1

    async def _chat(self, request: Request):
        start = time.perf_counter()
        try:
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > self.opts.limits.max_body_bytes:
                raise RequestError(413, f"request body larger than {self.opts.limits.max_body_bytes} bytes")
            chat = await asyncio.to_thread(parse_chat, await request.body(), self.opts.limits)
        except RequestError as e:
            return self._finish(start, self._error(e.status, e.message))
        model = chat.model or Path(self.opts.model_dir).name
        events = self._events(chat)
        try:
            first = await events.__anext__()  # "start" or an error: the status is known before any byte is sent
        except NoReplica as e:
            return self._finish(start, self._error(503, str(e), retry_after=True))
        if first["type"] == "error":
            return self._finish(start, self._error(first["status"], first["message"]))
        if chat.stream:
            self._count(200)
            return StreamingResponse(self._sse(chat, model, first, events, start), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            async for event in events:
                if event["type"] == "error":
                    return self._finish(start, self._error(event["status"], event["message"]))
                if event["type"] == "done":
                    body = completion_body(chat, model, event["text"], event["prompt_tokens"], event["token_ids"],
                                           event["finish_reason"], event["info"])
                    return self._finish(start, JSONResponse(body))
        except NoReplica as e:
            return self._finish(start, self._error(503, str(e), retry_after=True))
        return self._finish(start, self._error(503, "the replica ended the request without an answer", retry_after=True))

    def _events(self, chat: Chat) -> AsyncIterator[dict[str, Any]]:
        def call():
            return self.model.options(stream=True).generate.remote(chat)

        def on_retry(attempt: int, error: BaseException) -> None:
            logger.warning("replica lost during request %s (%s): sending it again", chat.id, type(error).__name__)
            self.m_retries.inc()

        return retrying(call, self.opts.retry_s, on_retry)

    async def _sse(self, chat: Chat, model: str, first: dict[str, Any], events: AsyncIterator[dict[str, Any]],
                   start: float) -> AsyncIterator[bytes]:
        """Server-sent chat.completion.chunk events: the role, a chunk per decoded token with
        text, the finish_reason with usage, `data: [DONE]`."""
        created = int(time.time())
        yield sse(chunk_body(chat, model, created, {"role": "assistant", "content": ""}))
        try:
            async for event in events:
                if event["type"] == "token" and event["delta"]:
                    yield sse(chunk_body(chat, model, created, {"content": event["delta"]}))
                elif event["type"] == "done":
                    if event["delta"]:
                        yield sse(chunk_body(chat, model, created, {"content": event["delta"]}))
                    info = {**event["info"], "token_ids": event["token_ids"]}
                    yield sse(chunk_body(chat, model, created, {}, event["finish_reason"],
                                         usage(event["prompt_tokens"], len(event["token_ids"]), event["info"])) | {"vskip": info})
                    yield sse("[DONE]")
                    break
                elif event["type"] == "error":
                    yield sse(error_body(event["status"], event["message"]))
                    break
        except NoReplica as e:
            yield sse(error_body(503, str(e)))
        finally:
            self.inflight -= 1
            self.m_latency.observe(time.perf_counter() - start)

    def _error(self, status: int, message: str, retry_after: bool = False) -> JSONResponse:
        headers = {"Retry-After": str(max(1, int(self.opts.retry_s // 4)))} if retry_after else None
        return JSONResponse(error_body(status, message), status_code=status, headers=headers)

    def _count(self, status: int) -> None:
        self.counts[str(status)] = self.counts.get(str(status), 0) + 1
        self.m_requests.inc(tags={"status": str(status)})

    def _finish(self, start: float, response: JSONResponse) -> JSONResponse:
        self._count(response.status_code)
        self.m_latency.observe(time.perf_counter() - start)
        return response


# -- starting it ----------------------------------------------------------------------------
def application(options: ServeOptions):
    """The bound Ray Serve application for `serve.run`: the Ingress over the VLMServer replicas."""
    opts = {**asdict(options), "limits": asdict(options.limits)}
    model = VLMServer.options(
        num_replicas=options.replicas,
        ray_actor_options={"num_cpus": options.replica_cpus},
        max_ongoing_requests=options.max_ongoing_requests,
        graceful_shutdown_timeout_s=options.drain_s,
    ).bind(opts)
    return Ingress.options(ray_actor_options={"num_cpus": 0}).bind(model, opts)


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
            host = address.rsplit(":", 1)[0]
            # Ray nodes on another loopback address (127.0.0.2, ...: a cluster on this machine, as
            # in the tests) are reached from that address, not from the machine's own one.
            local = {"_node_ip_address": host} if host.startswith("127.") and host != "127.0.0.1" else {}
            ray.init(address=address, **local)
        else:
            extra = {} if metrics_port is None else {"_metrics_export_port": metrics_port}
            init_local_ray(num_cpus=num_cpus, **extra)
    serve.start(http_options={"host": host, "port": port}, proxy_location=_proxy_location())
    serve.run(application(options), name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"
