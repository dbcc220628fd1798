"""onnxruntime CPU prefill: full vs skip-shaped graph at Qwen3-VL-8B layer width.

    python benchmarks/onnx_prefill.py [--layers 3] [--plan A,F,B] [--visual 576 1024] [--text 64]
                                      [--repeats 5] [--threads N]

A Qwen3-VL text decoder with the 8B model's layer dimensions (hidden 4096, FFN 12288, 32
heads, 8 KV heads, head dim 128) but only a few layers and random weights (tiny vision tower,
vocabulary 1024: the LM head runs on one row). The polymorphic prefill (symbolic batch,
sequence length and kept-row count) is exported once under the all-`full` plan and once under
--plan, through the same path export_onnx uses (DecoderCore -> torch.export -> skip passes ->
torch.onnx, optimizer on); for each visual count V both graphs run by onnxruntime on CPU at
S = V + text rows (text_before = 16, image, rest of the text).
Runs of the two graphs are interleaved (full, skip, full, skip, ...) after one warm-up
each; the table shows medians.

Ideal speed-up = decoder prefill FLOPs full / skip (vskip_compile.flops: projections,
attention rectangle and FFN; the LM head row is left out). Realized fraction = realized
time saving / ideal time saving = (1 - t_skip / t_full) / (1 - F_skip / F_full).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vskip_compile import SkipPlan, VisualLayout
from vskip_compile.archs import PrefillInputs, adapter_for
from vskip_compile.export import host
from vskip_compile.export.prefill import prefill_graph
from vskip_compile.flops import TextDims, model_flops

SHORT = {"A": "skip_attn", "F": "skip_ffn", "B": "skip_both", ".": "full"}
WIDTH = dict(hidden_size=4096, intermediate_size=12288, num_attention_heads=32, num_key_value_heads=8, head_dim=128)
TEXT_BEFORE = 16


def build_model(layers: int):
    """Qwen3-VL with the 8B text layer shape, `layers` layers, random weights."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    text = dict(WIDTH, num_hidden_layers=layers, vocab_size=1024, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                                 "mrope_interleaved": True})
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=4096,
                  num_position_embeddings=64, deepstack_visual_indexes=[0])
    config = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=1000, video_token_id=1001,
                           vision_start_token_id=1002, vision_end_token_id=1003)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return Qwen3VLForConditionalGeneration(config).eval()


def prefill_inputs(model, layout: VisualLayout) -> PrefillInputs:
    """Random embeddings, text positions, one DeepStack tensor (values do not change the timing)."""
    s, d = layout.seq_len, model.config.text_config.hidden_size
    embeds = torch.randn(1, s, d) * 0.02
    positions = torch.arange(s).expand(3, 1, s).contiguous()
    deepstack = torch.zeros(1, s, d)
    return PrefillInputs(embeds, positions, (deepstack,), None, layout)


def export(model, plan: SkipPlan, inputs: PrefillInputs, max_seq_len: int, path: Path) -> tuple[Path, list[str]]:
    graph = prefill_graph(model, adapter_for(model), plan, inputs, max_seq_len)
    with torch.no_grad():
        program = torch.onnx.export(graph.module, graph.args, input_names=graph.input_names,
                                    output_names=graph.output_names, dynamo=True, optimize=True, verbose=False)
    program.save(str(path), external_data=True)
    return path, graph.input_names


def feeds(inputs: PrefillInputs, plan: SkipPlan) -> dict[str, "object"]:
    """The polymorphic prefill's inputs by name (the layout as data, as OnnxRunner computes it)."""
    kept_index, kept_valid = host.kept_inputs(inputs.layout, plan.scope, rows=plan.rows)
    mask = torch.ones(1, inputs.layout.seq_len, dtype=torch.bool).numpy()
    return {"inputs_embeds": inputs.inputs_embeds.numpy(), "position_ids": inputs.position_ids.numpy(),
            "kept_index": kept_index, "kept_valid": kept_valid, "attention_mask": mask,
            "deepstack_0": inputs.deepstack[0].numpy()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--plan", default="A,F,B", help="one op per layer: A skip_attn, F skip_ffn, B skip_both, . full")
    ap.add_argument("--visual", type=int, nargs="+", default=[576, 1024])
    ap.add_argument("--text", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0 = its default)")
    args = ap.parse_args()

    import onnxruntime as ort

    ops = [SHORT[c] for c in args.plan.split(",")]
    if len(ops) != args.layers:
        raise SystemExit(f"--plan has {len(ops)} ops for {args.layers} layers")
    plan, full = SkipPlan.from_ops(ops), SkipPlan.full(args.layers)
    dims = TextDims(hidden=4096, heads=32, kv_heads=8, head_dim=128, ffn=12288, layers=args.layers)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if args.threads:
        options.intra_op_num_threads = args.threads
    rows = []
    with tempfile.TemporaryDirectory(prefix="vskip-bench-") as tmp:
        # Phase 1: export the two polymorphic graphs once (traced at the first V), then free the
        # torch model (peak memory: model or 2 sessions).
        model = build_model(args.layers)
        cases = []
        for v in args.visual:
            layout = VisualLayout.single(v + args.text, [(TEXT_BEFORE, TEXT_BEFORE + v)])
            cases.append((v, layout.seq_len, prefill_inputs(model, layout)))
        longest = max(s for _, s, _ in cases)
        paths = {}
        for name, p in (("full", full), ("skip", plan)):
            print(f"exporting the {name} prefill graph (every S up to {longest}) ...", flush=True)
            paths[name], _ = export(model, p, cases[0][2], longest, Path(tmp) / f"{name}.onnx")
        del model
        gc.collect()
        # Phase 2: per visual count, both sessions, interleaved timed runs.
        for v, s, inputs in cases:
            sessions = {name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                        for name, path in paths.items()}
            by_plan = {"full": feeds(inputs, full), "skip": feeds(inputs, plan)}
            named = {name: {i.name: by_plan[name][i.name] for i in sess.get_inputs()} for name, sess in sessions.items()}
            for name, sess in sessions.items():
                sess.run(None, named[name])  # warm-up
            times: dict[str, list[float]] = {"full": [], "skip": []}
            for _ in range(args.repeats):
                for name, sess in sessions.items():
                    t = time.perf_counter()
                    sess.run(None, named[name])
                    times[name].append(time.perf_counter() - t)
            del sessions
            f_full = model_flops(dims, full, S=s, V=v, P=TEXT_BEFORE)
            f_skip = model_flops(dims, plan, S=s, V=v, P=TEXT_BEFORE)
            t_full, t_skip = statistics.median(times["full"]), statistics.median(times["skip"])
            rows.append((v, s, f_full / 1e9, f_skip / 1e9, t_full * 1e3, t_skip * 1e3, f_full / f_skip,
                         t_full / t_skip, (1 - t_skip / t_full) / (1 - f_skip / f_full)))
            print(f"V={v}: full {[round(t, 2) for t in times['full']]} s, skip {[round(t, 2) for t in times['skip']]} s",
                  flush=True)

    print(f"\nonnxruntime {ort.__version__} CPU, {args.layers} layers at Qwen3-VL-8B width, plan {plan}, "
          f"median of {args.repeats} interleaved runs")
    header = ("V", "S", "GFLOP full", "GFLOP skip", "ms full", "ms skip", "ideal x", "real x", "realized")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for v, s, ff, fs, tf, ts, ideal, real, frac in rows:
        print(f"| {v} | {s} | {ff:.1f} | {fs:.1f} | {tf:.0f} | {ts:.0f} | {ideal:.2f} | {real:.2f} | {frac:.0%} |")


if __name__ == "__main__":
    main()
