"""Bad input, catalogued: every mistake gets one clear refusal that names the culprit.

Surfaces: plan files, OpSkip policies, model directories, engine directories, Python API
arguments, CLI numbers and HTTP bodies. Each case asserts the exception type (or the exit
code) AND that the message names what is wrong (the file, field, flag or argument). CLI cases
call `vskip_compile.cli.main` in-process (exit code + stderr); a few subprocesses prove the
real exit codes. Plus the regression test of the left-padded-batch crash (issue 14).
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vskip_compile import PlanError, SkipPlan, VSkipError
from vskip_compile.cli import main
from vskip_compile.errors import ModelDirError
from vskip_compile.export import EngineError, ManifestError, OnnxRunner, export_onnx
from vskip_compile.export import manifest as mf
from vskip_compile.config import CompileError
from vskip_compile.serve.request import Limits, RequestError, parse_chat
from vskip_compile.zoo import easyvqa

# The tiny LLaVA engine of test_export_onnx, exported once per process (as test_engine_manifest).
from test_export_onnx import exported_engine  # noqa: E402

ZOO = easyvqa.MODEL_DIR
needs_zoo = pytest.mark.skipif(not (ZOO / "model.safetensors").exists(), reason="zoo model weights not shipped")


def cli(capsys, *argv: str) -> tuple[int, str]:
    """(exit code, stderr) of `vskip ARGV` in-process; argparse refusals exit through SystemExit."""
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def assert_user_error(code: int, err: str, *culprits: str) -> None:
    """Exit 2, the message names each culprit, no traceback; our own refusals are one line."""
    assert code == 2, err
    assert "Traceback" not in err
    for c in culprits:
        assert c in err, (c, err)
    if "usage:" not in err:  # argparse prints its usage line first; ours print one line
        assert err.count("\n") == 1, err


# -- plan files ------------------------------------------------------------------------------------
GOOD = {"version": 1, "num_layers": 2, "ops": ["full", "skip_attn"]}
PLAN_CASES = {
    "version-true": ({**GOOD, "version": True}, "version True"),
    "version-string": ({**GOOD, "version": "1"}, "version '1'"),
    "version-3": ({**GOOD, "version": 3}, "version 3"),  # 1 (migrated) and 2 are read
    "version-float": ({**GOOD, "version": 1.0}, "version 1.0"),
    "num_layers-true": ({**GOOD, "num_layers": True, "ops": ["full"]}, "num_layers"),
    "num_layers-0": ({**GOOD, "num_layers": 0, "ops": []}, "num_layers"),
    "num_layers-negative": ({**GOOD, "num_layers": -1}, "num_layers"),
    "num_layers-float": ({**GOOD, "num_layers": 2.0}, "num_layers"),
    "num_layers-string": ({**GOOD, "num_layers": "2"}, "num_layers"),
    "ops-string": ({**GOOD, "ops": "full"}, "'ops'"),
    "ops-object": ({**GOOD, "ops": {"0": "full"}}, "'ops'"),
    "op-int": ({**GOOD, "ops": [3, "full"]}, "layer 0"),
    "op-unknown": ({**GOOD, "ops": ["full", "skip"]}, "unknown op 'skip' at layer 1"),
    "op-null": ({**GOOD, "ops": ["full", None]}, "layer 1"),
    "ops-length": ({**GOOD, "ops": ["full"]}, "num_layers=2"),
    "missing-ops": ({"version": 1, "num_layers": 2}, "'ops'"),
    "missing-version": ({"num_layers": 2, "ops": ["full", "full"]}, "'version'"),
    "missing-num_layers": ({"version": 1, "ops": ["full", "full"]}, "'num_layers'"),
    "unknown-key": ({**GOOD, "opz": []}, "opz"),
    "name-int": ({**GOOD, "name": 3}, "'name'"),
    "name-list": ({**GOOD, "name": ["a"]}, "'name'"),
    "provenance-string": ({**GOOD, "provenance": "calibrated"}, "'provenance'"),
    "provenance-list": ({**GOOD, "provenance": [1]}, "'provenance'"),
    "model-string": ({**GOOD, "model": "qwen3_vl"}, "'model'"),
    "model-architecture-int": ({**GOOD, "model": {"architecture": 5}}, "model.architecture"),
    "model-config_hash-int": ({**GOOD, "model": {"config_hash": 12}}, "model.config_hash"),
    "scope-unknown": ({**GOOD, "scope": "all"}, "scope 'all'"),
    "scope-int": ({**GOOD, "scope": 1}, "scope 1"),
    "root-list": ([GOOD], "JSON object"),
    "root-null": (None, "JSON object"),
}
PLAN_TEXT_CASES = {
    "not-json": ("{oops", "not a JSON plan file"),
    "empty-file": ("", "not a JSON plan file"),
    "duplicate-key": ('{"version": 1, "num_layers": 1, "ops": ["full"], "ops": ["skip_both"]}', "'ops' appears twice"),
    "trailing-garbage": (json.dumps(GOOD) + " x", "not a JSON plan file"),
}


def _plan_file(tmp_path: Path, case: str) -> Path:
    path = tmp_path / f"{case}.json"
    if case in PLAN_CASES:
        path.write_text(json.dumps(PLAN_CASES[case][0]))
    else:
        path.write_text(PLAN_TEXT_CASES[case][0])
    return path


ALL_PLAN_CASES = {**{k: v[1] for k, v in PLAN_CASES.items()}, **{k: v[1] for k, v in PLAN_TEXT_CASES.items()}}


@pytest.mark.parametrize("case", sorted(ALL_PLAN_CASES))
def test_plan_file_refused_naming_file_and_field(tmp_path, case):
    path = _plan_file(tmp_path, case)
    with pytest.raises(PlanError) as e:
        SkipPlan.load(path)
    assert str(path) in str(e.value) and ALL_PLAN_CASES[case] in str(e.value)


@pytest.mark.parametrize("case", sorted(ALL_PLAN_CASES)[::3])
def test_plan_file_refused_by_cli(tmp_path, capsys, case):
    path = _plan_file(tmp_path, case)
    assert_user_error(*cli(capsys, "plan", "validate", str(path)), str(path), ALL_PLAN_CASES[case])


def test_plan_binary_file_refused(tmp_path):
    path = tmp_path / "plan.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(PlanError, match="not a JSON plan file"):
        SkipPlan.load(path)


@pytest.mark.parametrize("verb", ["show", "validate", "export"])
def test_plan_path_that_is_a_directory(tmp_path, capsys, verb):
    assert_user_error(*cli(capsys, "plan", verb, str(tmp_path)), str(tmp_path), "is a directory")


def test_plan_path_missing(tmp_path, capsys):
    assert_user_error(*cli(capsys, "plan", "show", str(tmp_path / "nope.json")), "plan file not found", "nope.json")


def test_plan_constructor_refuses_bools_and_bad_types():
    with pytest.raises(PlanError, match="num_layers"):
        SkipPlan(("full",), num_layers=True)
    with pytest.raises(PlanError, match="'name'"):
        SkipPlan.from_ops(["full"], name=7)


# -- plans against models --------------------------------------------------------------------------
PRESET20 = str(Path(easyvqa.__file__).parent.parent / "plans" / "qwen3-vl-8b-preset20.json")


@pytest.mark.parametrize("argv, culprits", [
    (["--layers", "32"], ["the model has 32"]),
    (["--preset", "llava-1.5-7b"], ["the model has 32"]),
    (["--preset", "nope"], ["unknown preset 'nope'"]),
])
def test_plan_against_the_wrong_model(capsys, argv, culprits):
    assert_user_error(*cli(capsys, "plan", "validate", PRESET20, *argv), *culprits)


def test_imported_qwen3_vl_policy_validates_against_the_preset_as_compile_accepts_it(tmp_path, capsys, tiny_model):
    """An OpSkip policy names its family (qwen3_vl): `plan validate --preset` and compile() agree."""
    policy = {"model_family": "qwen3_vl", "num_layers": 36, "ffn_only": [2, 4], "freeze": list(range(24, 36))}
    (tmp_path / "p.json").write_text(json.dumps(policy))
    assert main(["plan", "import", str(tmp_path / "p.json"), "--out", str(tmp_path / "plan.json")]) == 0
    capsys.readouterr()
    assert main(["plan", "validate", str(tmp_path / "plan.json"), "--preset", "qwen3-vl-8b"]) == 0
    code, err = cli(capsys, "plan", "validate", str(tmp_path / "plan.json"), "--preset", "qwen2.5-vl-7b")
    assert_user_error(code, err, "architecture 'qwen3_vl'") if "architecture" in err else assert_user_error(code, err, "28")
    # compile() accepts a qwen3_vl-family plan of the tiny model's layer count...
    import vskip_compile

    model = tiny_model("qwen3_vl")
    n = len(model.model.language_model.layers)
    small = {**policy, "num_layers": n, "ffn_only": [0], "freeze": [n - 1]}
    vskip_compile.compile(model, SkipPlan.from_opskip(small), backend="eager")
    # ... and refuses another family's, naming it, as `plan validate` does.
    with pytest.raises(PlanError, match="made for architecture 'llava'"):
        vskip_compile.compile(model, SkipPlan.from_opskip({**small, "model_family": "llava"}), backend="eager")


# -- OpSkip policies -------------------------------------------------------------------------------
POLICY = {"model_family": "qwen3_vl", "num_layers": 4, "ffn_only": [1], "freeze": [3], "budget": 2}
POLICY_CASES = {
    "num_layers-true": ({**POLICY, "num_layers": True}, "num_layers"),
    "num_layers-missing": ({k: v for k, v in POLICY.items() if k != "num_layers"}, "num_layers"),
    "num_layers-string": ({**POLICY, "num_layers": "4"}, "num_layers"),
    "list-not-list": ({**POLICY, "ffn_only": 1}, "'ffn_only'"),
    "layer-out-of-range": ({**POLICY, "freeze": [4]}, "freeze: layer 4"),
    "layer-negative": ({**POLICY, "freeze": [-1]}, "freeze: layer -1"),
    "layer-bool": ({**POLICY, "freeze": [True]}, "freeze: layer True"),
    "layer-string": ({**POLICY, "attention_only": ["0"]}, "attention_only: layer '0'"),
    "layer-in-two-lists": ({**POLICY, "attention_only": [1]}, "layer 1 in both"),
    "layer-twice": ({**POLICY, "freeze": [3, 3], "budget": 3}, "layer 3 twice in freeze"),
    "budget-mismatch": ({**POLICY, "budget": 5}, "budget 5"),
    "budget-string": ({**POLICY, "budget": "2"}, "budget"),
    "budget-bool": ({**POLICY, "budget": True, "freeze": []}, "budget"),
    "freeze_scope-unknown": ({**POLICY, "freeze_scope": "all"}, "freeze_scope"),
    "freeze_scope-int": ({**POLICY, "freeze_scope": 0}, "freeze_scope"),
    "model_family-int": ({**POLICY, "model_family": 3}, "model_family"),
    "model_family-empty": ({**POLICY, "model_family": ""}, "model_family"),
    "unknown-key": ({**POLICY, "top_k": 3}, "top_k"),
    "root-list": ([POLICY], "JSON object"),
}


@pytest.mark.parametrize("case", sorted(POLICY_CASES))
def test_opskip_policy_refused_naming_the_key(case):
    policy, culprit = POLICY_CASES[case]
    with pytest.raises(PlanError) as e:
        SkipPlan.from_opskip(policy)
    assert culprit in str(e.value)


@pytest.mark.parametrize("case", ["layer-bool", "budget-string", "model_family-int", "unknown-key"])
def test_opskip_policy_refused_by_cli(tmp_path, capsys, case):
    policy, culprit = POLICY_CASES[case]
    (tmp_path / "p.json").write_text(json.dumps(policy))
    assert_user_error(*cli(capsys, "plan", "import", str(tmp_path / "p.json")), culprit)


def test_opskip_policy_files(tmp_path, capsys):
    (tmp_path / "p.json").write_text(json.dumps(POLICY))
    assert_user_error(*cli(capsys, "plan", "import", str(tmp_path / "p.json"), "--layers", "32"), "num_layers=4", "32")
    assert_user_error(*cli(capsys, "plan", "import", str(tmp_path / "missing.json")), "missing.json")
    (tmp_path / "bad.json").write_text("{")
    assert_user_error(*cli(capsys, "plan", "import", str(tmp_path / "bad.json")), "bad.json", "not a JSON file")
    assert_user_error(*cli(capsys, "plan", "import", str(tmp_path)), str(tmp_path), "directory")


# -- model directories -----------------------------------------------------------------------------
def _bad_model_dir(tmp_path: Path, case: str) -> tuple[Path, str]:
    """A copy of the zoo model directory (weights symlinked) broken as `case` says; returns
    (directory, what the refusal must name)."""
    d = tmp_path / "model"
    d.mkdir()
    for src in ZOO.iterdir():
        if src.is_file():
            (d / src.name).symlink_to(src) if src.suffix == ".safetensors" else shutil.copyfile(src, d / src.name)
    weights = d / "model.safetensors"
    if case == "missing-dir":
        shutil.rmtree(d)
        return d, "no such model directory"
    if case == "a-file":
        shutil.rmtree(d)
        d.write_text("x")
        return d, "not a directory"
    if case == "no-config":
        (d / "config.json").unlink()
        return d, "no config.json"
    if case == "corrupt-config":
        (d / "config.json").write_text((ZOO / "config.json").read_text()[:200])
        return d, "config.json: corrupt"
    if case == "config-a-list":
        (d / "config.json").write_text("[1, 2]")
        return d, "config.json: corrupt"
    if case == "architectures-string":
        cfg = json.loads((ZOO / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "architectures": "Qwen3VLForConditionalGeneration"}))
        return d, "'architectures'"
    if case == "architectures-unknown":
        cfg = json.loads((ZOO / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "architectures": ["NoSuchModelClass"]}))
        return d, "NoSuchModelClass"
    if case == "no-weights":
        weights.unlink()
        return d, "model.safetensors: missing"
    if case == "truncated-weights":
        weights.unlink()
        weights.write_bytes((ZOO / "model.safetensors").read_bytes()[:5_000_000])
        return d, "model.safetensors: corrupt or truncated"
    if case == "empty-weights":
        weights.unlink()
        weights.write_bytes(b"")
        return d, "model.safetensors: corrupt or truncated"
    if case == "garbage-weights":
        weights.unlink()
        weights.write_bytes(b"\xff" * 64)
        return d, "model.safetensors: corrupt or truncated"
    if case == "no-tokenizer-json":
        (d / "tokenizer.json").unlink()
        return d, "tokenizer.json"
    if case == "no-tokenizer-config":
        (d / "tokenizer_config.json").unlink()
        return d, "tokenizer_config.json missing"
    if case == "corrupt-tokenizer-config":
        (d / "tokenizer_config.json").write_text("{")
        return d, "tokenizer_config.json: corrupt"
    if case == "corrupt-processor-config":
        (d / "processor_config.json").write_text("{")
        return d, "processor_config.json: corrupt"
    raise AssertionError(case)


MODEL_DIR_CASES = ["missing-dir", "a-file", "no-config", "corrupt-config", "config-a-list", "architectures-string",
                   "architectures-unknown", "no-weights", "truncated-weights", "empty-weights", "garbage-weights",
                   "no-tokenizer-json", "no-tokenizer-config", "corrupt-tokenizer-config", "corrupt-processor-config"]


@needs_zoo
@pytest.mark.parametrize("case", MODEL_DIR_CASES)
def test_model_dir_refused_naming_the_file(tmp_path, case):
    from vskip_compile import modeldir

    d, culprit = _bad_model_dir(tmp_path, case)
    with pytest.raises(ModelDirError) as e:
        modeldir.load(d)
    assert culprit in str(e.value) and str(d) in str(e.value)


@needs_zoo
@pytest.mark.parametrize("command, case", [
    ("eval", "truncated-weights"), ("eval", "corrupt-config"), ("eval", "no-tokenizer-json"),
    ("calibrate", "corrupt-config"), ("calibrate", "truncated-weights"), ("calibrate", "no-tokenizer-config"),
    ("export", "truncated-weights"), ("export", "corrupt-config"), ("export", "no-tokenizer-json"),
    ("serve", "corrupt-config"), ("serve", "truncated-weights"), ("serve", "no-tokenizer-json"),
    ("run", "corrupt-config"),
])
def test_every_command_that_loads_a_model_dir_names_the_file(tmp_path, capsys, command, case, exported):
    d, culprit = _bad_model_dir(tmp_path, case)
    plan = tmp_path / "plan.json"
    SkipPlan.full(8).save(plan)
    argv = {
        "eval": ["eval", "--model-dir", str(d), "--limit", "1"],
        "calibrate": ["calibrate", "--model-dir", str(d), "--budget", "0.4", "--samples", "1"],
        "export": ["export", "--model", str(d), "--plan", str(plan), "--prompt", "x", "--out", str(tmp_path / "e")],
        "serve": ["serve", "--model", str(d), "--plan", str(plan)],
        "run": ["run", "--engine", str(exported), "--model", str(d), "--prompt", "x"],
    }[command]
    assert_user_error(*cli(capsys, *argv), culprit)


# -- engine directories ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    """The tiny LLaVA engine directory of test_export_onnx (do not modify: copy it)."""
    return exported_engine(tiny_model, tmp_path_factory, "llava", 0)[3]


@pytest.fixture
def engine(exported, tmp_path):
    copy = tmp_path / "engine"
    shutil.copytree(exported, copy)
    return copy


def _edit(engine: Path, change) -> None:
    m = json.loads((engine / mf.MANIFEST).read_text())
    change(m)
    (engine / mf.MANIFEST).write_text(json.dumps(m))


def _all_full(m):
    m["plan"]["ops"] = ["full"] * len(m["plan"]["ops"])


def _all_full_and_plan_id(m):
    _all_full(m)
    m["plan_id"]["ops"] = list(m["plan"]["ops"])


def _all_full_rehashed(m):
    """The plan edited and the content hash recomputed: the plan id still names the graphs' plan."""
    _all_full(m)
    m[mf.CONTENT_HASH] = mf.content_hash(m)


