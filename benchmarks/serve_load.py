"""Bounded load test of `vskip serve` on 127.0.0.1: throughput, latency, and that every request
got its own right answer.

    python benchmarks/serve_load.py --requests 300 --layouts 3            # zoo model, eager engine
    python benchmarks/serve_load.py --requests 200 --kill-replica --replicas 2
    python benchmarks/serve_load.py --requests 200 --rounds 4 --kill-replica --kill-round 3 --replicas 2
    python benchmarks/serve_load.py --sweep --out benchmarks/results/serve_sweep.json   # full vs plan, c = 1, 8, 32

--sweep: for a wide random model (hidden 2048, 8 layers by default (--wide-hidden, --wide-layers),
random weights, the shipped processor: compute-bound on a CPU) and the shipped model, the full model and a skip plan on the same
engine and batching, closed-loop clients at concurrency 1, 8 and 32 (each client sends its next
request when its last one is answered), prompts of random question length with the image
before or after the question: requests/s, p50 and p99 latency, and the measured throughput
ratio plan / full against the FLOPs-ideal ratio (decoder prefill FLOPs of flops.py over the
same requests; max_tokens 1, so a request is its prefill).

Starts a local Ray + the deployment itself, computes each distinct prompt's answer alone with
`vskip_compile.compile(...).generate` (the reference), then fires rounds of concurrent requests
over several layouts (questions of different lengths). Round 1 is cold (graphs compile as
layouts and batch sizes first appear); later rounds are warm. With --kill-replica, one replica
actor is ray.kill'ed during round --kill-round (default: the last): Ray Serve starts a new one
(the run waits until it is RUNNING, and records how long that took, before any later round,
which then also exercises the new, cold replica); requests that fail are counted as failed,
and a 200 whose answer differs from the reference is counted as wrong (must be 0).
Everything is bounded: request count, per-request timeout, total time limit; traffic goes to
127.0.0.1 only. Prints one JSON report.

(About 430 lines, one script: its load, kill and sweep modes share the deployment, the
reference answers and the report; split, each mode would repeat them.)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import socket
import statistics
import sys
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_plan(num_layers: int):
    from vskip_compile.plan import SkipPlan

    cycle = ["full", "skip_attn", "skip_ffn", "skip_both"]
    return SkipPlan.from_ops([cycle[i % 4] for i in range(num_layers)], name="serve-load-demo")


def pick_prompts(layouts: int, per_layout: int, seed: int) -> list[tuple[str, str]]:
    """(image path, question) pairs from the easy-VQA test split: `per_layout` distinct pairs
    for each of the `layouts` most common question lengths (length decides the layout)."""
    from vskip_compile.zoo import easyvqa

    by_len: dict[int, list] = {}
    for path, question, _ in easyvqa.test_set()[:3000]:
        by_len.setdefault(len(question.split()), []).append((path, question))
    common = sorted(by_len, key=lambda n: -len(by_len[n]))[:layouts]
    rng = random.Random(seed)
    return [p for n in sorted(common) for p in rng.sample(by_len[n], per_layout)]


def references(model_dir: Path, plan, engine: str, prompts, max_tokens: int) -> list[tuple[str, list[int]]]:
    """Each prompt alone through vskip_compile.compile(...).generate: (answer text, new token ids)."""
    import vskip_compile
    from vskip_compile.zoo import easyvqa

    model, processor = vskip_compile.load(model_dir)
    cm = vskip_compile.compile(model, plan, backend="eager" if engine == "onnx" else engine)
    out = []
    for path, question in prompts:
        inputs = easyvqa.build_inputs(processor, path, question)
        new = cm.generate(**inputs, max_new_tokens=max_tokens)[0, inputs["input_ids"].shape[1]:]
        out.append((easyvqa.parse_answer(processor, new), new.tolist()))
    return out


def _body(path: str, question: str, max_tokens: int) -> bytes:
    b64 = base64.b64encode(Path(path).read_bytes()).decode()
    content = [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}},
               {"type": "text", "text": question}]
    return json.dumps({"max_tokens": max_tokens, "messages": [{"role": "user", "content": content}]}).encode()


async def _one(session, url: str, body: bytes, timeout: float) -> tuple[int, dict | str, float]:
    import aiohttp

    start = time.perf_counter()
    try:
        async with session.post(url, data=body, headers={"Content-Type": "application/json"},
                                timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            text = await r.text()
            try:
                payload = json.loads(text)
            except json.JSONDecodeError:
                payload = text[:200]
            return r.status, payload, time.perf_counter() - start
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        return 0, f"{type(e).__name__}: {e}", time.perf_counter() - start


async def run_round(base: str, bodies: list[bytes], order: list[int], timeout: float, kill_at: float | None,
                    kill) -> dict:
    """All requests at once (bounded by len(order)); optionally kill a replica after kill_at s."""
    import aiohttp

    url = base + "/v1/chat/completions"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=len(order))) as session:
        start = time.perf_counter()
        tasks = [asyncio.create_task(_one(session, url, bodies[i], timeout)) for i in order]
        killed = None
        if kill_at is not None:
            await asyncio.sleep(kill_at)
            killed = await asyncio.to_thread(kill)
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    return {"results": results, "wall_s": wall, "killed": killed}


def summarize(round_no: int, out: dict, order: list[int], want: list[tuple[str, list[int]]]) -> dict:
    ok = wrong = retried = 0
    failed: dict[str, int] = {}
    latencies = []
    batches = []
    for i, (status, payload, dt) in zip(order, out["results"]):
        if status != 200:
            key = str(status) if status else "connection"
            failed[key] = failed.get(key, 0) + 1
            continue
        text, ids = want[i]
        got_ids = payload["vskip"]["token_ids"]
        if payload["choices"][0]["message"]["content"] == text and got_ids == ids[: len(got_ids)]:
            ok += 1
            latencies.append(dt)
            batches.append(payload["vskip"]["batch"])
            retried += payload["usage"]["vskip"].get("attempts", 1) > 1
        else:
            wrong += 1
    latencies.sort()
    n = len(order)
    return {
        "round": round_no,
        "requests": n,
        "ok": ok,
        "wrong": wrong,
        "failed": failed,
        "wall_s": round(out["wall_s"], 2),
        "throughput_rps": round(ok / out["wall_s"], 2),
        "p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "p99_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3) if latencies else None,
        "mean_batch": round(statistics.mean(batches), 2) if batches else None,
        "retried": retried,  # right answers that needed a second replica (theirs died)
        "killed_replica": out["killed"],
    }


# -- --sweep ------------------------------------------------------------------------------------
def wide_model(out: Path, hidden: int = 1024, layers: int = 4, seed: int = 0, image_px: int | None = None) -> Path:
    """A Qwen3-VL with the easy-VQA processor and a wide random decoder (FFN 2.75 x hidden, heads
    of 64, half as many KV heads), saved to out: compute-bound on a CPU when the decoder's prefill
    takes much longer than the serving path around it (HTTP, processor, vision tower).
    image_px: the processor resizes every image to image_px x image_px ((image_px / 16)^2 visual
    rows: patch 8, merge 2; default 128 px, 64 rows), for real visual row counts (384 px: 576)."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    from vskip_compile.zoo.train_easyvqa import build_config, make_processor

    processor = make_processor()
    if image_px:
        processor.image_processor.size = {"shortest_edge": image_px * image_px, "longest_edge": image_px * image_px}
    config = build_config(processor.tokenizer)
    text = config.text_config
    text.max_position_embeddings = 8192  # positions of long image prompts (M-RoPE ids stay small)
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = hidden, int(hidden * 2.75), layers
    text.num_attention_heads, text.num_key_value_heads, text.head_dim = hidden // 64, hidden // 128, 64
    text.rope_parameters = {**text.rope_parameters, "mrope_section": [8, 12, 12]}  # sums to head_dim / 2
    config.vision_config.out_hidden_size = hidden
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def sweep_prompts(n: int, seed: int) -> list[bytes]:
    """n request bodies: random easy-VQA images, a question of random length (its words
    repeated), the image before or after the question; max_tokens 1."""
    from vskip_compile.zoo import easyvqa

    rng = random.Random(seed)
    test = easyvqa.test_set()[:2000]
    bodies = []
    for _ in range(n):
        path, question, _ = rng.choice(test)
        words = question.split()
        question = " ".join(words + [rng.choice(words) for _ in range(rng.randrange(0, 12))])
        b64 = base64.b64encode(Path(path).read_bytes()).decode()
        parts = [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}},
                 {"type": "text", "text": question}]
        if rng.random() < 0.5:
            parts.reverse()
        bodies.append(json.dumps({"max_tokens": 1, "messages": [{"role": "user", "content": parts}]}).encode())
    return bodies


