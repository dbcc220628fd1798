"""vskip-compile: operator-level visual skipping for multimodal LLM prefill, as a compiler."""

from .errors import VSkipError
from .layout import LayoutError, VisualLayout
from .modeldir import load
from .plan import OPS, PlanError, SkipPlan, config_hash

__all__ = ["OPS", "LayoutError", "PlanError", "SkipPlan", "VSkipError", "VisualLayout", "config_hash", "load"]
__version__ = "0.1.0"


def compile(model, plan, backend=None, **kw):
    """vskip_compile.runtime.compile, imported lazily: the package import stays torch-free.
    backend None: the CompileConfig default ("inductor"), or `config=`'s."""
    from .runtime import compile as _compile

    if not isinstance(plan, SkipPlan):
        raise PlanError(f"plan must be a SkipPlan (SkipPlan.load(path) reads a plan file), got {type(plan).__name__}")

    return _compile(model, plan, backend, **kw)
