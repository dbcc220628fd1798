"""OnnxRunner: generate with an exported engine directory, onnxruntime + numpy only.

    runner = OnnxRunner("engine/", providers=["CPUExecutionProvider"])
    ids = runner.generate(**processor_outputs, max_new_tokens=32)   # [B, S + new], like HF

No torch and no transformers model at load or run time (torch tensors are accepted as inputs
and converted). The manifest is verified first (every file's sha256; the model when
`expect_model` is given); graph files are opened lazily, and each one's metadata must name
the manifest's model and its own role.

One prefill graph serves every layout: its batch, sequence length S and kept-row count K are
symbolic, the layout enters as data (kept_index, kept_valid, attention_mask). Per request:
checks first (S <= max_seq_len, cache room, the graphs it needs exist), so a refused request
runs nothing; then embedding lookup, vision graphs image by image, features scattered into
the image rows (DeepStack too), position ids (Qwen M-RoPE in numpy) rebased per row, the
kept rows of the layout (host.kept_inputs), one prefill, then decode steps over preallocated
K/V buffers of max_cache_len slots (one static decode graph per batch size). Left-padded
batches (attention_mask zeros, then ones) of rows with different layouts run together:
padding rows are never keys, so each row gets the tokens it gets alone. Greedy by default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..decoding import decode_loop
from ..layout import LayoutError
from . import host
from . import manifest as mf
from .weights import read_tensor

_NP_DTYPES = {"float32": np.float32, "float16": np.float16}
PREFILL_KEY = "dynamic"  # the one prefill graph of an engine (symbolic batch, S and K)


class MissingGraphError(LayoutError):
    """The engine has no graph for this input's image shape or batch size."""


class PromptTooLongError(LayoutError):
    """The prompt is longer than the engine's max_seq_len."""


def prefill_entry(manifest: Mapping[str, Any], where: str) -> tuple[str, dict[str, Any]]:
    """(key, manifest entry) of the engine's polymorphic prefill graph; refuses the per-layout
    prefill graphs older versions wrote."""
    graphs = manifest["graphs"]["prefill"]
    entry = graphs.get(PREFILL_KEY)
    if entry is None or "ranges" not in entry:
        have = ", ".join(sorted(graphs)) or "none"
        raise mf.EngineError(f"{where}: no polymorphic prefill graph (has: {have}); engines with one prefill per "
                             "layout come from an older vskip-compile: export the engine again")
    return PREFILL_KEY, entry


