"""Skip passes on traced decoder stacks: correctness against the eager plan semantics, counters,
refusals, FLOPs, and the graph forms the passes meet (export, decomposed export, AOT, post-grad).

Stacks are tiny HF text decoders (LLaMA, Qwen2, Qwen3 with q/k norms; hidden 64, 4 heads,
2 KV heads) run layer by layer with RoPE and an explicit causal mask (or is_causal), returning
the final hidden state and every layer's K/V. The oracle runs the same layers eagerly with
forward hooks that zero the self_attn / mlp output at the frozen rows: h + 0 == h is exactly
the plan semantics, with K/V of every row computed from the current hidden state.

Tolerance: fp32, atol = rtol = 1e-5. The rewritten graph multiplies matrices with fewer rows,
which can change the kernel's blocking and so the summation order (observed differences up to
~3e-7 on values of order 1); the skips themselves move values by 1e-3..5e-2.
"""

from __future__ import annotations

import functools
import re

import pytest
import torch
import transformers
from torch import fx, nn

from vskip_compile import SkipPlan, VisualLayout
from vskip_compile.attention_ops import SDPA_MASKS
from vskip_compile.core import KVCache, causal_mask
from vskip_compile.testing.graphs import aot_graph, count_ops
from vskip_compile.passes import (
    PASSES,
    PassContext,
    PassResult,
    SkipPassError,
    describe_passes,
    find_all_regions,
    run_passes,
    run_passes_on_graph,
)
from vskip_compile.passes.rules import _arg

ATOL = RTOL = 1e-5
KINDS = ("llama", "qwen2", "qwen3")
B, S = 2, 16


# -- tiny stacks --------------------------------------------------------------------------------


def build_lm(kind: str, layers: int = 2, seed: int = 0) -> nn.Module:
    configs = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}
    models = {"llama": transformers.LlamaModel, "qwen2": transformers.Qwen2Model, "qwen3": transformers.Qwen3Model}
    cfg = configs[kind](
        vocab_size=32,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return models[kind](cfg).eval()


class Stack(nn.Module):
    """x [B, S, D], position ids [B, S], DeepStack adds -> (h, k_0, v_0, ..., k_L-1, v_L-1)."""

    def __init__(self, lm: nn.Module, causal: str = "explicit"):
        super().__init__()
        self.lm, self.causal = lm, causal

    def forward(self, x: torch.Tensor, pos: torch.Tensor, *deepstack: torch.Tensor):
        mask = causal_mask(x.shape[1], x.device) if self.causal == "explicit" else None  # [1, 1, S, S]
        cos_sin = self.lm.rotary_emb(x, pos)
        cache, h = KVCache(), x
        for i, layer in enumerate(self.lm.layers):
            h = layer(h, attention_mask=mask, position_embeddings=cos_sin, position_ids=None, cache=cache, use_cache=True)
            h = h[0] if isinstance(h, tuple) else h
            if i < len(deepstack):
                h = h + deepstack[i]  # DeepStack: outside the layer regions
        return (h, *[t for i in range(len(self.lm.layers)) for t in cache.kv[i]])


def stack_inputs(batch: int = B, seq: int = S, n_deepstack: int = 0, seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, 64, generator=g)
    pos = torch.arange(seq)[None].expand(batch, seq).contiguous()
    return (x, pos, *[torch.randn(batch, seq, 64, generator=g) for _ in range(n_deepstack)])


def oracle(stack: Stack, inputs: tuple, plan: SkipPlan, layout: VisualLayout) -> tuple[torch.Tensor, ...]:
    """Eager plan semantics: zero the operator output at the frozen rows."""
    frozen = layout.frozen_spans(plan.scope)

    def zero(module, args, out):
        first = (out[0] if isinstance(out, tuple) else out).clone()
        for a, b in frozen:
            first[:, a:b] = 0.0
        return (first, *out[1:]) if isinstance(out, tuple) else first

    hooks = []
    for i, layer in enumerate(stack.lm.layers):
        if plan.skips_attn(i):
            hooks.append(layer.self_attn.register_forward_hook(zero))
        if plan.skips_ffn(i):
            hooks.append(layer.mlp.register_forward_hook(zero))
    try:
        with torch.no_grad():
            return stack(*inputs)
    finally:
        for h in hooks:
            h.remove()


@functools.lru_cache(maxsize=None)
def stack_for(kind: str, layers: int = 2, causal: str = "explicit") -> Stack:
    return Stack(build_lm(kind, layers), causal)


@functools.lru_cache(maxsize=None)
def exported(kind: str, batch: int = B, seq: int = S, causal: str = "explicit", decompose: bool = False, n_ds: int = 0):
    """(ep.module(), inputs) of a 2-layer stack, cached: tracing is the slow part."""
    stack = stack_for(kind, 2, causal)
    inputs = stack_inputs(batch, seq, n_ds)
    ep = torch.export.export(stack, inputs, strict=False)
    if decompose:
        ep = ep.run_decompositions()  # SDPA -> bmm/_softmax math form, linear -> mm
    return ep.module(), inputs


@functools.lru_cache(maxsize=None)
def aot_cached(kind: str, causal: str = "explicit"):
    inputs = stack_inputs()
    gm, args = aot_graph(stack_for(kind, 2, causal), inputs)
    return gm, args, inputs


def assert_matches(out, ref, full=None) -> None:
    """Every output (h and all K/V) equals the oracle; with `full`, the plan changed something."""
    assert len(out) == len(ref)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, atol=ATOL, rtol=RTOL)
    if full is not None:
        assert (full[0] - ref[0]).abs().max() > 1e-4, "the plan had no effect: the test would prove nothing"


