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

import contextlib
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
    max_cache_len: int | None = None,
    reuse: str | Path | None = None,
    opset: int | None = None,
    optimize: bool = True,
    source: Mapping[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Export (or extend) the engine directory out_dir for `model` under `plan`.

    example_inputs: HF processor outputs (input_ids, pixel_values, ...): their images decide
    the vision graphs, their layout a prefill graph. layouts: extra VisualLayouts to get a
    prefill graph each (same images, other text lengths). max_cache_len: decode cache slots
    (default: longest prefill + 256, rounded up to 64), fixed by the first export.
    reuse: an engine directory of the same model (any plan) whose plan-independent graphs
    (vision, decode at the same max_cache_len) and weights are copied instead of re-exported;
    only into a new directory. optimize: run torch.onnx's ONNX optimizer (slower export;
    onnxruntime optimizes at load time either way). source: recorded in the manifest (e.g.
    {"model_dir": ...}, which `vskip run` uses to find the processor).
    """
    import onnx

    say = progress or (lambda msg: None)
    work = jb.collect(model, plan, example_inputs, out_dir, layouts, max_cache_len, reuse, say)
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
    return onnx.load(str(path), load_external_data=False)


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