async def closed_loop(base: str, bodies: list[bytes], concurrency: int, timeout: float) -> dict:
    """`concurrency` clients, each sending the next body when its last one is answered."""
    import aiohttp

    url = base + "/v1/chat/completions"
    queue = list(range(len(bodies)))
    results: list = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def client():
            while queue:
                results.append(await _one(session, url, bodies[queue.pop()], timeout))

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ok = [r for r in results if r[0] == 200]
    failed = [r for r in results if r[0] != 200]
    lat = sorted(r[2] for r in ok)
    batches = [r[1]["usage"]["vskip"]["batch"] for r in ok]
    return {"concurrency": concurrency, "requests": len(bodies), "ok": len(ok), "wall_s": round(wall, 2),
            "rps": round(len(ok) / wall, 3), "p50_s": round(statistics.median(lat), 3) if lat else None,
            "p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3) if lat else None,
            "mean_batch": round(statistics.mean(batches), 2) if batches else None,
            "first_failure": [failed[0][0], str(failed[0][1])[:300]] if failed else None,
            "prompt_tokens": [r[1]["usage"]["prompt_tokens"] for r in ok]}


def visual_rows(model_dir: Path) -> int:
    """Visual rows the model's processor gives one easy-VQA image: grid t x h x w over merge^2."""
    from PIL import Image

    from vskip_compile.modeldir import load_processor
    from vskip_compile.zoo import easyvqa

    image_processor = load_processor(model_dir).image_processor
    grid = image_processor(images=[Image.open(easyvqa.test_set()[0][0]).convert("RGB")])["image_grid_thw"][0]
    return int(grid.prod()) // image_processor.merge_size ** 2