def rewrite_and_check(gm, inputs, stack, plan, layout, run_args=None) -> PassResult:
    res = run_passes(gm, PassContext(plan, layout))
    with torch.no_grad():
        out = res.gm(*(run_args if run_args is not None else inputs))
    assert_matches(out, oracle(stack, inputs, plan, layout))
    return res


LAYOUTS = {
    "text_before_3_after_5": [(3, 11)],
    "image_at_start": [(0, 10)],
    "text_before_6_after_1": [(6, 15)],
    "text_before_0_after_9": [(0, 7)],
    "two_images": [(2, 6), (8, 13)],
}
PLANS = [
    ("skip_attn", "skip_both"),
    ("skip_ffn", "skip_attn"),
    ("skip_both", "full"),
    ("full", "skip_ffn"),
    ("skip_both", "skip_both"),
]


def counts(plan: SkipPlan, frozen: bool = True) -> tuple[int, int]:
    n_attn = sum(plan.skips_attn(i) for i in range(plan.num_layers))
    n_ffn = sum(plan.skips_ffn(i) for i in range(plan.num_layers))
    return (n_attn, n_ffn) if frozen else (0, 0)


# -- API ----------------------------------------------------------------------------------------


def test_describe_passes_lists_the_ordered_passes():
    text = describe_passes()
    names = [p.name for p in PASSES]
    assert names == ["find_regions", "skip_attention", "skip_ffn", "cleanup"]
    assert [line.split()[1] for line in text.splitlines()] == names


def test_pass_context_is_frozen_and_typed():
    ctx = PassContext(SkipPlan.full(2), VisualLayout.single(S, [(3, 11)]))
    with pytest.raises(AttributeError):
        ctx.attn_module = "attn"  # type: ignore[misc]
    with pytest.raises(TypeError, match="SkipPlan"):
        PassContext(("full",), VisualLayout.single(S, [(3, 11)]))  # type: ignore[arg-type]


# -- correctness on export graphs (aten.linear, aten.scaled_dot_product_attention) --------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
def test_export_graph_matches_oracle(kind, layout_name):
    gm, inputs = exported(kind)
    idx = list(LAYOUTS).index(layout_name) + KINDS.index(kind)
    plan = SkipPlan(PLANS[idx % len(PLANS)])
    layout = VisualLayout.single(S, LAYOUTS[layout_name], B)
    res = rewrite_and_check(gm, inputs, stack_for(kind), plan, layout)
    n_attn, n_ffn = counts(plan)
    assert (res.counters["attn_rewritten"], res.counters["ffn_rewritten"]) == (n_attn, n_ffn)
    assert res.counters["attn_regions"] == res.counters["ffn_regions"] == res.counters["layers"] == 2


