"""export_onnx: every network a VLM needs at inference time, as ONNX files plus a manifest.

    out_dir/
      manifest.json                   model, plan, graphs + layouts, versions, sha256 of all files
      weights-000.safetensors         initializers of all graphs (deduplicated) + host tensors
      vision-<key>.onnx               one per image shape (Qwen grid, LLaVA size, LLaVA-NeXT views)
      prefill-<layout>.onnx           one per layout, the plan's skips baked in (static shapes)
      decode-b<B>.onnx                one decode step per batch size, fixed max_cache_len

A second call into the same directory (same model and plan) adds what is missing: the
vision graphs and prefill graph of new example inputs, prefill graphs of extra `layouts`,
and a decode graph for a new batch size. Existing files are never rewritten except the
manifest, which is rewritten last. Weights a new graph shares with existing ones are not
stored again.
"""

from __future__ import annotations

import importlib.metadata
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from ..archs import PrefillInputs, adapter_for
from ..layout import LayoutError, VisualLayout
from ..plan import PlanError, SkipPlan, config_hash
from . import decode as decode_mod
from . import host, manifest as mf, vision
from .prefill import prefill_graph
from .weights import WeightStore

DEFAULT_CACHE_SLACK = 256  # decode slots beyond the longest exported prefill, by default


@dataclass
class _Job:
    """One graph to export: where it goes and what the manifest says about it."""

    role: str  # vision | prefill | decode
    key: str
    module: torch.nn.Module
    args: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    entry: dict[str, Any]
    context: Any = None  # a context manager the trace needs (Qwen vision attention)

    @property
    def rel_path(self) -> str:
        return f"{self.role}-{self.key}.onnx"  # beside the weights: ONNX external data may not point upwards


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def _plan_id(plan: SkipPlan) -> dict[str, Any]:
    """The part of a plan that decides the graphs (ops and scope), for same-plan checks."""
    return {"ops": list(plan.ops), "scope": plan.scope}


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
    pad = getattr(gen, "pad_token_id", None)
    return eos, pad


def _embedding_table(model) -> torch.Tensor:
    """The input embedding matrix; refuses embeddings that are more than a lookup (scaled ones)."""
    emb = model.get_input_embeddings()
    if type(emb) is not torch.nn.Embedding:
        raise NotImplementedError(
            f"{type(emb).__name__}: the ONNX runner does a plain table lookup; this embedding may scale or offset"
        )
    return emb.weight.detach()


def _synthetic_prefill(layout: VisualLayout, like: PrefillInputs) -> PrefillInputs:
    """Zero-valued prefill inputs of another layout (shapes are all a static graph needs)."""
    b, s = layout.batch_size, layout.seq_len
    embeds = torch.zeros(b, s, like.inputs_embeds.shape[-1], dtype=like.inputs_embeds.dtype)
    pos_shape = (like.position_ids.shape[0], b, s) if like.position_ids.ndim == 3 else (b, s)
    positions = torch.zeros(pos_shape, dtype=like.position_ids.dtype)
    deepstack = None if like.deepstack is None else tuple(torch.zeros_like(embeds) for _ in like.deepstack)
    return PrefillInputs(embeds, positions, deepstack, None, layout)


def _onnx_export(job: _Job, tmp: Path, opset: int | None, optimize: bool):
    """torch.onnx.export (dynamo) of one job into tmp; returns the loaded ModelProto."""
    import contextlib

    import onnx

    path = tmp / job.rel_path
    with torch.no_grad(), (job.context or contextlib.nullcontext()):
        program = torch.onnx.export(
            job.module, job.args, input_names=job.input_names, output_names=job.output_names,
            dynamo=True, optimize=optimize, opset_version=opset, verbose=False,
        )
    program.save(str(path), external_data=True)
    return onnx.load(str(path), load_external_data=False)


def _stamp(proto, job: _Job, model_id: Mapping[str, Any]) -> None:
    """metadata_props that tie a graph file to its model and role (checked by the runner)."""
    props = {"vskip.role": job.role, "vskip.key": job.key, "vskip.config_hash": model_id["config_hash"]}
    for k, v in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v


