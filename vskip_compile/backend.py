"""The `vskip` torch.compile backend: skip passes on the aten graph, then an inner compiler.

    torch.compile(core, backend="vskip", fullgraph=True, options={"plan": plan, "inner": "inductor"})

Registered through the `torch_dynamo_backends` entry point. Dynamo calls
`vskip(gm, example_inputs, options=...)`; the graph is lowered to aten by AOT autograd, where
the passes (vskip_compile.passes) find each layer's operators and cut the skipped rows:

- inner="inductor": the passes run as inductor's post-grad custom pre-pass, on the
  normalized, functionalized post-grad graph, before inductor's own fusions.
- inner="eager": AOT autograd's forward graph, rewritten, runs as is (debugging, tests).
- inner="tensorrt": the rewritten forward graph goes to torch-tensorrt's backend.

Layout as data (no "layout" option): the graph is a DecoderCore(layout_inputs=True), whose
kept-row inputs the passes read; compiled with symbolic sequence and kept-row sizes, one graph
serves every layout. A "layout" option (a VisualLayout) specializes the graph to that one
layout with constant row offsets instead (compile with dynamic=False); kept for comparison.
The backend compiles inference only (the rewritten graph has no meaningful gradient).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from .config import BACKENDS
from .errors import VSkipError
from .layout import VisualLayout
from .plan import SkipPlan

PASS_OPTION_KEYS = ("attn_module", "ffn_module", "layer_pattern")  # PassContext fields an option may set
OPTION_KEYS = ("plan", "layout", "inner", *PASS_OPTION_KEYS)


class BackendError(VSkipError, ValueError):
    """The vskip backend was called with options it cannot use."""


def _pass_context(options: Mapping[str, Any]):
    from vskip_compile.passes import PassContext

    kw = {k: options[k] for k in PASS_OPTION_KEYS if k in options}
    return PassContext(options["plan"], options["layout"], **kw)


def _parse_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validated options; refuses a missing plan or layout instead of compiling an unskipped graph."""
    options = dict(options or {})
    unknown = set(options) - set(OPTION_KEYS)
    if unknown:
        raise BackendError(f"unknown vskip option(s): {', '.join(sorted(unknown))}; known: {', '.join(sorted(OPTION_KEYS))}")
    if "plan" not in options:
        raise BackendError(
            "the vskip backend needs options with a 'plan' (a SkipPlan): "
            "torch.compile(core, backend='vskip', options={'plan': plan})"
        )
    if not isinstance(options["plan"], SkipPlan):
        raise BackendError(f"option 'plan' must be a SkipPlan, got {type(options['plan']).__name__}")
    options.setdefault("layout", None)
    if options["layout"] is not None and not isinstance(options["layout"], VisualLayout):
        raise BackendError(
            f"option 'layout' must be a VisualLayout (a static specialization) or None (layout as data), "
            f"got {type(options['layout']).__name__}"
        )
    options.setdefault("inner", "inductor")
    if options["inner"] not in BACKENDS:
        raise BackendError(f"unknown inner backend {options['inner']!r}; expected one of {', '.join(BACKENDS)}")
    return options


def _passes_source_hash() -> str:
    """Hash of the pass implementation's source files: a changed pass must miss inductor's cache."""
    import vskip_compile.passes as passes

    files = tuple(sorted(str(p) for p in Path(passes.__file__).parent.glob("*.py")))
    return get_hash_for_files(files + (__file__,)).hex()