@pytest.mark.parametrize("kind", KINDS)
def test_aot_graph_matches_oracle(kind):
    """Dynamo + AOT autograd: aten.mm/t/_unsafe_view, flash_attention_for_cpu with a float mask."""
    gm, args, inputs = aot_cached(kind)
    for plan_ops, spans, scope in [
        (("skip_attn", "skip_both"), [(2, 6), (8, 13)], "visual"),
        (("skip_ffn", "skip_attn"), [(0, 10)], "visual"),
        (("skip_both", "skip_ffn"), [(3, 11)], "prefix_through_visual"),
    ]:
        plan = SkipPlan(plan_ops, scope=scope)
        res = rewrite_and_check(gm, inputs, stack_for(kind), plan, VisualLayout.single(S, spans, B), run_args=args)
        assert (res.counters["attn_rewritten"], res.counters["ffn_rewritten"]) == counts(plan)


def test_decomposed_math_attention_matches_oracle():
    """ep.run_decompositions(): SDPA as bmm/_softmax/where/any, linear as mm; all row-wise rules."""
    gm, inputs = exported("qwen3", decompose=True)
    assert count_ops(gm, "scaled_dot_product") == 0
    plan = SkipPlan(("skip_both", "skip_attn"))
    res = rewrite_and_check(gm, inputs, stack_for("qwen3"), plan, VisualLayout.single(S, [(2, 6), (8, 13)], B))
    assert res.counters["attn_rewritten"] == 2 and res.counters["ffn_rewritten"] == 1


@pytest.mark.parametrize("form", ["export", "aot"])
def test_is_causal_gets_an_explicit_rectangular_mask(form):
    """Without a mask HF calls SDPA with is_causal=True; fewer queries than keys would align it
    top-left, so the pass gives the kept query rows their causal mask, built from their
    positions as K x S (never the S x S mask cut afterwards)."""
    stack = stack_for("llama", 2, "is_causal")
    plan = SkipPlan(("skip_attn", "skip_attn"))
    layout = VisualLayout.single(S, [(3, 11)], B)
    if form == "export":
        gm, inputs = exported("llama", causal="is_causal")
        assert any(n.kwargs.get("is_causal") or (len(n.args) > 5 and n.args[5]) for n in gm.graph.nodes if "scaled_dot" in str(n.target))
        res = rewrite_and_check(gm, inputs, stack, plan, layout)
    else:
        gm, args, inputs = aot_cached("llama", "is_causal")
        res = rewrite_and_check(gm, inputs, stack, plan, layout, run_args=args)
    assert res.counters["attn_rewritten"] == 2
    kept = S - (11 - 3)
    masks = [_arg(n, SDPA_MASKS[n.target][0]) for n in res.gm.graph.nodes if n.target in SDPA_MASKS]
    assert len(masks) == 2 and all(tuple(m.meta["val"].shape) == (kept, S) for m in masks)  # [K, S] each
    aten = torch.ops.aten
    square = [n for n in res.gm.graph.nodes if isinstance(v := n.meta.get("val"), torch.Tensor)
              and tuple(v.shape[-2:]) == (S, S)  # S = head_dim here: mask-like tensors only
              and (v.dtype == torch.bool or n.target in (aten.full.default, aten.triu.default, aten.where.self))]
    assert not square, f"an S x S mask in the rewritten graph: {square}"
    if form == "aot":  # the CPU flash kernel's additive mask: 0 / -inf from the boolean rows
        assert all(m.target is torch.ops.aten.where.self for m in masks)


def test_prefix_through_visual_freezes_the_text_before_the_image():
    gm, inputs = exported("qwen2")
    plan = SkipPlan(("skip_both", "skip_attn"), scope="prefix_through_visual")
    rewrite_and_check(gm, inputs, stack_for("qwen2"), plan, VisualLayout.single(S, [(3, 7), (9, 11)], B))


def test_every_row_frozen_skips_the_operator_outright():
    gm, inputs = exported("llama")
    plan = SkipPlan(("skip_both", "skip_ffn"))
    res = rewrite_and_check(gm, inputs, stack_for("llama"), plan, VisualLayout.single(S, [(0, S)], B))
    assert res.counters["attn_rewritten"] == 1 and res.counters["ffn_rewritten"] == 2
    assert res.counters["attn_nodes_restricted"] == res.counters["ffn_nodes_restricted"] == 0


