"""A small Qwen3-VL trained from scratch on easy-VQA, shipped with the package.

Public API (a fixed contract): `MODEL_DIR`, `load`, `test_set`, `train_set`, `build_inputs`,
`parse_answer`, `evaluate`; CLI: `python -m vskip_compile.zoo.easyvqa --eval [--white] [--limit N]`.

The model is the real `transformers.Qwen3VLForConditionalGeneration` (DeepStack on); the
processor is `Qwen3VLProcessor`'s code (see `easyvqa_processor` for why it is a subclass).
Everything loads from the local directory: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import lru_cache
from pathlib import Path

import torch

MODEL_DIR = Path(__file__).resolve().parent / "easyvqa-qwen3vl"
MAX_NEW_TOKENS = 3  # answer word + <|im_end|> (+1 spare)

Sample = tuple[str, str, str]  # (image_path, question, answer)


def _split(questions_fn, paths_fn) -> list[Sample]:
    questions, answers, image_ids = questions_fn()
    paths = paths_fn()
    return [(paths[i], q, a) for q, a, i in zip(questions, answers, image_ids)]


@lru_cache(maxsize=1)
def _test_set() -> tuple[Sample, ...]:
    import easy_vqa

    return tuple(_split(easy_vqa.get_test_questions, easy_vqa.get_test_image_paths))


@lru_cache(maxsize=1)
def _train_set() -> tuple[Sample, ...]:
    import easy_vqa

    return tuple(_split(easy_vqa.get_train_questions, easy_vqa.get_train_image_paths))


def test_set() -> list[Sample]:
    """The whole easy-VQA test split: 9,673 (image_path, question, answer)."""
    return list(_test_set())


def train_set() -> list[Sample]:
    """The whole easy-VQA train split: 38,575 (image_path, question, answer)."""
    return list(_train_set())


def messages(question: str) -> list[dict]:
    """The one chat prompt used in training and inference: image first, then the question."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def prompt_text(processor, question: str) -> str:
    return processor.apply_chat_template(messages(question), add_generation_prompt=True, tokenize=False)


