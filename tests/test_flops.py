"""The symbolic FLOPs model: formulas, an independent count, monotonicity, HF configs, presets,
and agreement with torch's FlopCounterMode on one real-width Qwen3-VL-8B decoder layer."""

from __future__ import annotations

import pytest
import sympy
from hypothesis import given, settings
from hypothesis import strategies as st

from vskip_compile.flops import (
    DimsError, P, S, TextDims, V, evaluate, hf_text_config, layer_flops, model_flops, op_savings,
    plan_report,
)
from vskip_compile.plan import OPS, PlanError, SkipPlan
from vskip_compile.presets import PRESETS, get_preset

QWEN3_8B = get_preset("qwen3-vl-8b").dims


def preset20() -> SkipPlan:
    ops = ["full"] * 36
    for layer in (2, 4, 17, 18, 20, 21, 22, 23):
        ops[layer] = "skip_attn"
    for layer in range(24, 36):
        ops[layer] = "skip_both"
    return SkipPlan.from_ops(ops)


def direct_count(dims: TextDims, plan: SkipPlan, s: int, v: int, p: int = 0) -> int:
    """Row by row, independently of flops.py: what each query row and each FFN row costs."""
    d, h, g, e = dims.hidden, dims.heads, dims.kv_heads, dims.head_dim
    frozen = v + (p if plan.scope == "prefix_through_visual" else 0)
    total = 0
    for layer in range(plan.num_layers):
        for row in range(s):
            skipped = row < frozen  # which rows are frozen does not change the count
            total += 2 * d * g * e * 2  # K and V projections of this row: always
            if not (skipped and plan.skips_attn(layer)):
                total += 2 * d * h * e  # q projection
                total += 2 * h * e * d  # o projection
                for _kv_row in range(s):
                    total += 2 * h * e * 2  # one score (h heads) and one softmax·V row entry
            if not (skipped and plan.skips_ffn(layer)):
                if dims.mlp_at(layer) == "moe":
                    total += 2 * d * dims.experts + dims.top_k * 3 * 2 * d * dims.expert_ffn
                    total += 3 * 2 * d * dims.shared_ffn
                else:
                    total += (3 if dims.mlp_at(layer) == "gated" else 2) * 2 * d * dims.ffn
    return total


# -- formulas -----------------------------------------------------------------------------------
def test_layer_formula_is_the_stated_convention():
    sym = TextDims.symbolic()
    d, h, g, e, f = sym.hidden, sym.heads, sym.kv_heads, sym.head_dim, sym.ffn
    full = layer_flops(sym)
    assert sympy.expand(full["attn"] - (2 * S * d * h * e * 2 + 2 * S * d * g * e * 2 + 4 * S * S * h * e)) == 0
    assert sympy.expand(full["ffn"] - 6 * S * d * f) == 0
    assert sympy.expand(op_savings(sym, 0, "attn") - (4 * V * d * h * e + 4 * V * S * h * e)) == 0
    assert sympy.expand(op_savings(sym, 0, "ffn") - 6 * V * d * f) == 0
    both = layer_flops(sym, "skip_both")
    assert sympy.expand(full["attn"] + full["ffn"] - both["attn"] - both["ffn"]
                        - op_savings(sym, 0, "attn") - op_savings(sym, 0, "ffn")) == 0


def test_moe_and_plain_formulas():
    moe = TextDims.symbolic("moe")
    d, E, k, fe, fs = moe.hidden, moe.experts, moe.top_k, moe.expert_ffn, moe.shared_ffn
    assert sympy.expand(layer_flops(moe)["ffn"] - S * (2 * d * E + k * 6 * d * fe + 6 * d * fs)) == 0
    plain = TextDims.symbolic("plain")
    assert sympy.expand(layer_flops(plain)["ffn"] - 4 * S * plain.hidden * plain.ffn) == 0


def test_prefix_scope_freezes_v_plus_p_rows():
    sym = TextDims.symbolic()
    visual = op_savings(sym, 0, "attn")
    prefix = op_savings(sym, 0, "attn", scope="prefix_through_visual")
    assert sympy.expand(prefix - visual.subs(V, V + P)) == 0
    plan = SkipPlan.from_ops(["skip_both", "full"], scope="prefix_through_visual")
    dims = TextDims(64, 4, 2, 16, 128, 2)
    expr = model_flops(dims, plan)
    assert P in expr.free_symbols
    assert evaluate(expr, S=40, V=10, P=5) == direct_count(dims, plan, 40, 10, 5)
    assert plan_report(dims, plan, 40, 10, 5)["plan"] == direct_count(dims, plan, 40, 10, 5)