@pytest.mark.parametrize("form", ["export", "aot"])
@pytest.mark.parametrize("ops", [("skip_ffn", "skip_both"), ("skip_both", "skip_both"), ("skip_both", "skip_attn")])
def test_every_row_frozen_with_chained_regions(form, ops):
    """No text row: a dropped operator between two skipped ones makes the second's residual the
    first's close (layer 1's FFN reads layer 0's FFN output once layer 1's attention is gone)."""
    plan, layout = SkipPlan(ops), VisualLayout.single(S, [(0, S)], B)
    if form == "export":
        gm, inputs = exported("qwen2")
        res = rewrite_and_check(gm, inputs, stack_for("qwen2"), plan, layout)
    else:
        gm, args, inputs = aot_cached("qwen2")
        res = rewrite_and_check(gm, inputs, stack_for("qwen2"), plan, layout, run_args=args)
    assert (res.counters["attn_rewritten"], res.counters["ffn_rewritten"]) == counts(plan)
    n_sdpa = count_ops(res.gm, "scaled_dot_product")
    assert n_sdpa == plan.num_layers - counts(plan)[0]  # a dropped attention leaves no SDPA behind


def test_batch_of_one():
    gm, inputs = exported("qwen3", batch=1)
    rewrite_and_check(gm, inputs, stack_for("qwen3"), SkipPlan(("skip_ffn", "skip_both")), VisualLayout.single(S, [(4, 12)], 1))


def test_deepstack_adds_still_reach_the_visual_rows():
    """x + deepstack_i after layer i is outside every region: skipped layers keep it."""
    gm, inputs = exported("qwen3", n_ds=2)
    assert any(n.op == "placeholder" and "deepstack" in n.name for n in gm.graph.nodes)
    plan = SkipPlan(("skip_both", "skip_both"))
    layout = VisualLayout.single(S, [(3, 11)], B)
    res = rewrite_and_check(gm, inputs, stack_for("qwen3"), plan, layout)
    with torch.no_grad():
        h = res.gm(*inputs)[0]
    # visual rows: frozen through both layers, so exactly x + ds_0 + ds_1
    x, _, ds0, ds1 = inputs
    torch.testing.assert_close(h[:, 3:11], (x + ds0 + ds1)[:, 3:11])


def test_export_graph_module_with_lifted_parameters():
    """ep.graph_module: parameters are placeholders; the rewritten module runs on (params, inputs)."""
    stack = stack_for("llama")
    inputs = stack_inputs()
    ep = torch.export.export(stack, inputs, strict=False)
    state = {**ep.state_dict, **ep.constants}
    params = [state[s.target] for s in ep.graph_signature.input_specs if s.target is not None]
    plan = SkipPlan(("skip_attn", "skip_ffn"))
    rewrite_and_check(ep.graph_module, inputs, stack, plan, VisualLayout.single(S, [(3, 11)], B), run_args=(*params, *inputs))


# -- counters, purity, meta ----------------------------------------------------------------------


@pytest.mark.parametrize("form", ["export", "aot"])
def test_all_full_plan_rewrites_nothing(form):
    gm = exported("llama")[0] if form == "export" else aot_cached("llama")[0]
    code = gm.code
    res = run_passes(gm, PassContext(SkipPlan.full(2), VisualLayout.single(S, [(3, 11)], B)))
    assert res.gm is gm and not res.modified and gm.code == code
    assert res.counters["attn_rewritten"] == res.counters["ffn_rewritten"] == 0
    assert "slices_folded" not in res.counters  # cleanup does not even run


def test_layout_without_visual_rows_rewrites_nothing():
    gm, _ = exported("llama")
    res = run_passes(gm, PassContext(SkipPlan(("skip_both", "skip_both")), VisualLayout.single(S, [], B)))
    assert not res.modified and res.gm is gm


def test_passes_are_pure_and_each_pass_returns_a_pass_result():
    gm, _ = exported("qwen2")
    code = gm.code
    ctx = PassContext(SkipPlan(("skip_both", "full")), VisualLayout.single(S, [(3, 11)], B))
    current = gm
    for p in PASSES:
        res = p(current, ctx)
        assert isinstance(res, PassResult) and isinstance(res.counters, dict)
        current = res.gm
    assert gm.code == code
    assert current is not gm


