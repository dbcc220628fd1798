"""`vskip export` and `vskip run`: engines from the command line (registered in vskip_compile.cli).

    vskip export --model MODEL_DIR --plan plan.json --image cat.png --prompt "What is it?" --out engine/
    vskip run --engine engine/ --image dog.png --prompt "What is it?"

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
import sys
from pathlib import Path
from typing import Any

# Processor classes that are not in transformers' auto mapping: name -> (module, class).
_PROCESSORS = {"EasyVQAQwen3VLProcessor": ("vskip_compile.zoo.easyvqa_processor", "EasyVQAQwen3VLProcessor")}


def _fail(command: str, message: str) -> int:
    print(f"vskip {command}: error: {message}", file=sys.stderr)
    return 2


def _model_dir(path: str) -> Path:
    d = Path(path)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d}: not a Hugging Face model directory (no config.json)")
    return d


def load_processor(model_dir: Path):
    """The processor saved in model_dir (its own class when transformers cannot auto-load it)."""
    import importlib

    for name in ("processor_config.json", "preprocessor_config.json"):
        path = model_dir / name
        if path.is_file():
            cls = json.loads(path.read_text()).get("processor_class")
            if cls in _PROCESSORS:
                module, attr = _PROCESSORS[cls]
                return getattr(importlib.import_module(module), attr).from_pretrained(model_dir, local_files_only=True)
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_dir, local_files_only=True)


def load_model(model_dir: Path):
    """The model class named by config.json's `architectures`, eval mode, fp32."""
    import torch
    import transformers

    arch = (json.loads((model_dir / "config.json").read_text()).get("architectures") or [None])[0]
    cls = getattr(transformers, arch or "", None)
    if cls is None:
        raise ValueError(f"{model_dir}/config.json names no transformers class in 'architectures' ({arch!r})")
    return cls.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()


def build_inputs(processor, images: list[str], prompt: str, tensors: str) -> dict[str, Any]:
    """Processor outputs for one chat turn: the images, then the prompt."""
    from PIL import Image

    if getattr(processor, "chat_template", None) is None:
        raise ValueError("the processor has no chat template; vskip export/run build prompts with it")
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    pictures = []
    for path in images:
        with Image.open(path) as im:
            pictures.append(im.convert("RGB"))
    return dict(processor(text=[text], images=pictures or None, return_tensors=tensors))


# -- vskip export -------------------------------------------------------------------------------
def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a model under a plan as an ONNX engine directory",
        description="Export the vision encoder, one skip-shaped prefill for every prompt of up to "
        "--max-seq-len tokens and a decode step as ONNX, with shared weights and a verified manifest. "
        "Into an existing engine directory (same model and plan) it adds the graphs a new image size needs.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="local Hugging Face model directory (with its processor)")
    p.add_argument("--plan", required=True, metavar="plan.json", help="a skip plan (vskip plan show/validate)")
    p.add_argument("--image", action="append", default=[], metavar="IMG", help="an example image (repeatable)")
    p.add_argument("--prompt", required=True, help="the example prompt (text after the images)")
    p.add_argument("--out", required=True, metavar="DIR", help="engine directory to create or extend")
    p.add_argument("--max-seq-len", type=int, help="longest prompt in tokens the engine serves (default 1024)")
    p.add_argument("--max-cache-len", type=int, help="decode cache slots (default: max-seq-len + 256, rounded to 64)")
    p.add_argument("--no-optimize", action="store_true", help="skip torch.onnx's optimizer (faster export)")
    p.set_defaults(run=run_export)


def run_export(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..layout import LayoutError
    from ..plan import PlanError, SkipPlan
    from . import EngineError, export_onnx

    console = Console(stderr=True)
    try:
        model_dir = _model_dir(args.model)
        plan = SkipPlan.load(args.plan)
        with console.status("loading the model and processor") as status:
            processor = load_processor(model_dir)
            model = load_model(model_dir)
            inputs = build_inputs(processor, args.image, args.prompt, "pt")

            def progress(message: str) -> None:
                console.log(message)
                status.update(message)

            out = export_onnx(model, plan, inputs, args.out, max_seq_len=args.max_seq_len, max_cache_len=args.max_cache_len,
                              optimize=not args.no_optimize, source={"model_dir": str(model_dir.resolve())},
                              progress=progress)
    except (OSError, ValueError, PlanError, LayoutError, EngineError) as e:
        return _fail("export", str(e))
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
    p = sub.add_parser(
        "run",
        help="generate with an exported engine (onnxruntime)",
        description="Answer a prompt about images with an engine directory from `vskip export`, on "
        "onnxruntime. Text in and out go through the processor of the model directory.",
    )
    p.add_argument("--engine", required=True, metavar="DIR", help="engine directory")
    p.add_argument("--image", action="append", default=[], metavar="IMG", help="an image (repeatable)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--model", metavar="DIR", help="model directory for the processor (default: the one exported from)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--provider", action="append", metavar="EP",
                   help="onnxruntime execution provider, in order of preference (default CPUExecutionProvider)")
    p.set_defaults(run=run_run)


def run_run(args: argparse.Namespace) -> int:
    from ..flops import DimsError, hf_text_config
    from ..layout import LayoutError
    from ..plan import config_hash
    from . import EngineError, OnnxRunner
    from .manifest import load_manifest

    try:
        manifest = load_manifest(args.engine)
        source = args.model or manifest.get("source", {}).get("model_dir")
        if source is None:
            raise ValueError("give --model DIR: the engine does not name the model directory it came from")
        model_dir = _model_dir(source)
        expect = {"config_hash": config_hash(hf_text_config(json.loads((model_dir / "config.json").read_text())))}
        runner = OnnxRunner(args.engine, providers=args.provider, expect_model=expect)
        processor = load_processor(model_dir)
        inputs = build_inputs(processor, args.image, args.prompt, "np")
        ids = runner.generate(**inputs, max_new_tokens=args.max_new_tokens)
    except (OSError, ValueError, DimsError, LayoutError, EngineError) as e:
        return _fail("run", str(e))
    prompt_len = inputs["input_ids"].shape[1]
    print(processor.batch_decode(ids[:, prompt_len:], skip_special_tokens=True)[0].strip())
    return 0
