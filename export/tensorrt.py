"""export_tensorrt: the same graphs as export_onnx, compiled to raw TensorRT engines.

Each job (vision per image shape, THE skip-shaped prefill, decode step per batch size) is an
ExportedProgram (the prefill one already rewritten by the passes), compiled whole by
torch-tensorrt's dynamo path `convert_exported_program_to_serialized_trt_engine` into
`<role>-<key>.engine`: TensorRT's own plan format (no pickle), loadable by trtexec or
`tensorrt.Runtime.deserialize_cuda_engine` without torch. The prefill program is the ONNX
export's polymorphic one (symbolic batch, seq_len, kept): its engine gets one optimization
profile (`shape_ranges`): seq_len and kept from 2 to max_seq_len, batch from 1 to the largest
batch a decode graph is exported for, opt at the example's shapes. Vision and decode are
static. Engines embed their weights (no sharing between engines, unlike the ONNX export);
weights-000.safetensors holds the host tensors (embedding table). The manifest is the same
as the ONNX export's, with "format": "tensorrt" per graph and the TensorRT versions.

Needs a CUDA device, the model on it, and torch-tensorrt (which pins its torch version);
imported lazily. Not run in this project's CI (no GPU): see tests/test_engine_manifest.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from ..layout import VisualLayout
from ..plan import SkipPlan
from . import jobs as jb
from . import manifest as mf
from .weights import WeightStore

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def export_tensorrt(
    model,
    plan: SkipPlan,
    example_inputs: Mapping[str, Any] | None,
    out_dir: str | Path,
    layouts: Iterable[VisualLayout] | None = None,
    *,
    max_seq_len: int | None = None,
    batch_sizes: Iterable[int] = (),
    max_cache_len: int | None = None,
    precision: str = "fp32",
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Compile the engine directory out_dir for `model` (on CUDA) under `plan`; see export_onnx
    for the arguments. precision: the TensorRT kernels allowed (fp32, fp16, bf16)."""
    try:
        import torch_tensorrt
    except ImportError as e:
        raise ImportError("export_tensorrt needs torch-tensorrt: pip install 'vskip-compile[gpu]'") from e
    if not torch.cuda.is_available():
        raise mf.EngineError("export_tensorrt needs a CUDA device")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise mf.EngineError(f"move the model to CUDA first (model.cuda()); it is on {device}")

    say = progress or (lambda msg: None)
    if example_inputs is not None:
        example_inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in example_inputs.items()}
    work = jb.collect(model, plan, example_inputs, out_dir, layouts, max_cache_len, None, say, max_seq_len,
                      batch_sizes)
    work.out_dir.mkdir(parents=True, exist_ok=True)
    max_batch = max(int(key[1:]) for key in [*work.graphs["decode"], *(j.key for j in work.jobs if j.role == "decode")])
    for i, job in enumerate(work.jobs):
        say(f"[{i + 1}/{len(work.jobs)}] compiling {job.file('.engine')} with TensorRT")
        program = _program(job)
        inputs = [torch_tensorrt.Input(min_shape=r.min, opt_shape=r.opt, max_shape=r.max, dtype=r.dtype)
                  if r.min != r.max else torch_tensorrt.Input(shape=r.min, dtype=r.dtype)
                  for r in shape_ranges(job, max_batch)]
        engine: bytes = torch_tensorrt.dynamo.convert_exported_program_to_serialized_trt_engine(
            program, arg_inputs=inputs, enabled_precisions={PRECISIONS[precision]},
        )
        path = work.out_dir / job.file(".engine")
        path.write_bytes(engine)
        work.graphs[job.role][job.key] = {"file": path.name, "format": "tensorrt", "precision": precision, **job.entry}

    store = WeightStore(work.out_dir)
    digests = jb.host_tensors(model, store)
    store.flush()
    versions = {"torch_tensorrt": jb.version("torch-tensorrt"), "tensorrt": jb.version("tensorrt")}
    say("writing manifest.json")
    mf.write_manifest(work.out_dir, jb.manifest_body(work, {n: store.where(d) for n, d in digests.items()}, versions))
    return work.out_dir


@dataclass(frozen=True)
class ShapeRange:
    """One input of a TensorRT optimization profile (torch_tensorrt.Input min/opt/max)."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]
    dtype: torch.dtype


def shape_ranges(job: jb.Job, max_batch: int) -> list[ShapeRange]:
    """The profile of a job's inputs. Static jobs: min = opt = max = the example's shape. The
    prefill: each symbolic axis (entry["dynamic_axes"]) over its range (entry["ranges"]), the
    batch capped at max_batch (TensorRT sizes its memory for max), opt = the example's size
    clamped into the range."""
    axes = job.entry.get("dynamic_axes", {})
    ranges = dict(job.entry.get("ranges", {}))
    if "batch" in ranges:
        ranges["batch"] = (ranges["batch"][0], min(ranges["batch"][1], max_batch))
    out = []
    for name, x in zip(job.input_names, job.args):
        shape = tuple(int(n) for n in x.shape)
        lo, opt, hi = list(shape), list(shape), list(shape)
        for axis, sym in axes.get(name, {}).items():
            a, (r_min, r_max) = int(axis), ranges[sym]
            lo[a], opt[a], hi[a] = r_min, min(max(shape[a], r_min), r_max), r_max
        out.append(ShapeRange(name, tuple(lo), tuple(opt), tuple(hi), x.dtype))
    return out


def _program(job: jb.Job) -> torch.export.ExportedProgram:
    """The job as an ExportedProgram (prefill jobs already are one)."""
    if isinstance(job.module, torch.export.ExportedProgram):
        return job.module
    import contextlib

    with torch.no_grad(), (job.context or contextlib.nullcontext()):
        return torch.export.export(job.module, job.args, strict=False)