def ideal_ratio(model_dir: Path, plan, prompt_tokens: list[int], visual: int) -> float:
    """Decoder prefill FLOPs of the full model over those of the plan, summed over the requests
    (flops.py: S = prompt tokens, V = visual tokens; the image is one span)."""
    from vskip_compile import flops

    dims = flops.TextDims.from_hf_config(json.loads((model_dir / "config.json").read_text()))
    full = sum(flops.evaluate(flops.model_flops(dims), S=s, V=visual, P=0) for s in prompt_tokens)
    mine = sum(flops.evaluate(flops.model_flops(dims, plan), S=s, V=visual, P=0) for s in prompt_tokens)
    return full / mine


def run_sweep(args, serve_app, Limits) -> dict:
    import tempfile

    from vskip_compile.plan import SkipPlan
    from vskip_compile.zoo import easyvqa

    levels = [int(c) for c in args.concurrency.split(",")]
    wide = f"wide-{args.wide_hidden}x{args.wide_layers}"
    if args.image_px:
        wide += f"-{args.image_px}px"
    models = {wide: wide_model(Path(tempfile.mkdtemp(prefix="vskip-wide-")), args.wide_hidden, args.wide_layers,
                              image_px=args.image_px)}
    if not args.skip_shipped and (easyvqa.MODEL_DIR / "model.safetensors").is_file():
        models["easyvqa-shipped"] = easyvqa.MODEL_DIR
    report = {"engine": args.engine, "max_batch_size": args.max_batch_size, "batch_wait_ms": args.batch_wait_ms,
              "threads": args.threads, "models": {}}
    port = _free_port()  # one Serve HTTP proxy for every deployment of the sweep
    for name, model_dir in models.items():
        layers = json.loads((model_dir / "config.json").read_text())["text_config"]["num_hidden_layers"]
        cycle = args.wide_plan.split(",")
        ops = [cycle[i % len(cycle)] for i in range(layers)]
        plans = {"full": SkipPlan.full(layers), "plan": SkipPlan.from_ops(ops, name="-".join(cycle) + "-cycled")}
        if name == "easyvqa-shipped":
            plans["plan"] = SkipPlan.load(easyvqa.MODEL_DIR / "plans" / "opskip-b40.json")
        entry = report["models"][name] = {"plans": {k: str(v) for k, v in plans.items()}, "runs": {}}
        for label, plan in plans.items():
            options = serve_app.ServeOptions(
                model_dir=str(model_dir), plan=plan.to_dict(), engine=args.engine, replicas=1, replica_cpus=1,
                threads=args.threads, max_batch_size=args.max_batch_size, batch_wait_s=args.batch_wait_ms / 1000,
                max_ongoing_requests=256, limits=Limits(max_tokens=16))
            base = serve_app.start(options, host="127.0.0.1", port=port)
            warm = sweep_prompts(2 * args.max_batch_size, args.seed + 99)  # compiles: batch buckets 1 and >= 2
            asyncio.run(closed_loop(base, warm[:1], 1, args.timeout))
            asyncio.run(closed_loop(base, warm, args.max_batch_size, args.timeout))
            runs = entry["runs"][label] = []
            for c in levels:
                bodies = sweep_prompts(max(args.sweep_requests, 3 * c), args.seed + c)
                out = asyncio.run(closed_loop(base, bodies, c, args.timeout))
                runs.append(out)
                print(json.dumps({"model": name, "plan": label, **{k: v for k, v in out.items() if k != "prompt_tokens"}}),
                      file=sys.stderr, flush=True)
            serve_app.serve.delete(serve_app.APP_NAME)
        visual = entry["visual_rows"] = visual_rows(model_dir)
        for i, c in enumerate(levels):
            full, mine = entry["runs"]["full"][i], entry["runs"]["plan"][i]
            ideal = ideal_ratio(model_dir, plans["plan"], mine["prompt_tokens"], visual)
            measured = mine["rps"] / full["rps"] if full["rps"] else None
            entry.setdefault("ratios", []).append({
                "concurrency": c, "flops_ideal": round(ideal, 3), "measured": None if measured is None else round(measured, 3),
                "realized": None if measured is None else round(measured / ideal, 3)})
        for runs in entry["runs"].values():
            for r in runs:
                r.pop("prompt_tokens")
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="model directory (default: the zoo easy-VQA model)")
    ap.add_argument("--plan", type=Path, help="plan JSON (default: a cycle of full/skip_attn/skip_ffn/skip_both)")
    ap.add_argument("--engine", choices=("inductor", "eager", "onnx"), default="eager")
    ap.add_argument("--engine-dir", type=Path, help="ONNX engine directory (--engine onnx)")
    ap.add_argument("--requests", type=int, default=300, help="requests per round (all concurrent)")
    ap.add_argument("--rounds", type=int, default=2, help="round 1 is cold (compiles); later rounds warm")
    ap.add_argument("--layouts", type=int, default=3, help="distinct question lengths (layouts)")
    ap.add_argument("--per-layout", type=int, default=4, help="distinct (image, question) prompts per layout")
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--batch-wait-ms", type=float, default=50.0)
    ap.add_argument("--kill-replica", action="store_true", help="ray.kill one replica during the last round")
    ap.add_argument("--kill-after", type=float, default=5.0, help="seconds into the kill round")
    ap.add_argument("--kill-round", type=int, help="round in which a replica is killed (default: the last)")
    ap.add_argument("--timeout", type=float, default=600.0, help="per-request timeout (s)")
    ap.add_argument("--time-limit", type=float, default=1800.0, help="whole run (s); rounds stop being started after it")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="also write the JSON report here")
    ap.add_argument("--sweep", action="store_true", help="full model vs plan at several concurrencies (see the doc)")
    ap.add_argument("--concurrency", default="1,8,32", help="--sweep: client counts")
    ap.add_argument("--sweep-requests", type=int, default=32, help="--sweep: requests per level (at least 3 x concurrency)")
    ap.add_argument("--threads", type=int, default=2, help="--sweep: intra-op threads of the replica")
    ap.add_argument("--wide-hidden", type=int, default=2048, help="--sweep: the wide random model's hidden size")
    ap.add_argument("--wide-layers", type=int, default=8, help="--sweep: the wide random model's decoder layers")
    ap.add_argument("--image-px", type=int, help="--sweep: the wide model's processor resizes images to this side "
                    "(default 128 px: 64 visual rows; 384: 576)")
    ap.add_argument("--wide-plan", default="skip_both", help="--sweep: the wide model's plan, ops cycled over its "
                    "layers (default skip_both on every layer; e.g. skip_attn,skip_both)")
    ap.add_argument("--skip-shipped", action="store_true", help="--sweep: the wide model only")
    args = ap.parse_args(argv)
    if not 1 <= args.requests <= 2000 or not 1 <= args.rounds <= 10:
        ap.error("--requests must be in 1..2000 and --rounds in 1..10 (a bounded test)")
    kill_round = args.rounds if args.kill_round is None else args.kill_round
    if args.kill_replica and not 1 <= kill_round <= args.rounds:
        ap.error(f"--kill-round must be in 1..{args.rounds}")

    from vskip_compile.serve import use_loopback

    use_loopback()  # before Ray is imported: the local Ray instance stays on 127.0.0.1
    import ray
    import torch

    from vskip_compile.plan import SkipPlan
    from vskip_compile.serve import app as serve_app
    from vskip_compile.serve.request import Limits
    from vskip_compile.zoo import easyvqa

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if args.sweep:
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=False)
        else:
            serve_app.init_local_ray(num_cpus=2, log_to_driver=False)
        try:
            report = run_sweep(args, serve_app, Limits)
        finally:
            serve_app.stop()
        report["total_s"] = round(time.perf_counter() - t0, 1)
        text = json.dumps(report, indent=1)
        print(text)
        if args.out:
            args.out.write_text(text + "\n")
        return 0
    model_dir = args.model or easyvqa.MODEL_DIR
    if not (model_dir / "config.json").is_file():
        ap.error(f"no model at {model_dir}; pass --model DIR")
    config = json.loads((model_dir / "config.json").read_text())
    num_layers = config.get("text_config", config)["num_hidden_layers"]
    plan = SkipPlan.load(args.plan) if args.plan else _default_plan(num_layers)
    prompts = pick_prompts(args.layouts, args.per_layout, args.seed)
    bodies = [_body(p, q, args.max_tokens) for p, q in prompts]

    options = serve_app.ServeOptions(
        model_dir=str(model_dir), plan=plan.to_dict(), engine=args.engine,
        engine_dir=str(args.engine_dir) if args.engine_dir else None, replicas=args.replicas,
        replica_cpus=min(1.0, 2.0 / max(1, args.replicas)), max_batch_size=args.max_batch_size,
        batch_wait_s=args.batch_wait_ms / 1000, max_ongoing_requests=max(64, args.requests),
        limits=Limits(max_tokens=max(16, args.max_tokens)),
    )
    if os.environ.get("RAY_ADDRESS"):  # a Ray instance already running on this machine
        ray.init(log_to_driver=False)
    else:
        serve_app.init_local_ray(num_cpus=2, log_to_driver=False)  # retried: see its docstring
    report = {"model": str(model_dir), "plan": str(plan), "engine": args.engine, "replicas": args.replicas,
              "layouts": args.layouts, "distinct_prompts": len(prompts), "max_batch_size": args.max_batch_size,
              "rounds": []}
    try:
        base = serve_app.start(options, host="127.0.0.1", port=_free_port())
        report["startup_s"] = round(time.perf_counter() - t0, 1)
        t_ref = time.perf_counter()
        want = references(model_dir, plan, args.engine, prompts, args.max_tokens)
        report["reference_s"] = round(time.perf_counter() - t_ref, 1)
        report["distinct_answers"] = len({tuple(ids) for _, ids in want})
        rng = random.Random(args.seed)

        def kill() -> str:
            names = serve_app.replica_actors()
            serve_app.kill_replica(names[0])
            return names[0]

        for r in range(1, args.rounds + 1):
            if time.perf_counter() - t0 > args.time_limit:
                report["stopped"] = f"time limit {args.time_limit} s reached before round {r}"
                break
            order = [rng.randrange(len(prompts)) for _ in range(args.requests)]
            kill_at = args.kill_after if args.kill_replica and r == kill_round else None
            out = asyncio.run(run_round(base, bodies, order, args.timeout, kill_at, kill))
            summary = summarize(r, out, order, want)
            report["rounds"].append(summary)
            print(json.dumps(summary), file=sys.stderr, flush=True)
            if kill_at is not None:  # wait for Ray Serve to replace the killed replica
                t_kill = time.perf_counter()
                deadline = t_kill + 300
                while time.perf_counter() < deadline and serve_app.running_replicas() < args.replicas:
                    time.sleep(1)
                report["replicas_running_after_kill"] = serve_app.running_replicas()
                report["replica_back_s_after_round"] = round(time.perf_counter() - t_kill, 1)
                report["replicas_after_kill"] = serve_app.replica_actors()
    finally:
        serve_app.stop()
    report["total_s"] = round(time.perf_counter() - t0, 1)
    report["all_right"] = all(s["wrong"] == 0 for s in report["rounds"])
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if report["all_right"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
