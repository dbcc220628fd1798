"""Architecture adapters: one small class per VLM family, plus a generic fallback."""

from .base import Adapter, AdapterError, PrefillInputs
from .generic import GenericAdapter
from .llava import LlavaAdapter, LlavaNextAdapter
from .qwen import Qwen2_5_VLAdapter, Qwen3VLAdapter, Qwen3VLMoeAdapter
from .registry import ADAPTERS, adapter_for, register

__all__ = [
    "ADAPTERS",
    "Adapter",
    "AdapterError",
    "GenericAdapter",
    "LlavaAdapter",
    "LlavaNextAdapter",
    "PrefillInputs",
    "Qwen2_5_VLAdapter",
    "Qwen3VLAdapter",
    "Qwen3VLMoeAdapter",
    "adapter_for",
    "register",
]
