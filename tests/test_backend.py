"""The `vskip` torch.compile backend: registration, options, inductor pass uuid, inductor runs.

Inductor compiles take 30-60 s each on 2 shared CPU cores: two end-to-end cases only.
Tolerances as in test_compile.py (fp32 1e-5: GEMMs on fewer rows reorder sums; bf16 3e-2:
a few bf16 ulps at logit magnitude ~1, and inductor fuses pointwise ops in fp32 then rounds
once where eager rounds after each op).
"""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest
import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

import vskip_compile
from vskip_compile import SkipPlan, VisualLayout, reference
from vskip_compile.testing.tiny import build_tiny, tiny_inputs
from vskip_compile.backend import BackendError, VSkipInductorPass, vskip

FP32_ATOL = 1e-5
BF16_ATOL = 3e-2

PLAN = SkipPlan.from_ops(["skip_attn", "skip_both", "full", "skip_ffn"])
LAYOUT = VisualLayout.single(12, [(2, 8)])


def _gm():
    return torch.fx.symbolic_trace(torch.nn.Linear(4, 4))


def test_entry_point_registered():
    (ep,) = [e for e in entry_points(group="torch_dynamo_backends") if e.name == "vskip"]
    assert ep.load() is vskip
    assert torch._dynamo.lookup_backend("vskip") is not None


@pytest.mark.parametrize(
    "options, match",
    [
        (None, "needs options"),
        ({"plan": PLAN, "layout": "12:2-8"}, "layout"),
        ({"layout": LAYOUT}, "plan"),
        ({"plan": PLAN.to_dict(), "layout": LAYOUT}, "must be a SkipPlan"),
        ({"plan": PLAN, "layout": LAYOUT, "inner": "onnx"}, "unknown inner backend"),
        ({"plan": PLAN, "layout": LAYOUT, "bogus": 1}, "unknown vskip option"),
    ],
)
def test_bad_options_refused(options, match):
    with pytest.raises(BackendError, match=match):
        vskip(_gm(), [torch.randn(2, 4)], options=options)


def test_mode_refused():
    with pytest.raises(BackendError, match="mode"):
        vskip(_gm(), [torch.randn(2, 4)], options={"plan": PLAN, "layout": LAYOUT}, mode="max-autotune")


def test_missing_options_through_torch_compile():
    compiled = torch.compile(torch.nn.Linear(4, 4), backend="vskip", fullgraph=True)
    with pytest.raises(Exception, match="needs options"):
        compiled(torch.randn(2, 4))


def test_training_refused():
    lin = torch.nn.Linear(4, 4)
    compiled = torch.compile(lin, backend="vskip", options={"plan": PLAN, "layout": LAYOUT, "inner": "eager"})
    with pytest.raises(Exception, match="inference only"):
        compiled(torch.randn(2, 4, requires_grad=True))


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_graph_the_passes_cannot_rewrite_is_refused(inner):
    """A skip plan on a graph without decoder layers errors; it never runs unskipped."""
    compiled = torch.compile(torch.nn.Linear(4, 4), backend="vskip", fullgraph=True, options={"plan": PLAN, "layout": LAYOUT, "inner": inner})
    with torch.no_grad(), pytest.raises(Exception, match="self_attn|unchanged"):
        compiled(torch.randn(1, 12, 4))


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_layout_as_data_needs_the_marker(inner):
    """Without a layout option the graph must carry the vskip.kept_rows marker: refused, not run unskipped."""
    compiled = torch.compile(torch.nn.Linear(4, 4), backend="vskip", fullgraph=True, options={"plan": PLAN, "inner": inner})
    with torch.no_grad(), pytest.raises(Exception, match="kept_rows marker"):
        compiled(torch.randn(1, 12, 4))


def test_inductor_pass_uuid_follows_plan_and_layout():
    def uuid(plan, layout, **kw):
        return VSkipInductorPass({"plan": plan, "layout": layout, **kw}).uuid()

    base = uuid(PLAN, LAYOUT)
    assert isinstance(VSkipInductorPass({"plan": PLAN, "layout": LAYOUT}), CustomGraphPass)
    assert base == uuid(SkipPlan.from_ops(list(PLAN.ops)), VisualLayout.single(12, [(2, 8)]))
    assert base != uuid(SkipPlan.from_ops(["skip_attn", "skip_both", "full", "full"]), LAYOUT)
    assert base != uuid(SkipPlan.from_ops(list(PLAN.ops), scope="prefix_through_visual"), LAYOUT)
    assert base != uuid(PLAN, VisualLayout.single(12, [(2, 9)]))
    assert base != uuid(PLAN, VisualLayout.single(13, [(2, 8)]))
    assert base != uuid(PLAN, VisualLayout.single(12, [(2, 8)], batch_size=2))
    assert base != uuid(PLAN, LAYOUT, attn_module="attn")
    assert uuid(PLAN, None) == uuid(PLAN, None) != base  # layout as data: one key for every layout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_tensorrt_refused_without_gpu(tiny_model):
    with pytest.raises(BackendError, match="tensorrt"):
        vskip(_gm(), [torch.randn(2, 4)], options={"plan": PLAN, "layout": LAYOUT, "inner": "tensorrt"})
    with pytest.raises(BackendError, match="tensorrt"):
        vskip_compile.compile(tiny_model("llava"), SkipPlan.full(4), backend="tensorrt")


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch, dtype, atol, layout",
    [
        ("qwen3_vl", torch.float32, FP32_ATOL, dict(text_before=3, text_after=5, n_images=2)),
        ("llava", torch.bfloat16, BF16_ATOL, dict(text_before=0, text_after=4)),
    ],
)
def test_inductor_matches_reference(arch, dtype, atol, layout):
    model = build_tiny(arch, dtype=dtype)
    inputs = tiny_inputs(model, arch, **layout)
    with torch.no_grad(), reference.applied(model, PLAN):
        want = model(**inputs).logits[:, -1]  # [B, V]
        want_tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    cm = vskip_compile.compile(model, PLAN, backend="inductor")
    got = cm(**inputs, logits_to_keep=1).logits[:, -1]
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=0, atol=atol)
    assert torch.equal(cm.generate(**inputs, max_new_tokens=4), want_tokens)
    assert tuple(cm.cache_info())[:2] == (1, 1)
    with torch.no_grad():
        unskipped = model(**inputs).logits[:, -1]
    assert (unskipped - got).abs().max() > 3 * atol  # the pass ran inside inductor