def test_full_model_is_L_times_a_layer_symbolically():
    sym = TextDims.symbolic()
    layer = layer_flops(sym)
    assert sympy.expand(model_flops(sym) - sym.layers * (layer["attn"] + layer["ffn"])) == 0


# -- numbers --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_symbolic_equals_direct_count(name):
    dims = PRESETS[name].dims
    plan = SkipPlan.from_ops([OPS[i % 4] for i in range(dims.layers)])
    s, v = 96, 70
    want = direct_count(dims, plan, s, v)
    assert evaluate(model_flops(dims, plan), S=s, V=v) == want
    assert model_flops(dims, plan, s, v) == want  # ints in, int out
    assert plan_report(dims, plan, s, v)["plan"] == want
    assert evaluate(model_flops(dims), S=s, V=v) == direct_count(dims, SkipPlan.full(dims.layers), s, v)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_all_full_plan_saves_nothing(name):
    dims = PRESETS[name].dims
    full = SkipPlan.full(dims.layers)
    assert sympy.expand(model_flops(dims, full) - model_flops(dims)) == 0
    report = plan_report(dims, full, 1088, 1024)
    assert report["saved"] == 0 and report["reduction"] == 0.0 and report["plan"] == report["full"]
    assert all(row["saved"] == 0 for row in report["layers"])
    assert plan_report(dims, None, 1088, 1024) == report


ops_lists = st.lists(st.sampled_from(OPS), min_size=1, max_size=6)


@settings(max_examples=40, deadline=None)
@given(ops=ops_lists, s=st.integers(1, 300), v1=st.integers(0, 300), v2=st.integers(0, 300),
       scope=st.sampled_from(["visual", "prefix_through_visual"]))
def test_savings_monotone_in_v(ops, s, v1, v2, scope):
    v1, v2 = sorted((min(v1, s), min(v2, s)))
    dims = TextDims(64, 4, 2, 16, 96, len(ops))
    plan = SkipPlan.from_ops(ops, scope=scope)
    r1, r2 = plan_report(dims, plan, s, v1), plan_report(dims, plan, s, v2)
    assert 0 <= r1["saved"] <= r2["saved"]
    assert 0.0 <= r1["reduction"] <= r2["reduction"] <= 1.0
    assert r2["saved"] == sum(op_savings(dims, i, op, s, v2, scope=scope, P=0)
                              for i in range(len(ops)) for op in ("attn", "ffn")
                              if (plan.skips_attn(i) if op == "attn" else plan.skips_ffn(i)))


def test_preset20_qwen3_vl_8b_cuts_about_34_5_percent():
    report = plan_report(QWEN3_8B, preset20(), 1024 + 64, 1024)
    assert report["full"] == 15_812_190_535_680
    assert report["plan"] == 10_361_877_037_056
    assert report["reduction"] == pytest.approx(0.3447, abs=5e-4)  # NOTES: about 34.5%


def test_packaged_preset20_plan_is_that_plan():
    from importlib.resources import files

    packaged = SkipPlan.load(files("vskip_compile") / "plans" / "qwen3-vl-8b-preset20.json")
    assert packaged.ops == preset20().ops and packaged.scope == "visual"
    assert packaged.model["architecture"] == "Qwen3VLForConditionalGeneration"


def test_refusals_name_the_problem():
    with pytest.raises(PlanError, match="plan has 36 layers but the model has 28"):
        plan_report(get_preset("qwen2.5-vl-7b").dims, preset20(), 100, 10)
    with pytest.raises(ValueError, match="visual"):
        plan_report(QWEN3_8B, preset20(), 100, 101)
    with pytest.raises(PlanError, match="unknown op 'skip'"):
        layer_flops(QWEN3_8B, "skip")
    with pytest.raises(ValueError, match="'attn' or 'ffn'"):
        op_savings(QWEN3_8B, 0, "both")
    with pytest.raises(DimsError, match="unknown preset 'nope'.*qwen3-vl-8b"):
        get_preset("nope")
    with pytest.raises(DimsError, match="multiple of kv_heads"):
        TextDims(64, 4, 3, 16, 96, 2)
    with pytest.raises(ValueError, match="no value given for S"):
        evaluate(model_flops(QWEN3_8B), V=3)


