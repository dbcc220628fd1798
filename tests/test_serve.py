"""`vskip serve` end to end: Ray Serve on 127.0.0.1, requests over HTTP, answers compared with
the same request run alone through `vskip_compile.compile(...).generate`.

The model is the shipped easy-VQA Qwen3-VL under its calibrated plan; before the weights are
shipped, a 2-layer random Qwen3-VL with the easy-VQA processor (saved with save_pretrained).
One local Ray instance for the module; each engine is deployed in turn under the same
application name (Ray Serve replaces the replicas): "eager" (the vskip backend with the eager
inner compiler: one prefill graph per batch bucket, one decode graph per batch size and K/V
capacity, seconds each on 2 shared cores), "onnx" (an engine directory exported here once: its
one prefill graph serves every layout), and "inductor" (marked slow: inductor's C++ compile is
the longest step). Requests of different lengths share one batch; sampling with a seed is
reproducible; a stream's chunks concatenate to the answer; the `openai` client works.
The 4xx refusals are also checked without Ray (parse_chat, then Engine.prepare), so they run
even where a local Ray does not start.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import threading
import urllib.error
import urllib.request

import pytest

from vskip_compile.serve import use_loopback

use_loopback()  # before Ray is imported: the local Ray instance stays on 127.0.0.1

import torch  # noqa: E402

import vskip_compile  # noqa: E402
from vskip_compile.plan import SkipPlan  # noqa: E402
from vskip_compile.serve.request import Limits, RequestError, parse_chat  # noqa: E402  (no Ray, no torch)
from vskip_compile.zoo import easyvqa  # noqa: E402

MAX_TOKENS = 4
LIMITS = Limits(max_body_bytes=256 * 1024, max_image_bytes=64 * 1024, max_image_pixels=256 * 256, max_tokens=8,
                default_max_tokens=MAX_TOKENS)
SHIPPED_PLAN = easyvqa.MODEL_DIR / "plans" / "opskip-b40.json"
SHIPPED = (easyvqa.MODEL_DIR / "model.safetensors").is_file() and SHIPPED_PLAN.is_file()
PLAN = SkipPlan.load(SHIPPED_PLAN) if SHIPPED else SkipPlan.from_ops(["skip_attn", "skip_both"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data_url(path_or_image, fmt: str = "PNG") -> str:
    from PIL import Image

    if isinstance(path_or_image, Image.Image):
        buf = io.BytesIO()
        path_or_image.save(buf, format=fmt)
        raw = buf.getvalue()
    else:
        with open(path_or_image, "rb") as f:
            raw = f.read()
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(raw).decode()}"


def _chat(image_url: str, question: str, **extra) -> dict:
    content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": question}]
    return {"model": "tiny", "max_tokens": MAX_TOKENS, "messages": [{"role": "user", "content": content}], **extra}


def _stream(url: str, body: dict, timeout: float = 240) -> tuple[int, list]:
    """POST with stream=true: (status, the server-sent events' data, parsed; "[DONE]" as is)."""
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - loopback only
        assert r.headers["Content-Type"].startswith("text/event-stream")
        lines = r.read().decode().split("\n")
        status = r.status
    assert all(line.startswith("data: ") or line == "" for line in lines), lines
    events = [line[len("data: "):] for line in lines if line]
    return status, [e if e == "[DONE]" else json.loads(e) for e in events]


def _post(url: str, body, timeout: float = 240) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - loopback only
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _get(url: str, path: str) -> dict:
    with urllib.request.urlopen(url + path, timeout=30) as r:  # noqa: S310 - loopback only
        return json.loads(r.read())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    if SHIPPED:
        return easyvqa.MODEL_DIR
    from transformers import Qwen3VLForConditionalGeneration

    from vskip_compile.zoo.train_easyvqa import build_config, make_processor

    processor = make_processor()
    config = build_config(processor.tokenizer)
    config.text_config.num_hidden_layers = 2
    config.vision_config.depth = 1
    config.vision_config.deepstack_visual_indexes = [0]
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(config).eval()
    out = tmp_path_factory.mktemp("tiny-easyvqa")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


class _Service:
    """One local Ray instance and one Serve HTTP proxy on a fixed loopback port; `deploy`
    replaces the application when another engine (or engine directory) is asked for."""

    def __init__(self, port: int):
        self.port = port
        self.deployed = None

    def deploy(self, model_dir, engine: str, engine_dir=None) -> str:
        from vskip_compile.serve.app import ServeOptions, start

        key = (engine, str(engine_dir))
        url = f"http://127.0.0.1:{self.port}"
        if self.deployed != key:
            options = ServeOptions(model_dir=str(model_dir), plan=PLAN.to_dict(), engine=engine,
                                   engine_dir=None if engine_dir is None else str(engine_dir), max_batch_size=4,
                                   batch_wait_s=2.0, replica_cpus=1, limits=LIMITS)
            self.deployed = None
            start(options, host="127.0.0.1", port=self.port)
            self.deployed = key
        return url


@pytest.fixture(scope="module")
def service():
    pytest.importorskip("ray")
    pytest.importorskip("ray.serve")
    import ray

    from vskip_compile.serve.app import init_local_ray, stop

    try:
        if os.environ.get("RAY_ADDRESS"):  # a Ray instance already running on this machine
            ray.init(log_to_driver=False)
        else:
            init_local_ray(num_cpus=2, attempts=2, log_to_driver=False)  # a failed attempt costs ~2 min at load 10
    except Exception as e:  # noqa: BLE001 - Ray raises plain Exception when its node does not come up
        # Seen on a 2-core machine under heavy load (other jobs on both cores), even with
        # init_local_ray's retries: the raylet aborts when its dashboard agent takes more than
        # 15-20 s to start (ray-project/ray#65983). That is the machine, not this code: skip, saying so.
        pytest.skip(f"a local Ray instance did not start here: {type(e).__name__}: {e}")
    try:
        yield _Service(_free_port())
    finally:
        stop()


@pytest.fixture
def server(service, model_dir):
    """Base URL of the service running engine "eager"."""
    return service.deploy(model_dir, "eager")


class _Reference:
    """Each sample alone through vskip_compile.compile(model, PLAN, backend).generate, computed
    once per backend: (answer text, new token ids)."""

    def __init__(self, model_dir):
        self.model_dir = model_dir
        self.answers = {}
        self.loaded = None

    def __call__(self, samples, backend: str = "eager"):
        if self.loaded is None:
            self.loaded = vskip_compile.load(self.model_dir)
        model, processor = self.loaded
        cm = None
        out = []
        for path, question in samples:
            key = (backend, path, question)
            if key not in self.answers:
                cm = cm or vskip_compile.compile(model, PLAN, backend=backend)
                inputs = easyvqa.build_inputs(processor, path, question)
                new = cm.generate(**inputs, max_new_tokens=MAX_TOKENS)[0, inputs["input_ids"].shape[1]:]
                self.answers[key] = (easyvqa.parse_answer(processor, new), new.tolist())
            out.append(self.answers[key])
        return out


@pytest.fixture(scope="module")
def reference(model_dir):
    return _Reference(model_dir)


def _send_all(url: str, samples, timeout: float = 240) -> tuple[list[threading.Thread], dict]:
    """Start one request per sample, concurrently; results[i] = (status, body) once joined."""
    results: dict[int, tuple[int, dict]] = {}

    def send(i, path, question):
        results[i] = _post(url, _chat(_data_url(path), question), timeout=timeout)

    threads = [threading.Thread(target=send, args=(i, p, q)) for i, (p, q) in enumerate(samples)]
    for t in threads:
        t.start()
    return threads, results


def _join(threads) -> None:
    for t in threads:
        t.join(timeout=600)


def _check_answer(status: int, body: dict, want: tuple[str, list[int]]) -> None:
    text, ids = want
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == text
    assert body["vskip"]["token_ids"] == ids[: len(body["vskip"]["token_ids"])]
    assert body["usage"]["completion_tokens"] == len(body["vskip"]["token_ids"])


@pytest.fixture(scope="module")
def samples():
    """Two questions with the same layout (same word count) and one with another."""
    test = easyvqa.test_set()
    by_len: dict[int, list] = {}
    for path, question, _ in test[:200]:
        by_len.setdefault(len(question.split()), []).append((path, question))
    (la, a), (lb, b) = [(k, v) for k, v in sorted(by_len.items()) if len(v) >= 2][:2]
    return [a[0], a[1], b[0]]


def _bad_requests() -> dict[str, tuple[int, object]]:
    """name -> (HTTP status, body): every refusal the issue lists (no image, undecodable image,
    too large an image, too many tokens, unknown fields) and a few more."""
    from PIL import Image

    url = _data_url(easyvqa.test_set()[0][0])
    text_part = {"type": "text", "text": "what shape is it?"}
    return {
        "no image": (400, {"messages": [{"role": "user", "content": "what shape is it?"}]}),
        "text-only parts": (400, {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}),
        "undecodable image": (400, _chat("data:image/png;base64," + base64.b64encode(b"not a png").decode(), "what?")),
        "truncated image": (400, _chat("data:image/png;base64," + url.partition(",")[2][:400], "what?")),
        "bad base64": (400, _chat("data:image/png;base64,@@@", "what?")),
        "remote url": (400, _chat("http://127.0.0.1/x.png", "what?")),
        "image bytes over the limit": (413, _chat("data:image/png;base64," + base64.b64encode(bytes(70_000)).decode(), "what?")),
        "image pixels over the limit": (413, _chat(_data_url(Image.new("RGB", (300, 300), (9, 9, 9))), "what?")),
        "body over the limit": (413, _chat(url, "what shape is it?", user="x" * 300_000)),
        "two images": (400, {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "image_url", "image_url": {"url": url}}, text_part]}]}),
        "max_tokens over the limit": (400, _chat(url, "what shape is it?", max_tokens=9)),
        "max_tokens not an integer": (400, _chat(url, "what shape is it?", max_tokens="4")),
        "prompt too long": (400, _chat(url, " ".join(["shape"] * 300))),
        "unknown field": (400, _chat(url, "what shape is it?", logit_bias={"3": 1})),
        "temperature < 0": (400, _chat(url, "what shape is it?", temperature=-0.5)),
        "top_p > 1": (400, _chat(url, "what shape is it?", top_p=1.5)),
        "top_k negative": (400, _chat(url, "what shape is it?", top_k=-1)),
        "seed not an integer": (400, _chat(url, "what shape is it?", temperature=1, seed="7")),
        "repetition_penalty 0": (400, _chat(url, "what shape is it?", repetition_penalty=0)),
        "stop: five strings": (400, _chat(url, "what shape is it?", stop=["a", "b", "c", "d", "e"])),
        "stream_options without stream": (400, _chat(url, "what shape is it?", stream_options={"include_usage": True})),
        "unknown message field": (400, {"messages": [{"role": "user", "content": "hi", "name": "x"}]}),
        "unknown part field": (400, {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {**text_part, "cache_control": {}}]}]}),
        "unknown image_url field": (400, {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url, "format": "png"}}, text_part]}]}),
        "unknown part type": (400, {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "input_audio", "input_audio": {}}]}]}),
        "not json": (400, b"{not json"),
        "not an object": (400, b"[1, 2]"),
    }


