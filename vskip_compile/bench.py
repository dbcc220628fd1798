"""Prefill benchmark: compiled full vs compiled skip (static layout and polymorphic) vs eager
reference vs eager gather.

"compiled skip" is the graph specialized to the case's one layout (constant row offsets);
"compiled poly" the layout-polymorphic graph (kept rows gathered through graph inputs,
sequence and kept count symbolic) that CompiledVLM uses for every layout.

Real layer widths with few layers and random weights (a timing needs the real GEMM shapes,
not the real depth). Variants are run interleaved, round-robin, and medians taken, so machine
noise hits all of them alike; best-of-rounds (min) ratios are reported beside them. Printed:
speed-up over compiled full, the FLOPs-ideal speed-up of
the plan, their ratio ("realized"), and peak resident memory per variant.

The eager gather variant is the authors' style (GitHub zayan-l/OpSkip): index_select the kept
rows before the query path / FFN, index_add the updates back; K/V on every row.

Video cases (`frames`): N frames of T visual tokens each, one video span per frame with
FRAME_GAP text rows between frames (Qwen3-VL writes `<vision_end> <timestamp> <vision_start>`
there), so V = N * T video rows and S = V + text + (N - 1) * FRAME_GAP.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import reference
from .core import DecoderCore, causal_mask
from .flops import TextDims, plan_report
from .kept_rows import kept_inputs, mark_polymorphic, no_duck_sizes
from .layout import VisualLayout
from .plan import SkipPlan


@dataclass(frozen=True)
class BenchModel:
    name: str
    family: str  # "qwen3_vl" (M-RoPE, q/k norm) or "llama"
    hidden: int
    ffn: int
    heads: int
    kv_heads: int


MODELS = {
    "qwen3-vl-8b": BenchModel("qwen3-vl-8b", "qwen3_vl", 4096, 12288, 32, 8),
    "llava-1.5-7b": BenchModel("llava-1.5-7b", "llama", 4096, 11008, 32, 32),
    # Small widths for a quick check of the benchmark itself (tests), not for figures.
    "tiny-qwen3": BenchModel("tiny-qwen3", "qwen3_vl", 64, 128, 4, 2),
    "tiny-llama": BenchModel("tiny-llama", "llama", 64, 128, 4, 2),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The default plan of the benchmark: one layer each of the op mixes the paper's plans use.
DEFAULT_OPS = ("skip_attn", "skip_both")
FRAME_GAP = 3  # text rows between two frames of a video case
DEFAULT_FRAME_TOKENS = 256  # visual tokens per frame of a video case (Qwen3-VL-8B at 512 x 512 px per 2 frames)


def case_layout(visual: int, text: int, frames: int | None = None, frame_tokens: int = DEFAULT_FRAME_TOKENS
                ) -> VisualLayout:
    """The layout of one benchmark case: `visual` image rows after up to 8 text rows (a system
    prompt), the rest of the text after them; or, with `frames`, a video of frames x
    frame_tokens rows in one span per frame, FRAME_GAP text rows apart (`visual` unused)."""
    before = min(8, text - 1)  # text rows before the visual ones; the rest after them
    if frames is None:
        return VisualLayout.single(visual + text, [(before, before + visual)])
    step = frame_tokens + FRAME_GAP
    spans = [(before + i * step, before + i * step + frame_tokens) for i in range(frames)]
    seq_len = frames * frame_tokens + (frames - 1) * FRAME_GAP + text
    return VisualLayout.single(seq_len, spans, kinds=["video"] * frames)


def build_text_model(spec: BenchModel, layers: int, vocab: int = 256) -> tuple[nn.Module, nn.Module]:
    """(language model, lm_head) of the spec's width, random weights, eval mode, fp32."""
    if spec.family == "qwen3_vl":
        from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextModel

        head_dim = spec.hidden // spec.heads
        cfg = Qwen3VLTextConfig(
            vocab_size=vocab, hidden_size=spec.hidden, intermediate_size=spec.ffn, num_hidden_layers=layers,
            num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads, head_dim=head_dim,
            rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                             "mrope_interleaved": True},
        )
        lm = Qwen3VLTextModel(cfg)
    else:
        from transformers import LlamaConfig, LlamaModel

        cfg = LlamaConfig(vocab_size=vocab, hidden_size=spec.hidden, intermediate_size=spec.ffn,
                          num_hidden_layers=layers, num_attention_heads=spec.heads,
                          num_key_value_heads=spec.kv_heads)
        lm = LlamaModel(cfg)
    cfg._attn_implementation = "sdpa"
    head = nn.Linear(spec.hidden, vocab, bias=False)
    return lm.eval(), head.eval()