# -- Hugging Face configs (config.json dicts as published, and config objects) ---------------------
QWEN3_VL_8B_JSON = {
    "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl",
    "image_token_id": 151655, "vision_config": {"depth": 27, "hidden_size": 1152, "out_hidden_size": 4096},
    "text_config": {"model_type": "qwen3_vl_text", "hidden_size": 4096, "intermediate_size": 12288,
                    "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
                    "head_dim": 128, "vocab_size": 151936, "hidden_act": "silu", "rope_theta": 5000000},
}
QWEN25_VL_7B_JSON = {  # flat, as on the Hub: no text_config, no head_dim
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
    "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28, "num_hidden_layers": 28,
    "num_key_value_heads": 4, "vocab_size": 152064, "vision_config": {"depth": 32, "out_hidden_size": 3584},
}
LLAVA_15_7B_JSON = {  # the text_config leaves Vicuna's dims at LlamaConfig's defaults
    "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "image_token_index": 32000,
    "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                    "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                    "vocab_size": 32064},
}
LLAVA_NEXT_7B_JSON = {**LLAVA_15_7B_JSON, "architectures": ["LlavaNextForConditionalGeneration"],
                      "model_type": "llava_next"}
QWEN3_VL_30B_A3B_JSON = {
    "architectures": ["Qwen3VLMoeForConditionalGeneration"], "model_type": "qwen3_vl_moe",
    "text_config": {"model_type": "qwen3_vl_moe_text", "hidden_size": 2048, "intermediate_size": 6144,
                    "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
                    "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
                    "head_dim": 128, "decoder_sparse_step": 1, "mlp_only_layers": [], "vocab_size": 151936},
}


@pytest.mark.parametrize("cfg, preset", [
    (QWEN3_VL_8B_JSON, "qwen3-vl-8b"),
    (QWEN25_VL_7B_JSON, "qwen2.5-vl-7b"),
    (LLAVA_15_7B_JSON, "llava-1.5-7b"),
    (LLAVA_NEXT_7B_JSON, "llava-next-7b"),
    (QWEN3_VL_30B_A3B_JSON, "qwen3-vl-30b-a3b"),
])
def test_from_hf_config_dicts_match_presets(cfg, preset):
    assert TextDims.from_hf_config(cfg) == get_preset(preset).dims
    assert get_preset(preset).architecture == cfg["architectures"][0]


def test_from_hf_config_objects():
    from transformers import Qwen3VLConfig, Qwen3VLMoeConfig

    obj = Qwen3VLConfig(text_config=QWEN3_VL_8B_JSON["text_config"])
    assert TextDims.from_hf_config(obj) == QWEN3_8B
    moe = Qwen3VLMoeConfig(text_config=QWEN3_VL_30B_A3B_JSON["text_config"])
    assert TextDims.from_hf_config(moe) == get_preset("qwen3-vl-30b-a3b").dims
    # The hash a plan records for a model: from the config.json equals from the loaded config.
    assert hf_text_config(QWEN3_VL_8B_JSON)["vocab_size"] == 151936
    from vskip_compile.plan import config_hash

    assert config_hash(hf_text_config(QWEN3_VL_8B_JSON)) == config_hash(obj.get_text_config().to_dict())


def test_moe_dense_layers_and_shared_expert():
    text = {"model_type": "qwen2_moe", "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 4, "num_experts": 8, "num_experts_per_tok": 2,
            "moe_intermediate_size": 32, "shared_expert_intermediate_size": 128, "decoder_sparse_step": 2,
            "mlp_only_layers": [3]}
    dims = TextDims.from_hf_config(text)
    assert dims.mlp == "moe" and dims.dense_layers == (0, 2, 3) and dims.shared_ffn == 128
    assert dims.head_dim == 16  # d / h when the config does not name it
    plan = SkipPlan.from_ops(["skip_ffn", "skip_ffn", "full", "skip_both"])
    assert plan_report(dims, plan, 50, 20)["plan"] == direct_count(dims, plan, 50, 20)
    assert op_savings(dims, 1, "ffn", 50, 20) == 20 * (2 * 64 * 8 + 2 * 6 * 64 * 32 + 6 * 64 * 128)
    assert op_savings(dims, 0, "ffn", 50, 20) == 20 * 6 * 64 * 256


def test_from_hf_config_refuses_incomplete_config():
    with pytest.raises(DimsError, match="hidden_size.*no model_type"):
        TextDims.from_hf_config({"num_attention_heads": 4})


