"""The `vskip` command line: flops and plan subcommands, their JSON, their errors (exit 2)."""

import json
import shutil
import subprocess
import sys
from importlib.resources import files

import pytest

from vskip_compile.cli import main
from vskip_compile.flops import model_flops
from vskip_compile.plan import SkipPlan
from vskip_compile.presets import get_preset

PRESET20 = str(files("vskip_compile") / "plans" / "qwen3-vl-8b-preset20.json")
QWEN3_VL_8B_JSON = {
    "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl",
    "text_config": {"model_type": "qwen3_vl_text", "hidden_size": 4096, "intermediate_size": 12288,
                    "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
                    "head_dim": 128, "vocab_size": 151936},
}


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_flops_json_with_preset20(capsys):
    code, out, _ = run(capsys, "flops", "--preset", "qwen3-vl-8b", "--visual", "1024", "--text", "64",
                       "--plan", PRESET20, "--json")
    assert code == 0
    d = json.loads(out)
    assert (d["S"], d["V"], d["T"]) == (1088, 1024, 64)
    assert d["full"] == 15_812_190_535_680 and d["plan"] == 10_361_877_037_056
    assert d["reduction"] == pytest.approx(0.3447, abs=5e-4)
    assert len(d["layers"]) == 36 and d["layers"][24]["op"] == "skip_both"
    assert sum(row["saved"] for row in d["layers"]) == d["full"] - d["plan"]


def test_flops_without_plan_is_the_full_model(capsys):
    code, out, _ = run(capsys, "flops", "--preset", "llava-1.5-7b", "--visual", "576", "--text", "40", "--json")
    assert code == 0
    d = json.loads(out)
    assert d["reduction"] == 0 and d["plan"] == d["full"]
    assert d["full"] == model_flops(get_preset("llava-1.5-7b").dims, None, 616, 576)


def test_flops_with_a_config_json_equals_the_preset(capsys, tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(QWEN3_VL_8B_JSON))
    code, out, _ = run(capsys, "flops", "--config", str(cfg), "--visual", "1024", "--text", "64",
                       "--plan", PRESET20, "--json")
    assert code == 0 and json.loads(out)["plan"] == 10_361_877_037_056


def test_flops_table_for_people(capsys):
    code, out, _ = run(capsys, "flops", "--preset", "qwen3-vl-8b", "--visual", "1024", "--text", "64",
                       "--plan", PRESET20)
    assert code == 0
    assert "skip_both" in out and "total" in out and "reduction 34.47%" in out


def test_list_presets(capsys):
    code, out, _ = run(capsys, "flops", "--list-presets", "--json")
    assert code == 0 and json.loads(out)["qwen2.5-vl-7b"]["ffn"] == 18944


@pytest.mark.parametrize("argv, message", [
    (["flops", "--preset", "nope", "--visual", "1", "--text", "1"], "unknown preset 'nope'"),
    (["flops", "--preset", "qwen2.5-vl-7b", "--visual", "1", "--text", "1", "--plan", PRESET20],
     "plan has 36 layers but the model has 28"),
    (["flops", "--preset", "qwen3-vl-8b", "--visual", "1", "--text", "1", "--plan", "missing.json"],
     "plan file not found: missing.json"),
    (["flops", "--visual", "1", "--text", "1"], "--preset NAME or --config"),
    (["flops", "--preset", "qwen3-vl-8b", "--visual", "4"], "--visual V --text T"),
    (["flops", "--preset", "qwen3-vl-8b", "--visual", "4", "--text", "2", "--prefix", "3"], "--prefix 3"),
])
def test_flops_errors_exit_2_naming_the_problem(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2 and message in err and err.startswith("vskip flops: error:")


def test_bad_json_files_exit_2(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    code, _, err = run(capsys, "flops", "--config", str(bad), "--visual", "1", "--text", "1")
    assert code == 2 and "not a JSON file" in err
    code, _, err = run(capsys, "flops", "--preset", "qwen3-vl-8b", "--visual", "1", "--text", "1", "--plan", str(bad))
    assert code == 2 and "not a JSON plan file" in err
    code, _, err = run(capsys, "plan", "show", str(bad))
    assert code == 2 and "not a JSON plan file" in err and err.startswith("vskip plan show: error:")


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["flops", "--preset", "qwen3-vl-8b", "--visual", "-1", "--text", "1"])
    assert e.value.code == 2 and "non-negative" in capsys.readouterr().err


def test_plan_show(capsys):
    code, out, _ = run(capsys, "plan", "show", PRESET20)
    assert code == 0 and "qwen3-vl-8b-preset20" in out and "skip_attn" in out and "zayan-l/OpSkip" in out
    code, out, _ = run(capsys, "plan", "show", PRESET20, "--json")
    assert code == 0 and SkipPlan.from_dict(json.loads(out)) == SkipPlan.load(PRESET20)


def test_plan_validate(capsys, tmp_path):
    code, out, _ = run(capsys, "plan", "validate", PRESET20)
    assert code == 0 and out.startswith("valid")
    assert run(capsys, "plan", "validate", PRESET20, "--layers", "36")[0] == 0
    assert run(capsys, "plan", "validate", PRESET20, "--preset", "qwen3-vl-8b")[0] == 0
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(QWEN3_VL_8B_JSON))
    code, out, _ = run(capsys, "plan", "validate", PRESET20, "--config", str(cfg))
    assert code == 0 and out.startswith(f"valid for {cfg}")


def test_plan_validate_refusals(capsys, tmp_path):
    code, _, err = run(capsys, "plan", "validate", PRESET20, "--layers", "32")
    assert code == 2 and "plan has 36 layers but the model has 32" in err
    code, _, err = run(capsys, "plan", "validate", PRESET20, "--preset", "llava-1.5-7b")
    assert code == 2 and "the model has 32" in err
    other = {**QWEN3_VL_8B_JSON, "text_config": {**QWEN3_VL_8B_JSON["text_config"], "vocab_size": 1000}}
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(other))
    code, _, err = run(capsys, "plan", "validate", PRESET20, "--config", str(cfg))
    assert code == 2 and "text-config hash" in err
    cfg.write_text(json.dumps({**QWEN3_VL_8B_JSON, "architectures": ["Qwen3VLMoeForConditionalGeneration"]}))
    code, _, err = run(capsys, "plan", "validate", PRESET20, "--config", str(cfg))
    assert code == 2 and "made for architecture" in err
    bad = tmp_path / "plan.json"
    bad.write_text(json.dumps({"version": 3, "num_layers": 1, "ops": ["full"]}))  # 1 and 2 are read (issue 18)
    code, _, err = run(capsys, "plan", "validate", str(bad))
    assert code == 2 and "unknown plan version 3" in err


def test_console_script_and_python_m():
    argv = ["flops", "--preset", "qwen3-vl-8b", "--visual", "1024", "--text", "64", "--plan", PRESET20, "--json"]
    exe = shutil.which("vskip")
    cmd = [exe, *argv] if exe else [sys.executable, "-m", "vskip_compile", *argv]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["plan"] == 10_361_877_037_056
    done = subprocess.run([sys.executable, "-m", "vskip_compile", "flops", "--preset", "nope", "--visual", "1",
                           "--text", "1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown preset" in done.stderr


def test_passes_lists_the_pipeline_in_order(capsys):
    from vskip_compile.cli import main

    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    names = ["find_regions", "skip_attention", "skip_ffn", "cleanup"]
    assert [out.index(n) for n in names] == sorted(out.index(n) for n in names)
