"""OpenAI chat-completion requests in, responses out: validation with clear 4xx errors.

No Ray, no torch: parsing is pure so that a bad request fails here, before it reaches a
batch, and never touches the model. Every refusal is a `RequestError` with an HTTP status.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..errors import VSkipError
from ..sampling import check_option

# Top-level fields of POST /v1/chat/completions that this server understands. Anything else is
# refused (400): silently ignoring e.g. "logit_bias" would return an answer the client did not
# ask for. top_k, min_p and repetition_penalty are not OpenAI's (vLLM's names; the openai client
# sends them through extra_body).
CHAT_FIELDS = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p",
               "repetition_penalty", "seed", "stop", "stream", "stream_options", "n", "user")
MAX_STOP = 4  # stop sequences per request (OpenAI's limit)
MESSAGE_FIELDS = ("role", "content")
ROLES = ("system", "user", "assistant")


class RequestError(VSkipError, ValueError):
    """A request the server refuses; `status` is the HTTP status code (4xx)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. Sizes bound memory and time before any model work."""

    max_body_bytes: int = 8 * 1024 * 1024
    max_image_bytes: int = 4 * 1024 * 1024  # one decoded image file
    max_image_pixels: int = 2048 * 2048  # width * height, checked before the pixels are decoded
    max_images: int = 1
    max_videos: int = 1
    max_video_frames: int = 32  # frames a video keeps (a file is sampled down to it; a frame list may not exceed it)
    max_video_bytes: int = 6 * 1024 * 1024  # one decoded video file, or all frames of a frame list
    max_frame_pixels: int = 1024 * 1024  # width * height of each video frame, checked before decoding
    max_decoded_frames: int = 4096  # frames decoded from one video file at most (sampling reads them all)
    max_text_chars: int = 4096
    max_tokens: int = 64  # largest max_tokens a request may ask for
    default_max_tokens: int = 16


@dataclass
class Chat:
    """A validated request: messages for the chat template ({"type": "image"} placeholders),
    the decoded images in the same order, the number of tokens to generate, and how.

    sampling holds generate() options for this row (do_sample, temperature, top_p, top_k, min_p,
    repetition_penalty, seed), only those that take effect; a sampled request always has a
    seed (the client's, or one drawn here and reported back), so a retry on another replica
    gives the same answer."""

    messages: list[dict[str, Any]]
    images: list[Any]  # PIL RGB images
    max_tokens: int
    model: str | None = None
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")
    videos: list[Any] = field(default_factory=list)  # vskip_compile.video.Video, in order ({"type": "video"} parts)
    sampling: dict[str, Any] = field(default_factory=dict)
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage


def _error_type(status: int) -> str:
    return "invalid_request_error" if status < 500 else "server_error"


def error_body(status: int, message: str) -> dict[str, Any]:
    """OpenAI-style error object."""
    return {"error": {"message": message, "type": _error_type(status), "code": status}}


def decode_image(url: Any, limits: Limits, where: str):
    """A base64 `data:image/...` URL -> RGB PIL image, within the byte and pixel limits."""
    from PIL import Image, UnidentifiedImageError

    raw = _data_url(url, "image", limits.max_image_bytes, where, field="image_url.url")
    try:
        with Image.open(io.BytesIO(raw)) as im:
            w, h = im.size  # from the header; nothing decoded yet
            if w * h > limits.max_image_pixels:
                raise RequestError(413, f"{where}: image of {w}x{h} pixels exceeds the limit of "
                                        f"{limits.max_image_pixels} pixels")
            return im.convert("RGB")  # decodes: truncated or corrupt data fails here
    except RequestError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise RequestError(400, f"{where}: cannot decode the image ({type(e).__name__}: {e})") from e


def _data_url(url: Any, kind: str, limit: int, where: str, field: str = "the url") -> bytes:
    """The bytes of a base64 `data:<kind>/...;base64,` URL of at most `limit` bytes (field: how
    the error names the url)."""
    if not isinstance(url, str):
        raise RequestError(400, f"{where}: {field} must be a string")
    if not url.startswith("data:"):
        raise RequestError(400, f"{where}: only base64 data URLs are accepted (data:{kind}/...;base64,...); "
                                "this server fetches nothing")
    head, sep, payload = url.partition(",")
    if not sep or not head.endswith(";base64") or not head[len("data:"):].startswith(f"{kind}/"):
        raise RequestError(400, f"{where}: expected data:{kind}/<format>;base64,<data>")
    if len(payload) > limit * 4 // 3 + 4:
        raise RequestError(413, f"{where}: {kind} larger than {limit} bytes")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(400, f"{where}: invalid base64 ({e})") from e
    if len(raw) > limit:
        raise RequestError(413, f"{where}: {kind} larger than {limit} bytes")
    return raw


def decode_video(part: dict, limits: Limits, where: str):
    """A video content part -> vskip_compile.video.Video, within the limits. Two forms:
    {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,..."}} (a file, decoded
    with PyAV and sampled to max_video_frames) or {"type": "video", "video": [frame data URLs]}."""
    from .. import video as video_mod

    if part.get("type") == "video_url":
        spec = part.get("video_url")
        if not isinstance(spec, dict) or set(spec) != {"url"}:
            raise RequestError(400, f"{where}: video_url must be an object {{\"url\": ...}}")
        raw = _data_url(spec["url"], "video", limits.max_video_bytes, where)
        try:
            return video_mod.read_video_file(io.BytesIO(raw), limits.max_video_frames, limits.max_frame_pixels,
                                             limits.max_decoded_frames)
        except video_mod.VideoError as e:
            status = {video_mod.NoDecoderError: 501, video_mod.VideoLimitError: 413}.get(type(e), 400)
            raise RequestError(status, f"{where}: {e}") from e
    frames = part.get("video")
    if not isinstance(frames, list) or not frames:
        raise RequestError(400, f"{where}: video must be a non-empty list of frame data URLs (data:image/...)")
    if len(frames) > limits.max_video_frames:
        raise RequestError(413, f"{where}: {len(frames)} frames, more than {limits.max_video_frames}")
    frame_limits = Limits(max_image_bytes=limits.max_video_bytes, max_image_pixels=limits.max_frame_pixels)
    chars = sum(len(f) for f in frames if isinstance(f, str))  # base64: 4 chars per 3 bytes, + each URL's head
    if chars > limits.max_video_bytes * 4 // 3 + 100 * len(frames):
        raise RequestError(413, f"{where}: frames larger than {limits.max_video_bytes} bytes together")
    decoded = [decode_image(f, frame_limits, f"{where}.video[{i}]") for i, f in enumerate(frames)]
    try:
        return video_mod.load_video(decoded, max_frames=limits.max_video_frames)
    except video_mod.VideoError as e:
        raise RequestError(400, f"{where}: {e}") from e


def _int_field(body: dict, name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise RequestError(400, f"{name} must be in {low}..{high}, got {value}")
    return value


def _content(content: Any, limits: Limits, where: str, images: list, videos: list) -> str | list[dict[str, Any]]:
    """One message's content for the chat template; images decoded into `images`, videos into `videos`."""
    if isinstance(content, str):
        if len(content) > limits.max_text_chars:
            raise RequestError(400, f"{where}: text longer than {limits.max_text_chars} characters")
        return content
    if not isinstance(content, list) or not content:
        raise RequestError(400, f"{where}: content must be a string or a non-empty list of parts")
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise RequestError(400, f"{at}: a part must be an object")
        kind = part.get("type")
        if kind == "text":
            if set(part) - {"type", "text"}:
                raise RequestError(400, f"{at}: unknown fields {sorted(set(part) - {'type', 'text'})}")
            text = part.get("text")
            if not isinstance(text, str):
                raise RequestError(400, f"{at}: text must be a string")
            if len(text) > limits.max_text_chars:
                raise RequestError(400, f"{at}: text longer than {limits.max_text_chars} characters")
            parts.append({"type": "text", "text": text})
        elif kind == "image_url":
            if set(part) - {"type", "image_url"}:
                raise RequestError(400, f"{at}: unknown fields {sorted(set(part) - {'type', 'image_url'})}")
            spec = part.get("image_url")
            if not isinstance(spec, dict) or "url" not in spec or set(spec) - {"url", "detail"}:
                raise RequestError(400, f"{at}: image_url must be an object {{\"url\": ...}} (optional \"detail\")")
            if len(images) >= limits.max_images:
                raise RequestError(400, f"{at}: more than {limits.max_images} image(s) in one request")
            images.append(decode_image(spec["url"], limits, at))
            parts.append({"type": "image"})
        elif kind in ("video_url", "video"):
            if set(part) - {"type", kind}:
                raise RequestError(400, f"{at}: unknown fields {sorted(set(part) - {'type', kind})}")
            if len(videos) >= limits.max_videos:
                raise RequestError(400, f"{at}: more than {limits.max_videos} video(s) in one request")
            videos.append(decode_video(part, limits, at))
            parts.append({"type": "video"})
        else:
            raise RequestError(400, f"{at}: unsupported part type {kind!r}; expected 'text', 'image_url', "
                                    "'video_url' or 'video'")
    return parts


def parse_chat(raw: bytes, limits: Limits) -> Chat:
    """Body of POST /v1/chat/completions -> Chat, or RequestError (4xx) naming the problem."""
    if len(raw) > limits.max_body_bytes:
        raise RequestError(413, f"request body larger than {limits.max_body_bytes} bytes")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"body is not JSON ({e})") from e
    if not isinstance(body, dict):
        raise RequestError(400, "body must be a JSON object")
    unknown = sorted(set(body) - set(CHAT_FIELDS))
    if unknown:
        raise RequestError(400, f"unknown fields {unknown}; this server accepts {list(CHAT_FIELDS)}")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise RequestError(400, f"stream must be a boolean, got {stream!r}")
    include_usage = _stream_options(body.get("stream_options"), bool(stream))
    _int_field(body, "n", 1, 1)
    for name in ("model", "user"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise RequestError(400, f"{name} must be a string, got {body[name]!r}")
    model = body.get("model")
    max_tokens = _int_field(body, "max_tokens", 1, limits.max_tokens)
    max_completion = _int_field(body, "max_completion_tokens", 1, limits.max_tokens)
    if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
        raise RequestError(400, "max_tokens and max_completion_tokens differ")
    n_tokens = max_tokens or max_completion or limits.default_max_tokens
    sampling = sampling_options(body)
    stop = _stop(body.get("stop"))

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages must be a non-empty list")
    images: list = []
    videos: list = []
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(400, f"{where}: a message must be an object")
        if set(m) - set(MESSAGE_FIELDS):
            raise RequestError(400, f"{where}: unknown fields {sorted(set(m) - set(MESSAGE_FIELDS))}")
        if m.get("role") not in ROLES:
            raise RequestError(400, f"{where}: role must be one of {list(ROLES)}, got {m.get('role')!r}")
        out.append({"role": m["role"], "content": _content(m.get("content"), limits, where, images, videos)})
    if out[-1]["role"] != "user":
        raise RequestError(400, "the last message must be the user's")
    if not images and not videos:
        raise RequestError(400, "no image: this is a vision model; send one image_url part "
                                "(data:image/png;base64,...) or a video part with the question")
    return Chat(messages=out, images=images, max_tokens=n_tokens, model=model, sampling=sampling, stop=stop,
                stream=bool(stream), include_usage=include_usage, videos=videos)


def _number(body: dict, name: str) -> float | int | None:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise RequestError(400, f"{name} must be a number, got {value!r}")
    return value


def sampling_options(body: dict) -> dict[str, Any]:
    """generate() options of a request body, or RequestError (400) naming the field.

    Every sampling option is explicit (OpenAI's defaults for those unset), so the model's
    generation_config does not change what a request means. Greedy unless the request samples: temperature > 0, or temperature absent and top_p < 1,
    top_k > 0 or min_p > 0 asked for (then temperature 1, OpenAI's default). temperature 0 is
    greedy, where top_p, top_k, min_p and seed have no effect (they are still checked).
    repetition_penalty applies to greedy decoding too."""
    values = {name: _number(body, name) for name in ("temperature", "top_p", "min_p", "repetition_penalty")}
    values["top_k"] = body.get("top_k")
    values["seed"] = body.get("seed")
    temperature = values["temperature"]
    if temperature is not None and temperature < 0:
        raise RequestError(400, f"temperature must be >= 0 (0: greedy decoding), got {temperature!r}")
    try:
        for name, value in values.items():
            if name != "temperature" or value:
                check_option(name, value)
    except ValueError as e:
        raise RequestError(400, str(e)) from e
    filters = values["top_p"] not in (None, 1) or values["top_k"] not in (None, 0) or values["min_p"] not in (None, 0)
    do_sample = bool(temperature) if temperature is not None else filters
    out: dict[str, Any] = {}
    if values["repetition_penalty"] not in (None, 1):
        out["repetition_penalty"] = values["repetition_penalty"]
    if do_sample:  # OpenAI's defaults for what is unset: temperature 1, no top-p, top-k or min-p filter
        out["do_sample"] = True
        for name, default in (("temperature", 1.0), ("top_p", 1.0), ("top_k", 0), ("min_p", 0.0)):
            out[name] = values[name] if values[name] is not None else default
        out["seed"] = values["seed"] if values["seed"] is not None else secrets.randbelow(2**63)
    return out


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    strings = [value] if isinstance(value, str) else value
    if not isinstance(strings, list) or not all(isinstance(s, str) and s for s in strings) or not 1 <= len(strings) <= MAX_STOP:
        raise RequestError(400, f"stop must be a non-empty string or a list of 1..{MAX_STOP} non-empty strings, got {value!r}")
    return tuple(strings)


def _stream_options(value: Any, stream: bool) -> bool:
    if value is None:
        return False
    if not stream:
        raise RequestError(400, "stream_options is only allowed with stream=true")
    if not isinstance(value, dict) or set(value) - {"include_usage"} or not isinstance(value.get("include_usage", False), bool):
        raise RequestError(400, f"stream_options must be {{\"include_usage\": true|false}}, got {value!r}")
    return bool(value.get("include_usage", False))


def usage(prompt_tokens: int, completion_tokens: int, info: dict[str, Any]) -> dict[str, Any]:
    """OpenAI usage object; its `vskip` extension holds the request's serving figures (queue wait,
    prefill and decode seconds, batch size, compiles, visual FLOPs saved, seed)."""
    keys = ("queue_s", "prefill_s", "decode_s", "batch", "batch_padded", "compiles", "visual_flops_saved", "seed",
            "replica", "attempts")
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "vskip": {k: info[k] for k in keys if k in info}}


def completion_body(chat: Chat, model: str, text: str, prompt_tokens: int, new_ids: list[int],
                    finish_reason: str, extra: dict[str, Any]) -> dict[str, Any]:
    """OpenAI chat.completion object; `vskip` holds the token ids, layout and timings."""
    return {
        "id": chat.id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, len(new_ids), extra),
        "vskip": {"token_ids": new_ids, **extra},
    }


def chunk_body(chat: Chat, model: str, created: int, delta: dict[str, Any], finish_reason: str | None = None,
               usage_: dict[str, Any] | None = None) -> dict[str, Any]:
    """One OpenAI chat.completion.chunk (a server-sent event's data)."""
    out = {"id": chat.id, "object": "chat.completion.chunk", "created": created, "model": model,
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: `data: <json>` and a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()
