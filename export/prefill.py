"""The skip-shaped prefill program of a (model, plan): DecoderCore -> torch.export -> passes.

    forward(inputs_embeds [B, S, D], position_ids [B, S] or [3, B, S],
            kept_index [B, K] int64, kept_valid [B, K] bool, attention_mask [B, S] bool,
            *deepstack [B, S, D])
        -> (logits [B, 1, V] (last row), k_0, v_0, ..., k_{L-1}, v_{L-1} [B, KV, S, E])

One program serves every layout: the layout is data (vskip_compile.kept_rows), and the batch B,
the sequence length S and the kept-row count K are symbolic (torch.export `Dim`s, ranges in
`ranges`): S and K in [2, max_seq_len], B in [1, MAX_BATCH]. The passes rewrite the exported
aten graph so skipped operators gather their kept rows through kept_index and scatter them
back; an all-`full` plan only loses the layout marker. attention_mask is False at left
padding: padding rows are never keys of a real row. K/V of every row come out: they fill
the decode cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..archs import Adapter, PrefillInputs
from ..core import DecoderCore
from ..kept_rows import MIN_ROWS, kept_inputs, no_duck_sizes
from ..layout import LayoutError, VisualLayout
from ..plan import SkipPlan

MAX_BATCH = 64  # largest batch of the prefill program's symbolic batch axis
SYMBOLS = ("batch", "seq_len", "kept")  # names of the symbolic axes (ONNX dim_params, manifest)


@dataclass
class PrefillGraph:
    """A prefill program ready for torch.onnx.export / torch-tensorrt, with example inputs,
    names, the symbolic axes of each input and each symbol's (min, max)."""

    module: torch.export.ExportedProgram
    args: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    axes: dict[str, dict[int, str]]  # input name -> {axis: symbol}
    ranges: dict[str, tuple[int, int]]  # symbol -> (min, max)
    counters: dict[str, int] = field(default_factory=dict)


def io_names(num_layers: int, num_deepstack: int) -> tuple[list[str], list[str]]:
    inputs = ["inputs_embeds", "position_ids", "kept_index", "kept_valid", "attention_mask"]
    inputs += [f"deepstack_{i}" for i in range(num_deepstack)]
    outputs = ["logits"] + [f"{kv}_{i}" for i in range(num_layers) for kv in ("k", "v")]
    return inputs, outputs


def symbolic_axes(input_names: list[str], mrope: bool) -> dict[str, dict[int, str]]:
    """Which axis of each prefill input is the batch, the sequence or the kept-row count."""
    axes = {}
    for name in input_names:
        if name == "position_ids" and mrope:
            axes[name] = {1: "batch", 2: "seq_len"}  # [3, B, S]
        elif name in ("kept_index", "kept_valid"):
            axes[name] = {0: "batch", 1: "kept"}  # [B, K]
        else:
            axes[name] = {0: "batch", 1: "seq_len"}  # [B, S] or [B, S, D]
    return axes


def example_args(p: PrefillInputs, scope: str, rows: str = "visual") -> tuple[torch.Tensor, ...]:
    """The program's inputs for unpadded prefill inputs p, batch widened to 2 by repeating
    row 0 (traced at batch 1, torch would specialize the batch axis to 1)."""
    if p.layout.seq_len < MIN_ROWS:
        raise LayoutError(f"example prompt of {p.layout.seq_len} rows; a prefill program is traced with >= {MIN_ROWS}")

    def two_rows(x: torch.Tensor, axis: int) -> torch.Tensor:  # batch row 0, twice: [.., 2, ..]
        return torch.cat([x.narrow(axis, 0, 1)] * 2, dim=axis).detach()

    layout = VisualLayout(p.layout.seq_len, (p.layout.spans[0],) * 2, (p.layout.kinds[0],) * 2)
    kept_index, kept_valid = kept_inputs(layout, scope, device=p.inputs_embeds.device, rows=rows)  # [2, K]
    mask = torch.ones(2, p.layout.seq_len, dtype=torch.bool, device=p.inputs_embeds.device)  # [2, S]
    deepstack = tuple(two_rows(d, 0) for d in p.deepstack or ())
    return (two_rows(p.inputs_embeds, 0), two_rows(p.position_ids, p.position_ids.ndim - 2), kept_index, kept_valid,
            mask, *deepstack)


def prefill_graph(model, adapter: Adapter, plan: SkipPlan, example: PrefillInputs, max_seq_len: int) -> PrefillGraph:
    """Trace the layout-inputs core with symbolic B, S, K on the example and apply the passes."""
    if max_seq_len < max(MIN_ROWS, example.layout.seq_len):
        raise LayoutError(f"max_seq_len={max_seq_len} is below the example prompt's {example.layout.seq_len} rows")
    n_ds = len(example.deepstack or ())
    core = DecoderCore.from_model(model, adapter, logits_to_keep=1, num_deepstack=n_ds, layout_inputs=True).eval()
    args = example_args(example, plan.scope, plan.rows)
    in_names, out_names = io_names(core.num_layers, n_ds)
    axes = symbolic_axes(in_names, mrope=adapter.mrope(model))
    ranges = {"batch": (1, MAX_BATCH), "seq_len": (MIN_ROWS, max_seq_len), "kept": (MIN_ROWS, max_seq_len)}
    dims = {name: torch.export.Dim(name, min=lo, max=hi) for name, (lo, hi) in ranges.items()}
    flat = [{axis: dims[sym] for axis, sym in axes[name].items()} for name in in_names]  # one spec per input
    from ..passes import PassContext, run_passes  # lazy: passes/ is a sibling package

    # no duck sizes: an example whose K equals S (text only) must not tie K to S
    with torch.no_grad(), no_duck_sizes():
        ep = torch.export.export(core, args, dynamic_shapes=(flat[0], flat[1], tuple(flat[2:])), strict=False)
        result = run_passes(ep.module(), PassContext(plan))  # layout None: the layout is data
        # re-export the rewritten aten graph (flat signature): a program torch.onnx takes as is
        program = torch.export.export(result.gm, args, dynamic_shapes=flat, strict=False)
    return PrefillGraph(program, args, in_names, out_names, axes, ranges, dict(result.counters))


def symbol_ranges(program: torch.export.ExportedProgram, axes: dict[str, dict[int, str]],
                  input_names: list[str]) -> dict[str, tuple[int, int]]:
    """(min, max) of each named symbol as the program itself states it (its range constraints),
    checking that every axis of one name is one symbol and different names are different
    symbols: what the manifest and TensorRT's optimization profile must agree with."""
    nodes = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    user = program.graph_signature.user_inputs  # placeholder names of the inputs, in order
    exprs: dict[str, object] = {}
    for name, node_name in zip(input_names, user):
        for axis, sym in axes[name].items():
            size = nodes[node_name].meta["val"].shape[axis]
            if not isinstance(size, torch.SymInt):
                raise LayoutError(f"prefill input {name} axis {axis} ({sym}) is static ({size}) in the exported program")
            if exprs.setdefault(sym, size.node.expr) != size.node.expr:
                raise LayoutError(f"prefill input {name} axis {axis}: {size.node.expr}, not the {sym} symbol {exprs[sym]}")
    if len(set(exprs.values())) != len(exprs):
        raise LayoutError(f"two named axes share one symbol in the exported program: {exprs}")
    return {sym: (int(program.range_constraints[e].lower), int(program.range_constraints[e].upper))
            for sym, e in exprs.items()}
