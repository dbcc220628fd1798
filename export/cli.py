"""`vskip export` and `vskip run`: engines from the command line (registered in vskip_compile.cli).

    vskip export --model MODEL_DIR --plan plan.json --image cat.png --prompt "What is it?" --out engine/
    vskip run --engine engine/ --image dog.png --prompt "What is it?"
    vskip run --engine engine/ --video clip.mp4 --prompt "What happens?"        # PyAV: the video extra
    vskip run --engine engine/ --video f0.png,f1.png,f2.png,f3.png --prompt "What happens?"   # a frame list

Both need a local Hugging Face model directory with its processor (`run` reads only the
processor and config.json from it; the default is the directory the engine was exported from).
The prompt goes through the processor's chat template, one image entry per --image, so the
prompt text has no image placeholders. One export serves every prompt of up to --max-seq-len
tokens, any image position and count (the example only traces the graphs and decides the
vision graph's image size); `run` refuses a longer prompt with an error naming the limit.
Heavy imports happen inside the run functions, so `vskip --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import ModelDirError, VSkipError
from ..modeldir import check as _check_model_dir
from ..modeldir import check_processor, load, load_processor


class ImageError(VSkipError, ValueError):
    """An --image file that cannot be read as an image."""


def video_source(arg: str) -> str | list[str]:
    """A --video argument: a video file, or comma-separated frame image files."""
    return arg.split(",") if "," in arg else arg


def build_inputs(processor, images: list[str], prompt: str, tensors: str, model_dir: Path | None = None,
                 videos: list[str] | None = None, max_frames: int | None = None) -> dict[str, Any]:
    """Processor outputs for one chat turn: the images, the videos (--video: a file or a
    comma-separated frame list, vskip_compile.video), then the prompt."""
    from PIL import Image, UnidentifiedImageError

    videos = list(videos or [])
    where = f"{model_dir}: " if model_dir is not None else ""
    if getattr(processor, "chat_template", None) is None:
        raise ModelDirError(f"{where}the processor has no chat template (chat_template.jinja); "
                            "vskip export/run build prompts with it")
    content = [{"type": "image"} for _ in images] + [{"type": "video"} for _ in videos] + [{"type": "text", "text": prompt}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    from .. import video as video_mod

    loaded = []
    if videos:
        video_token = getattr(processor, "video_token", None)
        if video_token is None or text.count(video_token) != len(videos):
            raise ModelDirError(f"{where}the chat template writes no video placeholder ({video_token}) for a "
                                "{'type': 'video'} content part; this model directory takes no --video")
        for arg in videos:
            try:
                loaded.append(video_mod.load_video(video_source(arg), max_frames or video_mod.MAX_FRAMES))
            except video_mod.VideoError as e:
                raise video_mod.VideoError(f"--video {arg}: {e}") from e
    pictures = []
    for path in images:
        try:
            with Image.open(path) as im:
                pictures.append(im.convert("RGB"))
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            raise ImageError(f"--image {path}: cannot read it as an image ({type(e).__name__}: {e})") from e
    return video_mod.process(processor, text, pictures, loaded, tensors)


def _add_prompt_args(p: argparse.ArgumentParser, image: str, video: str, max_frames: str, prompt: str | None) -> None:
    """--image, --video, --max-frames and --prompt: one chat turn for build_inputs (export's
    example, run's question); only their help texts differ between the two commands."""
    from ..cli.common import pos_int

    p.add_argument("--image", action="append", default=[], metavar="IMG", help=image)
    p.add_argument("--video", action="append", default=[], metavar="VIDEO", help=video)
    p.add_argument("--max-frames", type=pos_int, default=32, help=max_frames)
    p.add_argument("--prompt", required=True, help=prompt)


# -- vskip export -------------------------------------------------------------------------------
def add_export(sub: argparse._SubParsersAction) -> None:
    from ..cli.common import pos_int  # vskip_compile.cli imports this module: import at parser-build time
    p = sub.add_parser(
        "export",
        help="export a model under a plan as an ONNX engine directory",
        description="Export the vision encoder, one skip-shaped prefill for every prompt of up to "
        "--max-seq-len tokens and a decode step as ONNX, with shared weights and a verified manifest. "
        "Into an existing engine directory (same model and plan) it adds the graphs a new image size needs.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="local Hugging Face model directory (with its processor)")
    p.add_argument("--plan", required=True, metavar="plan.json", help="a skip plan (vskip plan show/validate)")
    _add_prompt_args(p, image="an example image (repeatable)",
                     video="an example video: a file (PyAV) or comma-separated frame images (repeatable); "
                           "exports the vision graph of its grid",
                     max_frames="frames kept from a video file (default 32)",
                     prompt="the example prompt (text after the images)")
    p.add_argument("--out", required=True, metavar="DIR", help="engine directory to create or extend")
    p.add_argument("--max-seq-len", type=pos_int, help="longest prompt in tokens the engine serves (default 1024)")
    p.add_argument("--max-cache-len", type=pos_int, help="decode cache slots (default: max-seq-len + 256, rounded to 64)")
    p.add_argument("--no-optimize", action="store_true", help="skip torch.onnx's optimizer (faster export)")
    p.set_defaults(run=run_export)


def run_export(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from ..plan import SkipPlan
    from . import export_onnx
    from .manifest import check_out_dir

    console = Console(stderr=True)
    model_dir = Path(args.model)
    plan = SkipPlan.load(args.plan)
    _check_model_dir(model_dir)
    check_processor(model_dir)
    check_out_dir(args.out)
    with console.status("loading the model and processor") as status:
        model, processor = load(model_dir, dtype=torch.float32)
        inputs = build_inputs(processor, args.image, args.prompt, "pt", model_dir, args.video, args.max_frames)

        def progress(message: str) -> None:
            console.log(message)
            status.update(message)

        out = export_onnx(model, plan, inputs, args.out, max_seq_len=args.max_seq_len, max_cache_len=args.max_cache_len,
                          optimize=not args.no_optimize, source={"model_dir": str(model_dir.resolve())},
                          progress=progress)
    manifest = json.loads((Path(out) / "manifest.json").read_text())
    table = Table(title=f"{out}  ({manifest['model']['architecture']}, plan {plan})")
    for column in ("file", "role", "bytes", "key"):
        table.add_column(column)
    roles = {g["file"]: (role, key) for role, graphs in manifest["graphs"].items() for key, g in graphs.items()}
    for name, info in manifest["files"].items():
        role, key = roles.get(name, ("weights", ""))
        table.add_row(name, role, f"{info['bytes']:,}", key)
    Console().print(table)
    return 0


# -- vskip run ----------------------------------------------------------------------------------
def add_run(sub: argparse._SubParsersAction) -> None:
    from ..cli.common import pos_int
    p = sub.add_parser(
        "run",
        help="generate with an exported engine (onnxruntime)",
        description="Answer a prompt about images with an engine directory from `vskip export`, on "
        "onnxruntime. Text in and out go through the processor of the model directory.",
    )
    p.add_argument("--engine", required=True, metavar="DIR", help="engine directory")
    _add_prompt_args(p, image="an image (repeatable)",
                     video="a video file (decoded with PyAV: pip install 'vskip-compile[video]') or comma-separated "
                           "frame images (repeatable; after the images in the prompt)",
                     max_frames="frames kept from a video file, sampled uniformly (default 32)", prompt=None)
    p.add_argument("--model", metavar="DIR", help="model directory for the processor (default: the one exported from)")
    p.add_argument("--max-new-tokens", type=pos_int, default=32)
    p.add_argument("--provider", action="append", metavar="EP",
                   help="onnxruntime execution provider, in order of preference (default CPUExecutionProvider)")
    p.set_defaults(run=run_run)


def run_run(args: argparse.Namespace) -> int:
    from ..flops import hf_text_config
    from ..plan import config_hash
    from . import OnnxRunner
    from .manifest import MANIFEST, EngineError, load_manifest, verify_content

    manifest = load_manifest(args.engine)
    verify_content(Path(args.engine) / MANIFEST, manifest)  # the runner hashes the files
    source = args.model or manifest.get("source", {}).get("model_dir")
    if source is None:
        raise EngineError(f"{args.engine}: the engine does not name the model directory it came from; give --model DIR")
    model_dir = Path(source)
    expect = {"config_hash": config_hash(hf_text_config(_check_model_dir(model_dir)))}
    runner = OnnxRunner(args.engine, providers=args.provider, expect_model=expect)
    processor = load_processor(model_dir)
    inputs = build_inputs(processor, args.image, args.prompt, "np", model_dir, args.video, args.max_frames)
    ids = runner.generate(**inputs, max_new_tokens=args.max_new_tokens)
    prompt_len = inputs["input_ids"].shape[1]
    print(processor.batch_decode(ids[:, prompt_len:], skip_special_tokens=True)[0].strip())
    return 0
