"""Engine directories: the manifest, refusals that name the file, no pickles, no torch at
load time, execution providers, and the GPU paths (skipped without CUDA / torch-tensorrt)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from vskip_compile import PlanError, SkipPlan
from vskip_compile.archs import adapter_for
from vskip_compile.testing.tiny import tiny_inputs
from vskip_compile.export import EngineError, ManifestError, OnnxRunner, export_onnx, export_tensorrt
from vskip_compile.export import jobs as jb
from vskip_compile.export import manifest as mf
from vskip_compile.export.prefill import symbol_ranges
from vskip_compile.export.tensorrt import shape_ranges
from vskip_compile.export.weights import read_header
from vskip_compile.plan import config_hash

# The tiny LLaVA engine of test_export_onnx (exported once per process; pytest puts tests/ on
# sys.path, so this is the module pytest itself imports).
from test_export_onnx import MAX_SEQ_LEN, PLANS, exported_engine  # noqa: E402

PLAN = PLANS[0]


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    """(model, inputs, engine dir) of tiny LLaVA under PLAN; tests work on copies."""
    model, inputs, plan, out = exported_engine(tiny_model, tmp_path_factory, "llava", 0)
    assert plan == PLAN
    return model, inputs, out


@pytest.fixture
def engine(exported, tmp_path):
    """A fresh copy of the exported engine directory."""
    _, _, out = exported
    copy = tmp_path / "engine"
    shutil.copytree(out, copy)
    return copy


def test_manifest_records_plan_lengths_model_versions_and_every_file(exported):
    model, _, out = exported
    m = json.loads((out / "manifest.json").read_text())
    assert m["format"] == "vskip-engine" and m["format_version"] == 2
    assert m["plan"]["ops"] == list(PLAN.ops) and m["plan"]["name"] == PLAN.name
    adapter = adapter_for(model)
    assert m["model"]["architecture"] == "LlavaForConditionalGeneration"
    assert m["model"]["config_hash"] == config_hash(adapter.text_config(model))
    prefill = m["graphs"]["prefill"]["dynamic"]  # the one prefill graph, for every layout
    assert list(m["graphs"]["prefill"]) == ["dynamic"] and prefill["file"] == "prefill-dynamic.onnx"
    assert prefill["ranges"] == {"batch": [1, 64], "seq_len": [2, MAX_SEQ_LEN], "kept": [2, MAX_SEQ_LEN]}
    assert prefill["dynamic_axes"]["kept_index"] == {"0": "batch", "1": "kept"}
    assert (m["runtime"]["min_seq_len"], m["runtime"]["max_seq_len"]) == (2, MAX_SEQ_LEN)
    assert m["runtime"]["max_cache_len"] == 320  # max_seq_len + 256, rounded up to 64
    assert {"torch", "transformers", "onnx", "opset"} <= set(m["versions"]) and m["versions"]["opset"] >= 18
    on_disk = sorted(p.name for p in out.iterdir() if p.name != "manifest.json")
    assert sorted(m["files"]) == on_disk
    for name, info in m["files"].items():
        assert info["sha256"] == mf.sha256_file(out / name)


def test_no_pickles_only_json_safetensors_and_onnx(exported):
    _, _, out = exported
    for path in sorted(out.iterdir()):
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            base, header = read_header(path)
            end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
            assert base + end == path.stat().st_size
        elif path.suffix == ".onnx":
            onnx.load(str(path), load_external_data=False)
        else:
            pytest.fail(f"unexpected file in an engine directory: {path.name}")
        assert not path.read_bytes()[:2] == b"\x80\x04", f"{path.name} looks like a pickle"


# -- refusals, each naming the file ----------------------------------------------------------------
def test_corrupt_weights_refused(engine):
    path = engine / "weights-000.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"weights-000\.safetensors: modified or corrupt: sha256"):
        OnnxRunner(engine)


def test_truncated_graph_refused(engine):
    path = engine / "decode-b1.onnx"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ManifestError, match=r"decode-b1\.onnx: modified or truncated"):
        OnnxRunner(engine)


def test_missing_file_refused(engine):
    (engine / "vision-image3x16x16.onnx").unlink()
    with pytest.raises(ManifestError, match=r"vision-image3x16x16\.onnx: missing"):
        OnnxRunner(engine)


def test_swapped_graph_refused_by_hash(engine):
    shutil.copyfile(engine / "decode-b1.onnx", engine / "prefill-dynamic.onnx")
    with pytest.raises(ManifestError, match=r"prefill-dynamic\.onnx: modified"):
        OnnxRunner(engine)


def test_swapped_graph_refused_by_metadata_even_with_a_rehashed_manifest(engine, exported):
    """Someone swaps a graph and regenerates the hashes: the graph's own stamp still disagrees."""
    model, inputs, _ = exported
    shutil.copyfile(engine / "decode-b1.onnx", engine / "prefill-dynamic.onnx")
    body = json.loads((engine / "manifest.json").read_text())
    for key in ("format", "format_version", "files"):
        body.pop(key)
    mf.write_manifest(engine, body)
    with pytest.raises(ManifestError, match=r"prefill-dynamic\.onnx: graph metadata vskip.role='decode'"):
        OnnxRunner(engine).generate(**inputs, max_new_tokens=2)