def test_skip_both_folds_the_ffn_input_back_to_the_attention_rows():
    """With skip_both, the FFN's kept input is a slice of the attention's merged residual:
    cleanup folds slice(cat(...)) so no full-size copy feeds it."""
    gm, args, inputs = aot_cached("llama")
    plan = SkipPlan(("skip_both", "full"))
    res = rewrite_and_check(gm, inputs, stack_for("llama"), plan, VisualLayout.single(S, [(3, 11)], B), run_args=args)
    assert res.counters["slices_folded"] > 0


def test_inserted_nodes_carry_module_paths_and_true_fake_values():
    gm, inputs = exported("qwen3")
    res = run_passes(gm, PassContext(SkipPlan(("skip_attn", "skip_ffn")), VisualLayout.single(S, [(2, 6), (8, 13)], B)))
    inserted = [n for n in res.gm.graph.nodes if n.meta.get("vskip")]
    assert inserted
    for n in inserted:
        assert n.meta.get("nn_module_stack"), n.name
    shapes: dict[str, tuple] = {}

    class Record(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                shapes[n.name] = tuple(out.shape)
            return out

    with torch.no_grad():
        Record(res.gm).run(*inputs)
    for n in res.gm.graph.nodes:
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor) and n.name in shapes:
            assert tuple(v.shape) == shapes[n.name], n.name
    sdpa = [n for n in inserted if "scaled_dot" in str(n.target)]
    assert [tuple(n.meta["val"].shape) for n in sdpa] == [(B, 4, 7, 16)]  # 16 rows - 9 visual


def test_regions_are_found_per_layer_in_every_form():
    ctx = PassContext(SkipPlan.full(2), VisualLayout.single(S, [(3, 11)], B))
    for gm in (exported("qwen3")[0], aot_cached("qwen3")[0], exported("qwen3", decompose=True)[0]):
        found = find_all_regions(gm.graph, ctx)
        assert sorted(found) == [(0, "attn"), (0, "ffn"), (1, "attn"), (1, "ffn")]
        assert all(len(v) == 1 for v in found.values())
        attn = found[(1, "attn")][0]
        close = found[(0, "ffn")][0].close  # layer 1 reads layer 0's output (export: through a no-op .to)
        assert attn.residual is close or attn.residual in close.users


# -- refusals -----------------------------------------------------------------------------------


class _PostMLP(nn.Module):
    """An MLP followed by an extra op (to put something non-row-wise inside the FFN region)."""

    def __init__(self, mlp: nn.Module, fn):
        super().__init__()
        self.inner, self.fn = mlp, fn

    def forward(self, x):
        return self.fn(self.inner(x))


def _stack_with_post_mlp(fn) -> Stack:
    lm = build_lm("llama", 1)
    lm.layers[0].mlp = _PostMLP(lm.layers[0].mlp, fn)
    return Stack(lm)


def test_cumsum_along_the_sequence_in_the_mlp_is_refused_naming_op_layer_node():
    stack = _stack_with_post_mlp(lambda y: torch.cumsum(y, dim=1))
    inputs = stack_inputs()
    gm = torch.export.export(stack, inputs, strict=False).module()
    code = gm.code
    ctx = PassContext(SkipPlan(("skip_ffn",)), VisualLayout.single(S, [(3, 11)], B))
    with pytest.raises(SkipPassError) as err:
        run_passes(gm, ctx)
    msg = str(err.value)
    assert "aten.cumsum" in msg and "layer 0" in msg and "ffn" in msg
    assert re.search(r"node cumsum\w*", msg) and "sequence axis" in msg
    assert gm.code == code
    # in place: refused before the graph changes
    with pytest.raises(SkipPassError):
        run_passes_on_graph(gm.graph, ctx)
    gm.recompile()
    assert gm.code == code
    # the attention operator of the same layer is still fine to skip
    res = rewrite_and_check(gm, inputs, stack, SkipPlan(("skip_attn",)), VisualLayout.single(S, [(3, 11)], B))
    assert res.counters["attn_rewritten"] == 1


def test_cumsum_along_features_is_row_wise_and_rewritten():
    """Axes are tracked structurally: the same op along the hidden dim is fine."""
    stack = _stack_with_post_mlp(lambda y: torch.cumsum(y, dim=-1))
    inputs = stack_inputs()
    gm = torch.export.export(stack, inputs, strict=False).module()
    res = rewrite_and_check(gm, inputs, stack, SkipPlan(("skip_ffn",)), VisualLayout.single(S, [(3, 11)], B))
    assert res.counters["ffn_rewritten"] == 1


