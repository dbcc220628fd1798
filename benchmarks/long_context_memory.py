"""Peak memory of a long-context prefill: SDPA (materialized S x S mask) vs FlexAttention
(mask computed in the kernel from per-row vectors), full model vs skip plan, all compiled.

    python benchmarks/long_context_memory.py --seq 8192 --json benchmarks/results/long_context_memory.json

On a GPU (`--device cuda --dtype bf16`, in benchmarks/gpu_bench.sh) peak memory is the CUDA
allocator's. Static-layout graphs (inductor's CPU flex template miscompiles dynamic shapes in torch 2.13, see
vskip_compile.flex). Peak memory is the resident-set high-water mark above what was allocated
before the call (vskip_compile.bench's measurement); times are one call each, indicative only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vskip_compile.bench import BenchModel, _position_ids, _return_freed_memory_to_os, _time_once, build_text_model
from vskip_compile.core import DecoderCore
from vskip_compile.flops import TextDims, plan_report
from vskip_compile.layout import VisualLayout
from vskip_compile.plan import SkipPlan

# Qwen3-VL's layer structure (M-RoPE, q/k norms, GQA) at a width where S = 8192 runs in
# seconds on a CPU: the mask's share of memory does not depend on the width.
MODEL = BenchModel("qwen3-vl-1k", "qwen3_vl", hidden=1024, ffn=3072, heads=8, kv_heads=4)


def measure(seq: int, text: int, layers: int, ops: tuple[str, ...], device: str = "cpu",
            dtype: torch.dtype = torch.float32) -> list[dict]:
    torch.manual_seed(0)
    device = torch.device(device)
    lm, head = build_text_model(MODEL, layers)
    lm, head = lm.to(device, dtype), head.to(device, dtype)
    plan = SkipPlan.from_ops((ops * layers)[:layers], name="bench")
    visual, before = seq - text, 8
    layout = VisualLayout.single(seq, [(before, before + visual)])
    x = (torch.randn(1, seq, MODEL.hidden) * 0.02).to(device, dtype)
    pos = _position_ids(MODEL, seq).to(device)
    rows = []
    with torch.inference_mode():
        outs = {}
        for attention in ("sdpa", "flex"):
            for name, options in (("full", None), ("skip", {"plan": plan, "layout": layout, "inner": "inductor"})):
                torch._dynamo.reset()
                core = DecoderCore(lm, head, logits_to_keep=1, attention=attention)
                graph = torch.compile(core, backend="inductor" if options is None else "vskip", fullgraph=True,
                                      dynamic=False, options=options)
                graph(x, pos)  # compile
                seconds, peak_kib = _time_once(lambda: graph(x, pos), device)
                outs[(attention, name)] = graph(x, pos)[0][:, -1].float()
                rows.append({"attention": attention, "plan": name, "S": seq, "V": visual,
                             "peak_mib": round(peak_kib / 1024, 1), "seconds": round(seconds, 2)})
                print(rows[-1], flush=True)
    for name in ("full", "skip"):
        diff = float((outs[("sdpa", name)] - outs[("flex", name)]).abs().max())
        for r in rows:
            if r["plan"] == name:
                r["max_abs_diff_sdpa_flex"] = diff
    dims = TextDims(hidden=MODEL.hidden, heads=MODEL.heads, kv_heads=MODEL.kv_heads,
                    head_dim=MODEL.hidden // MODEL.heads, ffn=MODEL.ffn, layers=layers)
    report = plan_report(dims, plan, seq, visual)
    for r in rows:
        r.update({"model": MODEL.name, "layers": layers, "plan_ops": list(plan.ops), "dtype": str(dtype)[6:],
                  "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  "flops_reduction": report["reduction"], "torch": torch.__version__})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--text", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    _return_freed_memory_to_os()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    rows = measure(args.seq, args.text, args.layers, ("skip_attn", "skip_both"), args.device, dtype)
    print(f"{'attention':>9} {'plan':>5} {'peak MiB':>9} {'s':>7}")
    for r in rows:
        print(f"{r['attention']:>9} {r['plan']:>5} {r['peak_mib']:>9} {r['seconds']:>7}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
