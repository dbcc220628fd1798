"""Video inputs: frames from a file (PyAV, the optional `video` extra) or a frame list, and the
Qwen processors' video inputs made from them without torchvision.

    video = load_video("clip.mp4", max_frames=16)            # or load_video([img0, img1, ...])
    with_video_processor(processor)                          # once: a numpy video processor
    inputs = processor(text=[prompt], videos=[video.frames], videos_kwargs={"video_metadata": [video.metadata]})

Why our own video processor: transformers' Qwen video processors need torchvision, which this
project does not install. `FrameVideoProcessor` reuses the processor's own IMAGE processor on
each frame (same resize, rescale, normalization and patch order) and interleaves the frames of
each temporal patch: the image processor writes a frame as `temporal_patch_size` copies in the
(C, T, p, p) feature layout, and a video's temporal patch holds frame j at slot j of that axis.
Everything else (placeholder expansion, Qwen3-VL timestamps, mm_token_type_ids, Qwen2.5-VL
second_per_grid_ts) is the HF processor's own code. Frames are resized as images are
(the image processor's size limits), not with the video processor's defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Sequence

import numpy as np

from .errors import VSkipError

MAX_FRAMES = 32  # frames kept from a video file by default (sampled uniformly)


class VideoError(VSkipError, ValueError):
    """A video that cannot be read or used: missing decoder, unreadable file, bad frames."""


class VideoLimitError(VideoError):
    """A video over a limit (frame size, frames decoded) given for untrusted input."""


class NoDecoderError(VideoError):
    """Video files need PyAV, which is not installed (the `video` extra)."""


@dataclass
class Video:
    """Frames [T, H, W, 3] uint8 (T even: a temporal patch is 2 frames), the source fps, and
    which source frames were kept."""

    frames: np.ndarray
    fps: float | None
    indices: list[int]

    @property
    def metadata(self):
        from transformers.video_utils import VideoMetadata

        t, h, w, _ = self.frames.shape
        return VideoMetadata(total_num_frames=t, fps=self.fps, width=w, height=h, frames_indices=list(self.indices))


def sample_indices(total: int, max_frames: int) -> list[int]:
    """Up to max_frames frame indices of `total`, spread uniformly, first frame included."""
    if total < 1:
        raise VideoError("the video has no frames")
    n = min(total, max_frames)
    return sorted({int(i) for i in np.linspace(0, total - 1, n).round()})


def _even(frames: np.ndarray, indices: list[int]) -> tuple[np.ndarray, list[int]]:
    """An odd frame count gets its last frame repeated (as HF's processors pad a temporal patch)."""
    if len(frames) % 2:
        frames = np.concatenate([frames, frames[-1:]])
        indices = indices + indices[-1:]
    return frames, indices


def read_video_file(path: str | Path | BinaryIO, max_frames: int = MAX_FRAMES, max_pixels: int | None = None,
                    max_decoded: int | None = None) -> Video:
    """Decode a video file (a path or a binary file object) with PyAV and keep up to
    max_frames frames, uniformly sampled. Limits for untrusted input: max_pixels (width x
    height, checked before decoding) and max_decoded (frames decoded at most)."""
    try:
        import av
    except ImportError as e:
        raise NoDecoderError(f"reading video files needs PyAV: pip install 'vskip-compile[video]' ({e})") from e
    name = str(path) if isinstance(path, (str, Path)) else "video data"
    if isinstance(path, (str, Path)) and not Path(path).is_file():
        raise VideoError(f"video file not found: {path}")
    try:
        with av.open(str(path) if isinstance(path, (str, Path)) else path) as container:
            if not container.streams.video:
                raise VideoError(f"{name}: has no video stream")
            stream = container.streams.video[0]
            w, h = stream.codec_context.width, stream.codec_context.height
            if max_pixels is not None and w * h > max_pixels:
                raise VideoLimitError(f"{name}: frames of {w}x{h} pixels exceed the limit of {max_pixels} pixels")
            fps = float(stream.average_rate) if stream.average_rate else None
            decoded = []
            for frame in container.decode(stream):
                if max_decoded is not None and len(decoded) >= max_decoded:
                    raise VideoLimitError(f"{name}: more than {max_decoded} frames")
                decoded.append(frame.to_ndarray(format="rgb24"))  # [H, W, 3]
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as e:
        if isinstance(e, VideoError):
            raise
        raise VideoError(f"{name}: cannot decode it as a video ({type(e).__name__}: {e})") from e
    if not decoded:
        raise VideoError(f"{name}: the video has no frames")
    keep = sample_indices(len(decoded), max_frames)
    frames, keep = _even(np.stack([decoded[i] for i in keep]), keep)
    return Video(frames, fps, keep)


def _frame_array(frame: Any, where: str) -> np.ndarray:
    """One frame as [H, W, 3] uint8: a PIL image, an array, or an image file path."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(frame, (str, Path)):
        try:
            with Image.open(frame) as im:
                return np.asarray(im.convert("RGB"))
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise VideoError(f"{where} ({frame}): cannot read it as an image ({type(e).__name__}: {e})") from e
    if isinstance(frame, Image.Image):
        return np.asarray(frame.convert("RGB"))
    arr = np.asarray(frame)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise VideoError(f"{where}: a frame is [H, W, 3] uint8, got shape {list(arr.shape)} {arr.dtype}")
    return arr


def load_video(source: str | Path | Sequence[Any], max_frames: int = MAX_FRAMES, fps: float | None = None) -> Video:
    """A video from a file (decoded with PyAV) or a list of frames (PIL images, [H, W, 3] uint8
    arrays or image paths, all of one size; `fps` their rate, if known)."""
    if max_frames < 1:
        raise VideoError(f"max_frames must be >= 1, got {max_frames}")
    if isinstance(source, (str, Path)):
        return read_video_file(source, max_frames)
    frames = [_frame_array(f, f"frame {i}") for i, f in enumerate(source)]
    if not frames:
        raise VideoError("a video needs at least one frame")
    if len(frames) > max_frames:
        raise VideoError(f"{len(frames)} frames, more than max_frames={max_frames}")
    sizes = {f.shape for f in frames}
    if len(sizes) != 1:
        raise VideoError(f"frames of different sizes {sorted(s[:2] for s in sizes)}; a video's frames share one size")
    stacked, indices = _even(np.stack(frames), list(range(len(frames))))
    return Video(stacked, fps, indices)


class FrameVideoProcessor:
    """A Qwen video processor made of the processor's image processor (see module doc).

    Returns what HF's Qwen2-VL video processor returns: pixel_values_videos [sum t*h*w, C*T*p*p],
    video_grid_thw [N, 3] and (return_metadata) video_metadata."""

    def __init__(self, image_processor):
        self.image_processor = image_processor
        self.temporal_patch_size = int(image_processor.temporal_patch_size)
        self.merge_size = int(image_processor.merge_size)
        self.patch_size = int(image_processor.patch_size)

    def _one(self, frames: np.ndarray) -> tuple[np.ndarray, list[int]]:
        tp = self.temporal_patch_size
        if len(frames) % tp:
            frames = np.concatenate([frames] + [frames[-1:]] * (tp - len(frames) % tp))
        out = self.image_processor(images=list(frames), return_tensors="np")
        grids = np.asarray(out["image_grid_thw"])  # [T, 3], each (1, h, w)
        _, h, w = grids[0].tolist()
        rows = h * w
        pix = np.asarray(out["pixel_values"]).reshape(len(frames), rows, -1, tp, self.patch_size, self.patch_size)  # [T, R, C, tp, p, p]
        steps = [np.stack([pix[s * tp + j, :, :, j] for j in range(tp)], axis=2) for s in range(len(frames) // tp)]  # [R, C, tp, p, p] each
        video = np.concatenate(steps).reshape(len(steps) * rows, -1)  # [t*h*w, C*tp*p*p]
        return video, [len(steps), h, w]

    def __call__(self, videos=None, video_metadata=None, return_metadata: bool = False, return_tensors=None, **kwargs):
        from transformers import BatchFeature
        from transformers.video_utils import VideoMetadata

        videos = [np.asarray(v) for v in (videos or [])]
        pixels, grids = zip(*(self._one(v) for v in videos)) if videos else ((), ())
        data: dict[str, Any] = {"pixel_values_videos": np.concatenate(pixels), "video_grid_thw": np.array(grids)}
        if return_metadata:
            metadata = list(video_metadata) if video_metadata is not None else [
                VideoMetadata(total_num_frames=len(v), fps=None, frames_indices=list(range(len(v)))) for v in videos]
            data["video_metadata"] = metadata
        tensor_type = return_tensors if return_tensors in ("pt", "np") else None
        feature = BatchFeature({k: v for k, v in data.items() if k != "video_metadata"}, tensor_type=tensor_type)
        if return_metadata:
            feature["video_metadata"] = data["video_metadata"]
        return feature


def process(processor, text: str, images: list | None, videos: list[Video] | None, return_tensors: str) -> dict:
    """processor(text=[text], images=..., videos=...) as a plain dict: the videos' frames go to
    the processor's video processor (a FrameVideoProcessor when it has none), with their
    metadata (Qwen3-VL timestamps) and fps (Qwen2.5-VL second_per_grid_ts)."""
    kw: dict[str, Any] = {}
    if videos:
        video_token = getattr(processor, "video_token", None)
        if video_token is None or text.count(video_token) != len(videos):
            raise VideoError(f"the prompt holds {text.count(video_token) if video_token else 0} video placeholder(s) "
                             f"({video_token}) for {len(videos)} video(s): does the chat template write "
                             "{'type': 'video'} parts?")
        with_video_processor(processor)
        kw = {"videos": [v.frames for v in videos], "video_metadata": [v.metadata for v in videos]}
        if all(v.fps for v in videos):
            kw["fps"] = videos[0].fps
    out = dict(processor(text=[text], images=images or None, return_tensors=return_tensors, **kw))
    out.pop("video_metadata", None)
    return out


def with_video_processor(processor):
    """The processor, given a FrameVideoProcessor when it has no video processor of its own."""
    if getattr(processor, "video_processor", None) is None:
        if getattr(processor, "image_processor", None) is None or not hasattr(processor.image_processor, "temporal_patch_size"):
            raise VideoError(f"{type(processor).__name__}: no video processor and no Qwen-style image processor to "
                             "make one from; this model takes no videos here")
        processor.video_processor = FrameVideoProcessor(processor.image_processor)
    return processor
