"""Vision encoders as static graphs: one graph per image shape (Qwen: per (t, h, w) grid, which
images and videos share), keyed for the runner.

Each graph maps the pixels of ONE image to its language-model rows (projector / merger
included) and, for Qwen3-VL, its DeepStack features. Per-image graphs keep every dimension a
number; the runner runs them image by image and concatenates, which is what HF computes
(vision attention never crosses images).

- Qwen2.5-VL / Qwen3-VL: pixels [t*h*w, C*T*p*p] of a (t, h, w) patch grid (an image: t = 1;
  a video of t temporal patches: its cu_seqlens block attention per patch). The grid-derived
  index tensors (rotary positions, window order, position-embedding interpolation, cu_seqlens)
  are computed here with transformers' own `vision_utils` helpers and baked in as constants
  (transformers 5.24 accepts them precomputed). The per-window SDPA loop of HF's vision
  attention needs `cu_seqlens.tolist()`, which torch.export cannot trace, so during export
  the vision attention runs as ONE SDPA over the image with a block-diagonal mask built from
  cu_seqlens: the same attention (masked keys get weight exactly 0), computed densely.
- LLaVA: pixels [1, C, H, W] -> rows [T, D].
- LLaVA-NeXT: the views of one image [n, C, H, W] -> per-view rows [n, T, D]; the
  any-resolution packing (unpadding, newline rows) depends on the image size and runs on the
  host (export/host.py), with `image_newline` stored as a weight.

Torch and transformers are imported: this module is export-time only.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from ..archs import Adapter


@dataclass
class VisionGraph:
    """One static vision graph to export."""

    key: str
    module: nn.Module
    args: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


# -- Qwen ------------------------------------------------------------------------------------
def _block_masked_attention(self, hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
    """Qwen vision attention as one SDPA with a block-diagonal mask (export-time forward)."""
    rope = sys.modules[type(self).__module__].apply_rotary_pos_emb_vision
    n = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(n, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # [N, H, E]
    cos, sin = position_embeddings
    q, k = rope(q, k, cos, sin)
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, H, N, E]
    rows = torch.arange(n, device=hidden_states.device)
    segment = (rows[:, None] >= cu_seqlens[None, 1:]).sum(-1)  # [N]: index of each row's window
    mask = (segment[:, None] == segment[None, :])[None, None]  # [1, 1, N, N]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)  # [1, H, N, E]
    return self.proj(out.transpose(1, 2).reshape(n, -1))


@contextlib.contextmanager
def _exportable_qwen_vision(visual: nn.Module) -> Iterator[None]:
    """During export: every Qwen vision attention runs as _block_masked_attention, and a
    bias-less Conv3d (Qwen2.5-VL's patch embedding) gets an explicit zero bias, because
    onnxscript 0.7.2's aten_conv3d builds a wrong-shaped ([out, 2]) zero bias otherwise
    (onnxruntime then refuses the Conv). Everything is restored on exit."""
    attns = [m for m in visual.modules() if type(m).__name__.endswith("VisionAttention")]
    if not attns:
        raise NotImplementedError(f"{type(visual).__name__}: no *VisionAttention modules to export")
    convs = [m for m in visual.modules() if isinstance(m, nn.Conv3d) and m.bias is None]
    for m in attns:
        m.forward = _block_masked_attention.__get__(m)
    for m in convs:
        m.bias = nn.Parameter(torch.zeros(m.out_channels, dtype=m.weight.dtype), requires_grad=False)
    try:
        yield
    finally:
        for m in attns:
            del m.forward
        for m in convs:
            m.bias = None


class _QwenVision(nn.Module):
    """pixels of one (t, h, w) grid -> (rows [t*h*w/m^2, D], *deepstack [same])."""

    def __init__(self, visual: nn.Module, grid: tuple[int, int, int]):
        super().__init__()
        from transformers import vision_utils as vu

        self.visual = visual
        grid_thw = torch.tensor([grid])  # [1, 3]
        merge = visual.spatial_merge_size
        pre: dict[str, torch.Tensor] = {"position_ids": vu.get_vision_position_ids(grid_thw, merge)}
        pre["cu_seqlens"] = vu.get_vision_cu_seqlens(grid_thw)
        if hasattr(visual, "window_size"):  # Qwen2.5-VL window attention
            pre["window_index"], pre["cu_window_seqlens"] = vu.get_vision_window_index(
                grid_thw, merge, visual.window_size, visual.patch_size
            )
        if hasattr(visual, "num_grid_per_side"):  # Qwen3-VL interpolated position embeddings
            pre["interp_indices"], pre["interp_weights"] = vu.get_vision_interpolation_indices_and_weights(
                grid_thw, visual.num_grid_per_side, visual.interpolation_mode,
                visual.interpolation_align_corners, merge,
            )
        self.names = tuple(pre)
        device = next(visual.parameters()).device
        self.register_buffer("grid_thw", grid_thw.to(device), persistent=False)
        for name, t in pre.items():
            self.register_buffer(name, t.to(device), persistent=False)

    def forward(self, pixel_values):  # [t*h*w, C*T*p*p]
        pre = {name: getattr(self, name) for name in self.names}
        out = self.visual(pixel_values, grid_thw=self.grid_thw, return_dict=True, **pre)
        return (out.pooler_output, *(getattr(out, "deepstack_features", None) or ()))


def _qwen_graphs(model, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor,
                 graphs: dict[str, VisionGraph] | None = None) -> list[VisionGraph]:
    """One graph per distinct (t, h, w) grid; images and videos share them (a video of t
    temporal patches is one grid, its attention blocked per patch by cu_seqlens)."""
    visual = model.model.visual
    graphs = {} if graphs is None else graphs
    start = 0
    for t, h, w in image_grid_thw.tolist():
        n = t * h * w
        key = f"grid{t}x{h}x{w}"
        if key not in graphs:
            module = _QwenVision(visual, (t, h, w)).eval()
            n_ds = len(getattr(visual, "deepstack_visual_indexes", ()) or ())
            graphs[key] = VisionGraph(
                key, module, (pixel_values[start : start + n],), ["pixel_values"],
                ["features"] + [f"deepstack_{i}" for i in range(n_ds)], {"grid": [t, h, w]},
            )
        start += n
    return list(graphs.values())


# -- LLaVA / LLaVA-NeXT ----------------------------------------------------------------------
class _LlavaVision(nn.Module):
    """views [n, C, H, W] -> projected rows [n, T, D] (feature layer(s), CLS dropped if 'default')."""

    def __init__(self, model):
        super().__init__()
        cfg = model.config
        self.tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector
        self.layer = cfg.vision_feature_layer
        self.strategy = cfg.vision_feature_select_strategy
        if self.strategy not in ("default", "full"):
            raise NotImplementedError(f"vision_feature_select_strategy {self.strategy!r}")

    def forward(self, pixel_values):
        hidden = self.tower(pixel_values, output_hidden_states=True, return_dict=True).hidden_states
        layers = [self.layer] if isinstance(self.layer, int) else list(self.layer)
        picked = [hidden[i][:, 1:] if self.strategy == "default" else hidden[i] for i in layers]
        return self.projector(torch.cat(picked, dim=-1))  # [n, T, D]


def _llava_graphs(model, pixel_values: torch.Tensor) -> list[VisionGraph]:
    module = _LlavaVision(model).eval()
    _, c, h, w = pixel_values.shape
    return [VisionGraph(f"image{c}x{h}x{w}", module, (pixel_values[:1],), ["pixel_values"], ["features"])]


def _llava_next_graphs(model, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> list[VisionGraph]:
    from .host import anyres_num_views

    cfg = model.config
    module = _LlavaVision(model).eval()
    graphs: dict[str, VisionGraph] = {}
    for i, size in enumerate(image_sizes.tolist()):
        views = anyres_num_views(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        key = f"views{views}"
        if key not in graphs:
            graphs[key] = VisionGraph(key, module, (pixel_values[i, :views],), ["pixel_values"], ["features"], {"views": views})
    return list(graphs.values())


# -- entry points -----------------------------------------------------------------------------
def vision_graphs(model, adapter: Adapter, hf_inputs: dict[str, Any]) -> list[VisionGraph]:
    """The vision graphs the images and videos of hf_inputs need (none without pixel values);
    the family's kind of graphs is what its adapter declares (Adapter.vision_export)."""
    pixel_values = hf_inputs.get("pixel_values")
    kind = adapter.vision_export
    if kind == "qwen":
        graphs: dict[str, VisionGraph] = {}
        if pixel_values is not None:
            _qwen_graphs(model, pixel_values, torch.as_tensor(hf_inputs["image_grid_thw"]), graphs)
        if hf_inputs.get("pixel_values_videos") is not None:
            _qwen_graphs(model, hf_inputs["pixel_values_videos"], torch.as_tensor(hf_inputs["video_grid_thw"]), graphs)
        return list(graphs.values())
    if hf_inputs.get("pixel_values_videos") is not None:
        raise NotImplementedError(f"no ONNX video vision export for architecture family {adapter.name!r}")
    if pixel_values is None:
        return []
    if kind == "llava":
        return _llava_graphs(model, pixel_values)
    if kind == "llava_next":
        return _llava_next_graphs(model, pixel_values, torch.as_tensor(hf_inputs["image_sizes"]))
    raise NotImplementedError(f"no ONNX vision export for architecture family {adapter.name!r}")


def exporting(model, adapter: Adapter):
    """Context in which the vision graphs of this model trace (see _exportable_qwen_vision)."""
    if adapter.vision_export == "qwen":
        return _exportable_qwen_vision(model.model.visual)
    return contextlib.nullcontext()


def host_info(model, adapter: Adapter) -> dict[str, Any]:
    """What the runner needs to run the vision graphs and merge their output, as JSON."""
    cfg = model.config
    kind = adapter.vision_export
    if kind == "qwen":
        return {"kind": "qwen", "spatial_merge_size": int(model.model.visual.spatial_merge_size),
                "video": adapter.video_rope(model)}
    if kind == "llava":
        return {"kind": "llava"}
    if kind == "llava_next":
        vc = cfg.vision_config
        return {
            "kind": "llava_next",
            "image_grid_pinpoints": [list(p) for p in cfg.image_grid_pinpoints],
            "tile": int(vc.image_size),
            "side": int(vc.image_size // vc.patch_size),
        }
    raise NotImplementedError(f"no ONNX vision export for architecture family {adapter.name!r}")
