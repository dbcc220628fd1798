"""lmms-eval model `vskip`: a Hugging Face VLM whose prefill runs under a skip plan.

    --model vskip --model_args pretrained=DIR,plan=PLAN.json,backend=inductor[,device=cuda,dtype=bfloat16]

model_args: pretrained (a local directory or a hub id), plan (a SkipPlan JSON; none = the
unmodified model), backend (reference | eager | inductor | tensorrt | onnx), device, dtype
(float32 | bfloat16 | float16), engine (ONNX engine directory, backend onnx only), threads
(torch intra-op threads). Requests run one at a time (batch_size 1): the compiled prefill
takes unpadded batches only. Greedy decoding only; loglikelihood is not implemented. Visuals:
images (PIL) and videos (a file path, decoded with PyAV, or a list of frames); audio is refused.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm import tqdm

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from ..generator import DEFAULT_MAX_NEW_TOKENS, GenerationError, VSkipGenerator, check_greedy


class VSkip(lmms):
    is_simple = True

    def __init__(
        self,
        pretrained: str,
        plan: str | None = None,
        backend: str = "inductor",
        device: str | None = None,
        dtype: str = "float32",
        engine: str | None = None,
        threads: int | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if str(batch_size) != "1" or max_batch_size not in (None, 1):
            raise ValueError(
                f"the vskip model runs requests one at a time (batch_size=1), got batch_size={batch_size!r}: "
                "the compiled prefill takes unpadded batches only"
            )
        if threads is not None:
            torch.set_num_threads(int(threads))
        self.gen = VSkipGenerator(pretrained, plan=plan, backend=backend, device=device or "cpu", dtype=dtype,
                                  engine=engine)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers = []
        for request in tqdm(requests, desc="vskip", disable=self.rank != 0):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            gen_kwargs = dict(gen_kwargs or {})
            check_greedy(gen_kwargs)
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
            visuals = [v for v in visuals or [] if v is not None]
            if any(isinstance(v, dict) for v in visuals):
                raise GenerationError(f"{task} doc {doc_id}: the vskip model takes images and videos, not audio")
            videos = [v for v in visuals if isinstance(v, (str, list, tuple))]  # lmms-eval: a video is its file path
            visuals = [v for v in visuals if not isinstance(v, (str, list, tuple))]
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
            text = context.replace("<image>", "").replace("<video>", "")  # placeholders: visuals go first
            answer = self.gen.answer(text, visuals, max_new_tokens=max_new, until=until, videos=videos)
            answers.append(answer)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), answer)
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "the vskip model answers generate_until tasks only; loglikelihood (multiple-choice by "
            "likelihood) is not implemented"
        )

    def generate_until_multi_round(self, requests: Any) -> list[str]:
        raise NotImplementedError("the vskip model answers single-round generate_until tasks only")
