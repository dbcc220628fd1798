"""Skip passes on a sparse-MoE decoder: the tiny random Qwen3-VL-MoE (8 experts of width 32,
top-2 routing in layers 0-2, a dense MLP in layer 3; DeepStack after layers 0 and 1).

The traced core runs the experts with transformers' "batched_mm" implementation (see
vskip_compile.experts): token copies per routed expert (repeat_interleave), expert weights
gathered by routing index (aten.index.Tensor), bmm, weighted sum over the top-k. The passes
prove each of those row-wise and cut the frozen rows out of the whole MoE FFN, router included.
transformers' default where its kernel exists (CPU included), "grouped_mm", sorts the
(token, expert) pairs of the whole sequence: refused, naming op, layer and node.

Tolerance, fp32 logits: atol = rtol = 1e-5. The reference runs the model set to "eager"
experts (a loop over the experts hit, index_add of each expert's rows) on full-size GEMMs; the
compiled graph runs "batched_mm" (per-pair bmm, then a top-k sum) on fewer rows, so the expert
outputs are summed in another order.
Seen: <= 2e-7 on logits of magnitude <= 0.6 (a few fp32 ulps); the plan moves logits by
> 0.1. Routing is discrete (top-k), so a router near-tie could turn rounding into a different
expert; with this fixed seed no router margin is that small, and the greedy tokens must be
identical.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import fx, nn

import vskip_compile
from vskip_compile import SkipPlan, VisualLayout, reference
from vskip_compile.archs import adapter_for
from vskip_compile.testing.graphs import aot_graph
from vskip_compile.testing.tiny import VOCAB, tiny_inputs
from vskip_compile.core import DecoderCore
from vskip_compile.flop_count import count_flops
from vskip_compile.flops import TextDims, model_flops
from vskip_compile.passes import PassContext, SkipPassError, run_passes

ARCH = "qwen3_vl_moe"
ATOL = RTOL = 1e-5
# MoE FFN skipped in layers 0 (skip_ffn) and 1 (skip_both), attention in 1 and 2, the dense
# MLP of layer 3 skipped too.
PLAN = SkipPlan(("skip_ffn", "skip_both", "skip_attn", "skip_ffn"))
BATCH = 2


@pytest.fixture(scope="module")
def model(tiny_model):
    """The shared tiny model with the "eager" experts (the per-expert loop, not traceable);
    its own setting is restored afterwards."""
    model = tiny_model(ARCH)
    before = model.get_experts_implementation()
    model.set_experts_implementation("eager")
    yield model
    model.set_experts_implementation(before)


@pytest.fixture(scope="module")
def inputs(model):
    return tiny_inputs(model, ARCH, text_before=3, text_after=4, batch=BATCH)


@pytest.fixture(scope="module")
def layout(model, inputs):
    return adapter_for(model).layout(model, inputs["input_ids"])


@pytest.fixture(scope="module")
def want(model, inputs):
    """Reference prefill logits and greedy tokens under PLAN, and the all-full logits."""
    with torch.no_grad():
        full = model(**inputs).logits
        with reference.applied(model, PLAN):
            logits = model(**inputs).logits
            tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    return logits, tokens, full


def _core_and_args(model, inputs):
    adapter = adapter_for(model)
    p = adapter.prefill_inputs(model, **inputs)
    deepstack = tuple(p.deepstack or ())
    core = DecoderCore.from_model(model, adapter, 0, len(deepstack))
    return core, (p.inputs_embeds, p.position_ids, *deepstack), adapter.layout(model, inputs["input_ids"])


# -- the one-call API -----------------------------------------------------------------------------


def test_compile_equals_reference_on_moe(model, inputs, want):
    """vskip_compile.compile on the model with "eager" experts: the prefill graph runs
    "batched_mm", skipped MoE FFNs on the kept rows; logits and greedy tokens match the eager
    reference, and the model's experts setting is left as it was."""
    logits, tokens, full = want
    before = model.get_experts_implementation()
    assert before[""] == "eager"  # the switch is exercised, not already in place
    cm = vskip_compile.compile(model, PLAN, backend="eager")
    with torch.no_grad():
        last = cm(**inputs, logits_to_keep=1).logits  # [B, 1, V]: the prefill graph generate uses
    assert (full[:, -1] - logits[:, -1]).abs().max() > 1e-2, "the plan had no effect: the test would prove nothing"
    torch.testing.assert_close(last[:, 0], logits[:, -1], atol=ATOL, rtol=RTOL)
    assert torch.equal(cm.generate(**inputs, max_new_tokens=4), tokens)
    assert model.get_experts_implementation() == before


# -- the rewritten graph ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def traced(model, inputs):
    core, args, layout = _core_and_args(model, inputs)
    gm, graph_args = aot_graph(core, args)
    return gm, graph_args, layout


