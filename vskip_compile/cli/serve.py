"""`vskip serve`: a model under a plan behind OpenAI-compatible HTTP on Ray Serve."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import SERVE_ENGINES
from ..flops import DimsError, hf_text_config
from .common import UsageError, float_in, load_plan, port, pos_int


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a VLM under a skip plan: OpenAI-compatible HTTP on Ray Serve",
        description="Deploy the model (compiled under the plan, or its ONNX engine) on Ray Serve: "
        "POST /v1/chat/completions (base64 data-URL images, videos (video_url data URLs or frame "
        "lists) + text; greedy or sampled; stream=true for server-sent events), GET /health. Requests "
        "of any prompt length and image position are batched into one prefill (polymorphic graphs). "
        "Starts a local Ray instance, or "
        "joins a cluster with --address. Needs the serve extra: pip install 'vskip-compile[serve]'.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="model directory (config.json, weights, processor)")
    p.add_argument("--plan", required=True, metavar="PLAN.json", help="skip plan for this model")
    p.add_argument("--engine", choices=SERVE_ENGINES, default="inductor",
                   help="inductor (default) or eager: vskip_compile.compile backends; onnx: an exported engine")
    p.add_argument("--engine-dir", metavar="DIR", help="ONNX engine directory written by export_onnx (--engine onnx)")
    p.add_argument("--replicas", type=pos_int, default=1, help="model replicas (default 1)")
    p.add_argument("--replica-cpus", type=float_in(0, low_open=True), default=1.0,
                   help="CPUs Ray reserves per replica (default 1)")
    p.add_argument("--threads", type=pos_int, default=1, help="intra-op threads per replica (default 1)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1)")
    p.add_argument("--port", type=port, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--address", help="join this Ray cluster (auto, or HEAD:6379) instead of starting a local Ray")
    p.add_argument("--max-batch-size", type=pos_int, default=8, help="requests per batch (default 8)")
    p.add_argument("--batch-wait-ms", type=float_in(0, 60_000), default=20.0,
                   help="how long a batch waits to fill (default 20)")
    p.add_argument("--max-layouts", type=pos_int, default=32,
                   help="kept for compatibility; no effect: one polymorphic prefill graph serves every layout")
    p.add_argument("--max-tokens", type=pos_int, default=64, help="largest max_tokens a request may ask (default 64)")
    p.add_argument("--max-image-bytes", type=pos_int, default=4 * 1024 * 1024, help="largest image file (default 4 MiB)")
    p.add_argument("--max-video-frames", type=pos_int, default=32,
                   help="frames a video part keeps (a file is sampled down to it; default 32)")
    p.add_argument("--max-video-bytes", type=pos_int, default=6 * 1024 * 1024,
                   help="largest video file, or all frames of a frame list (default 6 MiB)")
    p.add_argument("--metrics-port", type=port, help="Prometheus port of a local Ray's metrics (not with --address)")
    p.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import threading

    from .. import modeldir

    # The user's files first: a bad one is refused before Ray starts.
    model_dir = Path(args.model)
    try:
        text = hf_text_config(modeldir.check(model_dir))
    except DimsError as e:
        raise DimsError(f"{model_dir / 'config.json'}: {e}") from e
    modeldir.check_processor(model_dir)
    plan = load_plan(args.plan)
    if plan.num_layers != text.get("num_hidden_layers"):
        raise UsageError(f"{args.plan} has {plan.num_layers} layers; {model_dir} has {text.get('num_hidden_layers')}")
    if args.engine == "onnx" and not args.engine_dir:
        raise UsageError("--engine onnx needs --engine-dir (a directory written by export_onnx)")
    if args.address and args.metrics_port is not None:
        raise UsageError("--metrics-port sets up a local Ray; with --address, the cluster's `ray start` sets it")
    from ..serve import use_loopback

    if not args.address:
        use_loopback()  # a local Ray instance stays on 127.0.0.1
    try:
        from ..serve import app as serve_app
    except ImportError as e:
        raise UsageError(f"vskip serve needs the serve extra: pip install 'vskip-compile[serve]' ({e})") from e
    from ..serve.request import Limits

    limits = Limits(max_tokens=args.max_tokens, default_max_tokens=min(16, args.max_tokens),
                    max_image_bytes=args.max_image_bytes, max_video_frames=args.max_video_frames,
                    max_video_bytes=args.max_video_bytes)
    options = serve_app.ServeOptions(
        model_dir=str(model_dir), plan=plan.to_dict(), engine=args.engine, engine_dir=args.engine_dir,
        replicas=args.replicas, replica_cpus=args.replica_cpus, threads=args.threads,
        max_batch_size=args.max_batch_size, batch_wait_s=args.batch_wait_ms / 1000, max_layouts=args.max_layouts,
        limits=limits,
    )
    url = serve_app.start(options, host=args.host, port=args.port, address=args.address, metrics_port=args.metrics_port)
    print(f"serving {model_dir} under {plan} ({args.engine}, {args.replicas} replica(s)) at {url}/v1/chat/completions; "
          "Ctrl-C stops", flush=True)
    try:
        threading.Event().wait()  # a server: runs until interrupted
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        serve_app.stop()
    return 0
