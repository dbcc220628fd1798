"""ONNX engines: onnxruntime generate == the eager reference, skip-shaped prefill graphs,
host glue (M-RoPE, LLaVA-NeXT packing) == transformers, missing layouts, added layouts.

Logit tolerance: last-row logits of the ONNX prefill are compared with the eager reference's
at atol = rtol = 1e-5 (fp32). Both sides compute the same ops in a different order (MLAS
vs. PyTorch kernels, ONNX decompositions of RMSNorm / softmax / RoPE): each op is exact to a
few ulps (eps = 1.2e-7), and errors grow roughly with reduction length (<= 128 here) and
depth (4 layers), so 1e-5 has about 10x margin over the worst case seen (~1e-6; NOTES.md
reports ~5e-7 for the text decoder alone). Greedy tokens must be identical.
"""

from __future__ import annotations

import functools
import json
import random
import shutil

import numpy as np
import onnx
import pytest
import torch

from vskip_compile import OPS, SkipPlan, VisualLayout
from vskip_compile.archs import adapter_for
from vskip_compile.archs.tiny import TINY_ARCHS, tiny_inputs
from vskip_compile.export import MissingGraphError, OnnxRunner, export_onnx
from vskip_compile.export import host
from vskip_compile.reference import applied

ATOL = RTOL = 1e-5
NEW_TOKENS = 6


def random_plan(seed: int, layers: int = 4) -> SkipPlan:
    """A plan with at least one skip, drawn from all four ops."""
    rng = random.Random(seed)
    ops = [rng.choice(OPS) for _ in range(layers)]
    ops[rng.randrange(layers)] = rng.choice(OPS[1:])
    return SkipPlan.from_ops(ops, name=f"random{seed}")


PLANS = {0: random_plan(0), 1: random_plan(1)}


_ENGINES: dict = {}  # (arch, seed) -> (model, inputs, plan, engine dir); also used by test_engine_manifest


def exported_engine(tiny_model, tmp_path_factory, arch: str, seed: int):
    """(model, inputs, plan, engine dir) of arch under PLANS[seed], exported once per process.
    The second plan of an arch reuses the first one's vision and decode graphs. Tests must
    not modify the directory (copy it first)."""
    if (arch, seed) not in _ENGINES:
        model = tiny_model(arch)
        inputs = tiny_inputs(model, arch)
        out = tmp_path_factory.mktemp(f"{arch}-plan{seed}")
        reuse = _ENGINES[(arch, 0)][3] if seed and (arch, 0) in _ENGINES else None
        export_onnx(model, PLANS[seed], inputs, out, optimize=False, reuse=reuse)
        _ENGINES[(arch, seed)] = (model, inputs, PLANS[seed], out)
    return _ENGINES[(arch, seed)]


@pytest.fixture(scope="module")
def engine(tiny_model, tmp_path_factory):
    """engine(arch, plan_seed) -> (model, inputs, plan, engine dir)."""
    return functools.partial(exported_engine, tiny_model, tmp_path_factory)


def reference_run(model, plan, inputs):
    with torch.no_grad(), applied(model, plan):
        tokens = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        logits = model(**inputs).logits[:, -1:]  # [B, 1, V]
    return tokens.numpy(), logits.numpy()


@pytest.mark.parametrize("seed", sorted(PLANS))
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_generate_matches_reference(engine, arch, seed):
    model, inputs, plan, out = engine(arch, seed)
    runner = OnnxRunner(out)
    want_tokens, want_logits = reference_run(model, plan, inputs)
    np.testing.assert_allclose(runner.prefill(**inputs)["logits"], want_logits, atol=ATOL, rtol=RTOL)
    np.testing.assert_array_equal(runner.generate(**inputs, max_new_tokens=NEW_TOKENS), want_tokens)


def test_numpy_and_torch_inputs_agree_and_sampling_is_seeded(engine):
    _, inputs, _, out = engine("qwen3_vl", 0)
    runner = OnnxRunner(out, threads=1)
    as_numpy = {k: v.numpy() for k, v in inputs.items()}
    np.testing.assert_array_equal(runner.generate(**as_numpy, max_new_tokens=3), runner.generate(**inputs, max_new_tokens=3))
    sampled = [runner.generate(**inputs, max_new_tokens=5, do_sample=True, seed=7) for _ in range(2)]
    np.testing.assert_array_equal(sampled[0], sampled[1])
    assert sampled[0].shape[1] <= inputs["input_ids"].shape[1] + 5