# the field a refusal must name, for the cases that are about one field
NAMED_FIELD = {"temperature < 0": "temperature", "top_p > 1": "top_p", "top_k negative": "top_k",
               "seed not an integer": "seed", "repetition_penalty 0": "repetition_penalty", "stop: five strings": "stop",
               "stream_options without stream": "stream_options", "unknown field": "logit_bias",
               "max_tokens over the limit": "max_tokens"}


def test_bad_requests_are_refused_without_ray(model_dir):
    """The same refusals without Ray: parse_chat, then Engine.prepare (processor, token count)
    for those that parse (the prompt too long for the model's context)."""
    from vskip_compile.serve.engine import Engine

    engine = None
    for name, (status, body) in _bad_requests().items():
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        with pytest.raises(RequestError) as e:
            chat = parse_chat(raw, LIMITS)
            engine = engine or Engine(model_dir, PLAN, "eager", limits=LIMITS, max_batch_size=4)
            engine.prepare(chat)
        assert e.value.status == status and e.value.message, name
        assert NAMED_FIELD.get(name, "") in e.value.message, (name, e.value.message)
        if name == "prompt too long":
            assert e.value.message.startswith("too many tokens"), e.value.message
    assert engine is not None  # "prompt too long" reached the engine


def test_bad_requests_get_4xx_and_the_replica_stays(server, samples):
    cases = _bad_requests()
    for name, (status, body) in cases.items():
        got, answer = _post(server, body)
        assert got == status, (name, answer)
        assert answer["error"]["message"], name
        assert answer["error"]["code"] == status and answer["error"]["type"] == "invalid_request_error", name
        assert NAMED_FIELD.get(name, "") in answer["error"]["message"], (name, answer)
    health = _get(server, "/health")
    assert health["status"] == "ok"
    assert sum(health["front"].values()) >= len(cases)


