"""Video in from the outside: frames and files (vskip_compile.video), the processor's video
inputs without torchvision, the chat API's video parts with their limits, and one video
request through the serving engine (no Ray) and the lmms-eval generator on the shipped
easy-VQA Qwen3-VL directory, against the eager reference."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch

from vskip_compile import SkipPlan, reference, video
from vskip_compile.serve.request import Limits, RequestError, parse_chat
from vskip_compile.zoo import easyvqa

PLAN_FILE = easyvqa.MODEL_DIR / "plans" / "opskip-b40.json"
SHIPPED = (easyvqa.MODEL_DIR / "model.safetensors").exists()
needs_model = pytest.mark.skipif(not SHIPPED, reason="the easy-VQA weights are not shipped in this checkout")


def _frames(n: int, side: int = 64) -> list[np.ndarray]:
    """n distinct RGB frames [side, side, 3] uint8 (a shape moving right)."""
    out = []
    for i in range(n):
        f = np.full((side, side, 3), 255, np.uint8)
        f[16:40, 4 + 4 * i : 20 + 4 * i] = (200, 30, 30)
        out.append(f)
    return out


def _png_url(frame: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _mp4(frames: list[np.ndarray], fps: int = 4) -> bytes:
    av = pytest.importorskip("av")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode())
    return buf.getvalue()


# -- frames and files -------------------------------------------------------------------------
def test_frame_lists_are_checked_and_padded_to_whole_temporal_patches():
    v = video.load_video(_frames(3), fps=2.0)
    assert v.frames.shape == (4, 64, 64, 3) and v.indices == [0, 1, 2, 2]  # the last frame repeated
    assert v.metadata.fps == 2.0 and v.metadata.frames_indices == [0, 1, 2, 2]
    with pytest.raises(video.VideoError, match="frames of different sizes"):
        video.load_video([_frames(1)[0], _frames(1, side=32)[0]])
    with pytest.raises(video.VideoError, match="more than max_frames=2"):
        video.load_video(_frames(3), max_frames=2)
    with pytest.raises(video.VideoError, match=r"frame 0: a frame is \[H, W, 3\] uint8"):
        video.load_video([np.zeros((4, 4), np.uint8)])
    with pytest.raises(video.VideoError, match="at least one frame"):
        video.load_video([])
    assert video.sample_indices(10, 4) == [0, 3, 6, 9] and video.sample_indices(3, 8) == [0, 1, 2]


def test_a_video_file_is_decoded_and_sampled(tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(_mp4(_frames(10)))
    v = video.load_video(path, max_frames=4)
    assert v.frames.shape == (4, 64, 64, 3) and v.indices == [0, 3, 6, 9] and v.fps == 4.0
    # lossy codec: still the frames it was given (the shape moved right by 12 px per sampled frame)
    red = [int(np.argmax((f[28, :, 0].astype(int) - f[28, :, 1].astype(int)) > 100)) for f in v.frames]
    assert red == [4, 16, 28, 40]
    with pytest.raises(video.VideoLimitError, match="exceed the limit of 100 pixels"):
        video.read_video_file(path, max_pixels=100)
    with pytest.raises(video.VideoLimitError, match="more than 5 frames"):
        video.read_video_file(path, max_decoded=5)
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(video.VideoError, match="cannot decode it as a video"):
        video.load_video(tmp_path / "bad.mp4")
    with pytest.raises(video.VideoError, match="video file not found"):
        video.load_video(tmp_path / "missing.mp4")


def test_frame_video_processor_is_the_image_processor_per_temporal_patch():
    """A video of two equal frames is exactly the image processor's output for that frame (which
    writes an image as temporal_patch_size copies); a 4-frame video is 2 temporal patches whose
    slot j holds frame j of the patch."""
    processor = easyvqa.load()[1] if SHIPPED else None
    if processor is None:
        pytest.skip("needs the shipped easy-VQA processor")
    ip = processor.image_processor
    frames = _frames(4)
    vp = video.FrameVideoProcessor(ip)
    same = vp(videos=[np.stack([frames[0], frames[0]])], return_tensors="np")
    image = ip(images=[frames[0]], return_tensors="np")
    assert np.array_equal(same["pixel_values_videos"], image["pixel_values"])
    assert same["video_grid_thw"].tolist() == image["image_grid_thw"].tolist()
    out = vp(videos=[np.stack(frames)], return_tensors="np")
    t, h, w = out["video_grid_thw"][0].tolist()
    assert t == 2 and out["pixel_values_videos"].shape[0] == t * h * w
    pix = out["pixel_values_videos"].reshape(t, h * w, 3, 2, ip.patch_size, ip.patch_size)  # [t, R, C, T, p, p]
    for k in range(4):
        ref = ip(images=[frames[k]], return_tensors="np")["pixel_values"].reshape(h * w, 3, 2, ip.patch_size, ip.patch_size)
        assert np.array_equal(pix[k // 2, :, :, k % 2], ref[:, :, 0])


# -- the chat API -----------------------------------------------------------------------------
def _video_chat(part: dict, text: str = "what shape is in the video?") -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": [part, {"type": "text", "text": text}]}],
                       "max_tokens": 4}).encode()


def test_chat_video_parts_parse_with_limits():
    limits = Limits(max_video_frames=4, max_frame_pixels=64 * 64, max_video_bytes=200_000)
    frames = [_png_url(f) for f in _frames(4)]
    chat = parse_chat(_video_chat({"type": "video", "video": frames}), limits)
    assert not chat.images and len(chat.videos) == 1 and chat.videos[0].frames.shape == (4, 64, 64, 3)
    assert chat.messages[0]["content"][0] == {"type": "video"}
    bad = {
        "too many frames": (413, {"type": "video", "video": frames + frames[:1]}),
        "frame pixels": (413, {"type": "video", "video": [_png_url(_frames(1, side=72)[0])]}),
        "frames not a list": (400, {"type": "video", "video": frames[0]}),
        "empty frames": (400, {"type": "video", "video": []}),
        "bad frame": (400, {"type": "video", "video": ["data:image/png;base64,@@"]}),
        "unknown field": (400, {"type": "video", "video": frames, "fps": 2}),
        "remote video": (400, {"type": "video_url", "video_url": {"url": "http://127.0.0.1/v.mp4"}}),
        "not a video url": (400, {"type": "video_url", "video_url": {"url": frames[0]}}),
        "video_url fields": (400, {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AA==", "x": 1}}),
        "video bytes": (413, {"type": "video_url", "video_url": {
            "url": "data:video/mp4;base64," + base64.b64encode(bytes(300_000)).decode()}}),
    }
    for name, (status, part) in bad.items():
        with pytest.raises(RequestError) as e:
            parse_chat(_video_chat(part), limits)
        assert e.value.status == status, (name, e.value.message)
        assert "content[0]" in e.value.message, name
    two = json.dumps({"messages": [{"role": "user", "content": [{"type": "video", "video": frames}] * 2}]}).encode()
    with pytest.raises(RequestError, match="more than 1 video") as e:
        parse_chat(two, limits)
    assert e.value.status == 400


def test_chat_video_url_is_decoded_with_pyav_within_limits():
    url = "data:video/mp4;base64," + base64.b64encode(_mp4(_frames(10))).decode()
    chat = parse_chat(_video_chat({"type": "video_url", "video_url": {"url": url}}), Limits(max_video_frames=4))
    assert chat.videos[0].frames.shape == (4, 64, 64, 3)
    for limits, what in ((Limits(max_frame_pixels=100), "pixels"), (Limits(max_decoded_frames=5), "more than 5 frames")):
        with pytest.raises(RequestError, match=what) as e:
            parse_chat(_video_chat({"type": "video_url", "video_url": {"url": url}}), limits)
        assert e.value.status == 413
    garbage = "data:video/mp4;base64," + base64.b64encode(b"no video here").decode()
    with pytest.raises(RequestError, match="cannot decode it as a video") as e:
        parse_chat(_video_chat({"type": "video_url", "video_url": {"url": garbage}}), Limits())
    assert e.value.status == 400


# -- end to end on the shipped model directory ------------------------------------------------
@pytest.fixture(scope="module")
def zoo():
    if not SHIPPED:
        pytest.skip("the easy-VQA weights are not shipped in this checkout")
    return easyvqa.load()


def _reference_tokens(model, plan, inputs, n):
    with torch.no_grad(), reference.applied(model, plan):
        return model.generate(**inputs, max_new_tokens=n, do_sample=False)


@needs_model
def test_video_request_through_the_serving_engine_equals_reference(zoo):
    """parse_chat -> Engine.prepare (processor + FrameVideoProcessor, Qwen3-VL timestamps) ->
    Engine.run (compiled, eager backend): the oracle's tokens for the same processor inputs."""
    from vskip_compile.serve.engine import Engine

    model, _ = zoo
    plan = SkipPlan.load(PLAN_FILE)
    limits = Limits(max_tokens=8, max_video_frames=4, max_frame_pixels=64 * 64)
    frames = [_png_url(f) for f in _frames(4)]
    chat = parse_chat(_video_chat({"type": "video", "video": frames}), limits)
    engine = Engine(easyvqa.MODEL_DIR, plan, "eager", limits=limits, max_batch_size=1)
    prepared = engine.prepare(chat)
    ids = prepared.inputs["input_ids"][0]
    video_id = engine.processor.video_token_id
    assert int((ids == video_id).sum()) == 2 * 64 and "pixel_values_videos" in prepared.inputs  # 2 patches of 8x8
    assert prepared.layout.kinds == (("video", "video"),)  # Qwen3-VL: one run per temporal patch
    answer = engine.run([prepared])[0]
    want = _reference_tokens(model, plan, prepared.inputs, 4)[0, ids.shape[0]:].tolist()
    assert answer.new_ids == want[: len(answer.new_ids)] and answer.new_ids


@needs_model
def test_lmms_generator_takes_videos(zoo, tmp_path):
    """The lmms-eval generator (no lmms_eval needed): a video file path and a frame list."""
    pytest.importorskip("av")
    from vskip_compile.lmms.generator import VSkipGenerator

    model, processor = zoo
    plan = SkipPlan.load(PLAN_FILE)
    path = tmp_path / "clip.mp4"
    path.write_bytes(_mp4(_frames(6)))
    gen = VSkipGenerator(None, plan=plan, backend="eager", model=model, processor=processor)
    for source in (str(path), _frames(4)):
        inputs = gen.inputs("what shape is in the video?", videos=[source])
        assert "pixel_values_videos" in inputs and "pixel_values" not in inputs
        want = _reference_tokens(model, plan, inputs, 3)[0, inputs["input_ids"].shape[1]:].tolist()
        assert gen.generate_ids(inputs, 3) == want
