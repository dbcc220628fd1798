"""lmms-eval integration: the `vskip` model, the offline easyvqa task, and their agreement with
`vskip_compile.zoo.easyvqa` (the same predictions on the same first questions).

The model is the zoo's easy-VQA Qwen3-VL when its weights are shipped, else a random one of
the same architecture saved with the zoo's processor (predictions are then arbitrary words,
which makes "same predictions" a strict check). Tests that need lmms_eval (installed with
`pip install --no-deps lmms-eval==0.7.3` plus the `eval` extra) skip without it.
"""

from __future__ import annotations

import glob
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from vskip_compile import PlanError, SkipPlan, reference
from vskip_compile.lmms import TASKS_DIR
from vskip_compile.lmms.generator import GenerationError, VSkipGenerator, check_greedy, cut_at
from vskip_compile.lmms.tasks.easyvqa import utils as task
from vskip_compile.zoo import easyvqa

N_QUESTIONS = 3  # questions 0..2: prompt lengths 77, 79, 79 tokens -> two compiled layouts
PLAN_OPS = ("full", "skip_attn", "skip_ffn", "skip_both", "skip_both", "skip_attn", "skip_both", "full")


def _has_lmms_eval() -> bool:
    try:
        importlib.import_module("lmms_eval.api.model")
    except ImportError:
        return False
    return True


