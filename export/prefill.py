"""The skip-shaped prefill program of one layout: DecoderCore -> torch.export -> passes.

    forward(inputs_embeds [B, S, D], position_ids [B, S] or [3, B, S], *deepstack [B, S, D])
        -> (logits [B, 1, V] (last row), k_0, v_0, ..., k_{L-1}, v_{L-1} [B, KV, S, E])

Every dimension is a number (the layout is static). With a plan that skips anything, the
passes rewrite the exported aten graph so skipped operators compute only the kept rows
(constant-offset slices); an all-`full` plan exports the unmodified core. K/V of every row
come out in both cases: they fill the decode cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..archs import Adapter, PrefillInputs
from ..core import DecoderCore
from ..plan import SkipPlan


@dataclass
class PrefillGraph:
    """A prefill program ready for torch.onnx.export, with its example inputs and names."""

    module: torch.export.ExportedProgram
    args: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    counters: dict[str, int] = field(default_factory=dict)


def io_names(num_layers: int, num_deepstack: int) -> tuple[list[str], list[str]]:
    inputs = ["inputs_embeds", "position_ids"] + [f"deepstack_{i}" for i in range(num_deepstack)]
    outputs = ["logits"] + [f"{kv}_{i}" for i in range(num_layers) for kv in ("k", "v")]
    return inputs, outputs


def prefill_graph(model, adapter: Adapter, plan: SkipPlan, inputs: PrefillInputs) -> PrefillGraph:
    """Trace the core on these inputs and, unless the plan is all-full, apply the skip passes."""
    n_ds = len(inputs.deepstack or ())
    core = DecoderCore.from_model(model, adapter, logits_to_keep=1, num_deepstack=n_ds).eval()
    args = (inputs.inputs_embeds.detach(), inputs.position_ids.detach(), *(d.detach() for d in inputs.deepstack or ()))
    in_names, out_names = io_names(core.num_layers, n_ds)
    with torch.no_grad():
        ep = torch.export.export(core, args, strict=False)
    if plan.is_full:
        return PrefillGraph(ep, args, in_names, out_names, {})
    from ..passes import PassContext, run_passes  # lazy: passes/ is a sibling package

    result = run_passes(ep.module(), PassContext(plan, inputs.layout))
    with torch.no_grad():  # re-export the rewritten aten graph: a program torch.onnx takes as is
        program = torch.export.export(result.gm, args, strict=False)
    return PrefillGraph(program, args, in_names, out_names, dict(result.counters))