ENGINE_CASES = {
    "plan-all-full": (_all_full, "edited after export"),
    "plan-and-plan_id-all-full": (_all_full_and_plan_id, "edited after export"),
    "plan-all-full-rehashed": (_all_full_rehashed, "not the plan its graphs were exported for"),
    "no-content-hash": (lambda m: m.pop(mf.CONTENT_HASH), "has no manifest_sha256"),
    "content-hash-garbage": (lambda m: m.update({mf.CONTENT_HASH: "0" * 64}), "edited after export"),
    "seq-len-range-edited": (lambda m: next(iter(m["graphs"]["prefill"].values()))["ranges"].update(seq_len=[2, 99999]),
                             "edited"),
    "max_cache_len-edited": (lambda m: m["runtime"].update(max_cache_len=10**6), "edited after export"),
    "architecture-edited": (lambda m: m["model"].update(architecture="Other"), "edited after export"),
    "files-entry-malformed": (lambda m: m["files"].update({"decode-b1.onnx": {"bytes": "x"}}), "files['decode-b1.onnx']"),
    "graphs-missing": (lambda m: m.pop("graphs"), "'graphs' is missing"),
    "format-other": (lambda m: m.update(format="other"), "not a vskip-engine manifest"),
    "format-version-99": (lambda m: m.update(format_version=99), "engine format version 99"),
    "plan-corrupt-rehashed": (lambda m: (m["plan"].update(version=True), m.update({mf.CONTENT_HASH: mf.content_hash(m)})),
                              "corrupt plan"),
}


