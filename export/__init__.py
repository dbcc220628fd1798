"""Engines: skip-shaped graphs lowered to files, and the runner that loads them.

    from vskip_compile.export import export_onnx, OnnxRunner
    export_onnx(model, plan, processor_outputs, "engine/")                  # torch + transformers
    OnnxRunner("engine/").generate(**processor_outputs, max_new_tokens=32)  # onnxruntime + numpy

An engine directory holds, as ONNX with shared safetensors weights: a vision graph per image
shape, the plan's skip-shaped prefill (one graph for every layout: batch, sequence length
and kept-row count symbolic, up to max_seq_len), a fixed-cache decode step per batch size,
and manifest.json (checked before anything loads). `export_tensorrt` compiles the same graphs
to TensorRT engines. Modules: jobs (what to export), vision / prefill / decode (the torch
modules), onnx_export / tensorrt (lowering), weights, manifest, host (numpy glue), runner, cli.

Importing this package imports neither torch nor onnx: the exporters load lazily, so a
deployment with only onnxruntime and numpy can use the runner.
"""

from __future__ import annotations

from typing import Any

from .manifest import EngineError, ManifestError
from .runner import MissingGraphError, OnnxRunner, PromptTooLongError


def export_onnx(*args: Any, **kwargs: Any):
    """See vskip_compile.export.onnx_export.export_onnx."""
    from .onnx_export import export_onnx as impl

    return impl(*args, **kwargs)


def export_tensorrt(*args: Any, **kwargs: Any):
    """See vskip_compile.export.tensorrt.export_tensorrt (needs torch-tensorrt and CUDA)."""
    from .tensorrt import export_tensorrt as impl

    return impl(*args, **kwargs)


__all__ = ["EngineError", "ManifestError", "MissingGraphError", "OnnxRunner", "PromptTooLongError", "export_onnx",
           "export_tensorrt"]
