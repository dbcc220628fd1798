"""Harness: easy-VQA questions as (image prefix, question suffix) batches with cached vision outputs.

Speed (2 CPU cores): the vision tower runs once per image (its outputs are cached and passed
as `mm_encoder_outputs`); questions are grouped by prompt length or by image, so a batch has
no padding in its prefix and one visual layout (the reference hooks and the token-dropping
loop need that).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from ..archs import PrefillInputs, adapter_for
from ..errors import VSkipError


class EvalError(VSkipError, RuntimeError):
    """The harness disagrees with an independent run: its numbers would not be trustworthy.

    Internal: a bug of the harness or a compiled path, not the user's input (exit 1)."""

    internal = True


class HarnessDataError(VSkipError, ValueError):
    """Samples the harness cannot batch: prompts that do not tokenize as the processor does,
    or that share no image prefix."""


class Harness:
    """easy-VQA questions as (image prefix, question suffix) batches with cached vision outputs.

    Every prompt is `prefix + suffix`: the prefix (chat header, the image's visual tokens,
    <|vision_end|>) is the same token sequence for every question; causal attention makes its
    states independent of the question, so it runs once per image and its K/V are shared by
    that image's questions (as in training). Suffixes are right-padded: a real row never
    attends to a pad (pads come after it), and decode steps mask the pads out.
    """

    def __init__(self, model, processor, samples: Sequence[tuple[str, str, str]]):
        from ..zoo import easyvqa

        self.model, self.processor, self.samples = model, processor, list(samples)
        self.adapter = adapter_for(model)
        tok = processor.tokenizer
        self.eos, self.pad = tok.eos_token_id, tok.pad_token_id
        first = easyvqa.build_inputs(processor, self.samples[0][0], self.samples[0][1])
        self.grid = first["image_grid_thw"]  # [1, 3]: every easy-VQA image has this grid
        merge = model.config.vision_config.spatial_merge_size
        self.num_visual = int(self.grid.prod()) // merge**2
        image_token = processor.image_token
        ids = [
            tok(easyvqa.prompt_text(processor, q).replace(image_token, image_token * self.num_visual))["input_ids"]
            for _, q, _ in self.samples
        ]
        if ids[0] != first["input_ids"][0].tolist():
            raise HarnessDataError("harness prompt ids differ from the processor's (is this an easy-VQA processor?)")
        cut = ids[0].index(model.config.vision_end_token_id) + 1
        self.prefix_ids = ids[0][:cut]
        if any(row[:cut] != self.prefix_ids for row in ids):
            raise HarnessDataError("easy-VQA prompts do not share one image prefix")
        self.suffix_ids = [row[cut:] for row in ids]
        paths = sorted({p for p, _, _ in self.samples})
        self.image_of = {p: i for i, p in enumerate(paths)}
        self.paths = paths
        self._features: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        self._out_cls = None

    def prompt_len(self, q: int) -> int:
        return len(self.prefix_ids) + len(self.suffix_ids[q])

    def full_inputs(self, q: int) -> dict[str, Any]:
        """HF forward inputs of one whole prompt (batch 1, cached vision outputs)."""
        ids = torch.tensor([self.prefix_ids + self.suffix_ids[q]])  # [1, S]
        kw = self._prefix_kwargs([self.image_of[self.samples[q][0]]])
        kw.update(input_ids=ids, attention_mask=torch.ones_like(ids),
                  mm_token_type_ids=(ids == self.model.config.image_token_id).to(torch.int32))
        return kw

    @torch.no_grad()
    def encode_images(self, image_indices: Sequence[int], chunk: int = 128) -> None:
        """Vision tower outputs of the images not cached yet (merged tokens + DeepStack)."""
        from ..zoo import easyvqa

        todo = [i for i in dict.fromkeys(image_indices) if i not in self._features]
        ip = self.processor.image_processor
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            px = ip(images=[easyvqa.open_image(self.paths[i]) for i in part], return_tensors="pt")
            out = self.model.model.get_image_features(px["pixel_values"], px["image_grid_thw"], return_dict=True)
            self._out_cls = type(out)
            for j, i in enumerate(part):
                self._features[i] = (out.pooler_output[j], [lvl[j] for lvl in out.deepstack_features])

    def _prefix_kwargs(self, images: Sequence[int]) -> dict[str, Any]:
        self.encode_images(images)
        feats = [self._features[i] for i in images]
        levels = len(feats[0][1])
        mm = self._out_cls(
            pooler_output=tuple(f[0] for f in feats),
            deepstack_features=[tuple(f[1][k] for f in feats) for k in range(levels)],
        )
        return {"image_grid_thw": self.grid.expand(len(images), 3).clone(), "mm_encoder_outputs": {"image": mm}}

    def image_groups(self, indices: Sequence[int], images_per_batch: int) -> list[list[int]]:
        """Question indices in groups of whole images (an image's questions stay together)."""
        by_image: dict[int, list[int]] = defaultdict(list)
        for q in indices:
            by_image[self.image_of[self.samples[q][0]]].append(q)
        images = sorted(by_image)
        return [[q for i in images[s : s + images_per_batch] for q in by_image[i]]
                for s in range(0, len(images), images_per_batch)]

    def batches(self, indices: Sequence[int], images_per_batch: int) -> Iterator["Batch"]:
        """Batches of whole images: their prefix inputs once, all their questions' suffixes."""
        for part in self.image_groups(indices, images_per_batch):
            yield self.batch(part)

    def batch(self, part: Sequence[int]) -> "Batch":
        imgs = list(dict.fromkeys(self.image_of[self.samples[q][0]] for q in part))
        slot = {i: j for j, i in enumerate(imgs)}
        owner = torch.tensor([slot[self.image_of[self.samples[q][0]]] for q in part])  # [Q]
        lengths = torch.tensor([len(self.suffix_ids[q]) for q in part])  # [Q]
        suffix = torch.full((len(part), int(lengths.max())), self.pad, dtype=torch.long)  # [Q, Ls]
        for r, q in enumerate(part):
            suffix[r, : lengths[r]] = torch.tensor(self.suffix_ids[q])
        prefix_ids = torch.tensor([self.prefix_ids] * len(imgs))  # [I, P]
        kw = self._prefix_kwargs(imgs)
        kw.update(input_ids=prefix_ids, attention_mask=torch.ones_like(prefix_ids),
                  mm_token_type_ids=(prefix_ids == self.model.config.image_token_id).to(torch.int32))
        with torch.no_grad():
            prefix = self.adapter.prefill_inputs(self.model, **kw)
        return Batch(list(part), prefix, suffix, lengths, owner)

    def prompt_batches(self, indices: Sequence[int], batch_size: int) -> Iterator[dict[str, Any]]:
        """Whole prompts as HF forward inputs, grouped by length (no padding, one layout per batch)."""
        groups: dict[int, list[int]] = defaultdict(list)
        for q in indices:
            groups[self.prompt_len(q)].append(q)
        for length in sorted(groups):
            for start in range(0, len(groups[length]), batch_size):
                part = groups[length][start : start + batch_size]
                ids = torch.tensor([self.prefix_ids + self.suffix_ids[q] for q in part])  # [B, S]
                kw = self._prefix_kwargs([self.image_of[self.samples[q][0]] for q in part])
                kw.update(input_ids=ids, attention_mask=torch.ones_like(ids),
                          mm_token_type_ids=(ids == self.model.config.image_token_id).to(torch.int32))
                yield kw

    def answer(self, tokens: torch.Tensor) -> str:
        from ..zoo import easyvqa

        return easyvqa.parse_answer(self.processor, tokens)


@dataclass
class Batch:
    questions: list[int]
    prefix: PrefillInputs  # [I, P] image prefixes (vision merged, positions, DeepStack)
    suffix: torch.Tensor  # [Q, Ls] right-padded question suffixes
    lengths: torch.Tensor  # [Q] real suffix lengths
    owner: torch.Tensor  # [Q] index of each question's image in the prefix batch