def test_missing_and_corrupt_manifest_refused(engine):
    (engine / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match=r"manifest\.json: corrupt, not JSON"):
        OnnxRunner(engine)
    (engine / "manifest.json").unlink()
    with pytest.raises(ManifestError, match=r"manifest\.json: missing"):
        OnnxRunner(engine)


def test_other_format_version_refused(engine):
    m = json.loads((engine / "manifest.json").read_text())
    m["format_version"] = 99
    (engine / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match=r"manifest\.json: engine format version 99, this build reads version 2"):
        OnnxRunner(engine)


def test_manifest_of_another_model_refused(engine, tmp_path):
    with pytest.raises(ManifestError, match=r"manifest\.json: engine is for another model: config_hash"):
        OnnxRunner(engine, expect_model={"config_hash": "0123456789abcdef"})
    # Another engine's manifest dropped into this directory: its files do not match.
    other = json.loads((engine / "manifest.json").read_text())
    other["files"]["weights-000.safetensors"]["sha256"] = "0" * 64
    (engine / "manifest.json").write_text(json.dumps(other))
    with pytest.raises(ManifestError, match=r"weights-000\.safetensors: modified or corrupt"):
        OnnxRunner(engine)


def test_export_into_an_engine_of_another_model_or_plan_refused(engine, tiny_model):
    qwen = tiny_model("qwen3_vl")
    with pytest.raises(ManifestError, match=r"engine is for another model: architecture"):
        export_onnx(qwen, SkipPlan.full(4), tiny_inputs(qwen, "qwen3_vl"), engine)
    llava = tiny_model("llava")
    with pytest.raises(PlanError, match="one plan per engine directory"):
        export_onnx(llava, SkipPlan.full(4), tiny_inputs(llava, "llava"), engine)


def test_unavailable_execution_provider_refused(engine):
    with pytest.raises(EngineError, match="execution provider NoSuchExecutionProvider is not available here"):
        OnnxRunner(engine, providers=["NoSuchExecutionProvider"])


# -- the runner needs only onnxruntime and numpy ----------------------------------------------------
_NO_TORCH = """
import sys, numpy as np
sys.modules["torch"] = None          # any import of torch or transformers now fails
sys.modules["transformers"] = None
from vskip_compile.export import OnnxRunner
inputs = dict(np.load(sys.argv[2]))
print(OnnxRunner(sys.argv[1]).generate(**inputs, max_new_tokens=4).tolist())
"""


def test_runner_loads_and_generates_without_torch(exported, tmp_path):
    _, inputs, out = exported
    npz = tmp_path / "inputs.npz"
    np.savez(npz, **{k: v.numpy() for k, v in inputs.items()})
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", _NO_TORCH, str(out), str(npz)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == OnnxRunner(out).generate(**inputs, max_new_tokens=4).tolist()


# -- GPU paths: not run without CUDA ---------------------------------------------------------------
def test_onnx_runner_on_cuda_provider(exported):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider here")
    _, inputs, out = exported
    cpu = OnnxRunner(out).generate(**inputs, max_new_tokens=4)
    gpu = OnnxRunner(out, providers=["CUDAExecutionProvider", "CPUExecutionProvider"]).generate(**inputs, max_new_tokens=4)
    np.testing.assert_array_equal(gpu, cpu)