def _gather_top_features(y):
    """An MoE-router-like gather / scatter along the features (GLM-4V-MoE's router: the top
    scores gathered, the chosen groups' mask scattered): y [B, S, D] -> [B, S, D]."""
    top = y.topk(4, dim=-1).indices  # [B, S, 4]
    picked = torch.gather(y, -1, top)  # [B, S, 4]
    mask = torch.zeros_like(y).scatter(-1, top, 1.0)  # [B, S, D], scatter.value
    return y.scatter(-1, top, picked * 2.0) + mask  # scatter.src


def test_gather_and_scatter_along_features_are_row_wise_and_rewritten():
    stack = _stack_with_post_mlp(_gather_top_features)
    inputs = stack_inputs()
    gm = torch.export.export(stack, inputs, strict=False).module()
    targets = {n.target for n in gm.graph.nodes}
    assert {torch.ops.aten.gather.default, torch.ops.aten.scatter.value, torch.ops.aten.scatter.src} <= targets
    res = rewrite_and_check(gm, inputs, stack, SkipPlan(("skip_ffn",)), VisualLayout.single(S, [(3, 11)], B))
    assert res.counters["ffn_rewritten"] == 1


@pytest.mark.parametrize("fn, op", [
    (lambda y: torch.gather(y, 1, torch.zeros_like(y, dtype=torch.long)), "aten.gather"),  # along the sequence
    (lambda y: y.scatter(1, torch.zeros_like(y, dtype=torch.long), 1.0), "aten.scatter"),
])
def test_gather_and_scatter_along_the_sequence_are_refused(fn, op):
    """Along `dim` = the sequence axis: refused, naming the op."""
    stack = _stack_with_post_mlp(fn)
    gm = torch.export.export(stack, stack_inputs(), strict=False).module()
    with pytest.raises(SkipPassError, match=rf"{op}.*along the sequence axis"):
        run_passes(gm, PassContext(SkipPlan(("skip_ffn",)), VisualLayout.single(S, [(3, 11)], B)))


def test_an_op_without_a_row_wise_rule_is_refused():
    stack = _stack_with_post_mlp(lambda y: torch.flip(y, dims=[-1]))
    gm = torch.export.export(stack, stack_inputs(), strict=False).module()
    with pytest.raises(SkipPassError, match=r"aten\.flip.*no row-wise rule"):
        run_passes(gm, PassContext(SkipPlan(("skip_ffn",)), VisualLayout.single(S, [(3, 11)], B)))


def test_plan_for_another_depth_or_layout_for_another_length_is_refused():
    gm, _ = exported("llama")
    with pytest.raises(SkipPassError, match="3 layers but the graph has 2"):
        run_passes(gm, PassContext(SkipPlan(("skip_ffn", "full", "full")), VisualLayout.single(S, [(3, 11)], B)))
    with pytest.raises(SkipPassError, match=r"expected the residual stream \[B, S=20, D\]"):
        run_passes(gm, PassContext(SkipPlan(("skip_ffn", "full")), VisualLayout.single(20, [(3, 11)], B)))


def test_wrong_module_names_are_refused():
    gm, _ = exported("llama")
    ctx = PassContext(SkipPlan(("skip_ffn", "full")), VisualLayout.single(S, [(3, 11)], B), ffn_module="feed_forward")
    with pytest.raises(SkipPassError, match="no residual add closing 'feed_forward'"):
        run_passes(gm, ctx)


# -- FLOPs --------------------------------------------------------------------------------------


def _flops(fn, *args) -> int:
    try:
        from vskip_compile.flop_count import count_flops
    except ImportError:  # FlopCounterMode alone: mm/bmm only, SDPA counted as 0
        from torch.utils.flop_counter import FlopCounterMode

        def count_flops(f, *a):
            with torch.no_grad(), FlopCounterMode(display=False) as c:
                f(*a)
            return c.get_total_flops()

    return count_flops(fn, *args)


