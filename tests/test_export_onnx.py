"""ONNX engines: onnxruntime generate == the eager reference on any layout and on left-padded
mixed batches, one polymorphic skip-shaped prefill graph, host glue (layout as data, M-RoPE,
LLaVA-NeXT packing) == its torch / transformers original, the max_seq_len limit, added batch
sizes.

Logit tolerance: last-row logits of the ONNX prefill are compared with the eager reference's
at atol = rtol = 1e-5 (fp32). Both sides compute the same ops in a different order (MLAS
vs. PyTorch kernels, ONNX decompositions of RMSNorm / softmax / RoPE, the kept rows gathered
and scattered back): each op is exact to a few ulps (eps = 1.2e-7), and errors grow roughly
with reduction length (<= 128 here) and depth (4 layers), so 1e-5 has about 10x margin over
the worst case seen (~2.4e-7 on the layouts of the property test; NOTES.md reports ~5e-7 for
the text decoder alone). Greedy tokens must be identical.
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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vskip_compile import OPS, SkipPlan, VisualLayout
from vskip_compile.archs import adapter_for
from vskip_compile.testing.tiny import TINY_ARCHS, left_padded_batch, tiny_inputs
from vskip_compile.export import MissingGraphError, OnnxRunner, PromptTooLongError, export_onnx
from vskip_compile.export import host
from vskip_compile.reference import applied

ATOL = RTOL = 1e-5
NEW_TOKENS = 6
MAX_SEQ_LEN = 64  # of the test engines: prompts up to 64 tokens, decode cache 320 slots
PROPERTY_ARCHS = ("llava", "qwen3_vl")  # mixed batches of 1..3 rows: decode graphs b1..b3


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
        batches = (2, 3) if arch in PROPERTY_ARCHS else ()
        export_onnx(model, PLANS[seed], inputs, out, optimize=False, reuse=reuse, max_seq_len=MAX_SEQ_LEN,
                    batch_sizes=batches)
        _ENGINES[(arch, seed)] = (model, inputs, PLANS[seed], out)
    return _ENGINES[(arch, seed)]


@pytest.fixture(scope="module")
def engine(tiny_model, tmp_path_factory):
    """engine(arch, plan_seed) -> (model, inputs, plan, engine dir)."""
    return functools.partial(exported_engine, tiny_model, tmp_path_factory)


def reference_run(model, plan, inputs, new_tokens: int = NEW_TOKENS):
    with torch.no_grad(), applied(model, plan):
        tokens = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
        logits = model(**inputs).logits[:, -1:]  # [B, 1, V]
    return tokens.numpy(), logits.numpy()


@pytest.mark.parametrize("arch, seed", [(arch, 0) for arch in TINY_ARCHS] + [(arch, 1) for arch in PROPERTY_ARCHS])
def test_generate_matches_reference(engine, arch, seed):
    """The example the engine was traced on, and a layout it never saw (longer text, image
    at the start), through the same prefill graph. Every architecture under plan 0 (its
    host glue: positions, M-RoPE, packing); the second plan on the property test's
    architectures, whose engines that test exports anyway (a second export of the other two
    added about a minute of CI and no host code)."""
    model, inputs, plan, out = engine(arch, seed)
    runner = OnnxRunner(out)
    other = tiny_inputs(model, arch, text_before=0, text_after=9, seed=3)
    for case in (inputs, other):
        want_tokens, want_logits = reference_run(model, plan, case)
        np.testing.assert_allclose(runner.prefill(**case)["logits"], want_logits, atol=ATOL, rtol=RTOL)
        np.testing.assert_array_equal(runner.generate(**case, max_new_tokens=NEW_TOKENS), want_tokens)
    assert list(runner.manifest["graphs"]["prefill"]) == ["dynamic"]


_ROW = st.fixed_dictionaries({
    "n_images": st.integers(0, 3),
    "text_before": st.integers(0, 5),  # 0: an image first
    "text_after": st.integers(0, 5),  # 0: an image last (longest row: 5 + 3 * 16 + 2 * 3 + 5 = 64)
    "text_between": st.integers(1, 3),
})


def _row_inputs(model, arch, row: dict, seed: int) -> dict:
    if row["n_images"] == 0 and row["text_before"] + row["text_after"] < 1:
        row = {**row, "text_after": 1}
    return tiny_inputs(model, arch, seed=seed, **row)


def _batch(singles: list[dict]) -> dict:
    """Rows as one left-padded batch (testing.tiny.left_padded_batch), rows without images too:
    image inputs are the concatenation of the rows that have them."""
    if len(singles) == 1:
        return singles[0]
    seq = ("input_ids", "attention_mask", "mm_token_type_ids")
    batch = left_padded_batch([{k: v for k, v in r.items() if k in seq} for r in singles])
    for key in {k for r in singles for k in r} - set(seq):
        batch[key] = torch.cat([r[key] for r in singles if key in r])
    return batch


@pytest.mark.parametrize("arch", PROPERTY_ARCHS)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(rows=st.lists(_ROW, min_size=1, max_size=3), seed=st.sampled_from(sorted(PLANS)))
def test_any_layouts_in_one_left_padded_batch_match_the_reference(engine, arch, rows, seed):
    """Random plans x random layouts (0-3 images, at the start / middle / end) x batches of
    1-3 rows of different lengths, left-padded into ONE prefill and one decode: each row's
    tokens equal the reference's for that row alone, and so do its last-row logits."""
    model, _, plan, out = engine(arch, seed)
    runner = OnnxRunner(out)
    singles = [_row_inputs(model, arch, row, seed=i) for i, row in enumerate(rows)]
    batch = _batch(singles)
    got_tokens = runner.generate(**batch, max_new_tokens=NEW_TOKENS)
    got_logits = runner.prefill(**batch)["logits"]  # [B, 1, V]
    for r, single in enumerate(singles):
        want_tokens, want_logits = reference_run(model, plan, single)
        np.testing.assert_allclose(got_logits[r : r + 1], want_logits, atol=ATOL, rtol=RTOL)
        new = got_tokens[r, batch["input_ids"].shape[1]:]
        np.testing.assert_array_equal(new[: want_tokens.shape[1] - single["input_ids"].shape[1]],
                                      want_tokens[0, single["input_ids"].shape[1]:])