@pytest.mark.parametrize("case", sorted(ENGINE_CASES))
def test_engine_manifest_refused(engine, case):
    change, culprit = ENGINE_CASES[case]
    _edit(engine, change)
    with pytest.raises(ManifestError) as e:
        OnnxRunner(engine)
    assert culprit in str(e.value) and "manifest.json" in str(e.value)


@pytest.mark.parametrize("case", ["plan-all-full", "plan-all-full-rehashed", "no-content-hash"])
def test_export_into_an_unverified_engine_refused_naming_the_directory(engine, tiny_model, case):
    from vskip_compile.testing.tiny import tiny_inputs

    _edit(engine, ENGINE_CASES[case][0])
    model = tiny_model("llava")
    with pytest.raises(ManifestError) as e:
        export_onnx(model, SkipPlan.full(len(model.model.language_model.layers)), tiny_inputs(model, "llava"), engine)
    assert f"{engine}: cannot export into this engine directory, its manifest does not verify" in str(e.value)
    assert ENGINE_CASES[case][1] in str(e.value)


def test_export_refuses_non_engine_directories(tmp_path, tiny_model):
    from vskip_compile.testing.tiny import tiny_inputs

    model = tiny_model("llava")
    plan, inputs = SkipPlan.full(len(model.model.language_model.layers)), tiny_inputs(model, "llava")
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("mine")
    with pytest.raises(EngineError, match=r"stuff: holds files but no manifest\.json"):
        export_onnx(model, plan, inputs, tmp_path / "stuff")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(EngineError, match="a-file: exists and is not a directory"):
        export_onnx(model, plan, inputs, tmp_path / "a-file")
    assert (tmp_path / "stuff" / "notes.txt").read_text() == "mine" and sorted(p.name for p in (tmp_path / "stuff").iterdir()) == ["notes.txt"]