def _experts_gathers(gm: fx.GraphModule) -> dict[int, list[int]]:
    """layer -> row counts of the expert-weight gathers (aten.index.Tensor in mlp.experts)."""
    out: dict[int, list[int]] = {}
    for n in gm.graph.nodes:
        stack = n.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else ""
        m = re.search(r"layers\.(\d+)\.mlp\.experts", path)
        if m and n.target is torch.ops.aten.index.Tensor:
            out.setdefault(int(m.group(1)), []).append(n.meta["val"].shape[0])
    return out


def test_moe_ffns_are_rewritten_and_flops_equal_the_model(model, want, traced):
    """Counters, the experts' gathers cut to top-k x kept rows, logits, and FLOPs: the graph's
    own count (FlopCounterMode + the SDPA rule) equals the symbolic model with k active experts
    per token (router d x E + k gated expert FFNs), plus the LM head the model leaves out."""
    gm, args, layout = traced
    s, v = layout.seq_len, layout.num_visual
    k = model.config.text_config.num_experts_per_tok
    assert _experts_gathers(gm) == {i: [BATCH * s * k] * 2 for i in range(3)}  # gate_up, down

    res = run_passes(gm, PassContext(PLAN, layout))
    assert res.counters["ffn_rewritten"] == 3 and res.counters["attn_rewritten"] == 2
    kept = BATCH * (s - v) * k
    assert _experts_gathers(res.gm) == {0: [kept] * 2, 1: [kept] * 2, 2: [BATCH * s * k] * 2}
    with torch.no_grad():
        torch.testing.assert_close(res.gm(*args)[0], want[0], atol=ATOL, rtol=RTOL)

    dims = TextDims.from_hf_config(model.config)
    assert dims.mlp == "moe" and dims.dense_layers == (3,)
    lm_head = 2 * BATCH * s * dims.hidden * VOCAB
    assert count_flops(gm, *args) == BATCH * model_flops(dims, None, s, v) + lm_head
    assert count_flops(res.gm, *args) == BATCH * model_flops(dims, PLAN, s, v) + lm_head


# -- refusals -------------------------------------------------------------------------------------


