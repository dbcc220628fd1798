"""Train a small Qwen3-VL (`Qwen3VLForConditionalGeneration`, DeepStack on) from scratch on easy-VQA.

    python -m vskip_compile.zoo.train_easyvqa --out DIR [--minutes M] [--epochs E] [--resume]

Seeded and resumable: `DIR/ckpt/` holds `model.safetensors`, `optim.safetensors` and
`state.json` (no pickles). The final model (`save_pretrained`) and processor go to `DIR/final/`.

Speed: each step takes a set of images and all of their questions; the vision tower runs once
per image and its outputs (merged tokens and DeepStack features) are indexed per question and
passed as `mm_encoder_outputs`, so gradients still flow into the vision tower. The loss is on
the answer tokens only (the answer word and the closing <|im_end|>). The data (processor,
questions grouped by image, batches, M-RoPE positions) is easyvqa_data.py's.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import easyvqa
from .easyvqa_data import Data, make_processor, rope_positions
from .easyvqa_processor import IMAGE_PAD, MERGE_SIZE, PATCH_SIZE, TEMPORAL_PATCH_SIZE, VIDEO_PAD, VISION_END, VISION_START

__all__ = ["Data", "build_config", "main", "make_processor", "rope_positions"]  # Data & co. re-exported: easyvqa_data.py


def build_config(tokenizer):
    from transformers import Qwen3VLConfig

    from ..archs.qwen import small_rope_parameters, small_vision_config

    ids = tokenizer.convert_tokens_to_ids
    vocab_size = len(tokenizer)
    head_dim = 32
    text = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        rope_parameters=small_rope_parameters(head_dim, interleaved=True),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    grid = 128 // PATCH_SIZE  # 16 patches per side at 128 px
    # depth 4, width 128, 4 heads, FFN 512, out to the text's 128; a perfect square of position
    # embeddings; DeepStack from 3 vision blocks
    vision = small_vision_config(4, 128, 4, 512, 128, PATCH_SIZE, MERGE_SIZE, TEMPORAL_PATCH_SIZE, in_channels=3,
                                 num_position_embeddings=grid * grid, deepstack_visual_indexes=[0, 1, 2])
    config = Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids(IMAGE_PAD),
        video_token_id=ids(VIDEO_PAD),
        vision_start_token_id=ids(VISION_START),
        vision_end_token_id=ids(VISION_END),
        tie_word_embeddings=False,
    )
    return config


def forward_hidden(model, b, positions):
    """Decoder states of the suffix rows; the vision tower and the prefix run once per image.

    The same weights and math as the full `model(**inputs)` forward: the prefix (image) part is
    computed once per image with a KV cache that is then indexed per question, so gradients
    flow through the prefix and the vision tower.
    """
    inner = model.model
    lm = inner.language_model
    vis = inner.get_image_features(b["pixel_values"], b["image_grid_thw"])
    img = torch.cat(vis.pooler_output)  # [I*64, D]
    prefix = b["prefix_ids"]  # [I, P]
    I, P = prefix.shape
    embeds = lm.embed_tokens(prefix)  # [I, P, D]
    vmask = prefix == model.config.image_token_id  # [I, P]
    embeds = embeds.masked_scatter(vmask[..., None].expand_as(embeds), img.to(embeds.dtype))
    deep = [torch.cat(f) for f in vis.deepstack_features]
    pos_p = positions[:, :P][:, None].expand(3, I, P)
    out = lm(inputs_embeds=embeds, position_ids=pos_p, use_cache=True, visual_pos_masks=vmask,
             deepstack_visual_embeds=deep)
    cache = out.cache
    owner = b["owner"]
    for layer in cache.layers:
        layer.keys = layer.keys[owner]
        layer.values = layer.values[owner]
    suffix = b["suffix_ids"]
    Q, L = suffix.shape
    pos_s = positions[:, P : P + L][:, None].expand(3, Q, L)
    attn = torch.cat([torch.ones(Q, P, dtype=torch.long), b["suffix_mask"]], 1)
    out = lm(input_ids=suffix, position_ids=pos_s, attention_mask=attn, cache=cache, use_cache=True)
    return out.last_hidden_state  # [Q, L, D]


def answer_logits(model, b, positions):
    """Logits predicting the answer word and <|im_end|>: [Q, 2, V]."""
    h = forward_hidden(model, b, positions)
    n = b["lengths"]  # ... assistant, answer, eos: positions n-3 and n-2 predict answer and eos
    rows = torch.arange(h.shape[0])
    hh = torch.stack([h[rows, n - 3], h[rows, n - 2]], 1)
    return model.lm_head(hh)


def loss_fn(model, b, positions):
    logits = answer_logits(model, b, positions)
    eos = model.config.text_config.eos_token_id
    targets = torch.stack([b["answers"], torch.full_like(b["answers"], eos)], 1)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    acc = (logits[:, 0].argmax(-1) == b["answers"]).float().mean()
    return loss, acc


@torch.no_grad()
def quick_eval(model, data: Data, positions, n_images: int, bs_images: int = 32) -> float:
    """Teacher-forced answer-token accuracy on the questions of the first n_images test images."""
    was = model.training
    model.eval()
    correct = total = 0
    n_images = min(n_images, len(data.groups))
    for s in range(0, n_images, bs_images):
        b = data.batch(list(range(s, min(s + bs_images, n_images))))
        pred = answer_logits(model, b, positions)[:, 0].argmax(-1)
        correct += int((pred == b["answers"]).sum())
        total += len(pred)
    model.train(was)
    return correct / total


def lr_at(progress: float, step: int, base: float, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then cosine from `base` to 5% of it as progress goes 0 -> 1."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = min(1.0, max(0.0, progress))
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))


def save_ckpt(ckdir: Path, model, opt, state: dict):
    from safetensors.torch import save_file

    ckdir.mkdir(parents=True, exist_ok=True)
    msd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(msd, str(ckdir / "model.safetensors.tmp"))
    names = {id(p): n for n, p in model.named_parameters()}
    osd = {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if not st:
                continue
            n = names[id(p)]
            osd[f"{n}::exp_avg"] = st["exp_avg"].contiguous()
            osd[f"{n}::exp_avg_sq"] = st["exp_avg_sq"].contiguous()
            osd[f"{n}::step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
    save_file(osd, str(ckdir / "optim.safetensors.tmp"))
    (ckdir / "state.json.tmp").write_text(json.dumps(state, indent=1))
    for f in ("model.safetensors", "optim.safetensors", "state.json"):
        (ckdir / f"{f}.tmp").replace(ckdir / f)


def load_ckpt(ckdir: Path, model, opt) -> dict:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(ckdir / "model.safetensors")))
    osd = load_file(str(ckdir / "optim.safetensors"))
    for n, p in model.named_parameters():
        if f"{n}::exp_avg" in osd:
            opt.state[p] = {
                "exp_avg": osd[f"{n}::exp_avg"],
                "exp_avg_sq": osd[f"{n}::exp_avg_sq"],
                "step": osd[f"{n}::step"].reshape(()),
            }
    return json.loads((ckdir / "state.json").read_text())


def save_final(out: Path, model, processor, meta: dict):
    from transformers import GenerationConfig

    final = out / "final"
    final.mkdir(parents=True, exist_ok=True)
    tok = processor.tokenizer
    model.generation_config = GenerationConfig(
        do_sample=False,
        max_new_tokens=easyvqa.MAX_NEW_TOKENS,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model.save_pretrained(final, safe_serialization=True)
    processor.save_pretrained(final)
    (final / "training.json").write_text(json.dumps(meta, indent=1))
    return final


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--minutes", type=float, default=None,
                    help="length of the run in training minutes (summed over resumes): the LR schedule follows "
                         "elapsed training time, so a slow or shared CPU still ends with a decayed LR")
    ap.add_argument("--epochs", type=float, default=8.0, help="length of the run in epochs when --minutes is not given")
    ap.add_argument("--images-per-step", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=150)
    ap.add_argument("--eval-images", type=int, default=50)
    ap.add_argument("--ckpt-every", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads; on a CPU shared with other busy processes 1 thread was several times "
                         "faster than 2 (OpenMP barriers wait on descheduled threads)")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--init", type=Path, default=None,
                    help="start from the weights of a saved model directory (e.g. the shipped "
                         "vskip_compile/zoo/easyvqa-qwen3vl) with a fresh optimizer and LR schedule: fine-tuning")
    args = ap.parse_args(argv)

    from tqdm import tqdm
    from transformers import Qwen3VLForConditionalGeneration

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    t_start = time.time()

    processor = make_processor()
    config = build_config(processor.tokenizer)
    model = Qwen3VLForConditionalGeneration(config)
    if args.init is not None:
        from safetensors.torch import load_file

        # strict: a directory saved from another config is refused, naming the mismatched keys
        model.load_state_dict(load_file(str(args.init / "model.safetensors")), strict=True)
        print(f"initialized from {args.init}", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params / 1e6:.2f} M", flush=True)

    train = Data(processor, easyvqa.train_set())
    test = Data(processor, easyvqa.test_set())
    print(f"data ready in {time.time() - t_start:.0f} s: {len(train.groups)} train images, "
          f"{len(train.samples)} questions", flush=True)

    positions = rope_positions(model, train, 32)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.98), eps=1e-8,
    )
    steps_per_epoch = len(train.groups) // args.images_per_step
    total = int(round(args.epochs * steps_per_epoch)) if args.minutes is None else 10**9
    budget_s = args.minutes * 60 if args.minutes is not None else None
    ckdir = args.out / "ckpt"
    state = {"step": 0, "train_seconds": 0.0, "history": []}
    if args.resume and (ckdir / "state.json").exists():
        state = load_ckpt(ckdir, model, opt)
        print(f"resumed at step {state['step']}", flush=True)
    state.update(seed=args.seed, minutes=args.minutes, epochs=None if args.minutes else args.epochs,
                 images_per_step=args.images_per_step, lr=args.lr, warmup=args.warmup,
                 init=str(args.init) if args.init else state.get("init"))

    def progress(step):
        if budget_s is not None:
            return state["train_seconds"] / budget_s
        return step / total

    def order(epoch):
        g = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        return torch.randperm(len(train.groups), generator=g).tolist()

    model.train()
    step = state["step"]
    bar = tqdm(total=None if budget_s else total, initial=step, desc="train", file=sys.stderr, mininterval=5, dynamic_ncols=False, ncols=110)
    ema_loss = ema_acc = None
    t_last = time.time()
    while step < total and progress(step) < 1.0:
        epoch, k = divmod(step, steps_per_epoch)
        idx = order(epoch)[k * args.images_per_step : (k + 1) * args.images_per_step]
        b = train.batch(idx)
        lr = lr_at(progress(step), step, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        loss, acc = loss_fn(model, b, positions)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        now = time.time()
        state["train_seconds"] += now - t_last
        t_last = now
        ema_loss = loss.item() if ema_loss is None else 0.95 * ema_loss + 0.05 * loss.item()
        ema_acc = acc.item() if ema_acc is None else 0.95 * ema_acc + 0.05 * acc.item()
        bar.update(1)
        bar.set_postfix(loss=f"{ema_loss:.3f}", acc=f"{ema_acc:.3f}", lr=f"{lr:.1e}", ep=epoch)
        stop = step >= total or progress(step) >= 1.0
        if step % args.eval_every == 0 or stop:
            ev = quick_eval(model, test, positions, args.eval_images)
            state["history"].append({"step": step, "epoch": round(step / steps_per_epoch, 2), "loss": round(ema_loss, 4),
                                     "train_acc": round(ema_acc, 4), "test_acc": round(ev, 4),
                                     "train_min": round(state["train_seconds"] / 60, 1)})
            print(f"\n[eval] step {step} epoch {step / steps_per_epoch:.2f} loss {ema_loss:.4f} "
                  f"train_acc {ema_acc:.3f} test_acc({args.eval_images} imgs) {ev:.4f} "
                  f"train_min {state['train_seconds'] / 60:.1f}", flush=True)
        if step % args.ckpt_every == 0 or stop:
            state["step"] = step
            save_ckpt(ckdir, model, opt, state)
    bar.close()
    state["step"] = step
    save_ckpt(ckdir, model, opt, state)
    model.eval()
    final = save_final(args.out, model, processor, {k: state[k] for k in state if k != "history"} | {
        "history": state["history"], "params": n_params})
    print(f"saved {final} (step {step}, epoch {step / steps_per_epoch:.2f}, "
          f"{state['train_seconds'] / 60:.1f} train min)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