@pytest.mark.slow
def test_moe_engine_generates_like_the_reference(tiny_model, tmp_path):
    """Qwen3-VL-MoE exports through the Qwen vision graphs its adapter declares
    (Adapter.vision_export; a test of the family name refused it before) and generates what
    the reference does, on the traced layout and one it never saw."""
    model = tiny_model("qwen3_vl_moe")
    inputs = tiny_inputs(model, "qwen3_vl_moe")
    out = export_onnx(model, PLANS[0], inputs, tmp_path / "moe", optimize=False, max_seq_len=MAX_SEQ_LEN)
    runner = OnnxRunner(out)
    for case in (inputs, tiny_inputs(model, "qwen3_vl_moe", text_before=0, text_after=9, seed=3)):
        want_tokens, want_logits = reference_run(model, PLANS[0], case)
        np.testing.assert_allclose(runner.prefill(**case)["logits"], want_logits, atol=ATOL, rtol=RTOL)
        np.testing.assert_array_equal(runner.generate(**case, max_new_tokens=NEW_TOKENS), want_tokens)


def test_all_full_plan_engine_is_the_unmodified_model(engine, tmp_path):
    """Under the all-`full` plan the prefill keeps its layout inputs (unused: only the marker
    is removed) and generates what HF generate does, on a layout it was not traced on."""
    model, inputs, _, first = engine("llava", 0)
    out = export_onnx(model, SkipPlan.full(4), inputs, tmp_path / "full", optimize=False, reuse=first,
                      max_seq_len=MAX_SEQ_LEN)
    graph = json.loads((out / "manifest.json").read_text())["graphs"]["prefill"]["dynamic"]
    assert graph["counters"].get("attn_rewritten", 0) == graph["counters"].get("ffn_rewritten", 0) == 0
    other = tiny_inputs(model, "llava", text_before=6, text_after=1, seed=4)
    with torch.no_grad():
        want = model.generate(**other, max_new_tokens=NEW_TOKENS, do_sample=False)
    np.testing.assert_array_equal(OnnxRunner(out).generate(**other, max_new_tokens=NEW_TOKENS), want.numpy())


def test_numpy_and_torch_inputs_agree_and_sampling_is_seeded(engine):
    _, inputs, _, out = engine("qwen3_vl", 0)
    runner = OnnxRunner(out, threads=1)
    as_numpy = {k: v.numpy() for k, v in inputs.items()}
    np.testing.assert_array_equal(runner.generate(**as_numpy, max_new_tokens=3), runner.generate(**inputs, max_new_tokens=3))
    sampled = [runner.generate(**inputs, max_new_tokens=5, do_sample=True, seed=7) for _ in range(2)]
    np.testing.assert_array_equal(sampled[0], sampled[1])
    assert sampled[0].shape[1] <= inputs["input_ids"].shape[1] + 5