@needs_zoo
def test_cli_export_into_an_edited_engine_refused_before_loading(engine, tmp_path, capsys):
    _edit(engine, _all_full)
    plan = tmp_path / "plan.json"
    SkipPlan.full(8).save(plan)
    code, err = cli(capsys, "export", "--model", str(ZOO), "--plan", str(plan), "--prompt", "x", "--out", str(engine))
    assert_user_error(code, err, str(engine), "does not verify", "edited after export")


@pytest.mark.parametrize("case", ["edited", "missing", "a-file", "no-model-dir"])
def test_cli_run_refuses_bad_engine_dirs(engine, tmp_path, capsys, case):
    if case == "edited":
        _edit(engine, _all_full)
        culprit = "edited after export"
    elif case == "missing":
        engine = tmp_path / "nope"
        culprit = "manifest.json: missing"
    elif case == "a-file":
        engine = tmp_path / "file"
        engine.write_text("x")
        culprit = "manifest.json: missing"
    else:
        culprit = "give --model DIR"  # exported from Python, the engine names no model directory
    assert_user_error(*cli(capsys, "run", "--engine", str(engine), "--prompt", "x"), culprit)


def test_runner_refuses_an_engine_path_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ManifestError, match="f: not a directory"):
        OnnxRunner(tmp_path / "f")