def _position_ids(spec: BenchModel, seq_len: int) -> torch.Tensor:
    pos = torch.arange(seq_len)[None]  # [1, S]
    return pos.expand(3, 1, seq_len).contiguous() if spec.family == "qwen3_vl" else pos


# -- the eager gather implementation (authors' style) ----------------------------------------
def _gather_attention(attn: nn.Module, x: torch.Tensor, cos, sin, mask, kept: torch.Tensor | None):
    """Attention update of the kept rows only (all rows when kept is None): [B, R, D]."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    B, S, _ = x.shape
    e = attn.head_dim
    xq = x if kept is None else x.index_select(1, kept)  # [B, R, D]
    R = xq.shape[1]
    q = attn.q_proj(xq).view(B, R, -1, e)  # [B, R, H, E]
    k = attn.k_proj(x).view(B, S, -1, e)  # [B, S, KV, E]
    v = attn.v_proj(x).view(B, S, -1, e).transpose(1, 2)  # [B, KV, S, E]
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, R, E], [B, KV, S, E]
    cq, sq = (cos, sin) if kept is None else (cos.index_select(1, kept), sin.index_select(1, kept))
    q, _ = apply_rotary_pos_emb(q, q, cq, sq)
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    m = mask if kept is None else mask.index_select(2, kept)  # [1, 1, R, S]
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=attn.scaling, enable_gqa=True)
    return attn.o_proj(out.transpose(1, 2).reshape(B, R, -1))  # [B, R, D]


class GatherPrefill(nn.Module):
    """Eager prefill that runs skipped operators on the kept rows via index_select / index_add."""

    def __init__(self, lm: nn.Module, head: nn.Module, plan: SkipPlan, layout: VisualLayout):
        super().__init__()
        self.lm, self.head, self.plan = lm, head, plan
        kept = [r for a, b in layout.kept_spans(plan.scope, plan.rows) for r in range(a, b)]
        self.register_buffer("kept", torch.tensor(kept, dtype=torch.long), persistent=False)

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = inputs_embeds  # [B, S, D]
        cos, sin = self.lm.rotary_emb(x, position_ids)
        mask = causal_mask(x.shape[1], x.device)
        for i, layer in enumerate(self.lm.layers):
            kept = self.kept if self.plan.skips_attn(i) else None
            upd = _gather_attention(layer.self_attn, layer.input_layernorm(x), cos, sin, mask, kept)
            x = x + upd if kept is None else x.index_add(1, kept, upd)
            h = layer.post_attention_layernorm(x)
            if self.plan.skips_ffn(i):
                x = x.index_add(1, self.kept, layer.mlp(h.index_select(1, self.kept)))
            else:
                x = x + layer.mlp(h)
        return self.head(self.lm.norm(x)[:, -1:])


class ReferencePrefill(nn.Module):
    """The eager oracle's cost: the full model, with skipped updates zeroed at frozen rows
    (the reference semantics of `vskip_compile.reference`, through its own hooks)."""

    def __init__(self, core: DecoderCore, plan: SkipPlan, layout: VisualLayout):
        super().__init__()
        self.core, self.plan = core, plan
        self.frozen = layout.frozen_spans(plan.scope, plan.rows)

    def forward(self, *args):
        zero = lambda module, inputs, output: reference._zero_rows(output, self.frozen)  # noqa: E731
        with reference.hooked(self.core.lm.layers, self.plan, zero):
            return self.core(*args)


# -- measurement ----------------------------------------------------------------------------
def _return_freed_memory_to_os() -> bool:
    """Make glibc serve every block >= 64 KiB with its own mmap, unmapped on free.

    Without it, freed tensors stay in malloc's heap and a later variant reuses those pages
    without touching new ones: its peak-RSS delta reads 0. With it, RSS follows live tensor
    memory, so the high-water mark over one call is that call's peak working set. The cost (a
    page fault per first touch) hits every variant alike. False where mallopt is unavailable.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3  # glibc malloc.h
        return bool(libc.mallopt(m_mmap_threshold, 64 * 1024)) and bool(libc.mallopt(m_trim_threshold, 64 * 1024))
    except (OSError, AttributeError):
        return False


def _rss_peak_reset() -> None:
    """Reset the kernel's peak-RSS counter of this process (Linux: clear_refs 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _time_once(fn: Callable[[], object], device: torch.device) -> tuple[float, int]:
    """(seconds, peak memory above what was allocated before the call, KiB): resident set on
    CPU, the CUDA caching allocator's peak on a GPU (synchronized around the call)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        return time.perf_counter() - t0, max(0, torch.cuda.max_memory_allocated(device) - before) // 1024
    before = _rss_kib("VmRSS")
    _rss_peak_reset()
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    return dt, max(0, _rss_kib("VmHWM") - before)


