"""VSkipGenerator: a HF VLM under a skip plan that answers (text, images, videos) prompts greedily.

The part of the lmms-eval model that needs no lmms_eval: load, build the prompt, generate
with one backend, decode. Backends:

    reference  the eager oracle: reference.applied(model, plan) + model.generate
    eager, inductor, tensorrt   vskip_compile.compile(model, plan, backend).generate
    onnx       an engine directory (export_onnx) run by OnnxRunner (one prefill graph for
               every layout); an image shape with no vision graph yet is exported into the
               directory first

The prompt is the model's chat template over one user turn: the images first, then the
videos, then the text (the convention of lmms-eval's Qwen models, and the easy-VQA training
prompt). A video is a file path (decoded with PyAV) or a list of frames (vskip_compile.video).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from ..plan import SkipPlan
from ..config import BACKENDS as COMPILE_BACKENDS
from ..errors import VSkipError

BACKENDS = ("reference", *COMPILE_BACKENDS, "onnx")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_NEW_TOKENS = 128

log = logging.getLogger(__name__)


class GenerationError(VSkipError, ValueError):
    """A request asks for something the vskip model does not do (sampling, beams, audio)."""


def check_greedy(gen_kwargs: dict[str, Any]) -> None:
    """Refuse sampling and beam search (temperature only matters when sampling)."""
    if gen_kwargs.get("do_sample"):
        raise GenerationError("the vskip model decodes greedily: do_sample=True is not supported")
    beams = gen_kwargs.get("num_beams")
    if beams not in (None, 1):
        raise GenerationError(f"the vskip model decodes greedily: num_beams={beams} is not supported")


def cut_at(text: str, until: Iterable[str]) -> str:
    """text up to the first occurrence of any stop string."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


class VSkipGenerator:
    """Model + processor + plan + backend. `plan` None runs the unmodified model."""

    def __init__(
        self,
        pretrained: str | Path,
        plan: str | Path | SkipPlan | None = None,
        backend: str = "inductor",
        device: str = "cpu",
        dtype: str = "float32",
        engine: str | Path | None = None,
        model=None,
        processor=None,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
        if engine is not None and backend != "onnx":
            raise ValueError(f"engine= is the ONNX engine directory; it needs backend=onnx, not {backend!r}")
        self.backend = backend
        self.device = device
        if model is None or processor is None:
            from .. import load

            model, processor = load(pretrained, DTYPES[dtype])
            model = model.to(device)
        self.model, self.processor = model, processor
        from ..archs import adapter_for

        self.adapter = adapter_for(self.model)
        if isinstance(plan, (str, Path)):
            plan = SkipPlan.load(plan)
        self.plan = plan if plan is not None else SkipPlan.full(len(self.adapter.layers(self.model)))
        self.adapter.check_plan(self.model, self.plan)  # refuse a plan for another model now
        self._compiled = None
        self._runner = None
        self.engine_dir = Path(engine) if engine is not None else None
        if backend in COMPILE_BACKENDS:
            from ..runtime import compile

            self._compiled = compile(self.model, self.plan, backend=backend)
        elif backend == "onnx" and self.engine_dir is None:
            self.engine_dir = Path(tempfile.mkdtemp(prefix="vskip-lmms-engine-"))

    # -- prompt --------------------------------------------------------------------------------
    def inputs(self, text: str, images: Sequence[Any] = (), videos: Sequence[Any] = (),
               max_frames: int | None = None) -> dict[str, torch.Tensor]:
        """Processor outputs (batch 1) for one user turn: images first, then videos (a file
        path or a frame list each), then text."""
        from .. import video

        clips = [v if isinstance(v, video.Video) else video.load_video(v, max_frames or video.MAX_FRAMES) for v in videos]
        content = ([{"type": "image"} for _ in images] + [{"type": "video"} for _ in clips]
                   + [{"type": "text", "text": text}])
        messages = [{"role": "user", "content": content}]
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        out = video.process(self.processor, prompt, list(images), clips, "pt")
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in out.items()}

    # -- generate ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_ids(self, inputs: dict[str, Any], max_new_tokens: int) -> list[int]:
        """The new token ids (prompt excluded) of a greedy generation under the plan."""
        prompt_len = inputs["input_ids"].shape[1]
        if self.backend == "reference":
            from .. import reference

            with reference.applied(self.model, self.plan, self.adapter):
                out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        elif self.backend == "onnx":
            out = torch.as_tensor(self._onnx_generate(inputs, max_new_tokens))
        else:
            out = self._compiled.generate(**inputs, max_new_tokens=max_new_tokens)
        return out[0, prompt_len:].tolist()

    def _onnx_generate(self, inputs: dict[str, Any], max_new_tokens: int):
        from ..export import MissingGraphError, OnnxRunner, export_onnx

        if self._runner is None and (self.engine_dir / "manifest.json").exists():
            self._runner = OnnxRunner(self.engine_dir)
        if self._runner is not None:
            try:
                return self._runner.generate(**inputs, max_new_tokens=max_new_tokens)
            except MissingGraphError as e:
                log.info("exporting a graph the engine lacks: %s", e)
        export_onnx(self.model, self.plan, inputs, self.engine_dir, optimize=False)  # adds what is missing
        self._runner = OnnxRunner(self.engine_dir)
        return self._runner.generate(**inputs, max_new_tokens=max_new_tokens)

    def decode(self, new_ids: Sequence[int]) -> str:
        """Text of the new tokens, stopped at the first EOS, special tokens dropped."""
        eos = self.model.generation_config.eos_token_id
        eos = set([eos] if isinstance(eos, int) else eos or [])
        ids = list(new_ids)
        for i, t in enumerate(ids):
            if t in eos:
                ids = ids[:i]
                break
        return self.processor.tokenizer.decode(ids, skip_special_tokens=True)

    def answer(self, text: str, images: Sequence[Any] = (), max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
               until: Iterable[str] = (), videos: Sequence[Any] = ()) -> str:
        """The greedy answer to one prompt, cut at the first stop string."""
        new = self.generate_ids(self.inputs(text, images, videos), max_new_tokens)
        return cut_at(self.decode(new), until)