# -- Python API arguments (the shipped model, backend="eager") --------------------------------------
@pytest.fixture(scope="module")
def zoo():
    """(model, processor, compiled model, one question's inputs) of the shipped easy-VQA model."""
    if not (ZOO / "model.safetensors").exists():
        pytest.skip("zoo model weights not shipped")
    import vskip_compile

    model, processor = easyvqa.load()
    cm = vskip_compile.compile(model, SkipPlan.full(8), backend="eager")
    sample = easyvqa.test_set()[0]
    return model, processor, cm, easyvqa.build_inputs(processor, sample[0], sample[1])


def _long_prompt(inputs, n: int):
    ids = inputs["input_ids"]
    text = ids[:, -1:].repeat(1, n)  # [1, n] copies of the last (text) token
    return {"input_ids": text, "attention_mask": torch.ones_like(text)}


API_CASES = {
    # name: (kwargs for generate, or a function of the inputs returning them; exception; culprit)
    "typo-max_new_token": (dict(max_new_token=1), CompileError, "max_new_token"),
    "unknown-kwarg": (dict(max_new_tokens=1, foo=3), CompileError, "foo"),
    "max_new_tokens-huge": (dict(max_new_tokens=10**6), CompileError, "max_position_embeddings 256"),
    "max_new_tokens-just-over": (lambda i: {**i, "max_new_tokens": 256 - i["input_ids"].shape[1] + 2}, CompileError,
                                 "max_position_embeddings"),
    "max_new_tokens-0": (dict(max_new_tokens=0), CompileError, "max_new_tokens"),
    "max_new_tokens-negative": (dict(max_new_tokens=-1), CompileError, "max_new_tokens"),
    "max_new_tokens-bool": (dict(max_new_tokens=True), CompileError, "max_new_tokens"),
    "max_new_tokens-float": (dict(max_new_tokens=1.5), CompileError, "max_new_tokens"),
    "max_new_tokens-string": (dict(max_new_tokens="4"), CompileError, "max_new_tokens"),
    "top_k-greedy": (dict(max_new_tokens=1, top_k=5), CompileError, "top_k set without do_sample=True"),
    "temperature-greedy": (dict(max_new_tokens=1, temperature=0.7), CompileError, "temperature set without do_sample"),
    "temperature-negative": (dict(max_new_tokens=1, do_sample=True, temperature=-1.0), CompileError,
                             "temperature must be a number > 0"),
    "top_p-over-1": (dict(max_new_tokens=1, do_sample=True, top_p=1.5), CompileError, "top_p must be a number in (0, 1]"),
    "typical_p": (dict(max_new_tokens=1, do_sample=True, typical_p=0.5), CompileError, "typical_p"),
    "num_return_sequences": (dict(max_new_tokens=1, num_return_sequences=2), CompileError, "num_return_sequences"),
    "output_attentions": (dict(max_new_tokens=1, output_attentions=True), CompileError, "output_attentions"),
    "do_sample-string": (dict(max_new_tokens=1, do_sample="yes"), CompileError, "do_sample must be a boolean"),
    "num_beams": (dict(max_new_tokens=1, num_beams=2), CompileError, "num_beams=2"),
    "use_cache-false": (dict(max_new_tokens=1, use_cache=False), CompileError, "use_cache=False"),
    "no-input_ids": (lambda i: {k: v for k, v in i.items() if k != "input_ids"} | {"max_new_tokens": 1},
                     CompileError, "input_ids"),
    "input_ids-list": (lambda i: {**i, "input_ids": i["input_ids"].tolist(), "max_new_tokens": 1}, CompileError,
                       "input_ids must be a 2-D integer tensor"),
    "input_ids-float": (lambda i: {**i, "input_ids": i["input_ids"].float(), "max_new_tokens": 1}, CompileError,
                        "input_ids must be a 2-D integer tensor"),
    "input_ids-1d": (lambda i: {**i, "input_ids": i["input_ids"][0], "max_new_tokens": 1}, CompileError,
                     "input_ids must be a 2-D integer tensor"),
    "input_ids-empty": (lambda i: {"input_ids": i["input_ids"][:, :0], "max_new_tokens": 1}, CompileError,
                        "input_ids is empty"),
    "input_ids-out-of-vocab": (lambda i: {**i, "input_ids": i["input_ids"] + 1000, "max_new_tokens": 1}, CompileError,
                               "outside the vocabulary"),
    "input_ids-negative": (lambda i: {**i, "input_ids": i["input_ids"] * 0 - 1, "max_new_tokens": 1}, CompileError,
                           "outside the vocabulary"),
    "attention_mask-shape": (lambda i: {**i, "attention_mask": i["attention_mask"][:, 1:], "max_new_tokens": 1},
                             CompileError, "attention_mask"),
    "attention_mask-right-padding": (lambda i: {**i, "attention_mask": torch.cat(
        [i["attention_mask"][:, :-1], torch.zeros_like(i["attention_mask"][:, -1:])], 1), "max_new_tokens": 1},
        CompileError, "batch row 0"),
    "prompt-longer-than-max-positions": (lambda i: {**_long_prompt(i, 300), "max_new_tokens": 1}, CompileError,
                                         "300 tokens, more than the model's max_position_embeddings 256"),
}


@pytest.mark.parametrize("case", sorted(API_CASES))
def test_generate_refuses_what_it_cannot_honour(zoo, case):
    _, _, cm, inputs = zoo
    kwargs, exc, culprit = API_CASES[case]
    kwargs = kwargs(dict(inputs)) if callable(kwargs) else {**inputs, **kwargs}
    with pytest.raises(exc) as e:
        cm.generate(**kwargs)
    assert culprit in str(e.value) and isinstance(e.value, VSkipError)


@pytest.mark.parametrize("kwargs, culprit", [
    (dict(foo=1), "foo"),
    (dict(logits_to_keep=-1), "logits_to_keep"),
    (dict(logits_to_keep="all"), "logits_to_keep"),
])
def test_forward_call_refuses_bad_arguments(zoo, kwargs, culprit):
    _, _, cm, inputs = zoo
    with pytest.raises(CompileError, match=culprit):
        cm(**inputs, **kwargs)