def bench_case(spec: BenchModel, layers: int, visual: int, text: int, repeats: int, ops: tuple[str, ...],
               log: Callable[[str], None] = print, device: str = "cpu", dtype: torch.dtype = torch.float32,
               frames: int | None = None, frame_tokens: int = DEFAULT_FRAME_TOKENS) -> dict:
    """Interleaved medians of the five variants for one (model, size); a video case with
    `frames` (see case_layout)."""
    torch._dynamo.reset()  # each case compiles DecoderCore.forward 3 times: stay clear of Dynamo's recompile limit
    torch.manual_seed(0)
    device = torch.device(device)
    lm, head = build_text_model(spec, layers)
    lm, head = lm.to(device, dtype), head.to(device, dtype)
    plan = SkipPlan.from_ops((ops * layers)[:layers], name="bench")
    layout = case_layout(visual, text, frames, frame_tokens)
    S, visual = layout.seq_len, layout.num_visual
    x = (torch.randn(1, S, spec.hidden) * 0.02).to(device, dtype)
    pos = _position_ids(spec, S).to(device)

    core = DecoderCore(lm, head, logits_to_keep=1)
    variants: dict[str, Callable[[], object]] = {}
    with torch.inference_mode():
        full_c = torch.compile(core, backend="inductor", fullgraph=True, dynamic=False)
        skip_c = torch.compile(DecoderCore(lm, head, logits_to_keep=1), backend="vskip", fullgraph=True, dynamic=False,
                               options={"plan": plan, "layout": layout, "inner": "inductor"})
        poly_c = torch.compile(DecoderCore(lm, head, logits_to_keep=1, layout_inputs=True), backend="vskip",
                               fullgraph=True, dynamic=False, options={"plan": plan, "inner": "inductor"})
        kept_index, kept_valid = kept_inputs(layout, plan.scope, device=device, rows=plan.rows)
        # own copies: marking sizes dynamic marks the tensors, and x, pos also feed the static graphs
        poly_args = (x.clone(), pos.clone(), kept_index, kept_valid, torch.ones(1, S, dtype=torch.bool, device=device))
        mark_polymorphic(poly_args, batched=False)
        ref = ReferencePrefill(DecoderCore(lm, head, logits_to_keep=1), plan, layout)
        gather = GatherPrefill(lm, head, plan, layout)

        def poly():
            with no_duck_sizes():
                return poly_c(*poly_args)

        variants = {
            "compiled full": lambda: full_c(x, pos),
            "compiled skip": lambda: skip_c(x, pos),
            "compiled poly": poly,
            "eager reference": lambda: ref(x, pos),
            "eager gather": lambda: gather(x, pos),
        }
        log(f"  compiling {spec.name} S={S} (V={visual}{f', {frames} frames' if frames else ''}) ...")
        outs = {name: fn() for name, fn in variants.items()}  # warm-up (compiles)
        last = {name: (o[0] if isinstance(o, tuple) else o)[:, -1].float() for name, o in outs.items()}
        # The skip variants against the oracle (compiled full computes another function: no plan).
        agree = max(float((last[n] - last["eager reference"]).abs().max()) for n in ("compiled skip", "compiled poly", "eager gather"))
        times: dict[str, list[float]] = {n: [] for n in variants}
        peaks: dict[str, int] = {n: 0 for n in variants}
        for _ in range(repeats):
            for name, fn in variants.items():
                dt, peak = _time_once(fn, device)
                times[name].append(dt)
                peaks[name] = max(peaks[name], peak)

    dims = TextDims(hidden=spec.hidden, heads=spec.heads, kv_heads=spec.kv_heads, head_dim=spec.hidden // spec.heads,
                    ffn=spec.ffn, layers=layers)
    report = plan_report(dims, plan, S, visual, V_video_value=layout.num_rows("video"))
    ideal = report["full"] / report["plan"]
    med = {n: statistics.median(t) for n, t in times.items()}
    speedup = med["compiled full"] / med["compiled skip"]
    # Per-round ratios (the variants of one round ran back to back): how steady the medians are.
    per_round = [g / k for g, k in zip(times["eager gather"], times["compiled skip"])]
    return {
        "model": spec.name, "layers": layers, "S": S, "V": visual, "plan": list(plan.ops),
        **({"video_frames": frames, "frame_tokens": frame_tokens} if frames else {}),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
        "median_ms": {n: round(1e3 * t, 2) for n, t in med.items()},
        "peak_mib": {n: round(p / 1024, 1) for n, p in peaks.items()},
        "speedup": speedup, "ideal_speedup": ideal, "realized": speedup / ideal,
        "poly_speedup": med["compiled full"] / med["compiled poly"],
        "realized_poly": med["compiled full"] / med["compiled poly"] / ideal,
        "poly_vs_static": med["compiled skip"] / med["compiled poly"],  # > 1: the polymorphic graph is faster
        # Best-of-rounds estimates (timeit's reading: noise only ever adds time), beside the medians.
        "min_ms": {n: round(1e3 * min(t), 2) for n, t in times.items()},
        "realized_min": min(times["compiled full"]) / min(times["compiled skip"]) / ideal,
        "realized_poly_min": min(times["compiled full"]) / min(times["compiled poly"]) / ideal,
        "poly_vs_static_min": min(times["compiled skip"]) / min(times["compiled poly"]),
        "poly_vs_static_rounds": [round(k / p, 4) for k, p in zip(times["compiled skip"], times["compiled poly"])],
        "skip_vs_gather": med["eager gather"] / med["compiled skip"],
        "skip_vs_gather_rounds": [round(r, 4) for r in per_round],
        "skip_faster_rounds": sum(r > 1 for r in per_round),
        "flops_reduction": report["reduction"], "max_abs_diff_last_logits": agree, "repeats": repeats,
    }


