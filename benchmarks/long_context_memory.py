"""Peak memory of a long-context prefill, full model vs skip plan, on a video-like layout:
SDPA (no S x S mask: is_causal for all-row attention, K x S mask rows for skipped operators)
and optionally FlexAttention (mask computed in the kernel), all compiled with inductor.

    python benchmarks/long_context_memory.py --frames 16 64 --json benchmarks/results/long_context_memory_video.json

A video of N frames of 256 visual rows (one span per frame, 3 text rows between frames, 64
text rows in all, as vskip_compile.bench.case_layout writes it): 16 frames = 4,096 visual
rows, 64 frames = 16,384. Graphs: "static" (one layout baked in) and "poly" (the default
runtime path: layout as data, sequence and kept count symbolic, the [B, S] attention mask an
input, so the padding rotation of vskip_compile.core runs too). On a GPU (`--device cuda
--dtype bf16`) peak memory is the CUDA allocator's. Peak memory is the resident-set
high-water mark above what was allocated before the call (vskip_compile.bench's
measurement); times are one call each, indicative only (and only on a quiet machine).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vskip_compile.bench import (DEFAULT_FRAME_TOKENS, BenchModel, _position_ids, _return_freed_memory_to_os,
                                 _time_once, build_text_model, case_layout)
from vskip_compile.core import DecoderCore
from vskip_compile.flops import TextDims, plan_report
from vskip_compile.kept_rows import kept_inputs, mark_polymorphic, no_duck_sizes
from vskip_compile.plan import SkipPlan

# Qwen3-VL's layer structure (M-RoPE, q/k norms, GQA) at a width where S = 16k runs in
# about a minute on a CPU: the mask's share of memory does not depend on the width.
MODEL = BenchModel("qwen3-vl-1k", "qwen3_vl", hidden=1024, ffn=3072, heads=8, kv_heads=4)
OPS = ("skip_attn", "skip_both")  # the skip plan, repeated over the layers


def _compiled(core: DecoderCore, plan: SkipPlan | None, layout, args: tuple, poly: bool):
    """core compiled with inductor (plan None: the unmodified model) and a call of it."""
    if plan is None:
        graph = torch.compile(core, backend="inductor", fullgraph=True, dynamic=False)
    else:
        graph = torch.compile(core, backend="vskip", fullgraph=True, dynamic=False,
                              options={"plan": plan, "layout": None if poly else layout, "inner": "inductor"})
    if not poly:
        return lambda: graph(*args)

    def call():
        with no_duck_sizes():
            return graph(*args)

    return call


def measure(frames: int, text: int, layers: int, attentions: tuple[str, ...], graphs: tuple[str, ...],
            device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[dict]:
    torch.manual_seed(0)
    device = torch.device(device)
    lm, head = build_text_model(MODEL, layers)
    lm, head = lm.to(device, dtype), head.to(device, dtype)
    plan = SkipPlan.from_ops((OPS * layers)[:layers], name="bench")
    full = SkipPlan.from_ops(["full"] * layers, name="full")
    layout = case_layout(0, text, frames, DEFAULT_FRAME_TOKENS)
    seq, visual = layout.seq_len, layout.num_visual
    x = (torch.randn(1, seq, MODEL.hidden) * 0.02).to(device, dtype)
    pos = _position_ids(MODEL, seq).to(device)
    rows, outs = [], {}
    with torch.inference_mode():
        for attention in attentions:
            for kind in graphs:
                poly = kind == "poly"
                if poly and attention == "flex" and device.type == "cpu":
                    continue  # inductor's CPU flex template miscompiles dynamic shapes (vskip_compile.flex)
                for name in ("full", "skip"):
                    torch._dynamo.reset()
                    core = DecoderCore(lm, head, logits_to_keep=1, layout_inputs=poly, attention=attention)
                    if poly:
                        index, valid = kept_inputs(layout, plan.scope, device=device, rows=plan.rows)
                        args = (x.clone(), pos.clone(), index, valid, torch.ones(1, seq, dtype=torch.bool, device=device))
                        mark_polymorphic(args, batched=False)
                    else:
                        args = (x, pos)
                    use = plan if name == "skip" else (full if poly else None)
                    call = _compiled(core, use, layout, args, poly)
                    call()  # compile
                    seconds, peak_kib = _time_once(call, device)
                    outs[(attention, kind, name)] = call()[0][:, -1].float()
                    rows.append({"attention": attention, "graph": kind, "plan": name, "S": seq, "V": visual,
                                 "frames": frames, "peak_mib": round(peak_kib / 1024, 1), "seconds": round(seconds, 2)})
                    print(rows[-1], flush=True)
    dims = TextDims(hidden=MODEL.hidden, heads=MODEL.heads, kv_heads=MODEL.kv_heads,
                    head_dim=MODEL.hidden // MODEL.heads, ffn=MODEL.ffn, layers=layers)
    report = plan_report(dims, plan, seq, visual, V_video_value=visual)
    kv_mib = 2 * layers * MODEL.kv_heads * (MODEL.hidden // MODEL.heads) * seq * dtype.itemsize / 2**20
    for r in rows:
        first = outs[(attentions[0], graphs[0], r["plan"])]
        r.update({
            "max_abs_diff_vs_first": float((outs[(r["attention"], r["graph"], r["plan"])] - first).abs().max()),
            "model": MODEL.name, "layers": layers, "plan_ops": list(plan.ops if r["plan"] == "skip" else full.ops),
            "dtype": str(dtype).removeprefix("torch."),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "flops_reduction": report["reduction"], "torch": torch.__version__,
            "kv_outputs_mib": round(kv_mib, 1),  # the K/V graph outputs, inside every peak
            "s_by_s_bool_mib": round(seq * seq / 2**20, 1), "s_by_s_float_mib": round(seq * seq * dtype.itemsize / 2**20, 1),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 64], help="video frames of 256 visual rows each")
    parser.add_argument("--text", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--attention", nargs="+", choices=("sdpa", "flex"), default=["sdpa"])
    parser.add_argument("--graphs", nargs="+", choices=("static", "poly"), default=["static", "poly"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    _return_freed_memory_to_os()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    rows = []
    for frames in args.frames:
        rows += measure(frames, args.text, args.layers, tuple(args.attention), tuple(args.graphs), args.device, dtype)
        if args.json:  # after each size: a long run keeps what it measured
            args.json.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"{'V':>6} {'S':>6} {'attention':>9} {'graph':>6} {'plan':>5} {'peak MiB':>9} {'s':>7}")
    for r in rows:
        print(f"{r['V']:>6} {r['S']:>6} {r['attention']:>9} {r['graph']:>6} {r['plan']:>5} {r['peak_mib']:>9} {r['seconds']:>7}")


if __name__ == "__main__":
    main()