needs_lmms_eval = pytest.mark.skipif(not _has_lmms_eval(), reason="lmms_eval is not installed")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    if (easyvqa.MODEL_DIR / "model.safetensors").exists():
        return easyvqa.MODEL_DIR
    from transformers import GenerationConfig, Qwen3VLForConditionalGeneration

    from vskip_compile.zoo.train_easyvqa import build_config, make_processor

    out = tmp_path_factory.mktemp("random-easyvqa")
    processor = make_processor()
    tok = processor.tokenizer
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(build_config(tok)).eval()
    model.generation_config = GenerationConfig(do_sample=False, max_new_tokens=easyvqa.MAX_NEW_TOKENS,
                                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def full(model_dir) -> VSkipGenerator:
    """The unmodified model, reference backend (loads model and processor once)."""
    return VSkipGenerator(model_dir, backend="reference")


@pytest.fixture(scope="module")
def plan(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    SkipPlan.from_ops(PLAN_OPS, scope="prefix_through_visual").save(path)
    return path


@pytest.fixture(scope="module")
def reference_answers(full, plan) -> list[str]:
    """The eager oracle under the plan, one question at a time, through zoo.easyvqa.predict."""
    answers = []
    with reference.applied(full.model, SkipPlan.load(plan)):
        for path, question, _ in easyvqa.test_set()[:N_QUESTIONS]:
            answers += easyvqa.predict(full.model, full.processor, [path], [question])
    return answers


def _ask(gen: VSkipGenerator, n: int) -> list[str]:
    return [gen.answer(q, [easyvqa.open_image(p)], max_new_tokens=easyvqa.MAX_NEW_TOKENS).strip()
            for p, q, _ in easyvqa.test_set()[:n]]


# -- the task --------------------------------------------------------------------------------------
def test_task_files_ship_in_the_package():
    assert (TASKS_DIR / "easyvqa" / "easyvqa.yaml").is_file()
    from vskip_compile.lmms.models import AVAILABLE_MODELS

    assert AVAILABLE_MODELS == {"vskip": "VSkip"}
    out = subprocess.run([sys.executable, "-m", "vskip_compile.lmms"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(TASKS_DIR)


def test_yaml_loads_local_data_and_our_functions():
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    cfg = yaml.load((TASKS_DIR / "easyvqa" / "easyvqa.yaml").read_text(), Loader=Loader)
    assert cfg["task"] == "easyvqa" and cfg["dataset_path"] == "json"  # a local builder: no hub
    assert (TASKS_DIR / "easyvqa" / cfg["dataset_kwargs"]["data_files"]["test"]).is_file()
    assert cfg["generation_kwargs"]["max_new_tokens"] == easyvqa.MAX_NEW_TOKENS
    for key in ("process_docs", "doc_to_visual", "doc_to_text", "process_results"):
        module, name = cfg[key].rsplit(".", 1)
        assert getattr(importlib.import_module(module), name) is getattr(task, name)


def test_docs_are_the_zoo_test_split_in_order():
    datasets = pytest.importorskip("datasets")
    marker = datasets.Dataset.from_list([{"split": "test"}])
    docs = task.process_docs(marker)
    samples = easyvqa.test_set()
    assert len(docs) == len(samples) == 9673
    for i in (0, 1, 4321, 9672):
        assert (docs[i]["question_id"], docs[i]["image_path"], docs[i]["question"], docs[i]["answer"]) == (i, *samples[i])
    assert task.doc_to_text(docs[0]) == samples[0][1]
    assert task.process_results(docs[0], [f" {samples[0][2]}\n"]) == {"exact_match": 1.0}
    assert task.process_results(docs[0], ["no"]) == {"exact_match": 0.0}
    with pytest.raises(ValueError, match="unknown easy-VQA split 'dev'"):
        task.load_docs("dev")


# -- the generator (no lmms_eval needed) -----------------------------------------------------------
def test_prompt_is_the_zoo_prompt(full):
    for path, question, _ in easyvqa.test_set()[:2]:
        got = full.inputs(question, [easyvqa.open_image(path)])
        want = easyvqa.build_inputs(full.processor, path, question)
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_full_model_answers_equal_zoo_evaluate(full):
    """No plan: the same answers as zoo.easyvqa.predict (batched, as `evaluate` runs it), and
    the same accuracy as zoo.easyvqa.evaluate."""
    n = 6
    samples = easyvqa.test_set()[:n]
    got = _ask(full, n)
    assert got == easyvqa.predict(full.model, full.processor, [s[0] for s in samples], [s[1] for s in samples])
    accuracy = sum(a == s[2] for a, s in zip(got, samples)) / n
    assert accuracy == easyvqa.evaluate(full.model, full.processor, samples)


def test_compiled_answers_equal_reference(full, plan, reference_answers):
    compiled = VSkipGenerator(None, plan=plan, backend="eager", model=full.model, processor=full.processor)
    assert compiled.plan.scope == "prefix_through_visual"
    assert _ask(compiled, N_QUESTIONS) == reference_answers


def test_refusals(full, model_dir):
    with pytest.raises(ValueError, match="unknown backend 'vllm'"):
        VSkipGenerator(model_dir, backend="vllm", model=full.model, processor=full.processor)
    with pytest.raises(ValueError, match="needs backend=onnx"):
        VSkipGenerator(model_dir, backend="eager", engine="e/", model=full.model, processor=full.processor)
    with pytest.raises(PlanError, match="plan has 4 layers but the model has 8"):
        VSkipGenerator(model_dir, plan=SkipPlan.full(4), model=full.model, processor=full.processor)
    with pytest.raises(GenerationError, match="do_sample=True"):
        check_greedy({"do_sample": True, "temperature": 0.7})
    with pytest.raises(GenerationError, match="num_beams=4"):
        check_greedy({"num_beams": 4})
    check_greedy({"do_sample": False, "temperature": 0, "top_p": 1.0, "num_beams": 1})
    assert cut_at("yes\n\nno", ["\n\n", ""]) == "yes"


@pytest.mark.slow
def test_onnx_backend_equals_reference(full, plan, reference_answers, tmp_path):
    """Questions 1 and 2 share one layout: one engine export serves both."""
    pytest.importorskip("onnxruntime")
    onnx = VSkipGenerator(None, plan=plan, backend="onnx", engine=tmp_path, model=full.model, processor=full.processor)
    got = [onnx.answer(q, [easyvqa.open_image(p)], max_new_tokens=easyvqa.MAX_NEW_TOKENS).strip()
           for p, q, _ in easyvqa.test_set()[1:N_QUESTIONS]]
    assert got == reference_answers[1:]
    assert json.loads((tmp_path / "manifest.json").read_text())["plan"]["scope"] == "prefix_through_visual"


# -- lmms-eval ------------------------------------------------------------------------------------
def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "LMMS_EVAL_PLUGINS": "vskip_compile.lmms", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets")}


@needs_lmms_eval
def test_plugin_gives_the_model_class(tmp_path):
    code = "from lmms_eval.models import get_model; c = get_model('vskip'); print(c.__module__ + '.' + c.__name__)"
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=_env(tmp_path), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "vskip_compile.lmms.models.vskip.VSkip"


@needs_lmms_eval
def test_model_refusals(model_dir):
    from vskip_compile.lmms.models.vskip import VSkip

    with pytest.raises(ValueError, match="one at a time"):
        VSkip(pretrained=str(model_dir), batch_size=4)
    model = VSkip(pretrained=str(model_dir), backend="reference")
    with pytest.raises(NotImplementedError, match="loglikelihood"):
        model.loglikelihood([])


@needs_lmms_eval
def test_cli_easyvqa_predictions_equal_reference(model_dir, plan, reference_answers, tmp_path):
    """`python -m lmms_eval --model vskip ... --tasks easyvqa --include_path ...` offline: its
    per-question answers are the oracle's, its accuracy their exact-match mean."""
    cmd = [
        sys.executable, "-m", "lmms_eval", "--model", "vskip",
        "--model_args", f"pretrained={model_dir},plan={plan},backend=eager,threads=1",
        "--tasks", "easyvqa", "--include_path", str(TASKS_DIR), "--limit", str(N_QUESTIONS),
        "--output_path", str(tmp_path / "out"), "--log_samples",
    ]
    out = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    (samples_file,) = glob.glob(str(tmp_path / "out" / "**" / "*_samples_easyvqa.jsonl"), recursive=True)
    rows = sorted((json.loads(line) for line in Path(samples_file).read_text().splitlines()), key=lambda r: r["doc_id"])
    assert [r["doc_id"] for r in rows] == list(range(N_QUESTIONS))
    assert [r["filtered_resps"].strip() for r in rows] == reference_answers
    truth = [a for _, _, a in easyvqa.test_set()[:N_QUESTIONS]]
    (results_file,) = glob.glob(str(tmp_path / "out" / "**" / "*_results.json"), recursive=True)
    accuracy = json.loads(Path(results_file).read_text())["results"]["easyvqa"]["exact_match,none"]
    assert accuracy == pytest.approx(sum(p == t for p, t in zip(reference_answers, truth)) / N_QUESTIONS)