# -- the graph is skip-shaped and polymorphic -----------------------------------------------------
def weight_matmuls(path) -> list[tuple[tuple, int, int]]:
    """(rows, in, out) of every MatMul / Gemm by a 2-D weight (an initializer or its
    transpose), from ONNX shape inference; rows are the activation's leading dims, named
    (batch, seq_len, kept) or numbers."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
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
            assert x[-1] == k and all(x), f"{node.name}: activation shape {x} is not known"
            found.append((tuple(x[:-1]), k, n))
    return sorted(found, key=str)


def expected_matmuls(plan: SkipPlan, d: int, kv: int, f: int, vocab: int):
    """The plan's projections: q/o and the FFN only over the kept rows of a skipped operator,
    k/v always over all rows; the LM head over the last row."""
    s, kept = ("batch", "seq_len"), ("batch", "kept")
    rows = []
    for i in range(plan.num_layers):
        r_attn = kept if plan.skips_attn(i) else s
        r_ffn = kept if plan.skips_ffn(i) else s
        rows += [(r_attn, d, d), (s, d, kv), (s, d, kv), (r_attn, d, d)]
        rows += [(r_ffn, d, f), (r_ffn, d, f), (r_ffn, f, d)]
    return sorted(rows + [(("batch", 1), d, vocab)], key=str)


@pytest.mark.parametrize("seed", sorted(PLANS))
@pytest.mark.parametrize("arch", ["llava", "qwen3_vl"])
def test_prefill_graph_has_the_plans_matmul_rows(engine, arch, seed):
    model, inputs, plan, out = engine(arch, seed)
    manifest = json.loads((out / "manifest.json").read_text())
    graph = manifest["graphs"]["prefill"]["dynamic"]
    rt = manifest["runtime"]
    kv = rt["num_kv_heads"] * rt["head_dim"]
    ffn = model.config.get_text_config().intermediate_size
    got = weight_matmuls(out / graph["file"])
    assert got == expected_matmuls(plan, rt["hidden_size"], kv, ffn, rt["vocab_size"])
    layout = adapter_for(model).layout(model, inputs["input_ids"])
    sizes = {"batch": 1, "seq_len": layout.seq_len, "kept": sum(b - a for a, b in layout.kept_spans(plan.scope)), 1: 1}
    full = expected_matmuls(SkipPlan.full(4), rt["hidden_size"], kv, ffn, rt["vocab_size"])
    macs = lambda rows: sum(np.prod([sizes[r] for r in rs]) * k * n for rs, k, n in rows)  # noqa: E731
    assert macs(got) < macs(full)


def test_graphs_pass_onnx_checker_and_only_the_prefill_axes_are_symbolic(engine):
    """Vision and decode graphs are static; the prefill's inputs are symbolic exactly on the
    axes the manifest names (batch, seq_len, kept), its outputs on batch and seq_len."""
    _, _, _, out = engine("qwen2_5_vl", 0)
    manifest = json.loads((out / "manifest.json").read_text())
    prefill = manifest["graphs"]["prefill"]["dynamic"]
    assert prefill["ranges"] == {"batch": [1, 64], "seq_len": [2, MAX_SEQ_LEN], "kept": [2, MAX_SEQ_LEN]}
    rt = manifest["runtime"]
    for path in sorted(out.glob("*.onnx")):
        onnx.checker.check_model(str(path))
        model = onnx.load(str(path), load_external_data=False)
        for value in [*model.graph.input, *model.graph.output]:
            dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            if path.name != prefill["file"]:
                assert all(isinstance(d, int) for d in dims), f"{path.name}: {value.name} has a symbolic dim"
            elif value.name in prefill["dynamic_axes"]:
                named = {int(a): sym for a, sym in prefill["dynamic_axes"][value.name].items()}
                assert dims == [named.get(i, d) for i, d in enumerate(dims)], value.name
                assert all(isinstance(d, int) for i, d in enumerate(dims) if i not in named), value.name
            elif value.name == "logits":
                assert dims == ["batch", 1, rt["vocab_size"]]
            else:  # k_i, v_i
                assert dims == ["batch", rt["num_kv_heads"], "seq_len", rt["head_dim"]], value.name


def test_prefill_and_decode_share_weights_on_disk(engine):
    _, _, _, out = engine("llava", 0)
    names = lambda p: {  # noqa: E731
        e.value for t in onnx.load(str(p), load_external_data=False).graph.initializer for e in t.external_data
        if e.key == "location"
    }
    prefill, decode = next(out.glob("prefill-*.onnx")), next(out.glob("decode-*.onnx"))
    assert names(prefill) == names(decode) == {"weights-000.safetensors"}
    assert len(list(out.glob("weights-*"))) == 1


# -- limits ---------------------------------------------------------------------------------------
def _count_runs(runner: OnnxRunner) -> list:
    """Record every graph the runner runs (and every session it opens) from now on."""
    calls: list = []
    run, graph = runner._run, runner._graph
    runner._run = lambda session, names, arrays: calls.append(("run", list(names))) or run(session, names, arrays)
    runner._graph = lambda role, key, what: calls.append(("open", role, key)) or graph(role, key, what)
    return calls


def test_prompt_longer_than_max_seq_len_is_refused_before_anything_runs(engine):
    model, inputs, _, out = engine("llava", 0)
    runner = OnnxRunner(out)
    assert runner.max_seq_len == MAX_SEQ_LEN
    calls = _count_runs(runner)
    long = tiny_inputs(model, "llava", text_after=MAX_SEQ_LEN - 18)  # 3 + 16 + 46 = 65 tokens
    assert long["input_ids"].shape[1] == MAX_SEQ_LEN + 1
    for call in (lambda: runner.generate(**long, max_new_tokens=2), lambda: runner.prefill(**long)):
        with pytest.raises(PromptTooLongError, match=rf"prompt of {MAX_SEQ_LEN + 1} tokens exceeds the engine's "
                                                     rf"max_seq_len={MAX_SEQ_LEN}"):
            call()
    assert calls == [] and runner._sessions == {}  # nothing opened, nothing run
    # The longest prompt in range runs (one graph, no new export).
    fits = tiny_inputs(model, "llava", text_after=MAX_SEQ_LEN - 19)
    assert runner.generate(**fits, max_new_tokens=2).shape == (1, MAX_SEQ_LEN + 2)


def test_batch_without_decode_graph_is_refused_before_anything_runs(engine):
    model, _, _, out = engine("llava", 0)
    runner = OnnxRunner(out)
    calls = _count_runs(runner)
    four = tiny_inputs(model, "llava", batch=4)
    with pytest.raises(MissingGraphError, match=r"no decode graph for batch size 4 \(b4\); exported: b1, b2, b3"):
        runner.generate(**four, max_new_tokens=2)
    assert calls == []
    assert runner.generate(**four, max_new_tokens=1).shape == (4, four["input_ids"].shape[1] + 1)  # prefill only


def test_one_token_prompt_runs_padded_to_the_minimum(engine):
    """S = 1 is below the graph's minimum of 2: the runner pads one column on the left."""
    model, _, plan, out = engine("llava", 0)
    one = tiny_inputs(model, "llava", text_before=1, text_after=0, n_images=0)
    want, want_logits = reference_run(model, plan, one)
    runner = OnnxRunner(out)
    np.testing.assert_allclose(runner.prefill(**one)["logits"], want_logits, atol=ATOL, rtol=RTOL)
    np.testing.assert_array_equal(runner.generate(**one, max_new_tokens=NEW_TOKENS), want)