class _Stack(nn.Module):
    """One residual FFN operator at `layers.0.mlp` (the module is shared, not copied)."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList([nn.Module()])
        self.layers[0].mlp = mlp

    def forward(self, x):
        return x + self.layers[0].mlp(x)


def test_grouped_mm_experts_are_refused_naming_op_layer_node(model, layout):
    """The model's own "grouped_mm" experts (traced without DecoderCore's switch): a sort of all
    (token, expert) pairs by expert and its inverse permutation (index_put), which no row-wise
    rule covers. Refused before the graph changes."""
    block = model.model.language_model.layers[0].mlp  # Qwen3VLMoeTextSparseMoeBlock
    x = torch.randn(BATCH, layout.seq_len, model.config.text_config.hidden_size)  # [B, S, D]
    before = model.get_experts_implementation()
    try:
        model.set_experts_implementation("grouped_mm")  # transformers' default where it dispatches
        gm = torch.export.export(_Stack(block), (x,), strict=False).module()
    except (ValueError, ImportError) as e:  # no grouped_mm kernel on this torch / device
        pytest.skip(f"grouped_mm experts unavailable: {e}")
    finally:
        model.set_experts_implementation(before)
    code = gm.code
    with pytest.raises(SkipPassError) as err:
        run_passes(gm, PassContext(SkipPlan(("skip_ffn",)), layout))
    msg = str(err.value)
    assert "ffn of layer 0" in msg and "mlp.experts" in msg and "no row-wise rule" in msg
    assert re.search(r"op aten\.index_put_?\.default at node index_put\w*", msg), msg
    assert gm.code == code


class _Top1MoE(nn.Module):
    """Top-1 token-choice MoE with expert weights gathered per token ([B, S] routing indices);
    with `capacity`, Switch/GShard token dropping: a token's place in its expert's queue is a
    cumsum over the tokens before it, so its output depends on other rows (not row-wise)."""

    def __init__(self, d: int = 16, experts: int = 4, capacity: int | None = None):
        super().__init__()
        self.router = nn.Linear(d, experts, bias=False)
        self.w = nn.Parameter(torch.randn(experts, d, d) / d**0.5)
        self.experts, self.capacity = experts, capacity
        self.register_buffer("perm", torch.randperm(d))  # a feature shuffle: x[..., perm] keeps rows

    def forward(self, x):  # [B, S, D]
        probs = self.router(x).softmax(-1)  # [B, S, E]
        gate, idx = probs.max(-1)  # [B, S]
        y = torch.matmul(x.unsqueeze(-2), self.w[idx]).squeeze(-2)  # [B, S, 1, D] @ [B, S, D, D] -> [B, S, D]
        y = y[:, :, self.perm]  # [B, S, D]
        if self.capacity is not None:
            onehot = nn.functional.one_hot(idx, self.experts).to(x.dtype)  # [B, S, E]
            position = onehot.cumsum(dim=1) * onehot  # [B, S, E]: place in the expert's queue
            gate = gate * ((position <= self.capacity).to(x.dtype) * onehot).sum(-1)  # [B, S]: 0 if dropped
        return y * gate.unsqueeze(-1)  # [B, S, D]


def _top1_case(capacity):
    torch.manual_seed(0)
    stack = _Stack(_Top1MoE(capacity=capacity)).eval()
    x = torch.randn(2, 10, 16)  # [B, S, D]
    gm = torch.export.export(stack, (x,), strict=False).module()
    return stack, x, gm, PassContext(SkipPlan(("skip_ffn",)), VisualLayout.single(10, [(2, 7)], 2))


def _frozen(layout: VisualLayout) -> torch.Tensor:
    """[B, S, 1] bool: the visual rows, which a skipped operator leaves unchanged."""
    frozen = torch.zeros(len(layout.spans), layout.seq_len, 1, dtype=torch.bool)
    for row, spans in enumerate(layout.spans):
        for a, b in spans:
            frozen[row, a:b] = True
    return frozen


def test_top1_gather_by_a_2d_routing_index_is_row_wise():
    """w[idx] with idx [B, S] (the batch dim in front of the sequence) and y[..., perm] (rows
    are y's own): rewritten, and equal to the plan semantics (frozen rows keep the residual)."""
    stack, x, gm, ctx = _top1_case(capacity=None)
    res = run_passes(gm, ctx)
    assert res.counters["ffn_rewritten"] == 1
    with torch.no_grad():
        torch.testing.assert_close(res.gm(x), torch.where(_frozen(ctx.layout), x, stack(x)), atol=ATOL, rtol=RTOL)


def test_batched_mm_block_in_export_form(model, layout):
    """torch.export keeps what AOT decomposes: aten.repeat_interleave.self_int (a token per
    routed expert) and the router's in-place div_. The real MoE block, run with "batched_mm"
    (its config restored after), is rewritten and equals the plan semantics."""
    block = model.model.language_model.layers[0].mlp
    stack = _Stack(block)
    x = torch.randn(BATCH, layout.seq_len, model.config.text_config.hidden_size)  # [B, S, D]
    before = model.get_experts_implementation()
    model.set_experts_implementation("batched_mm")
    try:
        gm = torch.export.export(stack, (x,), strict=False).module()
        with torch.no_grad():
            want = torch.where(_frozen(layout), x, stack(x))
    finally:
        model.set_experts_implementation(before)
    targets = {n.target for n in gm.graph.nodes}
    assert torch.ops.aten.repeat_interleave.self_int in targets and torch.ops.aten.index.Tensor in targets
    res = run_passes(gm, PassContext(SkipPlan(("skip_ffn",)), layout))
    assert res.counters["ffn_rewritten"] == 1
    with torch.no_grad():
        torch.testing.assert_close(res.gm(x), want, atol=ATOL, rtol=RTOL)


def test_capacity_token_dropping_is_refused_naming_op_layer_node():
    """Switch-style capacity (a cumsum over the tokens) in an MoE region: refused at the cumsum,
    before the graph changes."""
    _, _, gm, ctx = _top1_case(capacity=3)
    code = gm.code
    with pytest.raises(SkipPassError) as err:
        run_passes(gm, ctx)
    msg = str(err.value)
    assert "ffn of layer 0" in msg and "aten.cumsum" in msg and "sequence axis" in msg
    assert re.search(r"node cumsum\w*", msg)
    assert gm.code == code


def test_group_limited_router_gather_and_scatter_are_row_wise():
    """GLM-4V-MoE's router (DeepSeek-V3 style): the top groups' mask scattered per token
    (aten.scatter), the chosen experts' scores gathered per token (aten.gather), both along
    the expert axis of the flattened [B*S, E] scores. The tiny model's MoE block (layer 1;
    layer 0 is dense) with "batched_mm" experts, traced functional, is rewritten and equals
    the plan semantics. torch.export's own graph keeps `group_mask.scatter_(..)` in place: no
    rule re-emits an in-place op (a shared kept-row slice would be written), so it is refused."""
    from vskip_compile.archs.shrink import build_family

    glm = build_family("glm4v_moe")
    glm.set_experts_implementation("batched_mm")
    block = glm.model.language_model.layers[1].mlp  # Glm4vMoeTextMoE
    layout = VisualLayout.single(10, [(2, 7)], BATCH)
    x = torch.randn(BATCH, layout.seq_len, glm.config.text_config.hidden_size, generator=torch.Generator().manual_seed(0))
    stack = _Stack(block)
    ep = torch.export.export(stack, (x,), strict=False)
    ctx = PassContext(SkipPlan(("skip_ffn",)), layout)
    with pytest.raises(SkipPassError, match=r"op aten\.scatter_\.value at node scatter_\w* .*no row-wise rule"):
        run_passes(ep.module(), ctx)
    gm = ep.run_decompositions().module()  # functional: scatter, gather
    targets = {n.target for n in gm.graph.nodes}
    assert torch.ops.aten.gather.default in targets and torch.ops.aten.scatter.value in targets
    res = run_passes(gm, ctx)
    assert res.counters["ffn_rewritten"] == 1
    with torch.no_grad():
        torch.testing.assert_close(res.gm(x), torch.where(_frozen(layout), x, stack(x)), atol=ATOL, rtol=RTOL)
