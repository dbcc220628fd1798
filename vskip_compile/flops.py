"""Decoder-prefill FLOPs, symbolic (sympy) in S, V and the text config, under a skip plan.

Plain math: no torch, no transformers at import time (a config.json with missing fields is
completed from transformers' defaults, lazily, inside `TextDims.from_hf_config`).

Convention (the one every FLOPs figure of this project uses):
- 2 FLOPs per multiply-add; bias adds are not counted.
- Attention: q/k/v/o projections, plus QK^T and softmax·V over the full S_q x S_kv rectangle
  (no causal halving), each 2·S_q·S_kv·h·e.
- FFN: gated MLP 3 matrices (2·3·d·f per row), plain MLP 2 matrices (2·2·d·f per row), MoE by
  active experts: top-k gated expert FFNs + router d x E (+ a shared gated expert if the
  config has one; its d x 1 gate, a few FLOPs, is left out).
- Excluded: norms, RoPE, softmax itself, elementwise ops, embeddings and the LM head.

Skipping: a skipped attention operator saves its frozen rows' q and o projections and their
rows of the scores and softmax·V, never K/V (visual K/V are always computed). A skipped FFN
saves its frozen rows' FFN. Frozen rows are the visual rows the plan's `rows` selects (V, all
visual rows; V_video of them are video rows: "video" selects V_video, "image" V - V_video),
plus P under plan scope "prefix_through_visual" (P = the other rows before the last selected
visual row: text before the first one and between them, and with `rows` naming one modality
the other modality's rows there). A video of N frames of T tokens each is N*T video rows.

Functions take plain ints or sympy expressions for S, V, P and the dims; with ints the result
is an int, with symbols a sympy expression (`evaluate` substitutes numbers).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

import sympy

from .plan import PlanError, SkipPlan
from .errors import VSkipError

S, V, P = sympy.symbols("S V P", integer=True, nonnegative=True)
V_video = sympy.symbols("V_video", integer=True, nonnegative=True)  # the video rows among V
MLP_KINDS = ("gated", "plain", "moe")

# model_type values whose MLP has two matrices (fc1/fc2) instead of gate/up/down.
_PLAIN_MLP_TYPES = {"gpt2", "gpt_neox", "gptj", "opt", "phi", "falcon", "starcoder2", "bloom"}


class DimsError(VSkipError, ValueError):
    """A config does not give the dimensions the FLOPs model needs."""


@dataclass(frozen=True)
class TextDims:
    """The text-decoder dimensions that decide prefill FLOPs.

    hidden d, heads h, kv_heads g, head_dim e, ffn f (dense MLP width), layers L.
    MoE: experts E, top_k k, expert_ffn (each expert's width), shared_ffn (shared expert's
    width, 0 = none), dense_layers (layers of an MoE model that have a dense gated MLP).
    """

    hidden: Any
    heads: Any
    kv_heads: Any
    head_dim: Any
    ffn: Any
    layers: Any
    mlp: str = "gated"
    experts: Any = 0
    top_k: Any = 0
    expert_ffn: Any = 0
    shared_ffn: Any = 0
    dense_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "dense_layers", tuple(self.dense_layers))
        if self.mlp not in MLP_KINDS:
            raise DimsError(f"unknown mlp kind {self.mlp!r}; expected one of {', '.join(MLP_KINDS)}")
        ints = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("mlp", "dense_layers")}
        if not all(isinstance(v, int) for v in ints.values()):
            return  # symbolic dims: nothing to check
        for name in ("hidden", "heads", "kv_heads", "head_dim", "layers"):
            if ints[name] < 1:
                raise DimsError(f"{name} must be a positive int, got {ints[name]}")
        if self.heads % self.kv_heads:
            raise DimsError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.mlp == "moe" and not (self.experts >= 1 and 1 <= self.top_k <= self.experts and self.expert_ffn >= 1):
            raise DimsError(
                f"an MoE config needs experts >= top_k >= 1 and expert_ffn >= 1, got experts={self.experts}, "
                f"top_k={self.top_k}, expert_ffn={self.expert_ffn}"
            )
        if self.mlp != "moe" and self.ffn < 1:
            raise DimsError(f"ffn must be a positive int, got {self.ffn}")

    @classmethod
    def symbolic(cls, mlp: str = "gated") -> "TextDims":
        """Dims as sympy symbols d, h, g, e, f, L (and E, k, f_e, f_s for MoE), for formulas."""
        d, h, g, e, f, L = sympy.symbols("d h g e f L", integer=True, positive=True)
        E, k, fe, fs = sympy.symbols("E k f_e f_s", integer=True, nonnegative=True)
        moe = dict(experts=E, top_k=k, expert_ffn=fe, shared_ffn=fs) if mlp == "moe" else {}
        return cls(d, h, g, e, f, L, mlp=mlp, **moe)

    def mlp_at(self, layer: int | None) -> str:
        """MLP kind of one layer: an MoE model may keep dense MLPs in some layers."""
        if self.mlp == "moe" and layer is not None and layer in self.dense_layers:
            return "gated"
        return self.mlp

    @classmethod
    def from_hf_config(cls, cfg: Any) -> "TextDims":
        """From a Hugging Face config object or a config.json dict (VLM or text-only).

        Reads `text_config` when present (Qwen3-VL, Qwen2.5-VL, LLaVA, LLaVA-NeXT, Qwen3-VL-MoE);
        fields a config.json leaves at their defaults (LLaVA's vicuna text_config) come from
        transformers' config class for its model_type.
        """
        text = _text_part(_as_dict(cfg))
        if any(text.get(k) is None for k in _REQUIRED):
            text = hf_text_config(cfg)
        recurrent = [i for i, t in enumerate(text.get("layer_types") or ()) if t in _NOT_SOFTMAX_ATTENTION]
        if recurrent:
            raise DimsError(f"the FLOPs model counts softmax attention in every layer; layer {recurrent[0]} is "
                            f"{text['layer_types'][recurrent[0]]!r} (a recurrent layer), whose FLOPs it does not model")
        hidden, heads = int(text["hidden_size"]), int(text["num_attention_heads"])
        layers = int(text["num_hidden_layers"])
        kv_heads = int(text.get("num_key_value_heads") or heads)
        head_dim = int(text.get("head_dim") or hidden // heads)
        ffn = int(text.get("intermediate_size") or 0)
        experts = int(text.get("num_experts") or text.get("num_local_experts") or text.get("n_routed_experts") or 0)
        if not experts:
            mlp = "plain" if text.get("model_type") in _PLAIN_MLP_TYPES else "gated"
            return cls(hidden, heads, kv_heads, head_dim, ffn, layers, mlp=mlp)
        top_k = int(text.get("num_experts_per_tok") or 0)
        expert_ffn = int(text.get("moe_intermediate_size") or ffn)
        shared_ffn = int(text.get("shared_expert_intermediate_size") or 0)
        if not shared_ffn and text.get("n_shared_experts"):  # DeepSeek style
            shared_ffn = int(text["n_shared_experts"]) * expert_ffn
        step = int(text.get("decoder_sparse_step") or 1)
        only_mlp = set(text.get("mlp_only_layers") or ())
        first_dense = int(text.get("first_k_dense_replace") or 0)
        dense = tuple(
            i for i in range(layers) if i in only_mlp or (i + 1) % step != 0 or i < first_dense
        )
        return cls(
            hidden, heads, kv_heads, head_dim, ffn, layers, mlp="moe", experts=experts, top_k=top_k,
            expert_ffn=expert_ffn, shared_ffn=shared_ffn, dense_layers=dense,
        )


_REQUIRED = ("hidden_size", "num_attention_heads", "num_hidden_layers")
# config.layer_types of layers without softmax attention (linear attention, short convolutions, SSMs)
_NOT_SOFTMAX_ATTENTION = ("linear_attention", "conv", "mamba")


def hf_text_config(cfg: Any) -> dict[str, Any]:
    """The text-decoder part of a config with transformers' defaults filled in, i.e. what the
    loaded model's text config `to_dict()` holds (config.json files omit defaults). Use it to
    compute a plan's config hash from a config.json. Imports transformers."""
    d = _as_dict(cfg)
    if isinstance(cfg, Mapping):
        d = _with_hf_defaults(d)
    text = dict(_text_part(d))
    missing = [k for k in _REQUIRED if text.get(k) is None]
    if missing:
        raise DimsError(f"config has no {', '.join(missing)}")
    if text.get("head_dim") is None:  # derived, as the attention module does (Qwen2.5-VL)
        text["head_dim"] = int(text["hidden_size"]) // int(text["num_attention_heads"])
    return text


def _as_dict(cfg: Any) -> dict[str, Any]:
    if isinstance(cfg, Mapping):
        return dict(cfg)
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    raise DimsError(f"expected a Hugging Face config or a config.json dict, got {type(cfg).__name__}")


def _text_part(d: Mapping[str, Any]) -> Mapping[str, Any]:
    text = d.get("text_config")
    return text if isinstance(text, Mapping) else d


def _with_hf_defaults(d: Mapping[str, Any]) -> dict[str, Any]:
    """The config with transformers' defaults filled in (config.json files omit defaults)."""
    if "model_type" not in d:
        missing = [k for k in _REQUIRED if _text_part(d).get(k) is None]
        raise DimsError(f"config has no {', '.join(missing) or 'model_type'} and no model_type to fill defaults from")
    from huggingface_hub.errors import StrictDataclassError  # transformers' typed config fields
    from transformers import AutoConfig  # lazy: only for incomplete config.json dicts

    kwargs = {k: v for k, v in d.items() if k != "model_type"}
    try:
        return AutoConfig.for_model(d["model_type"], **kwargs).to_dict()
    except (ValueError, KeyError, TypeError, StrictDataclassError) as e:
        reason = " ".join(str(e).split(". Should contain one of")[0].split())  # not the list of every model type
        raise DimsError(f"config of model_type {d['model_type']!r} is incomplete or invalid and transformers "
                        f"cannot fill it ({reason})") from e


# -- per operator ------------------------------------------------------------------------------
def attn_flops(dims: TextDims, q_rows: Any, kv_rows: Any) -> Any:
    """One attention operator: q_rows query rows attend over kv_rows key/value rows."""
    d, h, g, e = dims.hidden, dims.heads, dims.kv_heads, dims.head_dim
    q_proj = 2 * q_rows * d * h * e
    kv_proj = 2 * 2 * kv_rows * d * g * e  # K and V: every row, always
    o_proj = 2 * q_rows * h * e * d
    scores_pv = 2 * 2 * q_rows * kv_rows * h * e  # QK^T and softmax·V, full rectangle
    return q_proj + kv_proj + o_proj + scores_pv


def ffn_flops(dims: TextDims, rows: Any, layer: int | None = None) -> Any:
    """One FFN operator on `rows` rows (the MLP kind of `layer`)."""
    d = dims.hidden
    kind = dims.mlp_at(layer)
    if kind == "gated":
        return 2 * 3 * rows * d * dims.ffn
    if kind == "plain":
        return 2 * 2 * rows * d * dims.ffn
    router = 2 * d * dims.experts
    experts = dims.top_k * 2 * 3 * d * dims.expert_ffn
    shared = 2 * 3 * d * dims.shared_ffn
    return rows * (router + experts + shared)


def frozen_rows(V: Any = V, scope: str = "visual", P: Any = P, rows: str = "visual", V_video: Any = V_video) -> Any:
    """Rows a skipped operator leaves unchanged: the selected visual rows (V, V_video or
    V - V_video for rows visual / video / image), + P under 'prefix_through_visual'."""
    selected = {"visual": V, "video": V_video, "image": V - V_video}.get(rows)
    if selected is None:
        raise PlanError(f"unknown rows {rows!r}")
    if scope == "visual":
        return selected
    if scope == "prefix_through_visual":
        return selected + P
    raise PlanError(f"unknown scope {scope!r}")


def layer_flops(
    dims: TextDims, op: str = "full", S: Any = S, V: Any = V, *, layer: int | None = None,
    scope: str = "visual", P: Any = P, rows: str = "visual", V_video: Any = V_video,
) -> dict[str, Any]:
    """{"attn": FLOPs, "ffn": FLOPs} of one decoder layer whose visual rows get `op`."""
    if op not in ("full", "skip_attn", "skip_ffn", "skip_both"):
        raise PlanError(f"unknown op {op!r}")
    R = frozen_rows(V, scope, P, rows, V_video)
    q_rows = S - R if op in ("skip_attn", "skip_both") else S
    ffn_rows = S - R if op in ("skip_ffn", "skip_both") else S
    return {"attn": _tidy(attn_flops(dims, q_rows, S)), "ffn": _tidy(ffn_flops(dims, ffn_rows, layer))}


def _tidy(x: Any) -> Any:
    """Expanded polynomial for sympy input, the plain number otherwise."""
    return sympy.expand(x) if isinstance(x, sympy.Basic) else x


def op_savings(
    dims: TextDims, layer: int, op: str, S: Any = S, V: Any = V, *, scope: str = "visual", P: Any = P,
    rows: str = "visual", V_video: Any = V_video,
) -> Any:
    """FLOPs saved by skipping one operator ("attn" or "ffn") of `layer` for the frozen rows."""
    if op not in ("attn", "ffn"):
        raise ValueError(f"op must be 'attn' or 'ffn', got {op!r}")
    sel = dict(scope=scope, P=P, rows=rows, V_video=V_video)
    full = layer_flops(dims, "full", S, V, layer=layer, **sel)[op]
    skipped = layer_flops(dims, f"skip_{op}", S, V, layer=layer, **sel)[op]
    return _tidy(full - skipped)


def model_flops(dims: TextDims, plan: SkipPlan | None = None, S: Any = S, V: Any = V, P: Any = P,
                V_video: Any = V_video) -> Any:
    """Decoder prefill FLOPs of the whole model, unmodified (plan None) or under `plan`
    (V_video: the video rows among V, used by a plan whose rows name one modality)."""
    if plan is None and not dims.dense_layers:
        per_layer = layer_flops(dims, "full", S, V)
        return _tidy(dims.layers * (per_layer["attn"] + per_layer["ffn"]))
    _check_layers(dims, plan)
    ops = plan.ops if plan is not None else ("full",) * dims.layers
    scope = plan.scope if plan is not None else "visual"
    rows = plan.rows if plan is not None else "visual"
    total = 0
    for i, op in enumerate(ops):
        f = layer_flops(dims, op, S, V, layer=i, scope=scope, P=P, rows=rows, V_video=V_video)
        total += f["attn"] + f["ffn"]
    return _tidy(total)


def evaluate(expr: Any, **values: int) -> int:
    """Numeric value of a FLOPs expression, e.g. evaluate(e, S=1088, V=1024)."""
    if not isinstance(expr, sympy.Basic):
        return int(expr)
    subs = {sym: values[sym.name] for sym in expr.free_symbols if sym.name in values}
    out = expr.subs(subs)
    if out.free_symbols:
        raise ValueError(f"no value given for {', '.join(sorted(s.name for s in out.free_symbols))}")
    return int(out)


def plan_report(
    dims: TextDims, plan: SkipPlan | None, S_value: int, V_value: int, P_value: int = 0, V_video_value: int = 0,
) -> dict[str, Any]:
    """Numbers for people and machines: full vs plan FLOPs, reduction, per-layer breakdown.
    V_value counts every visual row, V_video_value the video rows among them."""
    plan = plan if plan is not None else SkipPlan.full(_int_layers(dims))
    _check_layers(dims, plan)
    if min(S_value, V_value, P_value) < 0 or V_value + P_value > S_value:
        raise ValueError(f"need 0 <= visual ({V_value}) + prefix ({P_value}) <= sequence ({S_value})")
    if not 0 <= V_video_value <= V_value:
        raise ValueError(f"need 0 <= video rows ({V_video_value}) <= visual rows ({V_value})")
    sel = dict(scope=plan.scope, P=P_value, rows=plan.rows, V_video=V_video_value)
    layers = []
    for i, op in enumerate(plan.ops):
        full = layer_flops(dims, "full", S_value, V_value, layer=i, **sel)
        mine = layer_flops(dims, op, S_value, V_value, layer=i, **sel)
        layers.append({
            "layer": i,
            "op": op,
            "full": int(full["attn"] + full["ffn"]),
            "plan": int(mine["attn"] + mine["ffn"]),
            "saved": int(full["attn"] + full["ffn"] - mine["attn"] - mine["ffn"]),
            "attn_saved": int(full["attn"] - mine["attn"]),
            "ffn_saved": int(full["ffn"] - mine["ffn"]),
        })
    total_full = sum(r["full"] for r in layers)
    total_plan = sum(r["plan"] for r in layers)
    return {
        "S": S_value,
        "V": V_value,
        "P": P_value,
        "V_video": V_video_value,
        "scope": plan.scope,
        "rows": plan.rows,
        "full": total_full,
        "plan": total_plan,
        "saved": total_full - total_plan,
        "reduction": (total_full - total_plan) / total_full if total_full else 0.0,
        "layers": layers,
    }


def _int_layers(dims: TextDims) -> int:
    if not isinstance(dims.layers, int):
        raise DimsError("numeric FLOPs need an int layer count")
    return dims.layers


def _check_layers(dims: TextDims, plan: SkipPlan | None) -> None:
    n = _int_layers(dims)
    if plan is not None and plan.num_layers != n:
        raise PlanError(f"plan has {plan.num_layers} layers but the model has {n}")

