"""Which adapter serves a model: by config.model_type, else the generic one."""

from __future__ import annotations

from .base import Adapter
from .generic import GenericAdapter
from .llava import LlavaAdapter, LlavaNextAdapter
from .qwen import Qwen2_5_VLAdapter, Qwen3VLAdapter, Qwen3VLMoeAdapter

ADAPTERS: dict[str, type[Adapter]] = {}


def register(cls: type[Adapter]) -> type[Adapter]:
    """Register an adapter class for each of its model_types (refuses duplicates)."""
    for model_type in cls.model_types:
        if model_type in ADAPTERS and ADAPTERS[model_type] is not cls:
            raise ValueError(f"model_type {model_type!r} already has adapter {ADAPTERS[model_type].__name__}")
        ADAPTERS[model_type] = cls
    return cls


for _cls in (Qwen2_5_VLAdapter, Qwen3VLAdapter, Qwen3VLMoeAdapter, LlavaAdapter, LlavaNextAdapter):
    register(_cls)


def adapter_for(model) -> Adapter:
    """The registered adapter for model.config.model_type, or the GenericAdapter."""
    return ADAPTERS.get(getattr(model.config, "model_type", None), GenericAdapter)()
