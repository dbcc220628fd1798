"""The authors' policy format (GitHub zayan-l/OpSkip) <-> SkipPlan."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vskip_compile import OPS, PlanError, SkipPlan

# The authors' Qwen3-VL-8B preset20 (configs/qwen3_vl/preset20.json), written out here.
PRESET20 = {
    "model_family": "qwen3_vl",
    "checkpoint": "Qwen/Qwen3-VL-8B-Instruct",
    "num_layers": 36,
    "preset": 20,
    "budget": 20,
    "attention_only": [],
    "ffn_only": [2, 4, 17, 18, 20, 21, 22, 23],
    "freeze": list(range(24, 36)),
    "freeze_scope": "visual",
    "mlp_chunk_size": 512,
    "source": "Eval/scripts/lmms/qwen/qwen3-frozen2.sh",
    "use_triton": False,
}


def test_preset20_maps_kept_lists_to_our_ops():
    plan = SkipPlan.from_opskip(PRESET20)
    assert plan.num_layers == 36
    assert [i for i, op in enumerate(plan.ops) if op == "skip_attn"] == [2, 4, 17, 18, 20, 21, 22, 23]
    assert [i for i, op in enumerate(plan.ops) if op == "skip_both"] == list(range(24, 36))
    assert plan.ops.count("full") == 16 and plan.ops.count("skip_ffn") == 0
    assert plan.model == {"architecture": "qwen3_vl"}


def test_attention_only_means_skip_ffn():
    plan = SkipPlan.from_opskip({"num_layers": 3, "attention_only": [1]})
    assert plan.ops == ("full", "skip_ffn", "full")


def test_preset20_round_trip_keeps_their_fields():
    out = SkipPlan.from_opskip(PRESET20).to_opskip()
    assert out == PRESET20 | {"attention_only": [], "freeze_scope": "visual"}
    assert SkipPlan.from_opskip(out) == SkipPlan.from_opskip(PRESET20)


@settings(max_examples=50, deadline=None)
@given(
    ops=st.lists(st.sampled_from(OPS), min_size=1, max_size=40),
    scope=st.sampled_from(["visual", "prefix_through_visual"]),
)
def test_round_trip(ops, scope):
    plan = SkipPlan.from_ops(ops, scope=scope)
    policy = plan.to_opskip()
    assert json.loads(json.dumps(policy)) == policy
    assert SkipPlan.from_opskip(policy) == plan


@pytest.mark.parametrize(
    "policy, message",
    [
        ({"num_layers": 4, "freeze": [1, 1]}, "layer 1 twice in freeze"),
        ({"num_layers": 4, "ffn_only": [2], "freeze": [2]}, "layer 2 in both ffn_only and freeze"),
        ({"num_layers": 4, "freeze": [4]}, "layer 4 is out of range"),
        ({"num_layers": 4, "freeze": [-1]}, "layer -1 is out of range"),
        ({"num_layers": 4, "skip": [1]}, "unknown OpSkip policy key(s): skip"),
        ({"freeze": [1]}, "positive int num_layers"),
        ({"num_layers": 4, "freeze": [1], "budget": 3}, "budget 3 does not match"),
        ({"num_layers": 4, "freeze_scope": "all"}, "unknown scope 'all'"),
        ({"num_layers": 4, "freeze": "1,2"}, "'freeze' must be a list"),
    ],
)
def test_refusals_name_the_problem(policy, message):
    with pytest.raises(PlanError) as err:
        SkipPlan.from_opskip(policy)
    assert message in str(err.value)


def test_num_layers_must_match_the_model():
    with pytest.raises(PlanError, match="num_layers=36 but the model has 28"):
        SkipPlan.from_opskip(PRESET20, num_layers=28)


def test_cli_import_export_round_trip(tmp_path, capsys):
    from vskip_compile.cli import main

    policy = tmp_path / "preset20.json"
    policy.write_text(json.dumps(PRESET20))
    plan_file = tmp_path / "plan.json"
    assert main(["plan", "import", str(policy), "--out", str(plan_file), "--layers", "36"]) == 0
    assert SkipPlan.load(plan_file) == SkipPlan.from_opskip(PRESET20)
    capsys.readouterr()
    assert main(["plan", "export", str(plan_file)]) == 0
    assert SkipPlan.from_opskip(json.loads(capsys.readouterr().out)) == SkipPlan.from_opskip(PRESET20)


def test_cli_import_refusal_names_the_layer(tmp_path, capsys):
    from vskip_compile.cli import main

    policy = tmp_path / "bad.json"
    policy.write_text(json.dumps({"num_layers": 4, "ffn_only": [1], "freeze": [1]}))
    assert main(["plan", "import", str(policy)]) == 2
    assert "layer 1 in both ffn_only and freeze" in capsys.readouterr().err