def test_batch_sizes_added_to_an_existing_export(engine, tmp_path):
    """A second call adds a decode step for a new batch size (here through layouts=, kept for
    compatibility) and no prefill graph; no weight is stored twice; max_seq_len is fixed by
    the first export; generate then serves old and new batch sizes."""
    model, inputs, plan, first = engine("qwen3_vl", 0)
    out = tmp_path / "engine"
    shutil.copytree(first, out)
    four = tiny_inputs(model, "qwen3_vl", batch=4, seed=5)  # same image size, 4 rows
    with pytest.raises(Exception, match=rf"max_seq_len is {MAX_SEQ_LEN}, fixed by the first export"):
        export_onnx(model, plan, None, out, batch_sizes=[4], max_seq_len=128, optimize=False)
    export_onnx(model, plan, None, out, layouts=[adapter_for(model).layout(model, four["input_ids"])], optimize=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["graphs"]["prefill"]) == ["dynamic"]
    assert sorted(manifest["graphs"]["decode"]) == ["b1", "b2", "b3", "b4"]
    assert sorted(p.name for p in out.glob("weights-*")) == ["weights-000.safetensors"]  # nothing new to store
    runner = OnnxRunner(out)
    for case in (inputs, four):
        want, _ = reference_run(model, plan, case)
        np.testing.assert_array_equal(runner.generate(**case, max_new_tokens=NEW_TOKENS), want)