class VSkipInductorPass(CustomGraphPass):
    """Inductor post-grad pre-pass running the skip passes in place on the graph.

    uuid() covers the plan, the layout, the pass options and the pass source: inductor's FX
    graph cache keys on it, and a stale entry would silently run another plan's graph.
    """

    def __init__(self, options: Mapping[str, Any]):
        self.options = _parse_options(options)
        self.ctx = _pass_context(self.options)

    def __call__(self, graph: torch.fx.Graph) -> None:
        from vskip_compile.passes import run_passes

        if _is_attention_body(graph):
            return
        _check_rewritten(self.options, run_passes(graph, self.ctx))

    def uuid(self) -> str:
        o = self.options
        key = {
            "plan": o["plan"].to_dict(),
            "layout": None if o["layout"] is None else [o["layout"].seq_len, [list(map(list, row)) for row in o["layout"].spans]],
            "pass_options": {k: o.get(k) for k in PASS_OPTION_KEYS},
            "source": _passes_source_hash(),
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _is_attention_body(graph: torch.fx.Graph) -> bool:
    """Flex attention's score_mod / mask_mod bodies, which inductor's post-grad passes visit
    before the graph that calls them (the skip passes rewrite that caller). Their first inputs
    are 0-d: (score,) batch, head, query and key index; a prefill graph's are weights and
    activations."""
    first = [n.meta.get("val") for n in list(graph.find_nodes(op="placeholder"))[:4]]
    return len(first) == 4 and all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in first)


def _check_rewritten(options: Mapping[str, Any], result) -> None:
    """A plan that skips something on a layout with visual rows must change the graph."""
    plan, layout = options["plan"], options["layout"]
    skips = layout.has_visual if layout is not None else result.counters.get("attn_rewritten", 0) + result.counters.get("ffn_rewritten", 0)
    if not plan.is_full and (layout is None or layout.has_visual) and not (result.modified and skips):
        raise BackendError(
            f"the skip passes left the graph unchanged for {plan} on {layout} "
            f"(counters {dict(result.counters)}): refusing to run it as if skipped"
        )


def _refuse_training(example_inputs) -> None:
    if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs):
        raise BackendError("the vskip backend compiles inference only: call the compiled prefill under torch.no_grad()")


def _rewritten_forward(options: Mapping[str, Any], then=None):
    """AOT forward compiler: run the passes on the aten graph, then `then(gm, inputs)` or gm itself."""
    from torch._functorch.aot_autograd import make_boxed_func

    def fw_compiler(gm: torch.fx.GraphModule, example_inputs):
        from vskip_compile.passes import run_passes

        result = run_passes(gm, _pass_context(options))
        _check_rewritten(options, result)
        if then is not None:
            return then(result.gm, example_inputs)
        return make_boxed_func(result.gm.forward)

    return fw_compiler


def _tensorrt_compiler(gm: torch.fx.GraphModule, example_inputs):
    import torch_tensorrt  # noqa: F401  (registers the "torch_tensorrt" dynamo backend)
    from torch._functorch.aot_autograd import make_boxed_func

    compiled = torch._dynamo.lookup_backend("torch_tensorrt")(gm, example_inputs)
    return make_boxed_func(compiled)


def _check_tensorrt() -> None:
    try:
        import torch_tensorrt  # noqa: F401
    except ImportError as e:
        raise BackendError(f"inner='tensorrt' needs torch-tensorrt (pip install vskip-compile[gpu]): {e}") from e
    if not torch.cuda.is_available():
        raise BackendError("inner='tensorrt' needs a CUDA device; none is available")


def vskip(gm: torch.fx.GraphModule, example_inputs, *, options: Mapping[str, Any] | None = None, mode: str | None = None):
    """torch.compile backend: visual-skip passes on the aten graph, then the inner compiler."""
    if mode is not None:
        raise BackendError(f"the vskip backend takes no mode (got {mode!r}); pass options instead")
    options = _parse_options(options)
    _refuse_training(example_inputs)
    inner = options["inner"]
    if inner == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs, config_patches={"post_grad_custom_pre_pass": VSkipInductorPass(options)})

    from torch._dynamo.backends.common import aot_autograd

    if inner == "eager":
        return aot_autograd(fw_compiler=_rewritten_forward(options))(gm, example_inputs)
    _check_tensorrt()
    return aot_autograd(fw_compiler=_rewritten_forward(options, then=_tensorrt_compiler))(gm, example_inputs)