def export_onnx(
    model,
    plan: SkipPlan,
    example_inputs: Mapping[str, Any] | None,
    out_dir: str | Path,
    layouts: Iterable[VisualLayout] | None = None,
    *,
    max_cache_len: int | None = None,
    opset: int | None = None,
    optimize: bool = True,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Export (or extend) the engine directory out_dir for `model` under `plan`.

    example_inputs: HF processor outputs (input_ids, pixel_values, ...): their images decide
    the vision graphs, their layout a prefill graph. layouts: extra VisualLayouts to get a
    prefill graph each (same images, other text lengths). max_cache_len: decode cache slots
    (default: longest prefill + 256, rounded up to 64), fixed by the first export.
    """
    say = progress or (lambda msg: None)
    adapter = adapter_for(model)
    adapter.check_plan(model, plan)
    out_dir = Path(out_dir)
    text_config = adapter.text_config(model)
    model_id = {"architecture": adapter.architecture(model), "config_hash": config_hash(text_config)}
    stamped = plan if plan.model else plan.with_model(model_id["architecture"], text_config)

    old = None
    if (out_dir / mf.MANIFEST).exists():
        old = mf.verify(out_dir, expect_model=model_id)
        if old["plan_id"] != _plan_id(plan):
            raise PlanError(
                f"{out_dir}: engine was exported for plan {old['plan'].get('name') or old['plan_id']['ops']}, "
                f"not {plan.name or list(plan.ops)}; one plan per engine directory"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    graphs = old["graphs"] if old else {"vision": {}, "prefill": {}, "decode": {}}

    dims = _text_dims(model, adapter)
    model.eval()
    jobs: list[_Job] = []
    prefills: list[PrefillInputs] = []
    example = None
    if example_inputs is not None:
        say("running the model's vision tower on the example inputs")
        with torch.no_grad():
            example = adapter.prefill_inputs(model, **example_inputs)
        prefills.append(example)
        for g in vision.vision_graphs(model, adapter, dict(example_inputs)):
            if g.key not in graphs["vision"]:
                entry = {"inputs": g.input_names, "outputs": g.output_names, **g.meta}
                jobs.append(_Job("vision", g.key, g.module, g.args, g.input_names, g.output_names, entry,
                                 vision.exporting(model, adapter)))
    for layout in layouts or ():
        if example is None and old is None:
            raise LayoutError("extra layouts need example_inputs (or an existing export) to take shapes from")
        like = example if example is not None else _synthetic_like(old)
        prefills.append(_synthetic_prefill(layout, like))

    if not prefills and old is None:
        raise ValueError("nothing to export: give example_inputs (and optionally layouts)")
    num_deepstack = len(example.deepstack or ()) if example is not None else old["runtime"]["num_deepstack"]
    mrope = (example.position_ids.ndim == 3) if example is not None else old["runtime"]["position"] == "mrope"
    for p in prefills:
        if not p.layout.is_uniform:
            raise LayoutError(f"{p.layout}: batch rows have different visual spans; export one layout per graph")
        key = host.layout_key(p.layout)
        if key in graphs["prefill"] or any(j.key == key for j in jobs):
            continue
        say(f"tracing the prefill of layout {key} and applying the plan's passes")
        g = prefill_graph(model, adapter, plan, p)
        entry = {"layout": host.layout_to_json(p.layout), "inputs": g.input_names, "outputs": g.output_names,
                 "counters": g.counters}
        jobs.append(_Job("prefill", key, g.module, g.args, g.input_names, g.output_names, entry))

    longest = max([p.layout.seq_len for p in prefills] + [v["layout"]["seq_len"] for v in graphs["prefill"].values()] or [1])
    if old is not None:
        if max_cache_len is not None and max_cache_len != old["runtime"]["max_cache_len"]:
            raise mf.EngineError(f"{out_dir}: max_cache_len is {old['runtime']['max_cache_len']}, fixed by the first export")
        max_cache_len = old["runtime"]["max_cache_len"]
    elif max_cache_len is None:
        max_cache_len = -(-(longest + DEFAULT_CACHE_SLACK) // 64) * 64
    if longest >= max_cache_len:
        raise LayoutError(f"a prefill of {longest} rows does not fit max_cache_len={max_cache_len} (decode needs room)")

    for batch in sorted({p.layout.batch_size for p in prefills}):
        key = f"b{batch}"
        if key in graphs["decode"]:
            continue
        lm = adapter.language_model(model)
        args = decode_mod.example_inputs(model, adapter, batch, max_cache_len, mrope)
        ins = ["inputs_embeds", "position_ids", "past_mask"] + [f"past_{kv}_{i}" for i in range(dims["num_layers"]) for kv in ("k", "v")]
        outs = ["logits"] + [f"new_{kv}_{i}" for i in range(dims["num_layers"]) for kv in ("k", "v")]
        step = decode_mod.DecodeStep(lm, adapter.lm_head(model)).eval()
        jobs.append(_Job("decode", key, step, args, ins, outs, {"batch": batch, "max_cache_len": max_cache_len,
                                                                 "inputs": ins, "outputs": outs}))

    import onnx

    store = WeightStore(out_dir)
    table = _embedding_table(model)  # [V, D]
    table = table.float() if table.dtype == torch.bfloat16 else table  # numpy has no bfloat16
    host_tensors = {"embed_tokens": store.add_array("host.embed_tokens", table.numpy())}
    newline = getattr(getattr(model, "model", None), "image_newline", None)
    if newline is not None:
        host_tensors["image_newline"] = store.add_array("host.image_newline", newline.detach().float().numpy())
    protos = []
    with tempfile.TemporaryDirectory(prefix="vskip-onnx-") as tmp:
        for i, job in enumerate(jobs):
            say(f"[{i + 1}/{len(jobs)}] exporting {job.rel_path}")
            proto = _onnx_export(job, Path(tmp), opset, optimize)
            store.add_model(proto, Path(tmp))
            _stamp(proto, job, model_id)
            protos.append((job, proto))
        say("writing weights")
        store.flush()
    for job, proto in protos:
        path = out_dir / job.rel_path
        onnx.save_model(proto, str(path))
        onnx.checker.check_model(str(path))  # by path: resolves the external weights
        graphs[job.role][job.key] = {"file": job.rel_path, "opset": _opset(proto), **job.entry}

    eos, pad = _eos_pad(model)
    runtime = {
        "family": adapter.name,
        "image_token_id": adapter.image_token_id(model),
        "visual_token_ids": list(adapter.visual_token_ids(model)),
        "position": "mrope" if mrope else "1d",
        "num_deepstack": num_deepstack,
        "max_cache_len": max_cache_len,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "eos_token_id": eos,
        "pad_token_id": pad,
        **dims,
        "vision": vision.host_info(model, adapter),
        "tensors": {name: store.where(d) for name, d in host_tensors.items()},
    }
    say("writing manifest.json")
    mf.write_manifest(out_dir, {
        "model": {**model_id, "text_config": {k: text_config.get(k) for k in sorted(text_config) if _jsonable(text_config.get(k))}},
        "plan": stamped.to_dict(),
        "plan_id": _plan_id(plan),
        "runtime": runtime,
        "graphs": graphs,
        "versions": {
            "vskip_compile": _version("vskip-compile"),
            "torch": torch.__version__,
            "transformers": _version("transformers"),
            "onnx": onnx.__version__,
            "onnxscript": _version("onnxscript"),
            "opset": max([g["opset"] for role in graphs.values() for g in role.values()] or [0]),
        },
    })
    return out_dir


def _opset(proto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _synthetic_like(old: Mapping[str, Any]) -> PrefillInputs:
    """A one-row stand-in PrefillInputs of the existing export's input kinds (for `layouts`)."""
    rt = old["runtime"]
    dtype = getattr(torch, rt["dtype"])
    embeds = torch.zeros(1, 1, rt["hidden_size"], dtype=dtype)
    positions = torch.zeros((3, 1, 1) if rt["position"] == "mrope" else (1, 1), dtype=torch.long)
    deepstack = tuple(torch.zeros_like(embeds) for _ in range(rt["num_deepstack"])) or None
    return PrefillInputs(embeds, positions, deepstack, None, VisualLayout.single(1, []))
