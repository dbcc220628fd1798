"""export_tensorrt: the same graphs as export_onnx, compiled to raw TensorRT engines.

Each job (vision per image shape, skip-shaped prefill per layout, decode step per batch size)
is an ExportedProgram (the prefill one already rewritten by the passes), compiled whole by
torch-tensorrt's dynamo path `convert_exported_program_to_serialized_trt_engine` into
`<role>-<key>.engine`: TensorRT's own plan format (no pickle), loadable by trtexec or
`tensorrt.Runtime.deserialize_cuda_engine` without torch. Static shapes, so no optimization
profiles are needed. Engines embed their weights (no sharing between engines, unlike the
ONNX export); weights-000.safetensors holds the host tensors (embedding table). The manifest
is the same as the ONNX export's, with "format": "tensorrt" per graph and the TensorRT
versions.

Needs a CUDA device, the model on it, and torch-tensorrt (which pins its torch version);
imported lazily. Not run in this project's CI (no GPU): see tests/test_engine_manifest.py.
"""

from __future__ import annotations

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
    work = jb.collect(model, plan, example_inputs, out_dir, layouts, max_cache_len, None, say)
    work.out_dir.mkdir(parents=True, exist_ok=True)
    for i, job in enumerate(work.jobs):
        say(f"[{i + 1}/{len(work.jobs)}] compiling {job.file('.engine')} with TensorRT")
        program = _program(job)
        engine: bytes = torch_tensorrt.dynamo.convert_exported_program_to_serialized_trt_engine(
            program, arg_inputs=list(job.args), enabled_precisions={PRECISIONS[precision]},
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


def _program(job: jb.Job) -> torch.export.ExportedProgram:
    """The job as an ExportedProgram (prefill jobs already are one)."""
    if isinstance(job.module, torch.export.ExportedProgram):
        return job.module
    import contextlib

    with torch.no_grad(), (job.context or contextlib.nullcontext()):
        return torch.export.export(job.module, job.args, strict=False)
