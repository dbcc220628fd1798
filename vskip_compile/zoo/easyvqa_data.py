"""The easy-VQA training data: the processor, questions grouped by image, batches, positions.

The training loop (train_easyvqa.py) runs the vision tower once per image and the decoder's
image prefix once per image, so the data is grouped that way: Data holds every image's
pixel_values and every question's pre-tokenized suffix, and `batch` gives a set of images with
all of their questions.
"""

from __future__ import annotations

import torch

from . import easyvqa
from .easyvqa_processor import IMAGE_PAD, build_processor, build_vocab


def make_processor():
    import easy_vqa

    tr, te = easy_vqa.get_train_questions(), easy_vqa.get_test_questions()
    vocab = build_vocab(list(tr[0]) + list(te[0]) + list(easy_vqa.get_answers()))
    return build_processor(vocab)


class Data:
    """Questions grouped by image, pre-tokenized, and pixel_values per image (all in memory).

    A prompt is `prefix + suffix`: the prefix (<|im_start|> user <|vision_start|> 64 x
    <|image_pad|> <|vision_end|>) is the same token sequence for every question, so the decoder
    runs it once per image; the suffix is the question, the end of the user turn, the assistant
    header, and (in training) the answer and <|im_end|>.
    """

    def __init__(self, processor, samples):
        tok = processor.tokenizer
        self.eos = tok.eos_token_id
        self.pad = tok.pad_token_id
        by_image: dict[str, list[int]] = {}
        for i, (path, _, _) in enumerate(samples):
            by_image.setdefault(path, []).append(i)
        self.paths = sorted(by_image)
        self.groups = [by_image[p] for p in self.paths]
        self.samples = samples
        # pixel values of every image (Qwen2-VL patch order), [N, P, C*T*ps*ps]
        ip = processor.image_processor
        pix, grids = [], []
        for start in range(0, len(self.paths), 256):
            imgs = [easyvqa.open_image(p) for p in self.paths[start : start + 256]]
            out = ip(images=imgs, return_tensors="pt")
            pix.append(out["pixel_values"].view(len(imgs), -1, out["pixel_values"].shape[-1]))
            grids.append(out["image_grid_thw"])
        self.pixel_values = torch.cat(pix)
        self.grid = torch.cat(grids)
        if not bool((self.grid == self.grid[0]).all()):
            raise ValueError("easy-VQA images are expected to share one size")
        self.image_token_id = processor.image_token_id
        vision_end = processor.vision_end_token_id
        self.prefix = None
        self.suffix_ids = []
        for path, q, _ in samples:
            ids = self._prompt_ids(processor, q)
            cut = ids.index(vision_end) + 1
            if self.prefix is None:
                self.prefix = ids[:cut]
                # the same ids as the processor's own expansion
                ref = processor(text=[easyvqa.prompt_text(processor, q)], images=[easyvqa.open_image(path)])
                if list(ref["input_ids"][0]) != ids:
                    raise AssertionError("training prompt ids differ from the processor's")
            elif ids[:cut] != self.prefix:
                raise AssertionError("prompt prefix differs between questions")
            self.suffix_ids.append(ids[cut:])
        self.answer_ids = [tok.convert_tokens_to_ids(a) for _, _, a in samples]
        if tok.unk_token_id in self.answer_ids:
            raise ValueError("an answer is not in the vocabulary")

    @staticmethod
    def _prompt_ids(processor, question):
        n = 64  # visual tokens per image: (128/8)^2 / merge^2
        text = easyvqa.prompt_text(processor, question).replace(IMAGE_PAD, IMAGE_PAD * n)
        return processor.tokenizer(text)["input_ids"]

    def batch(self, image_idx: list[int]):
        """Prefix per image, and right-padded suffixes (with answer and eos) for all their questions."""
        rows, owner, answers = [], [], []
        for j, gi in enumerate(image_idx):
            for qi in self.groups[gi]:
                rows.append(self.suffix_ids[qi] + [self.answer_ids[qi], self.eos])
                owner.append(j)
                answers.append(self.answer_ids[qi])
        L = max(len(r) for r in rows)
        suffix = torch.full((len(rows), L), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), L), dtype=torch.long)
        for r, ids in enumerate(rows):
            suffix[r, : len(ids)] = torch.tensor(ids)
            mask[r, : len(ids)] = 1
        prefix = torch.tensor([self.prefix] * len(image_idx))
        return dict(
            prefix_ids=prefix,  # [I, P]
            suffix_ids=suffix,  # [Q, L]
            suffix_mask=mask,  # [Q, L]
            lengths=mask.sum(1),  # [Q]
            pixel_values=self.pixel_values[image_idx].reshape(-1, self.pixel_values.shape[-1]),
            image_grid_thw=self.grid[image_idx],
            owner=torch.tensor(owner),
            answers=torch.tensor(answers),
        )


def rope_positions(model, data: Data, total_len: int):
    """M-RoPE positions [3, P + total_len] of one prompt, by the model's own get_rope_index."""
    ids = torch.tensor([data.prefix + [data.pad] * total_len])
    ids[0, len(data.prefix) :] = data.eos  # any text token
    mm = (ids == data.image_token_id).long()
    pos, _ = model.model.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=data.grid[:1],
                                        attention_mask=torch.ones_like(ids))
    return pos[:, 0]  # [3, S]