# -- layout as data: numpy twins == torch originals -------------------------------------------------
_SPANS = st.lists(st.tuples(st.integers(0, 3), st.integers(1, 5)), max_size=3)  # (text gap, visual length)


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(0, 4), _SPANS, st.integers(0, 4)), min_size=1, max_size=4),
       scope=st.sampled_from(["visual", "prefix_through_visual"]))
def test_kept_inputs_twin_equals_the_torch_original(rows, scope):
    """host.kept_inputs / left_padding / rebase_positions (numpy) give the arrays of
    kept_rows.kept_inputs / runtime.left_padding / runtime.rebase_positions (torch) on random
    left-padded batches of random layouts."""
    from vskip_compile.kept_rows import MIN_ROWS, kept_inputs
    from vskip_compile.runtime import left_padding, rebase_positions

    assert host.MIN_ROWS == MIN_ROWS
    masks = []
    for pad, spans, tail in rows:  # pad, then (gap, visual run)*, then tail text
        m = []
        for gap, n in spans:
            m += [False] * gap + [True] * n
        masks.append((pad, m + [False] * tail))
    width = max(MIN_ROWS, max(pad + len(m) for pad, m in masks))
    pads = [width - len(m) for _, m in masks]  # left padding to the longest row
    layout = VisualLayout.from_masks([[False] * p + m for p, (_, m) in zip(pads, masks)])
    want_index, want_valid = kept_inputs(layout, scope, pads)
    got_index, got_valid = host.kept_inputs(layout, scope, pads)
    np.testing.assert_array_equal(got_index, want_index.numpy())
    np.testing.assert_array_equal(got_valid, want_valid.numpy())
    assert got_index.dtype == np.int64 and got_valid.dtype == bool
    if any(p == width for p in pads):
        return  # a row of padding only: no attention mask describes it
    attention = np.array([[0] * p + [1] * (width - p) for p in pads])  # [B, S]
    assert host.left_padding(attention, len(pads)) == (left_padding(torch.tensor(attention)) or [0] * len(pads))
    positions = np.random.default_rng(len(pads)).integers(0, 50, (3, len(pads), width))
    for pos in (positions, positions[0]):  # M-RoPE [3, B, S] and 1-D [B, S]
        np.testing.assert_array_equal(host.rebase_positions(pos, pads), rebase_positions(torch.tensor(pos), pads).numpy())


def test_left_padding_refuses_other_padding():
    with pytest.raises(ValueError, match="batch row 1: attention_mask is not left padding"):
        host.left_padding(np.array([[1, 1, 1], [1, 1, 0]]), 2)


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
    """One `vskip export` serves prompts of other lengths; a prompt over --max-seq-len exits
    with code 2 and an error naming the limit."""
    from vskip_compile.cli import main
    from vskip_compile.export.cli import build_inputs

    model, processor, image = mini_model_dir(tmp_path / "model")
    plan = SkipPlan.from_ops(["skip_both", "skip_attn"], name="cli")
    plan.save(tmp_path / "plan.json")
    prompt, engine = "what shape is in the image ?", tmp_path / "engine"
    limit = build_inputs(processor, [str(image)], prompt, "pt")["input_ids"].shape[1] + 2
    assert main(["export", "--model", str(tmp_path / "model"), "--plan", str(tmp_path / "plan.json"),
                 "--image", str(image), "--prompt", prompt, "--out", str(engine),
                 "--max-seq-len", str(limit)]) == 0  # optimizer on
    capsys.readouterr()

    def reference_answer(text: str) -> str:
        inputs = build_inputs(processor, [str(image)], text, "pt")
        with torch.no_grad(), applied(model, plan):
            ids = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        return processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()

    for text in (prompt, "what shape ?"):  # the example's length and another one
        assert main(["run", "--engine", str(engine), "--image", str(image), "--prompt", text, "--max-new-tokens", "4"]) == 0
        assert capsys.readouterr().out.strip() == reference_answer(text)

    assert main(["run", "--engine", str(engine), "--image", str(image), "--prompt", f"{prompt} {prompt}"]) == 2
    assert f"exceeds the engine's max_seq_len={limit}" in capsys.readouterr().err