def run(console, models=("qwen3-vl-8b", "llava-1.5-7b"), visual=(576, 1024), text: int = 64, layers: int = 2,
        repeats: int = 5, ops: tuple[str, ...] = DEFAULT_OPS, device: str = "cpu", dtype: str = "fp32",
        video_frames: tuple[int, ...] = (), frame_tokens: int = DEFAULT_FRAME_TOKENS) -> list[dict]:
    """All cases, a rich table; returns the rows (for --json). With video_frames, the cases
    are videos of those frame counts (frame_tokens rows per frame) instead of `visual` images."""
    from rich.table import Table

    exact_peaks = _return_freed_memory_to_os()
    if not exact_peaks:
        console.print("  (glibc mallopt unavailable: peak memory columns read freed-heap reuse as 0)")
    rows = []
    for name in models:
        if name not in MODELS:
            raise ValueError(f"unknown benchmark model {name!r}; expected one of {', '.join(MODELS)}")
        cases = [(0, n) for n in video_frames] if video_frames else [(v, None) for v in visual]
        for v, frames in cases:
            rows.append(bench_case(MODELS[name], layers, v, text, repeats, ops, log=console.print, device=device,
                                   dtype=DTYPES[dtype], frames=frames, frame_tokens=frame_tokens))
    where = rows[0]["device"] if rows else device
    table = Table(title=f"prefill, {dtype}, {where}, {torch.get_num_threads()} threads, {layers} layers, plan {list((ops * layers)[:layers])}")
    for col in ("model", "S (V)", "compiled full ms", "static skip ms", "poly skip ms", "eager ref ms", "eager gather ms",
                "FLOPs ideal", "realized static", "realized poly", "poly vs static",
                "best-of-rounds realized static/poly, poly vs static", "skip vs gather (rounds faster)",
                "peak MiB full/static/poly/gather", "max |skip - ref|"):
        table.add_column(col, justify="right")
    for r in rows:
        m, pk = r["median_ms"], r["peak_mib"]
        frames = f", {r['video_frames']} fr" if r.get("video_frames") else ""
        table.add_row(r["model"], f"{r['S']} ({r['V']}{frames})", f"{m['compiled full']:.0f}", f"{m['compiled skip']:.0f}",
                      f"{m['compiled poly']:.0f}", f"{m['eager reference']:.0f}", f"{m['eager gather']:.0f}",
                      f"{r['ideal_speedup']:.3f}", f"{r['realized']:.3f}", f"{r['realized_poly']:.3f}", f"{r['poly_vs_static']:.3f}",
                      f"{r['realized_min']:.3f}/{r['realized_poly_min']:.3f}, {r['poly_vs_static_min']:.3f}",
                      f"{r['skip_vs_gather']:.3f} ({r['skip_faster_rounds']}/{r['repeats']})",
                      f"{pk['compiled full']:.0f}/{pk['compiled skip']:.0f}/{pk['compiled poly']:.0f}/{pk['eager gather']:.0f}",
                      f"{r['max_abs_diff_last_logits']:.1e}")
    if not console.is_terminal:  # piped (--json puts the table on stderr): no 80-column squeeze
        console.width = max(console.width, 220)
    console.print(table)
    return rows
