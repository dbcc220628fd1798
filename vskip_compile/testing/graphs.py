"""The FX graphs the passes rewrite, captured the way the backend sees them, and op counts.

Tests of a pass trace a module once (`aot_graph`), rewrite the graph and count what the
rewrite left (`count_ops`): the pass library's "test helper that counts matches".
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn
from torch._dynamo.backends.common import aot_autograd


def aot_graph(module: nn.Module, inputs: tuple) -> tuple[fx.GraphModule, list[Any]]:
    """AOT autograd's forward graph of `module` (Dynamo, inference, static shapes) and the
    real arguments it takes (parameters lifted, as the vskip backend receives them)."""
    captured: dict[str, Any] = {}

    def fw_compiler(gm: fx.GraphModule, example_inputs):
        captured["gm"] = gm

        def run(*args):
            captured["args"] = list(args)
            return gm(*args)

        return run

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(module, backend=aot_autograd(fw_compiler=fw_compiler), fullgraph=True, dynamic=False)(*inputs)
    return captured["gm"], captured["args"]


def count_ops(gm: fx.GraphModule, name: str) -> int:
    """How many call_function nodes of gm have a target whose name contains `name`
    (e.g. "scaled_dot_product", "aten.index_select")."""
    return sum(n.op == "call_function" and name in str(n.target) for n in gm.graph.nodes)
