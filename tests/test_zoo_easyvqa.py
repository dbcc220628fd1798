"""The easy-VQA Qwen3-VL shipped in vskip_compile/zoo/easyvqa-qwen3vl (offline, CPU, fast)."""

from __future__ import annotations

import json

import pytest
import torch

from vskip_compile.zoo import easyvqa

MAX_BYTES = 25 * 1024 * 1024
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def _shipped() -> bool:
    return (easyvqa.MODEL_DIR / "config.json").exists() and (easyvqa.MODEL_DIR / "model.safetensors").exists()


needs_weights = pytest.mark.skipif(not _shipped(), reason="trained easy-VQA weights not shipped yet")


@pytest.fixture(scope="module")
def loaded():
    torch.manual_seed(0)
    return easyvqa.load()


def test_splits():
    test = easyvqa.test_set()
    assert len(test) == 9673
    path, question, answer = test[0]
    assert path.endswith(".png") and question.endswith("?") and answer
    assert len(easyvqa.train_set()) == 38575


@needs_weights
def test_directory_small_and_pickle_free():
    files = [p for p in easyvqa.MODEL_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= MAX_BYTES
    assert not [p.name for p in files if p.suffix in PICKLE_SUFFIXES]
    names = {p.name for p in files}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "processor_config.json", "metrics.json"} <= names


@needs_weights
def test_load_offline(loaded, monkeypatch):
    model, processor = loaded
    from transformers import Qwen3VLForConditionalGeneration

    assert isinstance(model, Qwen3VLForConditionalGeneration)
    assert not model.training
    cfg = model.config
    assert cfg.text_config.num_hidden_layers == 8 and cfg.text_config.hidden_size == 128
    assert len(cfg.vision_config.deepstack_visual_indexes) == 3
    assert cfg.image_token_id == processor.image_token_id < cfg.text_config.vocab_size
    # a second load with the hub switched off works from the local directory alone
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model2, _ = easyvqa.load()
    sd1, sd2 = model.state_dict(), model2.state_dict()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)


@needs_weights
def test_build_inputs_shapes(loaded):
    model, processor = loaded
    path, question, _ = easyvqa.test_set()[0]
    inputs = easyvqa.build_inputs(processor, path, question)
    assert {"input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids"} <= set(inputs)
    assert inputs["input_ids"].shape[0] == 1
    n_visual = int((inputs["input_ids"] == processor.image_token_id).sum())
    assert n_visual == 64 == int(inputs["mm_token_type_ids"].sum())
    assert inputs["image_grid_thw"].tolist() == [[1, 16, 16]]
    # a PIL image gives the same inputs as its path
    from PIL import Image

    with Image.open(path) as im:
        again = easyvqa.build_inputs(processor, im, question)
    assert torch.equal(again["pixel_values"], inputs["pixel_values"])


@needs_weights
def test_generate_answers_first_ten(loaded):
    model, processor = loaded
    correct = 0
    for path, question, answer in easyvqa.test_set()[:10]:
        inputs = easyvqa.build_inputs(processor, path, question)
        out = model.generate(**inputs, max_new_tokens=easyvqa.MAX_NEW_TOKENS, do_sample=False)
        pred = easyvqa.parse_answer(processor, out[0, inputs["input_ids"].shape[1]:])
        correct += pred == answer
    assert correct >= 9


@needs_weights
def test_batched_evaluate_matches_single(loaded):
    """evaluate's batching (left padding, vision once per image) gives the single-sample answers."""
    model, processor = loaded
    samples = easyvqa.test_set()[:24]
    batched = easyvqa.predict(model, processor, [s[0] for s in samples], [s[1] for s in samples])
    single = []
    for path, question, _ in samples[:6]:
        inputs = easyvqa.build_inputs(processor, path, question)
        out = model.generate(**inputs, max_new_tokens=easyvqa.MAX_NEW_TOKENS, do_sample=False)
        single.append(easyvqa.parse_answer(processor, out[0, inputs["input_ids"].shape[1]:]))
    assert batched[:6] == single
    acc = easyvqa.evaluate(model, processor, samples, batch_size=12)
    assert acc >= 0.75


def _metrics() -> dict:
    return json.loads((easyvqa.MODEL_DIR / "metrics.json").read_text())


@needs_weights
def test_metrics_recorded():
    metrics = _metrics()
    assert metrics["test"]["n"] == 9673 and metrics["white"]["n"] == 9673
    assert metrics["white"]["white_images"] and not metrics["test"]["white_images"]
    assert "--eval" in metrics["test"]["command"] and "--white" in metrics["white"]["command"]
    assert 0.0 <= metrics["white"]["accuracy"] < metrics["test"]["accuracy"] <= 1.0
    assert metrics["targets"]["test_accuracy_met"] == (metrics["test"]["accuracy"] >= 0.97)


@needs_weights
def test_metrics_meet_targets_and_belong_to_the_shipped_weights():
    """Targets: >= 97% on the whole test split, >= 30 points lower with white images, measured
    on exactly the weights that ship (sha256), so the figures cannot go stale."""
    import hashlib

    metrics = _metrics()
    shipped = hashlib.sha256((easyvqa.MODEL_DIR / "model.safetensors").read_bytes()).hexdigest()
    assert metrics["weights_sha256"] == shipped
    assert metrics["test"]["accuracy"] >= 0.97
    assert metrics["drop_points"] >= 30


@needs_weights
def test_accuracy_and_white_drop_on_a_test_subset(loaded):
    """Re-measured here on the first 240 test questions (the whole split takes minutes): the
    shipped model answers >= 95% (whole split: 99.2%) and loses >= 25 points on white images
    (whole split: 39.2). Margins leave room for a 240-question sample, not for a broken model."""
    model, processor = loaded
    samples = easyvqa.test_set()[:240]
    acc = easyvqa.evaluate(model, processor, samples, batch_size=120)
    white = easyvqa.evaluate(model, processor, samples, white_images=True, batch_size=120)
    assert acc >= 0.95
    assert acc - white >= 0.25


def test_parse_answer_stops_at_eos():
    class _Tok:
        eos_token_id = 3

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(str(i) for i in ids)

    class _Proc:
        tokenizer = _Tok()

    assert easyvqa.parse_answer(_Proc(), torch.tensor([7, 3, 9])) == "7"
    assert easyvqa.parse_answer(_Proc(), [3]) == ""