def test_export_tensorrt_writes_engines_and_a_verified_manifest(tiny_model, tmp_path):
    pytest.importorskip("torch_tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = tiny_model("llava").cuda()
    try:
        out = export_tensorrt(model, PLAN, tiny_inputs(model, "llava"), tmp_path / "trt", max_seq_len=MAX_SEQ_LEN)
        m = mf.verify(out)
        assert {g["format"] for role in m["graphs"].values() for g in role.values()} == {"tensorrt"}
        assert m["graphs"]["prefill"]["dynamic"]["ranges"]["seq_len"] == [2, MAX_SEQ_LEN]
        with pytest.raises(EngineError, match="OnnxRunner loads ONNX engines"):
            OnnxRunner(out)
    finally:
        model.cpu()


# -- TensorRT's optimization profile, checked on CPU (torch-tensorrt not needed) -------------------
@pytest.fixture(scope="module")
def prefill_job(exported):
    """The polymorphic prefill job of tiny LLaVA under PLAN, as both exporters get it."""
    model, inputs, _ = exported
    adapter = adapter_for(model)
    with torch.no_grad():
        example = adapter.prefill_inputs(model, **inputs)
    return jb._prefill_job(model, adapter, PLAN, example, MAX_SEQ_LEN)


def test_prefill_program_is_symbolic_in_batch_seq_len_and_kept_with_the_stated_ranges(prefill_job):
    axes = {name: {int(a): sym for a, sym in ax.items()} for name, ax in prefill_job.entry["dynamic_axes"].items()}
    want = {"batch": (1, 64), "seq_len": (2, MAX_SEQ_LEN), "kept": (2, MAX_SEQ_LEN)}
    assert symbol_ranges(prefill_job.module, axes, prefill_job.input_names) == want
    assert {k: tuple(v) for k, v in prefill_job.entry["ranges"].items()} == want


def test_tensorrt_profile_spans_the_ranges_and_the_program_runs_at_its_corners(prefill_job, exported):
    """shape_ranges: S and K from 2 to max_seq_len, the batch up to the largest decode batch,
    opt at the example (batch 2, S = 23, K = 7 kept text rows); the program itself runs at
    the profile's min and max shapes (so TensorRT gets a profile the graph accepts)."""
    model, _, _ = exported
    ranges = {r.name: r for r in shape_ranges(prefill_job, max_batch=3)}
    assert list(ranges) == prefill_job.input_names
    assert (ranges["inputs_embeds"].min, ranges["inputs_embeds"].opt, ranges["inputs_embeds"].max) == (
        (1, 2, 64), (2, 23, 64), (3, MAX_SEQ_LEN, 64))
    assert (ranges["kept_index"].min, ranges["kept_index"].opt, ranges["kept_index"].max) == (
        (1, 2), (2, 7), (3, MAX_SEQ_LEN))
    assert ranges["position_ids"].max == ranges["attention_mask"].max == (3, MAX_SEQ_LEN)
    assert [ranges[n].dtype for n in ("position_ids", "kept_index", "kept_valid", "attention_mask")] == [
        torch.int64, torch.int64, torch.bool, torch.bool]
    rt_vocab = model.config.get_text_config().vocab_size
    for corner in ("min", "max"):
        shapes = {name: getattr(r, corner) for name, r in ranges.items()}
        batch, seq_len = shapes["attention_mask"]
        kept = shapes["kept_index"][1]
        args = (torch.randn(shapes["inputs_embeds"]) * 0.02,
                torch.arange(seq_len).expand(batch, seq_len).contiguous(),
                (torch.arange(kept) % seq_len).expand(batch, kept).contiguous(),
                torch.ones(batch, kept, dtype=torch.bool),
                torch.ones(batch, seq_len, dtype=torch.bool))
        with torch.no_grad():
            logits, k0, *_ = prefill_job.module.module()(*args)
        assert logits.shape == (batch, 1, rt_vocab) and k0.shape[0] == batch and k0.shape[2] == seq_len, corner


def test_tensorrt_profile_of_a_static_graph_is_one_shape(exported):
    model, _, _ = exported
    job = jb._decode_job(model, adapter_for(model), 2, 320, mrope=False)
    for r in shape_ranges(job, max_batch=8):
        assert r.min == r.opt == r.max == tuple(job.args[job.input_names.index(r.name)].shape)


def test_export_tensorrt_without_torch_tensorrt_says_what_to_install(exported, tmp_path):
    import importlib.util

    if importlib.util.find_spec("torch_tensorrt") is not None:
        pytest.skip("torch-tensorrt is installed here")
    model, inputs, _ = exported
    with pytest.raises(ImportError, match=r"pip install 'vskip-compile\[gpu\]'"):
        export_tensorrt(model, PLAN, inputs, tmp_path / "trt")