def open_image(image):
    """Path or PIL image -> RGB PIL image."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    with Image.open(image) as im:
        return im.convert("RGB")


def white_like(image):
    from PIL import Image

    return Image.new("RGB", image.size, (255, 255, 255))


def build_inputs(processor, image, question: str) -> dict[str, torch.Tensor]:
    """Model inputs for one (image, question), batch 1: input_ids, attention_mask,
    mm_token_type_ids, pixel_values, image_grid_thw."""
    return dict(processor(text=[prompt_text(processor, question)], images=[open_image(image)], return_tensors="pt"))


def build_batch(processor, images, questions) -> dict[str, torch.Tensor]:
    """Left-padded batch of the same prompt (what `evaluate` feeds to generate)."""
    texts = [prompt_text(processor, q) for q in questions]
    imgs = [open_image(im) for im in images]
    return dict(processor(text=texts, images=imgs, padding=True, return_tensors="pt"))


def parse_answer(processor, new_token_ids) -> str:
    """Generated ids (after the prompt) -> the answer word, stopped at <|im_end|>."""
    ids = new_token_ids.tolist() if isinstance(new_token_ids, torch.Tensor) else list(new_token_ids)
    eos = processor.tokenizer.eos_token_id
    if eos in ids:
        ids = ids[: ids.index(eos)]
    return processor.tokenizer.decode(ids, skip_special_tokens=True).strip()


def load(dtype: torch.dtype = torch.float32, model_dir: str | Path | None = None):
    """(model, processor) from `MODEL_DIR` (or `model_dir`), offline; the model in eval mode."""
    from .. import load as load_dir

    return load_dir(Path(model_dir) if model_dir is not None else MODEL_DIR, dtype)


def _image_key(image):
    return image if isinstance(image, (str, Path)) else id(image)


@torch.inference_mode()
def predict(model, processor, images, questions, white_images: bool = False, share_vision: bool = True,
            return_logits: bool = False):
    """Greedy answers from `model.generate` for a batch of (image, question).

    With `share_vision`, the vision tower runs once per distinct image of the batch and its
    output (merged tokens and DeepStack features) is handed to `generate` as
    `mm_encoder_outputs` for every question of that image: the same numbers as passing
    `pixel_values` per row, computed once.
    """
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

    keys = ["white" if white_images else _image_key(im) for im in images]
    pil: dict = {}
    for k, im in zip(keys, images):
        if k not in pil:
            img = open_image(im)
            pil[k] = white_like(img) if white_images else img
    inputs = build_batch(processor, [pil[k] for k in keys], questions)
    if share_vision:
        grid = inputs["image_grid_thw"]  # [B, 3]
        per_row = (grid.prod(-1)).tolist()  # patches per row
        starts = [0]
        for n in per_row[:-1]:
            starts.append(starts[-1] + n)
        first: dict = {}
        for r, k in enumerate(keys):
            first.setdefault(k, r)
        uniq = list(first.values())
        pix = torch.cat([inputs["pixel_values"][starts[r] : starts[r] + per_row[r]] for r in uniq])
        vis = model.model.get_image_features(pix, grid[uniq])
        slot = {k: i for i, k in enumerate(first)}
        owner = [slot[k] for k in keys]
        enc = BaseModelOutputWithDeepstackFeatures(
            pooler_output=tuple(vis.pooler_output[o] for o in owner),
            deepstack_features=[tuple(f[o] for o in owner) for f in vis.deepstack_features],
        )
        inputs = {k: v for k, v in inputs.items() if k != "pixel_values"}
        inputs["mm_encoder_outputs"] = {"image": enc}
    out = model.generate(
        **inputs,
        max_new_tokens=MAX_NEW_TOKENS,
        do_sample=False,
        pad_token_id=processor.tokenizer.pad_token_id,
        eos_token_id=processor.tokenizer.eos_token_id,
        return_dict_in_generate=True,
        output_logits=return_logits,
    )
    new = out.sequences[:, inputs["input_ids"].shape[1] :]
    answers = [parse_answer(processor, row) for row in new]
    return (answers, out.logits) if return_logits else answers


def evaluate(model, processor, samples, white_images: bool = False, batch_size: int = 128, progress: bool = False) -> float:
    """Exact-match accuracy of greedy `generate` answers on (image_path, question, answer) samples.

    Samples are batched in their given order (the test split lists an image's questions
    together, so a batch holds few distinct images and the vision tower runs once for each).
    """
    samples = list(samples)
    if not samples:
        raise ValueError("no samples")
    correct = 0
    it = range(0, len(samples), batch_size)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=(len(samples) + batch_size - 1) // batch_size, desc="eval", file=sys.stderr)
    for start in it:
        chunk = samples[start : start + batch_size]
        preds = predict(model, processor, [s[0] for s in chunk], [s[1] for s in chunk], white_images)
        correct += sum(p == s[2] for p, s in zip(preds, chunk))
    return correct / len(samples)


def default_plan(min_kept: float = 0.995):
    """The recommended shipped skip plan: of the operator-level plans in `MODEL_DIR/plans`, the
    one with the largest measured prefill-FLOPs cut that keeps >= `min_kept` of the full model's
    test accuracy, read from the committed evaluation (`MODEL_DIR/eval/results.json`)."""
    from ..plan import SkipPlan

    rows = json.loads((MODEL_DIR / "eval" / "results.json").read_text())["rows"]
    ok = [r for r in rows if r["family"] == "opskip" and r["accuracy_kept"] >= min_kept]
    if not ok:
        raise LookupError(f"no shipped operator-level plan keeps {min_kept:.1%} of the test accuracy")
    best = max(ok, key=lambda r: r["flops_cut"])
    return SkipPlan.load(MODEL_DIR / "plans" / f"{best['method']}.json")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="easy-VQA Qwen3-VL from the zoo")
    ap.add_argument("--eval", action="store_true", help="accuracy on the easy-VQA test split")
    ap.add_argument("--white", action="store_true", help="replace every image by a white one")
    ap.add_argument("--limit", type=int, default=None, help="first N test questions only")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true", help="print a JSON line")
    ap.add_argument("--model-dir", type=Path, default=None, help="evaluate another directory than MODEL_DIR")
    ap.add_argument("--metrics-out", type=Path, default=None,
                    help="merge the result into this JSON file (key 'white' or 'test', with the command)")
    args = ap.parse_args(argv)
    if not args.eval:
        ap.print_help()
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = load(model_dir=args.model_dir)
    samples = test_set()[: args.limit] if args.limit else test_set()
    t0 = time.perf_counter()
    acc = evaluate(model, processor, samples, white_images=args.white, batch_size=args.batch_size, progress=True)
    dt = time.perf_counter() - t0
    result = {"accuracy": round(acc, 6), "n": len(samples), "white_images": args.white, "seconds": round(dt, 1),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "command": "python -m vskip_compile.zoo.easyvqa " + " ".join(sys.argv[1:] if argv is None else argv)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"accuracy {acc:.4f} on {len(samples)} test questions (white_images={args.white}, {dt:.0f} s)")
    if args.metrics_out is not None:
        metrics = json.loads(args.metrics_out.read_text()) if args.metrics_out.exists() else {}
        metrics["white" if args.white else "test"] = result
        if "test" in metrics and "white" in metrics:
            metrics["drop_points"] = round(100 * (metrics["test"]["accuracy"] - metrics["white"]["accuracy"]), 2)
        args.metrics_out.write_text(json.dumps(metrics, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