def test_forward_call_refuses_a_prompt_longer_than_max_positions(zoo):
    _, _, cm, inputs = zoo
    with pytest.raises(CompileError, match="max_position_embeddings 256"):
        cm(**_long_prompt(inputs, 257))


@pytest.mark.parametrize("kwargs, exc, culprit", [
    (dict(plan="plan.json"), PlanError, "plan must be a SkipPlan"),
    (dict(plan=SkipPlan.full(3)), PlanError, "plan has 3 layers but the model has 8"),
    (dict(plan=SkipPlan.full(8).with_model("LlavaForConditionalGeneration", {})), PlanError, "made for architecture"),
    (dict(backend="nope"), CompileError, "unknown backend 'nope'"),
    (dict(cache_size=0), CompileError, "cache_size"),
    (dict(decode_bucket=0), CompileError, "decode_bucket"),
])
def test_compile_refuses_bad_arguments(zoo, kwargs, exc, culprit):
    import vskip_compile

    model = zoo[0]
    kwargs = {"plan": SkipPlan.full(8), "backend": "eager", **kwargs}
    with pytest.raises(exc, match=culprit):
        vskip_compile.compile(model, **kwargs)


def test_left_padded_batch_after_a_single_row_call(zoo):
    """Issue 14's crash: a left-padded batch on the CompiledVLM that ran a single row before
    raised FailOnRecompileLimitHit (DeepStack slices of padded rows non-contiguous). Every row
    must get the tokens it gets alone."""
    model, processor, _, _ = zoo
    import vskip_compile

    cm = vskip_compile.compile(model, SkipPlan.full(8), backend="eager")
    (img1, q1, _), (img2, q2, _) = easyvqa.test_set()[:2]
    single = cm.generate(**easyvqa.build_inputs(processor, img1, q1), max_new_tokens=4)
    batch = easyvqa.build_batch(processor, [img1, img2], [q1, q2 + " please tell me"])
    out = cm.generate(**batch, max_new_tokens=4)
    assert out.shape[0] == 2
    pad = int((batch["attention_mask"][0] == 0).sum())
    row0 = out[0, pad:]
    assert row0[: single.shape[1]].tolist() == single[0].tolist()
    alone = cm.generate(**easyvqa.build_inputs(processor, img2, q2 + " please tell me"), max_new_tokens=4)
    assert out[1].tolist()[: alone.shape[1]] == alone[0].tolist()


# -- CLI numbers -----------------------------------------------------------------------------------
P = ["--preset", "qwen3-vl-8b"]
CLI_NUMBER_CASES = {
    "flops-visual-0-text-0": (["flops", *P, "--visual", "0", "--text", "0"], ["--visual", "--text"]),
    "flops-visual-1e20": (["flops", *P, "--visual", str(10**20), "--text", "1"], ["argument --visual"]),
    "flops-visual-over-context": (["flops", *P, "--visual", "300000", "--text", "0"], ["max_position_embeddings 262144"]),
    "flops-llava-over-context": (["flops", "--preset", "llava-1.5-7b", "--visual", "4096", "--text", "1"],
                                 ["max_position_embeddings 4096"]),
    "flops-visual-negative": (["flops", *P, "--visual", "-1", "--text", "1"], ["argument --visual"]),
    "flops-visual-word": (["flops", *P, "--visual", "many", "--text", "1"], ["argument --visual", "'many'"]),
    "flops-text-float": (["flops", *P, "--visual", "1", "--text", "1e3"], ["argument --text"]),
    "flops-prefix-over-text": (["flops", *P, "--visual", "1", "--text", "2", "--prefix", "5"], ["--prefix 5"]),
    "flops-prefix-negative": (["flops", *P, "--visual", "1", "--text", "2", "--prefix", "-5"], ["argument --prefix"]),
    "demo-n-0": (["demo", "-n", "0"], ["argument -n"]),
    "demo-n-negative": (["demo", "-n", "-1"], ["argument -n"]),
    "demo-n-huge": (["demo", "-n", "1000"], ["argument -n", "at most 100"]),
    "demo-n-word": (["demo", "-n", "x"], ["argument -n"]),
    "calibrate-samples-0": (["calibrate", "--budget", "0.4", "--samples", "0"], ["argument --samples"]),
    "calibrate-budget-0": (["calibrate", "--budget", "0"], ["argument --budget"]),
    "calibrate-budget-1.5": (["calibrate", "--budget", "1.5"], ["argument --budget"]),
    "calibrate-batch-size-0": (["calibrate", "--budget", "0.4", "--batch-size", "0"], ["argument --batch-size"]),
    "calibrate-workers-0": (["calibrate", "--budget", "0.4", "--workers", "0"], ["argument --workers"]),
    "calibrate-fidelity-1": (["calibrate", "--budget", "0.4", "--fidelity", "1"], ["argument --fidelity"]),
    "eval-limit-0": (["eval", "--limit", "0"], ["argument --limit"]),
    "eval-images-per-batch-0": (["eval", "--images-per-batch", "0"], ["argument --images-per-batch"]),
    "eval-budgets-nan": (["eval", "--budgets", "nan"], ["argument --budgets"]),
    "eval-time-repeats-0": (["eval", "--time-repeats", "0"], ["argument --time-repeats"]),
    "eval-workers-negative": (["eval", "--workers", "-2"], ["argument --workers"]),
    "bench-visual-0": (["bench", "--visual", "0"], ["argument --visual"]),
    "bench-visual-huge": (["bench", "--visual", str(10**9)], ["argument --visual"]),
    "bench-layers-0": (["bench", "--layers", "0"], ["argument --layers"]),
    "bench-repeats-0": (["bench", "--repeats", "0"], ["argument --repeats"]),
    "bench-ops-unknown": (["bench", "--ops", "skip"], ["argument --ops"]),
    "export-max-cache-len-0": (["export", "--model", "m", "--plan", "p", "--prompt", "x", "--out", "o",
                                "--max-cache-len", "0"], ["argument --max-cache-len"]),
    "run-max-new-tokens-0": (["run", "--engine", "e", "--prompt", "x", "--max-new-tokens", "0"],
                             ["argument --max-new-tokens"]),
    "run-max-new-tokens-negative": (["run", "--engine", "e", "--prompt", "x", "--max-new-tokens", "-1"],
                                    ["argument --max-new-tokens"]),
    "serve-port-0": (["serve", "--model", "m", "--plan", "p", "--port", "0"], ["argument --port"]),
    "serve-port-70000": (["serve", "--model", "m", "--plan", "p", "--port", "70000"], ["argument --port"]),
    "serve-replicas-0": (["serve", "--model", "m", "--plan", "p", "--replicas", "0"], ["argument --replicas"]),
    "serve-replica-cpus-0": (["serve", "--model", "m", "--plan", "p", "--replica-cpus", "0"], ["argument --replica-cpus"]),
    "serve-replica-cpus-nan": (["serve", "--model", "m", "--plan", "p", "--replica-cpus", "nan"],
                               ["argument --replica-cpus"]),
    "serve-batch-wait-negative": (["serve", "--model", "m", "--plan", "p", "--batch-wait-ms", "-1"],
                                  ["argument --batch-wait-ms"]),
    "serve-max-tokens-0": (["serve", "--model", "m", "--plan", "p", "--max-tokens", "0"], ["argument --max-tokens"]),
    "serve-max-image-bytes-0": (["serve", "--model", "m", "--plan", "p", "--max-image-bytes", "0"],
                                ["argument --max-image-bytes"]),
    "plan-validate-layers-0": (["plan", "validate", PRESET20, "--layers", "0"], ["argument --layers"]),
    "plan-import-layers-negative": (["plan", "import", "p.json", "--layers", "-3"], ["argument --layers"]),
}


