"""CompileConfig: how `vskip_compile.compile` builds and caches its graphs, in one record.

One frozen dataclass, checked once, with a JSON round-trip (torchao's pattern), in place of
the keyword arguments compile(), CompiledVLM and the serving engine each repeated with their
defaults. BACKENDS is the one list of compilers behind the skip passes: CompiledVLM's
`backend` and the torch.compile backend's `inner` option both read it. Plain Python: no torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from .errors import VSkipError

BACKENDS = ("inductor", "eager", "tensorrt")  # what compiles the rewritten graph
SPECIALIZE = (None, "layout")  # None: one polymorphic graph per batch bucket; "layout": one per layout
DECODE_BUCKET = 64  # decode K/V capacity is rounded up to a multiple of this
ATTENTIONS = ("sdpa", "flex")  # the prefill's attention kernel (vskip_compile.flex)
SERVE_ENGINES = ("inductor", "eager", "onnx")  # vskip serve: a compile backend, or an exported ONNX engine
VERSION = 1


class CompileError(VSkipError, ValueError):
    """A compile option, model state or input the compiled model cannot serve."""


@dataclass(frozen=True)
class CompileConfig:
    """backend: BACKENDS; cache_size: graphs each cache keeps (prefill and decode separately);
    decode_bucket: the decode K/V capacity is rounded up to a multiple of it (fewer decode
    graphs for a few masked slots); specialize: SPECIALIZE; attention: ATTENTIONS ("flex":
    FlexAttention, its mask computed in the kernel from per-row vectors, no S x S mask)."""

    backend: str = "inductor"
    cache_size: int = 8
    decode_bucket: int = DECODE_BUCKET
    specialize: str | None = None
    attention: str = "sdpa"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise CompileError(f"unknown backend {self.backend!r}; expected one of {', '.join(BACKENDS)}")
        if self.cache_size < 1:
            raise CompileError(f"cache_size must be >= 1, got {self.cache_size}")
        if self.decode_bucket < 1:
            raise CompileError(f"decode_bucket must be >= 1, got {self.decode_bucket}")
        if self.specialize not in SPECIALIZE:
            raise CompileError(f"specialize must be one of {SPECIALIZE}, got {self.specialize!r}")
        if self.attention not in ATTENTIONS:
            raise CompileError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")

    @classmethod
    def of(cls, config: "CompileConfig | None" = None, **options: Any) -> "CompileConfig":
        """`config`, or one made from keyword options (None values left at their defaults);
        both together are refused, as are unknown options."""
        options = {k: v for k, v in options.items() if v is not None}
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise CompileError(f"unknown compile option(s) {', '.join(unknown)}; known: {', '.join(known)}")
        if config is not None:
            if options:
                raise CompileError(f"give a CompileConfig or its options ({', '.join(sorted(options))}), not both")
            if not isinstance(config, cls):
                raise CompileError(f"config must be a CompileConfig, got {type(config).__name__}")
            return config
        return cls(**options)

    def to_dict(self) -> dict[str, Any]:
        return {"version": VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CompileConfig":
        d = dict(d)
        version = d.pop("version", VERSION)
        if version != VERSION:
            raise CompileError(f"compile config version {version!r} is not supported (expected {VERSION})")
        return cls.of(**d)
