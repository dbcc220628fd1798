"""SkipPlan: JSON round trip, equality, printing, and every refusal naming its problem."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vskip_compile import OPS, PlanError, SkipPlan, config_hash
from vskip_compile.plan import PLAN_VERSION, SCOPES

TEXT = {"model_type": "qwen3_vl_text", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 1000}
ARCH = "Qwen3VLForConditionalGeneration"


def sample_plan() -> SkipPlan:
    return SkipPlan.from_ops(
        ["full", "skip_attn", "skip_ffn", "skip_both"], name="demo",
        provenance={"samples": 8, "budget": 0.3},
    ).with_model(ARCH, TEXT)


def test_round_trip_through_dict_and_file(tmp_path):
    plan = sample_plan()
    d = plan.to_dict()
    assert d["version"] == PLAN_VERSION and d["num_layers"] == 4 and d["ops"][3] == "skip_both"
    assert d["model"] == {"architecture": ARCH, "config_hash": config_hash(TEXT)}
    assert SkipPlan.from_dict(d) == plan
    assert SkipPlan.from_dict(d).to_dict() == d
    path = tmp_path / "plan.json"
    plan.save(path)
    assert json.loads(path.read_text()) == d
    back = SkipPlan.load(path)
    assert back == plan and back.provenance == plan.provenance and back.model == plan.model


def test_defaults_are_left_out_of_the_json():
    d = SkipPlan.full(2).to_dict()
    assert d == {"version": PLAN_VERSION, "num_layers": 2, "ops": ["full", "full"]}
    assert "scope" in SkipPlan.from_ops(["full"], scope="prefix_through_visual").to_dict()


def test_equality_is_ops_layers_name_scope_not_provenance():
    a = SkipPlan.from_ops(["full", "skip_attn"], provenance={"x": 1})
    assert a == SkipPlan.from_ops(["full", "skip_attn"], provenance={"y": 2})
    assert a != SkipPlan.from_ops(["full", "skip_ffn"])
    assert a != SkipPlan.from_ops(["full", "skip_attn"], scope="prefix_through_visual")
    assert a != SkipPlan.from_ops(["full", "skip_attn"], name="other")
    assert hash(a) == hash(SkipPlan.from_ops(["full", "skip_attn"]))


def test_queries():
    plan = sample_plan()
    assert [plan.skips_attn(i) for i in range(4)] == [False, True, False, True]
    assert [plan.skips_ffn(i) for i in range(4)] == [False, False, True, True]
    assert SkipPlan.full(3).is_full and not plan.is_full


def test_str_shows_ops_and_counts():
    assert str(sample_plan()) == "SkipPlan 'demo' [.AFB] (4 layers: 1 skip_attn, 1 skip_ffn, 1 skip_both)"
    assert str(SkipPlan.full(3)) == "SkipPlan [...] (3 layers: no skips)"


@pytest.mark.parametrize("d, message", [
    ({"version": 99, "num_layers": 1, "ops": ["full"]}, "unknown plan version 99"),
    ({"version": 1, "num_layers": 2, "ops": ["full", "skip_mlp"]}, "unknown op 'skip_mlp' at layer 1"),
    ({"version": 1, "num_layers": 3, "ops": ["full", "full"]}, "plan has 2 ops but num_layers=3"),
    ({"version": 1, "num_layers": 0, "ops": []}, "num_layers must be a positive int"),
    ({"version": 1, "num_layers": 1, "ops": ["full"], "layers": 1}, "unknown plan key.*layers"),
    ({"version": 1, "num_layers": 1, "ops": ["full"], "scope": "all"}, "unknown scope 'all'"),
    ({"version": 1, "ops": ["full"]}, "missing required key 'num_layers'"),
    ({"version": 1, "num_layers": 1, "ops": "full"}, "'ops' must be a list"),
    ([1, 2], "a plan is a JSON object, got list"),
])
def test_from_dict_refusals_name_the_problem(d, message):
    with pytest.raises(PlanError, match=message):
        SkipPlan.from_dict(d)


def test_load_refuses_a_non_json_file_naming_the_file(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text("{not json")
    with pytest.raises(PlanError, match=r"plan\.json: not a JSON plan file"):
        SkipPlan.load(path)
    path.write_text(json.dumps({"version": 1, "num_layers": 1, "ops": ["full"], "extra": 0}))
    with pytest.raises(PlanError, match=r"plan\.json: unknown plan key\(s\): extra"):
        SkipPlan.load(path)


def test_check_model_refuses_another_model():
    plan = sample_plan()
    plan.check_model(ARCH, 4, TEXT)  # fits
    with pytest.raises(PlanError, match="plan has 4 layers but the model has 5"):
        plan.check_model(ARCH, 5, TEXT)
    with pytest.raises(PlanError, match="made for architecture 'Qwen3VLForConditionalGeneration'"):
        plan.check_model("LlavaForConditionalGeneration", 4, TEXT)
    with pytest.raises(PlanError, match="text-config hash"):
        plan.check_model(ARCH, 4, {**TEXT, "hidden_size": 128})
    SkipPlan.full(4).check_model("anything", 4, {})  # an unstamped plan checks the layer count only


op_lists = st.lists(st.sampled_from(OPS), min_size=1, max_size=40)
names = st.none() | st.text(min_size=1, max_size=20)
provenance = st.none() | st.dictionaries(st.text(max_size=10), st.integers() | st.text(max_size=10), max_size=3)


@settings(max_examples=50, deadline=None)
@given(ops=op_lists, name=names, prov=provenance, scope=st.sampled_from(SCOPES))
def test_round_trip_any_plan(ops, name, prov, scope):
    plan = SkipPlan.from_ops(ops, name=name, provenance=prov, scope=scope)
    back = SkipPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert back == plan and back.provenance == plan.provenance and back.num_layers == len(ops)