def test_mixed_lengths_share_a_batch_and_equal_each_alone(server, reference, samples):
    """Concurrent requests of two prompt lengths (two layouts) run as ONE batch (one
    left-padded prefill, one decode loop) and answer exactly what each request alone answers
    through vskip_compile.compile(...).generate."""
    threads, results = _send_all(server, samples)
    want = reference(samples)  # the solo references compile here while the server compiles in its replica
    _join(threads)
    for i in range(len(samples)):
        _check_answer(*results[i], want[i])
    info = [results[i][1]["vskip"] for i in range(len(samples))]
    assert len({v["layout"] for v in info}) == 2  # two layouts...
    assert [v["batch"] for v in info] == [3, 3, 3]  # ...in one batch
    usage = results[0][1]["usage"]["vskip"]
    for key in ("queue_s", "prefill_s", "decode_s", "batch", "compiles", "visual_flops_saved"):
        assert key in usage, key
    assert usage["visual_flops_saved"] > 0 and usage["queue_s"] >= 0 and usage["prefill_s"] > 0

    # two of them again: the batched prefill graph is cached and reused (no per-request compile)
    before = _get(server, "/health")["graph_cache"]
    threads, again = _send_all(server, [samples[0], samples[2]])
    _join(threads)
    for i, j in ((0, 0), (1, 2)):
        _check_answer(*again[i], want[j])
    after = _get(server, "/health")["graph_cache"]
    assert after["misses"] == before["misses"] and after["hits"] > before["hits"]


