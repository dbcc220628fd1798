"""vskip-compile: operator-level visual skipping for multimodal LLM prefill, as a compiler."""

from .layout import LayoutError, VisualLayout
from .plan import OPS, PlanError, SkipPlan, config_hash

__all__ = ["OPS", "LayoutError", "PlanError", "SkipPlan", "VisualLayout", "config_hash"]
__version__ = "0.1.0"
