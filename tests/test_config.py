"""CompileConfig: one checked record of the compile options, with a JSON round-trip."""

from __future__ import annotations

import json

import pytest

from vskip_compile.config import BACKENDS, CompileConfig, CompileError


def test_defaults_and_round_trip():
    c = CompileConfig(backend="eager", cache_size=16, specialize="layout")
    assert CompileConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert CompileConfig().backend == BACKENDS[0] and CompileConfig().specialize is None


@pytest.mark.parametrize("kw, culprit", [
    (dict(backend="vllm"), "unknown backend"),
    (dict(cache_size=0), "cache_size"),
    (dict(decode_bucket=0), "decode_bucket"),
    (dict(specialize="shape"), "specialize"),
])
def test_bad_fields_are_refused_naming_them(kw, culprit):
    with pytest.raises(CompileError, match=culprit):
        CompileConfig(**kw)


def test_of_takes_a_config_or_its_options_not_both():
    assert CompileConfig.of(backend="eager", cache_size=None) == CompileConfig(backend="eager")
    c = CompileConfig(backend="eager")
    assert CompileConfig.of(c) is c
    with pytest.raises(CompileError, match="not both"):
        CompileConfig.of(c, cache_size=4)
    with pytest.raises(CompileError, match="unknown compile option.*cache_sise"):
        CompileConfig.of(cache_sise=4)
    with pytest.raises(CompileError, match="version"):
        CompileConfig.from_dict({"version": 2})


def test_compile_takes_a_config(tiny_model):
    import vskip_compile
    from vskip_compile import SkipPlan

    model = tiny_model("llava")
    cm = vskip_compile.compile(model, SkipPlan.full(4), config=CompileConfig(backend="eager", cache_size=2))
    assert cm.config.backend == "eager" and cm.cache_info().maxsize == 2
    assert vskip_compile.compile(model, SkipPlan.full(4), "eager").config == CompileConfig(backend="eager")
    with pytest.raises(CompileError, match="not both"):
        vskip_compile.compile(model, SkipPlan.full(4), "eager", config=CompileConfig())