def test_flops_drop_by_the_skipped_rows():
    """Attention skip saves q and o projections and the V query rows of QKᵀ and softmax·V;
    K/V projections stay. FFN skip saves the three MLP matmuls on V rows."""
    gm, inputs = exported("qwen3")
    plan = SkipPlan(("skip_attn", "skip_both"))
    layout = VisualLayout.single(S, [(2, 6), (8, 13)], B)
    res = run_passes(gm, PassContext(plan, layout))
    d, heads, e, f, v = 64, 4, 16, 128, layout.num_visual
    try:
        import vskip_compile.flop_count  # noqa: F401

        sdpa = 2 * B * heads * v * S * (e + e)
    except ImportError:
        sdpa = 0
    attn = 2 * B * v * d * heads * e + 2 * B * v * heads * e * d + sdpa
    ffn = 3 * 2 * B * v * d * f
    saved = _flops(gm, *inputs) - _flops(res.gm, *inputs)
    assert saved == 2 * attn + 1 * ffn


# -- real pipeline pieces -----------------------------------------------------------------------


def test_decoder_core_of_tiny_qwen3_vl_with_deepstack(tiny_model, manual):
    """The project's DecoderCore (logits + K/V, DeepStack adds) of a tiny Qwen3-VL, exported."""
    from vskip_compile.archs import adapter_for
    from vskip_compile.testing.tiny import tiny_inputs
    from vskip_compile.core import DecoderCore

    model = tiny_model("qwen3_vl")
    adapter = adapter_for(model)
    inputs = tiny_inputs(model, "qwen3_vl", text_before=3, text_after=5, batch=2)
    p = adapter.prefill_inputs(model, **inputs)
    deepstack = tuple(p.deepstack or ())
    core = DecoderCore.from_model(model, adapter, num_deepstack=len(deepstack))
    args = (p.inputs_embeds, p.position_ids, *deepstack)
    gm = torch.export.export(core, args, strict=False).module()
    layout = adapter.layout(model, inputs["input_ids"])
    ops = ("skip_both", "skip_attn", "skip_ffn", "full")
    res = run_passes(gm, PassContext(SkipPlan(ops), layout))
    assert res.counters["attn_rewritten"] == 2 and res.counters["ffn_rewritten"] == 2
    with torch.no_grad():
        logits = res.gm(*args)[0]
        want = manual(model, inputs, ops)
    torch.testing.assert_close(logits, want, atol=ATOL, rtol=RTOL)


@pytest.mark.slow
def test_inductor_post_grad_custom_pass():
    """The passes as inductor's post_grad_custom_pre_pass on the normalized post-grad graph."""
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.custom_graph_pass import CustomGraphPass

    stack = Stack(build_lm("llama", 1))
    inputs = stack_inputs()
    plan, layout = SkipPlan(("skip_both",)), VisualLayout.single(S, [(2, 6), (8, 13)], B)
    seen: dict[str, int] = {}

    class Pass(CustomGraphPass):
        def __call__(self, graph: fx.Graph) -> None:
            seen.update(run_passes_on_graph(graph, PassContext(plan, layout)).counters)

        def uuid(self) -> str:
            return f"test-{plan.ops}-{layout}"

    def backend(gm, example_inputs):
        return compile_fx(gm, example_inputs, config_patches={"post_grad_custom_pre_pass": Pass(), "fx_graph_cache": False})

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(stack, backend=backend, fullgraph=True, dynamic=False)(*inputs)
    assert seen["attn_rewritten"] == 1 and seen["ffn_rewritten"] == 1
    assert_matches(out, oracle(stack, inputs, plan, layout))


def test_run_passes_on_a_bare_graph_rewrites_it_in_place():
    """What inductor's post-grad hook hands over: a Graph, rewritten in place (run_passes accepts
    one too and behaves the same)."""
    from vskip_compile.passes.base import copy_graph_module

    gm, inputs = exported("llama")
    plan, layout = SkipPlan(("skip_both", "skip_attn")), VisualLayout.single(S, [(3, 11)], B)
    for run in (run_passes_on_graph, run_passes):
        mine = copy_graph_module(gm)
        res = run(mine.graph, PassContext(plan, layout))
        assert res.modified and res.counters["attn_rewritten"] == 2
        mine.recompile()
        with torch.no_grad():
            assert_matches(mine(*inputs), oracle(stack_for("llama"), inputs, plan, layout))