# -- the graph is skip-shaped ---------------------------------------------------------------------
def weight_matmuls(path) -> list[tuple[int, int, int]]:
    """(rows, in, out) of every MatMul / Gemm by a 2-D weight (an initializer or its
    transpose), from ONNX shape inference."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*model.graph.value_info, *model.graph.input]}
    weights = {t.name: list(t.dims) for t in model.graph.initializer if len(t.dims) == 2}
    for node in model.graph.node:  # unoptimized graphs multiply by Transpose(weight)
        if node.op_type == "Transpose" and node.input[0] in weights:
            weights[node.output[0]] = weights[node.input[0]][::-1]
    found = []
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm") and node.input[1] in weights:
            x = shapes[node.input[0]]
            k, n = weights[node.input[1]]
            assert x[-1] == k and all(x), f"{node.name}: activation shape {x} is not static"
            found.append((int(np.prod(x[:-1])), k, n))
    return sorted(found)


def expected_matmuls(plan: SkipPlan, layout: VisualLayout, d: int, kv: int, f: int, vocab: int):
    """The plan's projections: q/o and the FFN only over the kept rows of a skipped operator,
    k/v always over all rows; the LM head over the last row."""
    s = layout.seq_len
    kept = sum(b - a for a, b in layout.kept_spans(plan.scope))
    rows = []
    for i in range(plan.num_layers):
        r_attn = kept if plan.skips_attn(i) else s
        r_ffn = kept if plan.skips_ffn(i) else s
        rows += [(r_attn, d, d), (s, d, kv), (s, d, kv), (r_attn, d, d)]
        rows += [(r_ffn, d, f), (r_ffn, d, f), (r_ffn, f, d)]
    return sorted(rows + [(1, d, vocab)])


@pytest.mark.parametrize("seed", sorted(PLANS))
@pytest.mark.parametrize("arch", ["llava", "qwen3_vl"])
def test_prefill_graph_has_the_plans_matmul_rows(engine, arch, seed):
    model, inputs, plan, out = engine(arch, seed)
    manifest = json.loads((out / "manifest.json").read_text())
    (graph,) = manifest["graphs"]["prefill"].values()
    layout = host.layout_from_json(graph["layout"])
    rt = manifest["runtime"]
    kv = rt["num_kv_heads"] * rt["head_dim"]
    ffn = model.config.get_text_config().intermediate_size
    got = weight_matmuls(out / graph["file"])
    assert got == expected_matmuls(plan, layout, rt["hidden_size"], kv, ffn, rt["vocab_size"])
    full = expected_matmuls(SkipPlan.full(4), layout, rt["hidden_size"], kv, ffn, rt["vocab_size"])
    macs = lambda rows: sum(r * k * n for r, k, n in rows)  # noqa: E731
    assert macs(got) < macs(full)


def test_graphs_pass_onnx_checker_and_have_static_io(engine):
    _, _, _, out = engine("qwen2_5_vl", 0)
    for path in sorted(out.glob("*.onnx")):
        onnx.checker.check_model(str(path))
        model = onnx.load(str(path), load_external_data=False)
        for value in [*model.graph.input, *model.graph.output]:
            dims = value.type.tensor_type.shape.dim
            assert all(d.HasField("dim_value") for d in dims), f"{path.name}: {value.name} has a symbolic dim"


def test_prefill_and_decode_share_weights_on_disk(engine):
    _, _, _, out = engine("llava", 0)
    names = lambda p: {  # noqa: E731
        e.value for t in onnx.load(str(p), load_external_data=False).graph.initializer for e in t.external_data
        if e.key == "location"
    }
    prefill, decode = next(out.glob("prefill-*.onnx")), next(out.glob("decode-*.onnx"))
    assert names(prefill) == names(decode) == {"weights-000.safetensors"}
    assert len(list(out.glob("weights-*"))) == 1


# -- layouts ------------------------------------------------------------------------------------
def test_layout_without_graph_is_refused_with_the_available_ones(engine, tiny_model):
    model, _, _, out = engine("llava", 0)
    other = tiny_inputs(model, "llava", text_after=7)
    with pytest.raises(MissingGraphError, match=r"b1-s26-v3_19.*exported: b1-s23-v3_19"):
        OnnxRunner(out).generate(**other, max_new_tokens=2)


def test_layouts_added_to_an_existing_export(engine, tmp_path):
    """A second call with layouts=[...] adds a prefill graph per layout, and a decode step for
    a new batch size; no weight is stored twice; generate then serves old and new layouts."""
    model, inputs, plan, first = engine("qwen3_vl", 0)
    out = tmp_path / "engine"
    shutil.copytree(first, out)
    pair = tiny_inputs(model, "qwen3_vl", batch=2, seed=5)  # same image size, 2 rows
    export_onnx(model, plan, None, out, layouts=[adapter_for(model).layout(model, pair["input_ids"])], optimize=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["graphs"]["prefill"]) == ["b1-s23-v3_19", "b2-s23-v3_19"]
    assert sorted(manifest["graphs"]["decode"]) == ["b1", "b2"]
    assert sorted(p.name for p in out.glob("weights-*")) == ["weights-000.safetensors"]  # nothing new to store
    runner = OnnxRunner(out, max_prefill_sessions=1)
    assert sorted(map(str, runner.layouts)) == [str(VisualLayout.single(23, [(3, 19)], b)) for b in (1, 2)]
    for case in (inputs, pair):
        want, _ = reference_run(model, plan, case)
        np.testing.assert_array_equal(runner.generate(**case, max_new_tokens=NEW_TOKENS), want)
    assert [key for key in runner._sessions if key[0] == "prefill"] == [("prefill", "b2-s23-v3_19")]  # LRU of 1


# -- host glue == transformers --------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("kw", [{}, {"text_before": 0}, {"text_after": 0}, {"n_images": 2}, {"batch": 2}])
def test_mrope_matches_hf_get_rope_index(tiny_model, arch, kw):
    model = tiny_model(arch)
    inputs = tiny_inputs(model, arch, **kw)
    want, want_deltas = model.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
    )
    got, deltas = host.mrope_position_ids(
        inputs["input_ids"].numpy(), inputs["mm_token_type_ids"].numpy(), inputs["image_grid_thw"].numpy(),
        model.model.visual.spatial_merge_size, inputs["attention_mask"].numpy(),
    )
    np.testing.assert_array_equal(got, want.numpy())
    np.testing.assert_array_equal(deltas, want_deltas.numpy())


@pytest.mark.parametrize("size", [(16, 28), (28, 16), (16, 16), (40, 12)])
def test_anyres_packing_matches_hf(tiny_model, size):
    model = tiny_model("llava_next")
    cfg = model.config
    tile, side, dim = cfg.vision_config.image_size, cfg.vision_config.image_size // cfg.vision_config.patch_size, 64
    views = host.anyres_num_views(size, cfg.image_grid_pinpoints, tile)
    feats = torch.randn(views, side * side, dim)
    with torch.no_grad():
        (want,), _ = model.model.pack_image_features([feats], torch.tensor([size]), "default", model.model.image_newline)
    got = host.pack_anyres(feats.numpy(), size, cfg.image_grid_pinpoints, tile, side, model.model.image_newline.detach().numpy())
    np.testing.assert_array_equal(got, want.numpy())


def test_layout_of_matches_the_adapter(tiny_model):
    model = tiny_model("qwen2_5_vl")
    inputs = tiny_inputs(model, "qwen2_5_vl", n_images=2, batch=2)
    adapter = adapter_for(model)
    got = host.layout_of(inputs["input_ids"].numpy(), adapter.visual_token_ids(model))
    assert got == adapter.layout(model, inputs["input_ids"])


# -- vskip export / vskip run ----------------------------------------------------------------------
def mini_model_dir(path):
    """A local HF model directory with a processor: the zoo's Qwen3-VL layout, 2 layers, random."""
    from PIL import Image
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from vskip_compile.zoo.easyvqa_processor import build_processor, build_vocab
    from vskip_compile.zoo.train_easyvqa import build_config

    processor = build_processor(build_vocab(["what shape is in the image ?", "circle rectangle triangle"]))
    d = build_config(processor.tokenizer).to_dict()
    d["text_config"].update(num_hidden_layers=2, layer_types=["full_attention"] * 2)
    d["vision_config"].update(depth=1, deepstack_visual_indexes=[0])
    config = Qwen3VLConfig.from_dict(d)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    rng = np.random.default_rng(0)
    image = path / "image.png"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(image)
    return model, processor, image


