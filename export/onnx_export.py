"""export_onnx: every network a VLM needs at inference time, as ONNX files plus a manifest.

    out_dir/
      manifest.json                   model, plan, graphs, max_seq_len, versions, sha256 of all files
      weights-000.safetensors         initializers of all graphs (deduplicated) + host tensors
      vision-<key>.onnx               one per image shape (Qwen grid, LLaVA size, LLaVA-NeXT views)
      prefill-dynamic.onnx            the plan's skip-shaped prefill for EVERY layout: dim_params
                                      batch, seq_len (2..max_seq_len) and kept (2..max_seq_len)
      decode-b<B>.onnx                one decode step per batch size, fixed max_cache_len

A second call into the same directory (same model and plan) adds what is missing: the
vision graphs of new image shapes and a decode graph for a new batch size. Existing files
are never rewritten except the manifest, which is rewritten last. Weights a new graph shares
with existing ones are not stored again.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch

from ..layout import VisualLayout
from ..plan import SkipPlan
from . import jobs as jb
from . import manifest as mf
from .weights import WeightStore


def export_onnx(
    model,
    plan: SkipPlan,
    example_inputs: Mapping[str, Any] | None,
    out_dir: str | Path,
    layouts: Iterable[VisualLayout] | None = None,
    *,
    max_seq_len: int | None = None,
    batch_sizes: Iterable[int] = (),
    max_cache_len: int | None = None,
    reuse: str | Path | None = None,
    opset: int | None = None,
    optimize: bool = True,
    source: Mapping[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Export (or extend) the engine directory out_dir for `model` under `plan`.

    example_inputs: HF processor outputs (input_ids, pixel_values, ...): their images decide
    the vision graphs; the prefill graph is traced on them and serves every layout of up to
    max_seq_len tokens (default 1024, or max_cache_len - 1 when only that is given).
    batch_sizes: batch sizes to get a decode graph for (the example's always has one).
    layouts: compatibility only, not needed: each must fit max_seq_len and adds a decode
    graph for its batch size. max_cache_len: decode cache slots (default max_seq_len + 256,
    rounded up to 64). Both lengths are fixed by the first export into out_dir.
    reuse: an engine directory of the same model (any plan) whose plan-independent graphs
    (vision, decode at the same max_cache_len) and weights are copied instead of re-exported;
    only into a new directory. optimize: run torch.onnx's ONNX optimizer (slower export;
    onnxruntime optimizes at load time either way). source: recorded in the manifest (e.g.
    {"model_dir": ...}, which `vskip run` uses to find the processor).
    """
    import onnx

    say = progress or (lambda msg: None)
    work = jb.collect(model, plan, example_inputs, out_dir, layouts, max_cache_len, reuse, say, max_seq_len,
                      batch_sizes)
    work.source.update(source or {})
    jb.copy_reused(work)
    work.out_dir.mkdir(parents=True, exist_ok=True)
    store = WeightStore(work.out_dir)
    protos = []
    with tempfile.TemporaryDirectory(prefix="vskip-onnx-") as tmp:
        for i, job in enumerate(work.jobs):
            say(f"[{i + 1}/{len(work.jobs)}] exporting {job.file('.onnx')}")
            proto = _onnx_export(job, Path(tmp), opset, optimize)
            store.add_model(proto, Path(tmp))
            _stamp(proto, job, work.model_id)
            protos.append((job, proto))
        digests = jb.host_tensors(model, store)
        say("writing weights")
        store.flush()
    for job, proto in protos:
        path = work.out_dir / job.file(".onnx")
        onnx.save_model(proto, str(path))
        onnx.checker.check_model(str(path))  # by path: resolves the external weights
        work.graphs[job.role][job.key] = {"file": path.name, "format": "onnx", "opset": _opset(proto), **job.entry}

    opsets = [g["opset"] for role in work.graphs.values() for g in role.values() if "opset" in g]
    versions = {"onnx": onnx.__version__, "onnxscript": jb.version("onnxscript"), "opset": max(opsets, default=None)}
    say("writing manifest.json")
    mf.write_manifest(work.out_dir, jb.manifest_body(work, {n: store.where(d) for n, d in digests.items()}, versions))
    return work.out_dir


def _onnx_export(job: jb.Job, tmp: Path, opset: int | None, optimize: bool):
    """torch.onnx.export (dynamo) of one job into tmp; returns the loaded ModelProto."""
    import onnx

    path = tmp / job.file(".onnx")
    with torch.no_grad(), _reused_torchlib_registry(), (job.context or contextlib.nullcontext()):
        program = torch.onnx.export(
            job.module, job.args, input_names=job.input_names, output_names=job.output_names,
            dynamo=True, optimize=optimize, opset_version=opset, verbose=False,
        )
    program.save(str(path), external_data=True)
    proto = onnx.load(str(path), load_external_data=False)
    if "dynamic_axes" in job.entry:
        _name_symbols(proto, job.entry["dynamic_axes"])
    return proto


def _name_symbols(proto, axes: Mapping[str, Mapping[str, str]]) -> None:
    """Rename the exporter's dim_params (s17, s22, ...) to the axes' names (batch, seq_len,
    kept) everywhere in the graph, expressions included (e.g. 's22 + 1')."""
    names: dict[str, str] = {}
    for value in proto.graph.input:
        for axis, sym in axes.get(value.name, {}).items():
            dim = value.type.tensor_type.shape.dim[int(axis)]
            if not dim.dim_param:
                raise ValueError(f"prefill input {value.name} axis {axis} ({sym}) was exported static ({dim.dim_value})")
            if names.setdefault(dim.dim_param, sym) != sym:
                raise ValueError(f"prefill input {value.name} axis {axis}: {dim.dim_param} is already {names[dim.dim_param]}")
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = pattern.sub(lambda m: names[m.group(1)], dim.dim_param)


def _stamp(proto, job: jb.Job, model_id: Mapping[str, Any]) -> None:
    """metadata_props that tie a graph file to its model and role (checked by the runner)."""
    props = {"vskip.role": job.role, "vskip.key": job.key, "vskip.config_hash": model_id["config_hash"]}
    for k, v in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v


def _opset(proto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


_REGISTRIES: dict[Any, Any] = {}  # torchlib registries by from_torchlib arguments, process-wide


@contextlib.contextmanager
def _reused_torchlib_registry() -> Iterator[None]:
    """torch.onnx.export rebuilds its torchlib op registry on every call (about a quarter of
    a small graph's export time, measured on torch 2.13); reuse one per opset meanwhile.
    Touches a private torch class: if it is not there, exports run unchanged."""
    try:
        from torch.onnx._internal.exporter._registration import ONNXRegistry
    except ImportError:
        yield
        return
    original = ONNXRegistry.__dict__.get("from_torchlib")
    if not isinstance(original, classmethod):
        yield
        return

    def cached(cls, *args, **kwargs):
        key = (cls, args, tuple(sorted(kwargs.items())))
        if key not in _REGISTRIES:
            _REGISTRIES[key] = original.__func__(cls, *args, **kwargs)
        return _REGISTRIES[key]

    ONNXRegistry.from_torchlib = classmethod(cached)
    try:
        yield
    finally:
        ONNXRegistry.from_torchlib = original