# -- torch's own count on a real-width decoder layer ------------------------------------------------
def test_op_savings_match_flop_counter_on_a_qwen3_vl_8b_layer():
    """One Qwen3-VL-8B-width decoder layer (d 4096, ffn 12288, 32/8 heads), random init, 16 rows
    of which 10 visual: torch's count of the full layer, of the attention with only the kept
    query rows (K/V of all rows) and of the FFN on the kept rows equals the symbolic model."""
    import torch
    from transformers import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextDecoderLayer

    from vskip_compile.flop_count import count_flops

    cfg = Qwen3VLTextConfig(**QWEN3_VL_8B_JSON["text_config"])
    cfg._attn_implementation = "sdpa"  # the fused kernel that FlopCounterMode alone counts as 0
    torch.manual_seed(0)
    layer = Qwen3VLTextDecoderLayer(cfg, layer_idx=0).eval()
    s, (v0, v1) = 16, (3, 13)  # visual rows 3..12
    kept = torch.tensor([i for i in range(s) if not v0 <= i < v1])
    x = torch.randn(1, s, cfg.hidden_size)
    cos, sin = torch.ones(1, s, cfg.head_dim), torch.zeros(1, s, cfg.head_dim)
    attn = layer.self_attn

    def attention_on_rows(h, rows):  # the skip-shaped attention operator
        hq = h[:, rows]
        q = attn.q_norm(attn.q_proj(hq).view(1, len(rows), -1, cfg.head_dim)).transpose(1, 2)  # [1, H, R, E]
        k = attn.k_norm(attn.k_proj(h).view(1, s, -1, cfg.head_dim)).transpose(1, 2)  # [1, G, S, E]
        v = attn.v_proj(h).view(1, s, -1, cfg.head_dim).transpose(1, 2)  # [1, G, S, E]
        mask = torch.ones(len(rows), s, dtype=torch.bool).tril()[: len(rows)]
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return attn.o_proj(o.transpose(1, 2).reshape(1, len(rows), -1))  # [1, R, D]

    full_layer = count_flops(layer, x, position_embeddings=(cos, sin))
    attn_full = count_flops(attn, x, (cos, sin), None)
    attn_kept = count_flops(attention_on_rows, x, kept)
    ffn_full = count_flops(layer.mlp, x)
    ffn_kept = count_flops(layer.mlp, x[:, kept])

    want = layer_flops(QWEN3_8B, "full", s, v1 - v0)
    assert attn_full == want["attn"] and ffn_full == want["ffn"]
    assert full_layer == want["attn"] + want["ffn"]
    assert attn_full - attn_kept == op_savings(QWEN3_8B, 0, "attn", s, v1 - v0)
    assert ffn_full - ffn_kept == op_savings(QWEN3_8B, 0, "ffn", s, v1 - v0)
    skip_both = layer_flops(QWEN3_8B, "skip_both", s, v1 - v0)
    assert attn_kept + ffn_kept == skip_both["attn"] + skip_both["ffn"]


def test_sdpa_rule_counts_the_full_rectangle():
    import torch

    from vskip_compile.flop_count import count_flops, sdpa_flops

    sdpa = torch.nn.functional.scaled_dot_product_attention
    q, k, v = torch.randn(2, 4, 8, 16), torch.randn(2, 2, 12, 16), torch.randn(2, 2, 12, 16)
    want = 2 * 2 * 4 * 8 * 12 * (16 + 16)
    assert sdpa_flops(q.shape, k.shape, v.shape) == want
    assert count_flops(sdpa, q, k, v, enable_gqa=True) == want
    mask = torch.ones(8, 12, dtype=torch.bool).tril()
    assert count_flops(sdpa, q, k, v, attn_mask=mask, enable_gqa=True) == want
    kk, vv = k[:, :, :8], v[:, :, :8]
    assert count_flops(sdpa, q, kk, vv, is_causal=True, enable_gqa=True) == 2 * 2 * 4 * 8 * 8 * 32


def test_flops_presets_and_cli_import_no_torch_or_transformers_at_module_level():
    """Plain math stays plain: `vskip flops` must not pay for torch or transformers."""
    import ast
    from pathlib import Path

    import vskip_compile

    root = Path(vskip_compile.__file__).parent
    cli = sorted(str(p.relative_to(root)) for p in (root / "cli").glob("*.py"))
    assert "cli/__init__.py" in cli and "cli/flops.py" in cli
    for name in ("flops.py", "presets.py", *cli):
        tree = ast.parse((root / name).read_text())
        for node in tree.body:  # module level only; lazy imports inside functions are fine
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            else:
                continue
            assert not any(m.split(".")[0] in ("torch", "transformers") for m in mods), (name, mods)