def test_cli_export_then_run_answers_like_the_reference(tmp_path, capsys):
    from vskip_compile.cli import main
    from vskip_compile.export.cli import build_inputs

    model, processor, image = mini_model_dir(tmp_path / "model")
    plan = SkipPlan.from_ops(["skip_both", "skip_attn"], name="cli")
    plan.save(tmp_path / "plan.json")
    prompt, engine = "what shape is in the image ?", tmp_path / "engine"
    assert main(["export", "--model", str(tmp_path / "model"), "--plan", str(tmp_path / "plan.json"),
                 "--image", str(image), "--prompt", prompt, "--out", str(engine)]) == 0  # optimizer on
    capsys.readouterr()
    assert main(["run", "--engine", str(engine), "--image", str(image), "--prompt", prompt, "--max-new-tokens", "4"]) == 0
    answer = capsys.readouterr().out.strip()

    inputs = build_inputs(processor, [str(image)], prompt, "pt")
    with torch.no_grad(), applied(model, plan):
        ids = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    want = processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
    assert answer == want

    # A prompt of another length has no prefill graph: exit code 2, naming the exported layout.
    assert main(["run", "--engine", str(engine), "--image", str(image), "--prompt", "what shape ?"]) == 2
    assert "exported: b1-s" in capsys.readouterr().err