@pytest.mark.parametrize("case", sorted(CLI_NUMBER_CASES))
def test_cli_numbers_refused_naming_the_flag(capsys, case):
    argv, culprits = CLI_NUMBER_CASES[case]
    assert_user_error(*cli(capsys, *argv), *culprits)


@pytest.mark.parametrize("config, culprit", [
    ([1, 2], "a config.json is a JSON object"),
    ({"hidden_size": 64}, "config has no"),
    ({"model_type": "llama", "hidden_size": "big"}, "hidden_size"),
])
def test_cli_flops_config_file_refused_naming_it(tmp_path, capsys, config, culprit):
    (tmp_path / "config.json").write_text(json.dumps(config))
    code, err = cli(capsys, "flops", "--config", str(tmp_path / "config.json"), "--visual", "1", "--text", "1")
    assert_user_error(code, err, culprit, "config.json")


# -- the CLI's two kinds of failure ---------------------------------------------------------------
def test_internal_error_prints_the_traceback_and_exits_1(monkeypatch, capsys):
    import vskip_compile.cli as c
    import vskip_compile.cli.passes as cli_passes

    monkeypatch.setattr(cli_passes, "run_passes", lambda args: {}["boom"])
    code = c.main(["passes"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" in err and "KeyError: 'boom'" in err and "internal error" in err


@pytest.mark.parametrize("module, run, argv", [
    ("vskip_compile.cli.passes", "run_passes", ["passes"]),
    ("vskip_compile.export.cli", "run_export", ["export", "--model", "m", "--plan", "p.json", "--prompt", "q", "--out", "o"]),
])
def test_a_pass_refusing_its_rewrite_is_internal_exit_1(monkeypatch, capsys, module, run, argv):
    """SkipPassError is a VSkipError, but no input of the user's is wrong: traceback, exit 1."""
    import importlib

    import vskip_compile.cli as c
    from vskip_compile.passes.base import SkipPassError

    def refuse(args):
        raise SkipPassError("layer 0: aten.flip has no row-wise rule")

    monkeypatch.setattr(importlib.import_module(module), run, refuse)
    code = c.main(argv)
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" in err and "SkipPassError" in err and "internal error" in err


_INTERNAL = ("import sys, vskip_compile.cli as c, vskip_compile.cli.passes as p; p.run_passes = lambda a: {}['boom']; "
             "sys.exit(c.main(['passes']))")


@pytest.mark.parametrize("argv, code, culprit", [
    (["-m", "vskip_compile", "flops", "--preset", "qwen3-vl-8b", "--visual", "0", "--text", "0"], 2, "--visual"),
    (["-m", "vskip_compile", "plan", "show", "."], 2, "is a directory"),
    (["-m", "vskip_compile", "demo", "-n", "-1"], 2, "argument -n"),
    (["-c", _INTERNAL], 1, "KeyError: 'boom'"),
])
def test_real_exit_codes(argv, code, culprit):
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == code and culprit in done.stderr, done.stderr
    assert ("Traceback" in done.stderr) == (code == 1)


# -- HTTP bodies -----------------------------------------------------------------------------------
def _png_url() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


URL = _png_url()
IMAGE = {"type": "image_url", "image_url": {"url": URL}}
TEXT = {"type": "text", "text": "what shape?"}


def _chat(**kw):
    return {"messages": [{"role": "user", "content": [IMAGE, TEXT]}], **kw}


def _msg(content, role="user", **kw):
    return {"messages": [{"role": role, "content": content, **kw}]}


HTTP_CASES = {
    "not-json": (b"{oops", 400, "body is not JSON"),
    "body-list": ([], 400, "body must be a JSON object"),
    "unknown-field": (_chat(logit_bias={"1": 2}), 400, "logit_bias"),
    "top_p-over-1": (_chat(top_p=1.5), 400, "top_p must be"),
    "stream-string": (_chat(stream="false"), 400, "stream must be a boolean"),
    "n-2": (_chat(n=2), 400, "n must be"),
    "n-true": (_chat(n=True), 400, "n must be an integer"),
    "temperature-negative": (_chat(temperature=-0.5), 400, "temperature must be"),
    "temperature-false": (_chat(temperature=False), 400, "temperature must be a number"),
    "temperature-string": (_chat(temperature="0"), 400, "temperature must be a number"),
    "model-int": (_chat(model=3), 400, "model must be a string"),
    "user-int": (_chat(user=3), 400, "user must be a string"),
    "max_tokens-0": (_chat(max_tokens=0), 400, "max_tokens must be in 1..64"),
    "max_tokens-huge": (_chat(max_tokens=10**6), 400, "max_tokens must be in 1..64"),
    "max_tokens-bool": (_chat(max_tokens=True), 400, "max_tokens must be an integer"),
    "max_tokens-string": (_chat(max_tokens="4"), 400, "max_tokens must be an integer"),
    "max_tokens-float": (_chat(max_tokens=4.0), 400, "max_tokens must be an integer"),
    "max_completion_tokens-0": (_chat(max_completion_tokens=0), 400, "max_completion_tokens"),
    "max_tokens-disagree": (_chat(max_tokens=4, max_completion_tokens=5), 400, "max_tokens and max_completion_tokens"),
    "messages-missing": ({}, 400, "messages"),
    "messages-empty": ({"messages": []}, 400, "messages"),
    "message-not-object": ({"messages": ["hi"]}, 400, "messages[0]"),
    "role-unknown": (_msg([IMAGE, TEXT], role="robot"), 400, "messages[0]: role"),
    "message-unknown-field": (_msg([IMAGE, TEXT], name="bob"), 400, "messages[0]: unknown fields ['name']"),
    "content-int": (_msg(3), 400, "messages[0]: content"),
    "content-empty-list": (_msg([]), 400, "messages[0]: content"),
    "part-not-object": (_msg([IMAGE, "hi"]), 400, "messages[0].content[1]"),
    "part-type-unknown": (_msg([IMAGE, {"type": "audio"}]), 400, "messages[0].content[1]: unsupported part type 'audio'"),
    "text-part-extra-field": (_msg([IMAGE, {**TEXT, "lang": "en"}]), 400, "messages[0].content[1]: unknown fields"),
    "text-part-int": (_msg([IMAGE, {"type": "text", "text": 3}]), 400, "messages[0].content[1]: text must be a string"),
    "text-too-long": (_msg([IMAGE, {"type": "text", "text": "x" * 5000}]), 400, "longer than 4096"),
    "image-http-url": (_msg([{"type": "image_url", "image_url": {"url": "http://x/cat.png"}}, TEXT]), 400,
                       "messages[0].content[0]: only base64 data URLs"),
    "image-url-not-string": (_msg([{"type": "image_url", "image_url": {"url": 3}}, TEXT]), 400,
                             "messages[0].content[0]: image_url.url must be a string"),
    "image-url-missing": (_msg([{"type": "image_url", "image_url": {}}, TEXT]), 400, "messages[0].content[0]: image_url"),
    "image-bad-base64": (_msg([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}, TEXT]), 400,
                         "invalid base64"),
    "image-not-an-image": (_msg([{"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + base64.b64encode(b"not a png").decode()}}, TEXT]), 400, "cannot decode the image"),
    "image-not-image-mime": (_msg([{"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}, TEXT]),
                             400, "expected data:image/"),
    "two-images": (_msg([IMAGE, IMAGE, TEXT]), 400, "more than 1 image"),
    "no-image": (_msg([TEXT]), 400, "no image"),
    "last-message-assistant": ({"messages": [{"role": "user", "content": [IMAGE, TEXT]},
                                             {"role": "assistant", "content": "a circle"}]}, 400, "last message"),
    "body-too-large": (b" " * (8 * 1024 * 1024 + 1), 413, "request body larger than"),
}


@pytest.mark.parametrize("case", sorted(HTTP_CASES))
def test_http_body_refused_naming_the_field(case):
    body, status, culprit = HTTP_CASES[case]
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(RequestError) as e:
        parse_chat(raw, Limits())
    assert e.value.status == status and culprit in e.value.message and isinstance(e.value, VSkipError)


def test_http_good_body_still_parses():
    chat = parse_chat(json.dumps(_chat(max_tokens=4, temperature=0, n=1, stream=False, user="u")).encode(), Limits())
    assert chat.max_tokens == 4 and len(chat.images) == 1


# -- every user-facing error class is a VSkipError -------------------------------------------------
def test_every_error_class_is_a_vskip_error_keeping_its_old_base():
    from vskip_compile.archs.base import AdapterError
    from vskip_compile.backend import BackendError
    from vskip_compile.cli.common import UsageError
    from vskip_compile.evaluate.harness import EvalError
    from vskip_compile.export.runner import MissingGraphError
    from vskip_compile.export.weights import WeightsError
    from vskip_compile.flops import DimsError
    from vskip_compile.layout import LayoutError
    from vskip_compile.lmms.generator import GenerationError
    from vskip_compile.passes.base import SkipPassError
    from vskip_compile.reference import ReferenceCallError

    value_errors = [PlanError, LayoutError, CompileError, BackendError, AdapterError, DimsError, UsageError,
                    RequestError, GenerationError, WeightsError, SkipPassError, ModelDirError, MissingGraphError]
    runtime_errors = [EvalError, EngineError, ManifestError, ReferenceCallError]
    for cls in value_errors:
        assert issubclass(cls, VSkipError) and issubclass(cls, ValueError), cls
    for cls in runtime_errors:
        assert issubclass(cls, VSkipError) and issubclass(cls, RuntimeError), cls