def test_sampling_with_a_seed_is_reproducible(server, model_dir, samples):
    """temperature > 0: the same seed gives the same tokens (in a batch with another request or
    alone) and equals compile(...).generate with that seed; other seeds give other tokens."""
    from vskip_compile import load

    path, question = samples[0]
    url = _data_url(path)
    hot = dict(temperature=8.0, max_tokens=6)  # hot enough that a trained model's answer varies
    bodies = [_chat(url, question, seed=s, **hot) for s in (11, 11, 12, 13)]
    results = {}

    def send(i):
        results[i] = _post(server, bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    _join(threads)
    ids = [results[i][1]["vskip"]["token_ids"] for i in range(len(bodies))]
    assert all(results[i][0] == 200 for i in results), results
    assert ids[0] == ids[1] and len({tuple(x) for x in ids[1:]}) == 3, ids
    assert results[0][1]["usage"]["vskip"]["seed"] == 11
    status, alone = _post(server, bodies[0])
    assert status == 200 and alone["vskip"]["token_ids"] == ids[0]

    model, processor = load(model_dir)
    cm = vskip_compile.compile(model, PLAN, backend="eager")
    inputs = easyvqa.build_inputs(processor, path, question)
    new = cm.generate(**inputs, max_new_tokens=6, do_sample=True, temperature=8.0, top_k=0, top_p=1.0, seed=11)
    want = new[0, inputs["input_ids"].shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    assert ids[0] == (want[: want.index(eos) + 1] if eos in want else want)


def test_stream_chunks_concatenate_to_the_answer(server, samples):
    """stream=true: OpenAI chat.completion.chunk events, the role first, text as decoded, the
    finish_reason with usage last, then [DONE]; the chunks' text is the non-streamed answer."""
    for path, question in samples[:2]:
        body = _chat(_data_url(path), question, max_tokens=6)
        status, plain = _post(server, body)
        assert status == 200
        status, events = _stream(server, body)
        assert status == 200 and events[-1] == "[DONE]"
        chunks = events[:-1]
        assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        assert text == plain["choices"][0]["message"]["content"]
        assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
        last = chunks[-1]
        assert last["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
        assert last["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"]
        assert last["vskip"]["token_ids"] == plain["vskip"]["token_ids"]


def test_stop_sequence_cuts_the_answer(server, reference, samples):
    """stop: the answer ends before the first stop string (not included), finish_reason stop."""
    path, question = samples[0]
    text, _ = reference(samples[:1])[0]
    stop = text[1:3]  # inside the greedy answer (a shape, a color, yes or no)
    status, body = _post(server, _chat(_data_url(path), question, stop=[stop, "zzz"]))
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == text[: text.find(stop)].strip()
    assert body["choices"][0]["finish_reason"] == "stop"
    status, events = _stream(server, _chat(_data_url(path), question, stop=stop))
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1]) == text[: text.find(stop)].strip()


def test_the_openai_client_works(server, reference, samples):
    """The `openai` package against the server: a completion, and a stream with sampling."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=240)
    path, question = samples[1]
    messages = _chat(_data_url(path), question)["messages"]
    done = client.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    text, _ = reference(samples[1:2])[0]
    assert done.choices[0].message.content == text and done.choices[0].finish_reason in ("stop", "length")
    assert done.usage.completion_tokens >= 1
    pieces, finish, usage = [], None, None
    for chunk in client.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_TOKENS, stream=True,
                                                temperature=0.7, top_p=0.9, seed=5):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    assert finish in ("stop", "length") and usage.completion_tokens >= 1
    again = client.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_TOKENS, temperature=0.7,
                                           top_p=0.9, seed=5)
    assert "".join(pieces) == again.choices[0].message.content  # same seed, same answer, streamed or not
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_TOKENS, top_p=2)


# -- engine "onnx" --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def onnx_engine_dir(model_dir, samples, tmp_path_factory):
    """An ONNX engine of the model under PLAN, traced on samples[0]: one prefill graph for
    every layout, a batch-1 decode graph."""
    pytest.importorskip("onnxruntime")
    from vskip_compile.export import export_onnx
    model, processor = vskip_compile.load(model_dir)
    path, question = samples[0]
    out = tmp_path_factory.mktemp("onnx-engine")
    export_onnx(model, PLAN, easyvqa.build_inputs(processor, path, question), out, optimize=False,
                source={"model_dir": str(model_dir)})
    return out


def test_onnx_engine_over_http(service, model_dir, onnx_engine_dir, reference, samples):
    """Engine "onnx": its one prefill graph answers every layout what compile(...).generate
    answers (the pair of one layout runs row by row: the engine has no batch-2 decode graph),
    the question of another length too, and the replica keeps serving."""
    url = service.deploy(model_dir, "onnx", onnx_engine_dir)
    health = _get(url, "/health")
    assert health["engine"] == "onnx" and health["graph_cache"] == {"prefill_graphs": 1, "decode_graphs": 1}
    threads, results = _send_all(url, samples)
    want = reference(samples)
    _join(threads)
    for i in (0, 1, 2):
        _check_answer(*results[i], want[i])
    assert [results[i][1]["vskip"]["batch_padded"] for i in (0, 1)] == [1, 1]  # batch-1 decode graph only
    status, body = _post(url, _chat(_data_url(samples[0][0]), samples[0][1]))  # still serving
    _check_answer(status, body, want[0])
    assert _get(url, "/health")["requests"] == {"200": 4}
    status, body = _post(url, _chat(_data_url(samples[0][0]), samples[0][1], temperature=0.5))
    assert status == 400 and "engine 'onnx' decodes greedily" in body["error"]["message"]


# -- engine "inductor" ----------------------------------------------------------------------------
@pytest.mark.slow
def test_inductor_engine_over_http(service, model_dir, reference, samples):
    """Engine "inductor" (the `vskip serve` default): one request end to end answers what the
    request alone answers through compile(..., backend="eager").generate, the oracle the other
    engines are held to. Exact equality across inner compilers holds here: inductor's fp32
    kernels stay within 1e-5 of eager in the logits (test_backend), far below the shipped
    model's top-2 logit margins on these answers (at least 2.3 over the greedy tokens of the
    first 40 test questions, measured); a second, in-process inductor compile of the
    reference would only double the longest step of this file."""
    url = service.deploy(model_dir, "inductor")
    assert _get(url, "/health")["engine"] == "inductor"
    status, body = _post(url, _chat(_data_url(samples[0][0]), samples[0][1]), timeout=900)
    _check_answer(status, body, reference(samples[:1])[0])
    assert body["vskip"]["batch"] == 1
    assert _get(url, "/health")["graph_cache"]["misses"] >= 1
