"""What an export writes: the graphs a model needs for some inputs, and the manifest body.

Shared by the ONNX and TensorRT exporters, which differ only in how a job becomes a file.
A job is one graph: a vision encoder for one image shape (static), THE skip-shaped prefill of
the plan (one per engine: batch, sequence length and kept-row count symbolic, so it serves
every layout up to max_seq_len), or the decode step of one batch size (static, max_cache_len
slots). Jobs that an existing export in out_dir already holds are left out (that is how a
second call adds image shapes and batch sizes); with `reuse`, the plan-independent jobs
(vision, decode) another engine of the same model holds are copied.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from ..archs import PrefillInputs, adapter_for
from ..core import refuse_recurrent
from ..kept_rows import MIN_ROWS
from ..layout import LayoutError, VisualLayout
from ..plan import PlanError, SkipPlan, config_hash
from . import decode as decode_mod
from . import vision
from . import manifest as mf
from .prefill import prefill_graph, symbol_ranges
from .runner import PREFILL_KEY, prefill_entry
from .weights import WeightStore

DEFAULT_MAX_SEQ_LEN = 1024  # longest prompt of an engine, by default
DEFAULT_CACHE_SLACK = 256  # decode slots beyond max_seq_len, by default


@dataclass
class Job:
    """One graph to export: its module or program, example inputs, names, manifest entry."""

    role: str  # vision | prefill | decode
    key: str
    module: Any  # torch.nn.Module or torch.export.ExportedProgram
    args: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    entry: dict[str, Any]
    context: Any = None  # a context manager the trace needs (Qwen vision attention)

    def file(self, suffix: str) -> str:
        # Flat directory: ONNX external data may not point to a parent directory.
        return f"{self.role}-{self.key}{suffix}"


@dataclass
class Work:
    """Everything one export call writes, decided before anything is written."""

    out_dir: Path
    model_id: dict[str, Any]
    plan: SkipPlan
    text_config: dict[str, Any]
    graphs: dict[str, dict[str, Any]]  # role -> key -> manifest entry (existing ones included)
    jobs: list[Job]
    copies: list[tuple[str, str]]  # (role, key) copied from `reuse`
    reuse: Path | None
    runtime: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)  # where the model came from (kept across calls)


def version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


plan_id = mf.plan_id  # the part of a plan that decides the graphs (ops, scope, rows)


def collect(
    model,
    plan: SkipPlan,
    example_inputs: Mapping[str, Any] | None,
    out_dir: str | Path,
    layouts: Iterable[VisualLayout] | None,
    max_cache_len: int | None,
    reuse: str | Path | None,
    say: Callable[[str], None],
    max_seq_len: int | None = None,
    batch_sizes: Iterable[int] = (),
) -> Work:
    """Decide the jobs of one export call (traces the prefill program and runs the passes).

    layouts (compatibility: one prefill serves every layout) only check that their lengths
    fit and add a decode step for their batch sizes, like batch_sizes."""
    adapter = adapter_for(model)
    adapter.check_plan(model, plan)
    refuse_recurrent(adapter.language_model(model), "the ONNX / TensorRT export (its prefill and decode programs)")
    out_dir = Path(out_dir)
    text_config = adapter.text_config(model)
    model_id = {"architecture": adapter.architecture(model), "config_hash": config_hash(text_config)}
    old = _existing(out_dir, model_id, plan)
    src = None
    if reuse is not None:
        if old is not None:
            raise mf.EngineError(f"{out_dir}: reuse= copies into a new engine directory, this one has a manifest")
        src = mf.verify(reuse, expect_model=model_id)
    graphs = old["graphs"] if old else {"vision": {}, "prefill": {}, "decode": {}}
    model.eval()

    example = None
    vision_graphs: list[vision.VisionGraph] = []
    if example_inputs is not None:
        say("running the model's vision tower on the example inputs")
        with torch.no_grad():
            example = adapter.prefill_inputs(model, **example_inputs)
        example.require_causal("the ONNX / TensorRT prefill export")
        vision_graphs = vision.vision_graphs(model, adapter, dict(example_inputs))
    elif old is None:
        raise ValueError("nothing to export: give example_inputs (and optionally layouts or batch_sizes)")
    layouts = list(layouts or ()) + ([example.layout] if example is not None else [])
    if example is not None:
        mrope, num_deepstack = adapter.mrope(model), len(example.deepstack or ())
    else:
        mrope, num_deepstack = old["runtime"]["position"] == "mrope", old["runtime"]["num_deepstack"]
    max_seq_len, max_cache_len = _lengths(max_seq_len, max_cache_len, layouts, old, src, out_dir)

    jobs: list[Job] = []
    copies: list[tuple[str, str]] = []
    for g in vision_graphs:
        if g.key in graphs["vision"] or any(j.key == g.key for j in jobs):
            continue
        if src is not None and g.key in src["graphs"]["vision"]:
            copies.append(("vision", g.key))
            continue
        entry = {"inputs": g.input_names, "outputs": g.output_names, **g.meta}
        jobs.append(Job("vision", g.key, g.module, g.args, g.input_names, g.output_names, entry,
                        vision.exporting(model, adapter)))
    if PREFILL_KEY not in graphs["prefill"]:
        say(f"tracing the prefill (any layout, up to {max_seq_len} rows) and applying the plan's passes")
        jobs.append(_prefill_job(model, adapter, plan, example, max_seq_len))
    batches = {layout.batch_size for layout in layouts} | set(batch_sizes)
    for batch in sorted(batches):
        key = f"b{batch}"
        if key in graphs["decode"]:
            continue
        if src is not None and src["graphs"]["decode"].get(key, {}).get("max_cache_len") == max_cache_len:
            copies.append(("decode", key))
            continue
        jobs.append(_decode_job(model, adapter, batch, max_cache_len, mrope))

    eos, pad = _eos_pad(model)
    runtime = {
        "family": adapter.name,
        "image_token_id": adapter.image_token_id(model),
        "video_token_id": adapter.video_token_id(model),
        "visual_token_ids": list(adapter.visual_token_ids(model)),
        "position": "mrope" if mrope else "1d",
        "num_deepstack": num_deepstack,
        "min_seq_len": MIN_ROWS,
        "max_seq_len": max_seq_len,
        "max_cache_len": max_cache_len,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "eos_token_id": eos,
        "pad_token_id": pad,
        **_text_dims(model, adapter),
        "vision": vision.host_info(model, adapter),
    }
    source = dict(old.get("source", {})) if old else {}
    return Work(out_dir, model_id, plan, text_config, graphs, jobs, copies, Path(reuse) if reuse else None, runtime,
                source)


def copy_reused(work: Work) -> None:
    """Copy the reused graphs and every weights file of the reused engine (offsets stay valid)."""
    if not work.copies:
        return
    src = mf.load_manifest(work.reuse)
    work.out_dir.mkdir(parents=True, exist_ok=True)
    for path in sorted(work.reuse.glob("weights-*.safetensors")):
        shutil.copyfile(path, work.out_dir / path.name)
    for role, key in work.copies:
        entry = src["graphs"][role][key]
        shutil.copyfile(work.reuse / entry["file"], work.out_dir / entry["file"])
        work.graphs[role][key] = entry


def host_tensors(model, store: WeightStore) -> dict[str, str]:
    """Add the tensors the runner reads itself to the store: the embedding table (and
    LLaVA-NeXT's newline row). Returns name -> digest (store.where after flush)."""
    emb = model.get_input_embeddings()
    if type(emb) is not torch.nn.Embedding:
        raise NotImplementedError(
            f"{type(emb).__name__}: the runners do a plain table lookup; this embedding may scale or offset"
        )
    table = emb.weight.detach().cpu()  # [V, D]
    table = table.float() if table.dtype == torch.bfloat16 else table  # numpy has no bfloat16
    digests = {"embed_tokens": store.add_array("host.embed_tokens", table.numpy())}
    newline = getattr(getattr(model, "model", None), "image_newline", None)
    if newline is not None:
        digests["image_newline"] = store.add_array("host.image_newline", newline.detach().cpu().float().numpy())
    return digests


def manifest_body(work: Work, tensors: Mapping[str, Any], versions: Mapping[str, Any]) -> dict[str, Any]:
    stamped = work.plan if work.plan.model else work.plan.with_model(work.model_id["architecture"], work.text_config)
    text = {k: v for k, v in sorted(work.text_config.items()) if _jsonable(v)}
    return {
        "model": {**work.model_id, "text_config": text},
        "plan": stamped.to_dict(),
        "plan_id": plan_id(work.plan),
        "runtime": {**work.runtime, "tensors": dict(tensors)},
        "graphs": work.graphs,
        "source": work.source,
        "versions": {
            "vskip_compile": version("vskip-compile"),
            "torch": torch.__version__,
            "transformers": version("transformers"),
            **versions,
        },
    }


# -- helpers -------------------------------------------------------------------------------------
def _existing(out_dir: Path, model_id: Mapping[str, Any], plan: SkipPlan) -> dict[str, Any] | None:
    """The verified manifest of an engine already in out_dir (same model and plan), or None
    for a new or empty directory; any other directory is refused (mf.check_out_dir)."""
    old = mf.check_out_dir(out_dir)
    if old is None:
        return None
    mf.check_model(old, model_id, str(out_dir / mf.MANIFEST))
    if old["plan_id"] != plan_id(plan):
        raise PlanError(
            f"{out_dir}: engine was exported for plan {old['plan'].get('name') or old['plan_id']['ops']}, "
            f"not {plan.name or list(plan.ops)}; one plan per engine directory"
        )
    return old


def _lengths(max_seq_len, max_cache_len, layouts, old, src, out_dir) -> tuple[int, int]:
    """(max_seq_len, max_cache_len): fixed by an existing export; else requested; else the
    reused engine's. Defaults: max_seq_len = max_cache_len - 1 when only the cache is
    given, else DEFAULT_MAX_SEQ_LEN (raised to the longest layout, rounded up to 64); the
    cache max_seq_len + slack, rounded up to 64. Decode needs a slot past the longest prompt."""
    if old is not None:
        _, entry = prefill_entry(old, str(out_dir / mf.MANIFEST))
        for name, want, fixed in (("max_seq_len", max_seq_len, entry["ranges"]["seq_len"][1]),
                                  ("max_cache_len", max_cache_len, old["runtime"]["max_cache_len"])):
            if want is not None and want != fixed:
                raise mf.EngineError(f"{out_dir}: {name} is {fixed}, fixed by the first export")
        max_seq_len, max_cache_len = entry["ranges"]["seq_len"][1], old["runtime"]["max_cache_len"]
    elif src is not None:  # the reused engine's lengths, unless asked otherwise
        max_cache_len = src["runtime"]["max_cache_len"] if max_cache_len is None else max_cache_len
        max_seq_len = src["runtime"].get("max_seq_len") if max_seq_len is None else max_seq_len
    longest = max((layout.seq_len for layout in layouts), default=MIN_ROWS)
    if max_seq_len is None:
        rounded = -(-longest // 64) * 64
        max_seq_len = max_cache_len - 1 if max_cache_len is not None else max(DEFAULT_MAX_SEQ_LEN, rounded)
    if max_cache_len is None:
        max_cache_len = -(-(max_seq_len + DEFAULT_CACHE_SLACK) // 64) * 64
    if max_seq_len < MIN_ROWS:
        raise LayoutError(f"max_seq_len={max_seq_len}: a prefill program needs at least {MIN_ROWS} rows")
    if longest > max_seq_len:
        raise LayoutError(f"a prompt of {longest} rows exceeds max_seq_len={max_seq_len}")
    if max_seq_len >= max_cache_len:
        raise LayoutError(f"max_seq_len={max_seq_len} does not fit max_cache_len={max_cache_len} (decode needs room)")
    return max_seq_len, max_cache_len


def _prefill_job(model, adapter, plan: SkipPlan, example: PrefillInputs, max_seq_len: int) -> Job:
    """The one polymorphic prefill; its entry names the symbolic axes and their ranges (as
    the exported program states them)."""
    g = prefill_graph(model, adapter, plan, example, max_seq_len)
    ranges = symbol_ranges(g.module, g.axes, g.input_names)
    if ranges != g.ranges:
        raise LayoutError(f"the exported prefill program has ranges {ranges}, asked for {g.ranges}")
    entry = {"inputs": g.input_names, "outputs": g.output_names, "counters": g.counters,
             "dynamic_axes": {name: {str(axis): sym for axis, sym in ax.items()} for name, ax in g.axes.items()},
             "ranges": {sym: list(r) for sym, r in ranges.items()}}
    return Job("prefill", PREFILL_KEY, g.module, g.args, g.input_names, g.output_names, entry)


def _decode_job(model, adapter, batch: int, max_cache_len: int, mrope: bool) -> Job:
    lm = adapter.language_model(model)
    layers = len(lm.layers)
    args = decode_mod.example_inputs(model, adapter, batch, max_cache_len, mrope)
    ins = ["inputs_embeds", "position_ids", "past_mask"] + [f"past_{kv}_{i}" for i in range(layers) for kv in ("k", "v")]
    outs = ["logits"] + [f"new_{kv}_{i}" for i in range(layers) for kv in ("k", "v")]
    step = decode_mod.DecodeStep(lm, adapter.lm_head(model)).eval()
    entry = {"batch": batch, "max_cache_len": max_cache_len, "inputs": ins, "outputs": outs}
    return Job("decode", f"b{batch}", step, args, ins, outs, entry)


def _text_dims(model, adapter) -> dict[str, Any]:
    lm = adapter.language_model(model)
    cfg = lm.config
    return {
        "num_layers": len(lm.layers),
        "hidden_size": int(cfg.hidden_size),
        "num_kv_heads": int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads),
        "head_dim": int(lm.layers[0].self_attn.head_dim),
        "vocab_size": int(cfg.vocab_size),
    }


def _eos_pad(model) -> tuple[list[int], int | None]:
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    if eos is None:
        eos = model.config.get_text_config().eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return eos, getattr(gen, "pad_token_id", None)


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True