def _to_numpy(x: Any) -> np.ndarray:
    """numpy view of a numpy array, list or torch tensor (without importing torch)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _ort_errors() -> tuple[type[BaseException], ...]:
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return (state.Fail, state.InvalidArgument, state.InvalidGraph, state.InvalidProtobuf, state.NoSuchFile,
            state.NotImplemented, state.RuntimeException, state.EPFail)


class OnnxRunner:
    """A verified engine directory, ready to generate."""

    def __init__(
        self,
        engine_dir: str | Path,
        providers: Sequence[str | tuple[str, dict]] | None = None,
        *,
        expect_model: Mapping[str, Any] | None = None,
        threads: int | None = None,
    ):
        import onnxruntime as ort

        self.dir = Path(engine_dir)
        self.manifest = mf.verify(self.dir, expect_model)
        self.rt = self.manifest["runtime"]
        self._check_references()
        self.prefill_graph = prefill_entry(self.manifest, str(self.dir / mf.MANIFEST))[1]
        formats = {g.get("format", "onnx") for role in self.manifest["graphs"].values() for g in role.values()}
        if formats - {"onnx"}:
            raise mf.EngineError(f"{self.dir}: holds {', '.join(sorted(formats - {'onnx'}))} graphs; OnnxRunner loads ONNX engines")
        if self.rt["dtype"] not in _NP_DTYPES:
            raise mf.EngineError(f"{self.dir}: engines in {self.rt['dtype']} are not supported by the ONNX runner")
        self.dtype = _NP_DTYPES[self.rt["dtype"]]
        available = ort.get_available_providers()
        self.providers = list(providers or ["CPUExecutionProvider"])
        for p in self.providers:
            name = p[0] if isinstance(p, tuple) else p
            if name not in available:
                raise mf.EngineError(f"execution provider {name} is not available here; available: {', '.join(available)}")
        self.options = ort.SessionOptions()
        self.options.log_severity_level = 3  # errors only: constant-folding notes are noise here
        if threads:
            self.options.intra_op_num_threads = threads
        self._sessions: dict[tuple[str, str], Any] = {}  # (role, key) -> session, opened on first use
        tensors = self.rt["tensors"]
        self.embed = read_tensor(self.dir / tensors["embed_tokens"]["file"], tensors["embed_tokens"]["key"])  # [V, D]
        nl = tensors.get("image_newline")
        self.image_newline = None if nl is None else np.asarray(read_tensor(self.dir / nl["file"], nl["key"]))

    def _check_references(self) -> None:
        """Every file the manifest points to is one whose hash it lists (and so was verified)."""
        listed = self.manifest["files"]
        refs = [g["file"] for role in self.manifest["graphs"].values() for g in role.values()]
        refs += [t["file"] for t in self.rt["tensors"].values()]
        for ref in refs:
            if ref not in listed:
                raise mf.ManifestError(f"{self.dir / mf.MANIFEST}: corrupt, it points to {ref!r} but lists no hash for it")

    # -- graphs ---------------------------------------------------------------------------------
    @property
    def max_seq_len(self) -> int:
        """Longest prompt (in tokens, padding included) the prefill graph takes."""
        return int(self.prefill_graph["ranges"]["seq_len"][1])

    def _graph(self, role: str, key: str, what: str):
        """The onnxruntime session of graph role/key, created on first use."""
        import onnxruntime as ort

        graphs = self.manifest["graphs"][role]
        if key not in graphs:
            have = ", ".join(sorted(graphs)) or "none"
            raise MissingGraphError(f"{self.dir}: no {role} graph for {what} ({key}); exported: {have}")
        if (role, key) in self._sessions:
            return self._sessions[(role, key)]
        path = self.dir / graphs[key]["file"]
        try:
            session = ort.InferenceSession(str(path), self.options, providers=self.providers)
        except _ort_errors() as e:
            raise mf.ManifestError(f"{path}: onnxruntime cannot load it ({e})") from e
        meta = session.get_modelmeta().custom_metadata_map
        want = {"vskip.role": role, "vskip.key": key, "vskip.config_hash": self.manifest["model"]["config_hash"]}
        for k, v in want.items():
            if meta.get(k) != v:
                raise mf.ManifestError(f"{path}: graph metadata {k}={meta.get(k)!r}, manifest says {v!r} (swapped file?)")
        self._sessions[(role, key)] = session
        return session

    @staticmethod
    def _run(session, names: Sequence[str], arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        return session.run(None, dict(zip(names, arrays)))

    # -- vision -----------------------------------------------------------------------------------
    def _vision(self, inputs: dict[str, np.ndarray], video: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
        """All images' (or, video=True, all videos') LM rows [N, D] (in order) and DeepStack
        rows (one [N, D] per level)."""
        vis = self.rt["vision"]
        pixels = inputs["pixel_values_videos" if video else "pixel_values"]
        feats: list[np.ndarray] = []
        deep: list[list[np.ndarray]] = []
        if vis["kind"] == "qwen":
            grid_key = "video_grid_thw" if video else "image_grid_thw"
            grids = inputs.get(grid_key)
            if grids is None:
                raise mf.EngineError(f"Qwen inputs with {'pixel_values_videos' if video else 'pixel_values'} need {grid_key}")
            start = 0
            for t, h, w in grids.tolist():
                n = t * h * w
                key = f"grid{t}x{h}x{w}"  # one graph per grid: the vision tower treats images and videos alike
                what = f"{'video' if video else 'image'} grid {(t, h, w)}"
                out = self._run(self._graph("vision", key, what), ["pixel_values"],
                                [pixels[start : start + n].astype(self.dtype, copy=False)])
                feats.append(out[0])
                deep.append(out[1:])
                start += n
        elif video:
            raise mf.EngineError(f"video inputs: the {vis['kind']} vision graphs of {self.dir} take images only")
        elif vis["kind"] == "llava":
            for i in range(pixels.shape[0]):
                key = "image{}x{}x{}".format(*pixels.shape[1:])
                out = self._run(self._graph("vision", key, f"images of shape {pixels.shape[1:]}"), ["pixel_values"],
                                [pixels[i : i + 1].astype(self.dtype, copy=False)])
                feats.append(out[0][0])  # [T, D]
        elif vis["kind"] == "llava_next":
            sizes = inputs.get("image_sizes")
            if sizes is None:
                raise mf.EngineError("LLaVA-NeXT inputs with pixel_values need image_sizes")
            for i, size in enumerate(sizes.tolist()):
                views = host.anyres_num_views(size, vis["image_grid_pinpoints"], vis["tile"])
                out = self._run(self._graph("vision", f"views{views}", f"an image of size {size}"), ["pixel_values"],
                                [pixels[i, :views].astype(self.dtype, copy=False)])
                feats.append(host.pack_anyres(out[0], size, vis["image_grid_pinpoints"], vis["tile"], vis["side"],
                                              self.image_newline))
        else:
            raise mf.EngineError(f"unknown vision kind {vis['kind']!r} in {self.dir / mf.MANIFEST}")
        levels = [np.concatenate([d[k] for d in deep]) for k in range(len(deep[0]))] if deep and deep[0] else []
        return np.concatenate(feats), levels

    # -- generate --------------------------------------------------------------------------------
    def check(self, input_ids: np.ndarray, max_new_tokens: int = 1) -> None:
        """Refuse, before anything runs, a request this engine cannot serve: a prompt longer
        than max_seq_len, prompt + new tokens beyond max_cache_len, no decode graph for the
        batch size (needed when more than one token is generated)."""
        batch, seq_len = input_ids.shape
        if seq_len > self.max_seq_len:
            raise PromptTooLongError(f"a prompt of {seq_len} tokens exceeds the engine's max_seq_len={self.max_seq_len} "
                                     f"({self.dir}); export the engine again with a larger max_seq_len")
        max_len = self.rt["max_cache_len"]
        if max(seq_len, host.MIN_ROWS) + max_new_tokens - 1 > max_len:  # a 1-token prompt fills MIN_ROWS slots
            raise mf.EngineError(f"{seq_len} prompt + {max_new_tokens} new tokens exceed the engine's max_cache_len={max_len}")
        decode = self.manifest["graphs"]["decode"]
        if max_new_tokens > 1 and f"b{batch}" not in decode:
            have = ", ".join(sorted(decode)) or "none"
            raise MissingGraphError(f"{self.dir}: no decode graph for batch size {batch} (b{batch}); exported: {have}")

    def prefill(self, **inputs: Any) -> dict[str, Any]:
        """Run vision + prefill; returns logits [B, 1, V], kv (list of [B, KV, S', E]), the
        first decode position ids ([B, 1] or [3, B, 1]), left padding per row and the layout
        (S' = S, or MIN_ROWS for a shorter prompt, padded on the left). Exposed for tests and
        benchmarks."""
        arr = {k: _to_numpy(v) for k, v in inputs.items() if v is not None}
        video_id = self.rt.get("video_token_id")
        if "pixel_values_videos" in arr and (video_id is None or "video" not in self.rt["vision"]):
            raise mf.EngineError(f"{self.dir}: this engine takes no video inputs (exported before video support, or "
                                 "for a model without video tokens); export it again")
        self.check(arr["input_ids"])
        arr = _pad_to_min_rows(arr)
        ids = arr["input_ids"].astype(np.int64)  # [B, S]
        batch, seq_len = ids.shape
        pads = host.left_padding(arr.get("attention_mask"), batch)
        layout = host.layout_of(ids, self.rt["visual_token_ids"], () if video_id is None else (video_id,))

        embeds = np.asarray(self.embed[ids], dtype=self.dtype)  # [B, S, D]
        deepstack = [np.zeros_like(embeds) for _ in range(self.rt["num_deepstack"])]
        for key, token, video in (("pixel_values", self.rt["image_token_id"], False),
                                  ("pixel_values_videos", video_id, True)):
            if key in arr:  # images, then videos: each scattered into its own token's rows (HF's order)
                rows, levels = self._vision(arr, video)
                token_rows = ids == token  # [B, S]
                embeds = host.scatter_rows(embeds, token_rows, rows)
                deepstack = [host.scatter_rows(d, token_rows, lv) for d, lv in zip(deepstack, levels)]
        real = np.arange(seq_len)[None, :] >= np.asarray(pads)[:, None]  # [B, S], False at left padding
        if self.rt["position"] == "mrope":
            mm = arr.get("mm_token_type_ids")
            if mm is None:
                mm = (ids == self.rt["image_token_id"]).astype(np.int64) + 2 * (ids == video_id).astype(np.int64)
            video_pos = self.rt["vision"].get("video", {})
            positions, _ = host.mrope_position_ids(
                ids, mm, arr.get("image_grid_thw"), self.rt["vision"]["spatial_merge_size"], real,
                video_grid_thw=arr.get("video_grid_thw"), second_per_grid_ts=arr.get("second_per_grid_ts"),
                tokens_per_second=video_pos.get("tokens_per_second"),
                split_video_frames=bool(video_pos.get("split_frames")))  # [3, B, S]
        else:
            positions = np.tile(np.arange(seq_len, dtype=np.int64), (batch, 1))  # [B, S]
        positions = host.rebase_positions(positions, pads)
        plan_id = self.manifest["plan_id"]
        kept_index, kept_valid = host.kept_inputs(layout, plan_id["scope"], pads, plan_id.get("rows", "visual"))  # [B, K]
        session = self._graph("prefill", PREFILL_KEY, "every layout")
        out = self._run(session, self.prefill_graph["inputs"],
                        [embeds, positions, kept_index, kept_valid, real, *deepstack])
        # Decode step t sits at the largest prompt position + 1 + t on every axis, as HF generate
        # moves position ids on (its rope deltas; padding.last_positions).
        return {"logits": out[0], "kv": out[1:], "next_position": host.last_positions(positions) + 1, "pads": pads,
                "layout": layout}

    def generate(
        self,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        seed: int | None = None,
        **inputs: Any,
    ) -> np.ndarray:
        """Token ids [B, S + generated] (prompt included, like HF generate). Greedy unless
        do_sample (temperature sampling, numpy RNG). Stops at the model's EOS ids; finished
        rows are padded with pad_token_id, as HF does. Left-padded batches are welcome."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        ids = _to_numpy(inputs["input_ids"]).astype(np.int64)
        self.check(ids, max_new_tokens)  # before anything runs
        batch = ids.shape[0]
        rng = np.random.default_rng(seed)

        def pick(logits: np.ndarray) -> np.ndarray:  # [B, V] -> [B]
            if not do_sample:
                return logits.argmax(-1)
            z = logits.astype(np.float64) / temperature
            p = np.exp(z - z.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            return np.array([rng.choice(len(row), p=row) for row in p])

        pre = self.prefill(**inputs)
        eos = np.asarray(self.rt["eos_token_id"], dtype=np.int64)
        pad = self.rt["pad_token_id"] if self.rt["pad_token_id"] is not None else (int(eos[0]) if eos.size else 0)
        new_tokens = decode_loop(pre["logits"][:, -1], self._decode_steps(pre, batch), max_new_tokens, eos, pad, pick)
        return np.concatenate([ids, np.stack(new_tokens, axis=1)], axis=1)

    def _decode_steps(self, pre: dict[str, Any], batch: int):
        """step(tokens [B]) -> logits [B, V] for decoding.decode_loop: the decode graph over
        preallocated K/V buffers of max_cache_len slots, filled from the prefill on first use."""
        state: dict[str, Any] = {}
        max_len = self.rt["max_cache_len"]

        def start() -> None:
            n = pre["kv"][0].shape[2]  # prefill rows (slots filled)
            kv_shape = (batch, self.rt["num_kv_heads"], max_len, self.rt["head_dim"])
            cache = [np.zeros(kv_shape, self.dtype) for _ in pre["kv"]]
            for buf, kv in zip(cache, pre["kv"]):
                buf[:, :, :n] = kv
            past_mask = np.arange(max_len)[None, :] < n  # [B, T]: filled slots...
            past_mask = past_mask & (np.arange(max_len)[None, :] >= np.asarray(pre["pads"])[:, None])  # ...not padding
            state.update(graph=self._graph("decode", f"b{batch}", f"batch size {batch}"),
                         names=self.manifest["graphs"]["decode"][f"b{batch}"]["inputs"], n=n, cache=cache,
                         past_mask=past_mask, position=pre["next_position"])  # position [B, 1] or [3, B, 1]

        def step(token: np.ndarray) -> np.ndarray:
            if not state:
                start()
            embeds = np.asarray(self.embed[token], dtype=self.dtype)[:, None]  # [B, 1, D]
            cache, n = state["cache"], state["n"]
            out = self._run(state["graph"], state["names"], [embeds, state["position"], state["past_mask"], *cache])
            for buf, kv in zip(cache, out[1:]):
                buf[:, :, n] = kv[:, :, 0]
            state["past_mask"][:, n] = True
            state["n"] = n + 1
            state["position"] = state["position"] + 1
            return out[0][:, -1]  # [B, V]

        return step


def _pad_to_min_rows(arr: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A prompt shorter than MIN_ROWS tokens gets padding columns in front (attention_mask 0):
    the prefill graph is traced for S >= MIN_ROWS, and padding rows are never keys."""
    ids = arr["input_ids"]
    grow = host.MIN_ROWS - ids.shape[1]
    if grow <= 0:
        return arr
    out = dict(arr)
    mask = arr.get("attention_mask")
    out["attention_mask"] = np.ones_like(ids) if mask is None else mask
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):  # [B, S] each
        if key in out:
            out[key] = np.concatenate([np.zeros((ids.shape[0], grow), out[key].dtype), out[key]], axis=1)
    return out
