"""DecoderCore: the language model's prefill as one traceable function.

The HF text models build their masks and position ids with data-dependent code (packed-sequence
detection, `get_rope_index`, boolean-mask DeepStack). The core keeps only what a prefill graph
needs, with everything data-dependent computed outside by the adapter:

    forward(inputs_embeds, position_ids, *deepstack) -> (logits, k_0, v_0, ..., k_{L-1}, v_{L-1})
    forward(inputs_embeds, position_ids, kept_index, kept_valid, attention_mask, *deepstack)   # layout_inputs=True

The second form takes the layout as data (vskip_compile.kept_rows) and a left-padding mask:
one graph, its sequence length and kept count symbolic, serves every layout and mixed batches.

It calls the model's own decoder layers (same modules, same weights), so the graph has the shape
the passes expect (`layers.<i>.self_attn`, `layers.<i>.mlp`, one SDPA per layer). K/V of every
layer, full rows, come out as graph outputs.

No S x S mask on SDPA attention on CPU: the layers get no mask, so SDPA runs with
is_causal=True (HF's own choice without padding; the CPU flash kernel builds no mask), and a
left-padded batch is turned into a right-padded one inside the graph (`LeftPadRoll`: each batch
row's rows rotated by its padding, and back at the outputs), where causal attention alone keeps
every real row off the padding keys. One graph serves padded and unpadded batches. A skipped
operator's K kept query rows get a K x S mask built from their positions (passes/rules.py, the
SDPA rule). Eager attention, sliding-window layers and CUDA (whose is_causal kernel, flash,
takes no mask for the cut rows) keep an explicit causal S x S mask.

MoE experts run with the row-wise "batched_mm" implementation while the core (or DecodeStep)
is traced (vskip_compile.experts).

Recurrent layers (Qwen3.5's gated-delta-net linear attention, config.layer_types
"linear_attention"): their token mixer reads the rows in order into a conv state and a
recurrent state, so the core keeps HF's left-padded layout for a model that has them (no
LeftPadRoll: padding rotated to the end would run into the final state). Such a layer gets
the 2D padding mask [B, S] (HF zeroes padding rows with it: apply_mask_to_padding_states);
full-attention layers get the explicit causal mask with padding keys masked (padding_mask).
Its two outputs are (conv_state [B, C, W], recurrent_state [B, H, Dk, Dv]), what HF's
LinearAttentionLayer cache holds after the prefill, in place of (k, v); DecodeStep takes and
returns them alike.

DecodeStep is its decode counterpart: one new token over a fixed-size, masked KV cache,

    forward(inputs_embeds [B, 1, D], position_ids [B, 1] or [3, B, 1], past_mask [B, T] bool,
            k_0, v_0, ... [B, KV, T, E]) -> (logits [B, 1, V], k_new_0, v_new_0, ... [B, KV, 1, E])

(a recurrent layer's pair: its conv and recurrent state in, the updated states out)

the same graph for every plan (decoding is the unmodified model). CompiledVLM.generate compiles
it with the prefill's inner backend; the ONNX / TensorRT exporters (vskip_compile.export.decode)
lower it to files.
"""

from __future__ import annotations

import contextlib
import inspect
import traceback

import torch
from torch import nn
from torch.nn import functional as F

from . import flex
from .errors import VSkipError
from .experts import experts_configs, restore_experts, use_traceable_experts
from .kept_rows import kept_rows
from .outside import FINAL_NORMS, embedding_multiplier, final_norm, rotary_layers, scale_embeddings


class KVCache:
    """Stands in for a HF `Cache`: keeps each layer's K/V, grown by concatenation.

    5.24 attention calls `cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)`
    with K after RoPE, shape [B, KV, S, E]: exactly what a DynamicCache stores for decoding.
    A prefill's first update returns K/V as they are (what DecoderCore records); eager decoding
    (the token-dropping baselines, the eval harness) appends to it. Layers may hold different
    lengths (tokens dropped from some layer on). `record` maps what is stored (DecoderCore:
    K/V rotated back to the left-padded layout, attention keeps the rotated ones).

    With `states` (DecoderCore's prefill), recurrent layers record their final conv and
    recurrent state (HF's LinearAttentionLayer calls, a prefill: no state before the first
    row); without, such a layer is refused by name (eager decoding carries K/V only).
    """

    def __init__(self, record=None, states: bool = False) -> None:
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.record = record
        self.states = states
        self.conv: dict[int, torch.Tensor] = {}
        self.recurrent: dict[int, torch.Tensor] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.record is not None:
            self.kv[layer_idx] = (self.record(key_states), self.record(value_states))
            return key_states, value_states
        if layer_idx in self.kv:
            k, v = self.kv[layer_idx]
            key_states = torch.cat([k, key_states], dim=2)  # [B, KV, S+n, E]
            value_states = torch.cat([v, value_states], dim=2)
        self.kv[layer_idx] = (key_states, value_states)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.kv[layer_idx][0].shape[2]) if layer_idx in self.kv else 0

    # -- recurrent layers (prefill only) ---------------------------------------------------
    def _recurrent(self, layer_idx: int, state_idx: int) -> None:
        if not self.states:
            raise RecurrentLayerError(f"this path's KVCache carries K/V only (eager decoding: the token-dropping "
                                      f"baselines, the shared-prefix harness); decoder layer {layer_idx} is a "
                                      "recurrent (linear-attention) layer whose conv and recurrent states it does not keep")
        if state_idx != 0:
            raise RecurrentLayerError(f"decoder layer {layer_idx} keeps more than one conv / recurrent state "
                                      f"(state_idx {state_idx}); the vskip core carries one")

    def get_conv_state(self, layer_idx: int, state_idx: int = 0):
        self._recurrent(layer_idx, state_idx)
        return None

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0):
        self._recurrent(layer_idx, state_idx)
        return None

    def is_recording_past(self, layer_idx: int) -> bool:
        return False

    def update_conv_state(self, conv_states, layer_idx, state_idx: int = 0, conv_kernel_size: int | None = None, **kwargs):
        """conv_states [B, C, S], the conv's input rows: keeps the last W = conv_kernel_size
        (zeros before the first row, as HF pads a prefill shorter than W); returns them as is."""
        self._recurrent(layer_idx, state_idx)
        width = conv_kernel_size or conv_states.shape[-1]
        self.conv[layer_idx] = F.pad(conv_states, (width, 0))[..., -width:]  # [B, C, W]
        return conv_states

    def update_recurrent_state(self, recurrent_states, layer_idx, state_idx: int = 0, **kwargs):
        self._recurrent(layer_idx, state_idx)
        self.recurrent[layer_idx] = recurrent_states  # [B, H, Dk, Dv]
        return recurrent_states

    def layer_outputs(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer layer_idx's pair of graph outputs: (k, v), or a recurrent layer's (conv, recurrent) state."""
        if layer_idx in self.conv:
            return self.conv[layer_idx], self.recurrent[layer_idx]
        return self.kv[layer_idx]


def causal_mask(seq_len: int, device: torch.device, past: int = 0) -> torch.Tensor:
    """Boolean [1, 1, S, past + S] mask, True where a query row may attend: every one of `past`
    cached keys before the S new rows, and causally among the new rows (key <= query).

    Explicit rather than SDPA's `is_causal`: slicing the query rows of a skipped operator must
    slice the mask rows too, which `is_causal` (top-left aligned) cannot express.
    """
    rows = torch.arange(seq_len, device=device)
    mask = rows[:, None] >= rows[None, :]  # [S, S]
    if past:
        cached = torch.ones(seq_len, past, dtype=torch.bool, device=device)  # [S, past]
        return torch.cat([cached, mask], dim=1)[None, None]  # [1, 1, S, past + S]
    return mask.view(1, 1, seq_len, seq_len)  # [1, 1, S, S]


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as eager attention's additive float one: 0 where allowed, dtype's min elsewhere."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


class LeftPadRoll:
    """A left-padded batch as a right-padded one: batch row b's rows rotated by its padding
    pads[b], so its real rows come first (row j of the rotated layout is row (j + pads[b]) mod S).

    Causal attention on the rotated layout never lets a real row see a padding key (they all
    come after it), so SDPA needs no mask: is_causal=True, no S x S tensor. Positions and RoPE
    ids travel with their rows; relative distances between real rows (sliding windows) are
    unchanged. A padding row attends causally to the rows before it: finite, and never a key
    of a real row (decoding masks it by the attention mask). Costs one gather per input row
    tensor and per recorded K/V; zero padding rotates by 0 (an exact copy).
    """

    def __init__(self, attention_mask: torch.Tensor):
        seq_len = self.seq_len = attention_mask.shape[1]
        self.pads = (attention_mask == 0).sum(dim=1)  # [B], left padding (the runtime refuses other padding)
        rows = torch.arange(seq_len, device=attention_mask.device)  # [S]
        self.source = self.wrap(rows[None, :] + self.pads[:, None])  # [B, S]: rotated row j holds row source[b, j]
        self.back = self.wrap(rows[None, :] - self.pads[:, None])  # [B, S]: row i is rotated row back[b, i]

    def wrap(self, i: torch.Tensor) -> torch.Tensor:
        """i mod S for i in [-S, 2S), by two wheres: the ONNX exporter's remainder takes no
        symbolic divisor."""
        i = torch.where(i < 0, i + self.seq_len, i)
        return torch.where(i >= self.seq_len, i - self.seq_len, i)

    @staticmethod
    def take(x: torch.Tensor, index: torch.Tensor, axis: int, batch_axis: int) -> torch.Tensor:
        """x's rows index [B, n] along `axis`, the batch on `batch_axis` (broadcast elsewhere)."""
        view = [1] * x.ndim
        view[batch_axis], view[axis] = index.shape
        size = list(x.shape)
        size[axis] = index.shape[1]
        return torch.gather(x, axis, index.view(view).expand(size))  # x with axis of size n

    def rows(self, x: torch.Tensor, axis: int = 1) -> torch.Tensor:
        """x [.., B, S, ..] (sequence on `axis`, the batch before it) in the rotated layout."""
        return self.take(x, self.source, axis, axis - 1)

    def unrolled(self, x: torch.Tensor, axis: int = 1, last: int = 0) -> torch.Tensor:
        """x [B, .., S, ..] (batch first, sequence on `axis`) back in the left-padded layout;
        last > 0: only its last `last` rows."""
        return self.take(x, self.back[:, -last:] if last else self.back, axis, 0)

    def index(self, kept_index: torch.Tensor) -> torch.Tensor:
        """Kept-row indices [B, K] in the rotated layout."""
        return self.wrap(kept_index - self.pads[:, None])  # [B, K]


class CoreError(VSkipError, NotImplementedError):
    """A language model whose attention pattern the traced core does not reproduce."""


class RecurrentLayerError(CoreError):
    """A path that carries K/V only, given a model with recurrent (linear-attention) layers."""


# config.layer_types of recurrent token mixers whose state the core and DecodeStep carry (HF's
# LinearAttentionLayer cache: one conv state and one recurrent state per layer).
RECURRENT_TYPES = ("linear_attention",)


def recurrent_layers(language_model: nn.Module) -> tuple[bool, ...]:
    """Per decoder layer, whether it is recurrent (config.layer_types in RECURRENT_TYPES)."""
    types = getattr(language_model.config, "layer_types", None) or ()
    return tuple(i < len(types) and types[i] in RECURRENT_TYPES for i in range(len(language_model.layers)))


# The rows HF's chunked gated-delta rule takes at a time (torch_chunk_gated_delta_rule's chunk_size):
# its loop over ceil(S / 64) chunks is unrolled when traced, so the graph guards on that count.
RECURRENT_CHUNK = 64


def recurrent_chunks(recurrent: tuple[bool, ...], seq_len: int) -> int | None:
    """The chunk count a prefill of seq_len rows traces for a model with linear-attention layers
    (`recurrent`: recurrent_layers; one graph per count, S symbolic within: one entry would
    otherwise recompile for every 64 rows), None for other models."""
    return -(-seq_len // RECURRENT_CHUNK) if any(recurrent) else None


# The decoder-layer arguments run_layers passes (the cache under either name).
LAYER_ARGUMENTS = ("hidden_states", "attention_mask", "position_embeddings", "position_ids", "cache", "past_key_values",
                   "use_cache")


def check_recurrent_call(language_model: nn.Module) -> None:
    """Refuse (CoreError, naming them) recurrent layers whose forward takes arguments that
    run_layers does not pass (Qwen4-Exp's conv_mask, ple_input_ids): a padding mask that never
    reaches the recurrence would run padding into its state. Read once: inspect does not trace."""
    for i, (layer, recurrent) in enumerate(zip(language_model.layers, recurrent_layers(language_model))):
        params = inspect.signature(layer.forward).parameters.values()
        extra = [p.name for p in params if p.name not in LAYER_ARGUMENTS
                 and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
        if recurrent and extra:
            raise CoreError(f"{type(language_model).__name__}: recurrent decoder layer {i} ({type(layer).__name__}) "
                            f"takes {', '.join(extra)}, which the vskip core does not pass (its padding mask must "
                            "arrive as attention_mask)")


def refuse_recurrent(language_model: nn.Module, what: str) -> None:
    """Refuse (RecurrentLayerError, naming the first such layer) a model with recurrent layers
    in a path that carries K/V only (`what` names the path)."""
    recurrent = recurrent_layers(language_model)
    if any(recurrent):
        i = recurrent.index(True)
        raise RecurrentLayerError(f"{what} carries attention K/V only; {type(language_model).__name__}'s decoder layer "
                                  f"{i} is {language_model.config.layer_types[i]!r} (a recurrent conv / state "
                                  "layer): refused rather than run wrong; use vskip_compile.compile")


# What Dynamo raises when the model's own code cannot be traced as the core calls it (code that
# fails called this way, data-dependent control flow); errors of the backend (the passes, inductor)
# come wrapped otherwise and pass through.
TRACE_ERRORS = (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError, torch._dynamo.exc.TorchRuntimeError)


@contextlib.contextmanager
def model_trace_errors(language_model: nn.Module):
    """Inside the block, a trace error in the model's code becomes a CoreError naming the model,
    the line of its code and the error underneath: a structure the core does not reproduce
    (an MoE that loops over the experts a batch hits: Step3p7), refused by name, never a crash."""
    try:
        yield
    except TRACE_ERRORS as e:
        root = e
        while root.__cause__ is not None:
            root = root.__cause__
        frames = [f for f in traceback.extract_tb(e.__traceback__) if "/transformers/models/" in f.filename]
        where = f" at {frames[-1].filename.split('/transformers/')[-1]}:{frames[-1].lineno}" if frames else ""
        what = " ".join(str(root).split())[:200]
        raise CoreError(f"{type(language_model).__name__}: its decoder layers cannot be traced as the vskip core calls "
                        f"them{where} ({type(root).__name__}: {what})") from e


def attention_windows(language_model: nn.Module) -> tuple[int | None, ...]:
    """Per decoder layer, the sliding window its attention keeps (None: full causal, or a
    recurrent layer, recurrent_layers), read from config.layer_types / sliding_window as HF
    builds its mask mapping. Refuses (CoreError, naming the layer type) patterns the core does
    not build: chunked attention, other layer types."""
    config = language_model.config
    n = len(language_model.layers)
    check_structure(language_model)
    layer_mask(torch.ones(1, dtype=torch.bool), language_model, torch.float32)  # refuses other implementations now
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not types:  # Mistral-style: a sliding_window in the config applies to every layer
        types = ["sliding_attention" if isinstance(window, int) else "full_attention"] * n
    if getattr(config, "use_sliding_window", True) is False:  # Qwen2-style: layer_types name windows it never uses
        types = ["full_attention"] * n
    out: list[int | None] = []
    for i, t in enumerate(types[:n]):
        if t == "full_attention" or t in RECURRENT_TYPES:  # recurrent: no mask window (the 2D padding mask)
            out.append(None)
        elif t == "sliding_attention" and isinstance(window, int) and window > 0:
            out.append(window)
        else:
            raise CoreError(f"{type(language_model).__name__}: decoder layer {i} has attention type {t!r} "
                            f"(sliding_window {window!r}); the vskip core builds full and sliding-window causal masks only")
    return tuple(out)


def check_structure(language_model: nn.Module) -> None:
    """Refuse (CoreError, naming the missing part) a text model the core cannot call: it needs
    .layers, a final norm (vskip_compile.outside.FINAL_NORMS) and one .rotary_emb giving each
    layer its (cos, sin). What the text model applies outside its layers is reproduced
    (vskip_compile.outside; a field it does not reproduce is refused there, by name)."""
    missing = [name for name in ("layers", "rotary_emb") if not isinstance(getattr(language_model, name, None), nn.Module)]
    if final_norm(language_model) is None:
        missing.insert(1, " / ".join(FINAL_NORMS))
    if missing:
        raise CoreError(f"{type(language_model).__name__} has no {' | '.join(missing)} module: the vskip core calls "
                        "lm.layers with lm.rotary_emb's (cos, sin) and applies the final norm")
    embedding_multiplier(language_model)  # refuses a field read outside the layers that is not reproduced


def layer_mask(mask: torch.Tensor, language_model: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The boolean mask (True: may attend) in the form the model's attention reads: as is for
    SDPA, additive (0 / dtype min, as HF's create_causal_mask builds it) for eager attention,
    whose `attn_weights + mask` would add a boolean as 0/1. Other implementations: CoreError."""
    impl = getattr(language_model.config, "_attn_implementation", None) or "sdpa"
    if impl in ("sdpa", flex.NAME):  # flex.NAME dispatches a tensor mask to transformers' SDPA function
        return mask
    if impl == "eager":
        return torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    raise CoreError(f"{type(language_model).__name__}: attention implementation {impl!r}; the vskip core "
                    "traces 'sdpa' or 'eager' attention")


def windowed(mask: torch.Tensor, window: int | None, query_index: torch.Tensor | None = None) -> torch.Tensor:
    """mask [B, 1, Q, T] restricted to keys within `window` rows of each query (HF's
    sliding_window_overlay: key > query - window); query_index [Q] or [B, Q] gives the query
    rows' sequence indices (default: the last Q of T). window None: mask as is."""
    if window is None:
        return mask
    keys = torch.arange(mask.shape[-1], device=mask.device)  # [T]
    if query_index is None:
        query_index = keys[-mask.shape[-2]:]  # [Q]
    near = keys > query_index[..., :, None] - window  # [Q, T] or [B, Q, T]
    return mask & (near[None, None] if near.ndim == 2 else near[:, None])  # [B, 1, Q, T]


def prefill_masks(language_model: nn.Module, windows: tuple[int | None, ...], hidden: torch.Tensor,
                  blocks: torch.Tensor | None = None, padding: torch.Tensor | None = None) -> list:
    """Per layer, the mask a prefill over hidden [B, S, D] (no padding, or padding rotated to
    the right) passes: None for full causal SDPA layers on CPU (SDPA's is_causal: the CPU flash
    kernel takes no S x S tensor, and a cut layer's K x S rows as its mask), the explicit causal
    mask [1, 1, S, S] for sliding-window layers, eager attention and other devices (on CUDA,
    is_causal traces to the flash kernel, which takes no mask: the passes could not give a
    skipped operator's query rows theirs). With `blocks` [B, S] (bidirectional blocks: Gemma 3's
    images) every layer gets the explicit block mask [B, 1, S, S], windowed where it slides: the
    model's own mask, of which a skipped operator's kept query rows take their rows. With
    `padding` [B, S] (left padding kept in place: a model with recurrent layers) every layer
    gets the explicit mask with padding keys masked (padding_mask)."""
    impl = getattr(language_model.config, "_attn_implementation", None) or "sdpa"
    # flex.NAME sends a mask that is no FlexMask to transformers' SDPA
    sdpa = impl in ("sdpa", flex.NAME) and hidden.device.type == "cpu" and blocks is None and padding is None
    if sdpa and all(w is None for w in windows):
        return [None] * len(windows)
    mask = causal_mask(hidden.shape[1], hidden.device) if blocks is None else block_mask(blocks)  # [1 or B, 1, S, S]
    if padding is not None:
        mask = padding_mask(mask, padding)  # [B, 1, S, S]
    return [None if sdpa and w is None else layer_mask(windowed(mask, w), language_model, hidden.dtype) for w in windows]


def padding_mask(mask: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    """mask [1 or B, 1, S, S] with the keys that padding [B, S] (True: a real row) marks as
    padding masked, except each row's own key: a padding query row attends to itself alone
    (finite; no real row's key), a real row to no padding row. [B, 1, S, S]."""
    rows = torch.arange(padding.shape[1], device=padding.device)  # [S]
    own = rows[:, None] == rows[None, :]  # [S, S]
    return mask & (padding.bool()[:, None, None, :] | own)  # [B, 1, S, S]


def rotary_layer_types(language_model: nn.Module) -> tuple[str, ...] | None:
    """Per decoder layer, the layer type its rotary embedding is computed for, when the model's
    rotary embedding differs per layer type (Gemma 3: `rotary_emb(x, position_ids, layer_type)`,
    one base for sliding and one for full layers); None when one (cos, sin) serves every layer.
    Read once at construction: inspect does not trace."""
    rotary = language_model.rotary_emb
    if "layer_type" not in inspect.signature(rotary.forward).parameters:
        return None
    types = getattr(language_model.config, "layer_types", None)
    n = len(language_model.layers)
    if not types or len(types) < n:
        raise CoreError(f"{type(language_model).__name__}: its rotary embedding takes a layer type but "
                        f"config.layer_types names {len(types or ())} of its {n} layers")
    return tuple(types[:n])


def layer_position_embeddings(language_model: nn.Module, x: torch.Tensor, position_ids: torch.Tensor,
                              types: tuple[str, ...] | None, rotary: tuple[bool, ...]) -> tuple | list:
    """The (cos, sin) every layer gets: one pair for all, or a list of each layer's pair (one
    rotary call per layer type, `types` from rotary_layer_types, as HF's text model does; None
    for a layer `rotary` (vskip_compile.outside.rotary_layers) gives no rotary embedding)."""
    if types is None:
        pair = language_model.rotary_emb(x, position_ids)
        return pair if all(rotary) else [pair if r else None for r in rotary]
    by_type = {t: language_model.rotary_emb(x, position_ids, t) for t in dict.fromkeys(types)}
    return [by_type[t] if r else None for t, r in zip(types, rotary)]


def block_mask(blocks: torch.Tensor) -> torch.Tensor:
    """The causal mask with bidirectional blocks, [B, 1, S, S]: query q sees key k when k <= q or
    both rows are in one block. blocks [B, S]: each row's block id (vskip_compile.archs.blocks;
    a row alone in its block is plain causal)."""
    rows = torch.arange(blocks.shape[1], device=blocks.device)  # [S]
    causal = rows[:, None] >= rows[None, :]  # [S, S]
    same = blocks[:, :, None] == blocks[:, None, :]  # [B, S, S]
    return (causal[None] | same)[:, None]  # [B, 1, S, S]


def rope_axes(language_model: nn.Module) -> int:
    """How many M-RoPE axes the rotary embedding reads: its mrope_section's length (HunYuan-VL:
    4), else 3 (t, h, w; the count is unused for 2D position ids)."""
    sections = getattr(getattr(language_model, "rotary_emb", None), "mrope_section", None)
    return len(sections) if isinstance(sections, (list, tuple)) and sections else 3


def rope_position_ids(position_ids: torch.Tensor, axes: int = 3) -> torch.Tensor:
    """Position ids as the rotary embedding reads them: the [text; axes...] form with one row
    more than the rotary axes (Qwen's [text; t; h; w], [4, B, S]) keeps its last `axes` rows;
    [axes, B, S] and [B, S] pass as they are."""
    if position_ids.ndim == 3 and position_ids.shape[0] == axes + 1:
        return position_ids[1:]
    return position_ids


def cache_keyword(layer: nn.Module) -> str:
    """The name a decoder layer takes its cache under: `cache` in transformers 5.24,
    `past_key_values` in earlier 5.x (the GPU machine's 5.17)."""
    params = inspect.signature(layer.forward).parameters
    return "cache" if "cache" in params or "past_key_values" not in params else "past_key_values"


def shared_kv(language_model: nn.Module) -> bool:
    """Whether the decoder layers take a `shared_kv_states` dict (Gemma 4: the last layer of each
    type stores its K/V there; layers whose config.kv_sharing_modes entry is "reuse" attend with
    those instead of their own). With no reusing layer the dict is only written: the core passes
    a fresh one each call. Refused (CoreError, naming the layers): reuse, as the core carries each
    layer's own K/V through prefill and decoding; per-layer inputs (hidden_size_per_layer_input),
    which the core does not pass."""
    if "shared_kv_states" not in inspect.signature(language_model.layers[0].forward).parameters:
        return False
    config, name = language_model.config, type(language_model).__name__
    reusing = [i for i, mode in enumerate(getattr(config, "kv_sharing_modes", None) or ()) if mode == "reuse"]
    if reusing:
        raise CoreError(f"{name}: decoder layers {reusing} reuse the K/V of earlier layers (num_kv_shared_layers "
                        f"{config.num_kv_shared_layers}); the vskip core carries each layer's own K/V")
    if getattr(config, "hidden_size_per_layer_input", None):
        raise CoreError(f"{name}: per-layer inputs (hidden_size_per_layer_input {config.hidden_size_per_layer_input}) "
                        "are not passed to the decoder layers by the vskip core")
    return True


def run_layers(language_model: nn.Module, x: torch.Tensor, mask, position_embeddings, cache,
               experts_configs=(), deepstack: tuple[torch.Tensor, ...] = (), cache_kw: str = "cache",
               shared: bool = False) -> torch.Tensor:
    """The decoder layers over x [B, S, D] with an explicit mask and (cos, sin) (each one for all
    layers, or a list of one per layer) and a cache stand-in, DeepStack added after layers 0..n-1.
    MoE experts run their traceable implementation while traced (restored after), so the
    prefill and the decode step trace alike. shared: the layers get one fresh shared_kv_states
    dict (shared_kv: stored into, never read)."""
    switch = experts_configs if torch.compiler.is_compiling() else ()
    saved = use_traceable_experts(switch)
    n = len(language_model.layers)
    masks = mask if isinstance(mask, list) else [mask] * n  # a FlexMask is a tuple: one for all
    rope = position_embeddings if isinstance(position_embeddings, list) else [position_embeddings] * n
    extra = {"shared_kv_states": {}} if shared else {}
    try:
        for i, layer in enumerate(language_model.layers):
            x = layer(
                x,
                attention_mask=masks[i],
                position_embeddings=rope[i],
                position_ids=None,
                use_cache=True,
                **{cache_kw: cache},
                **extra,
            )
            x = x[0] if isinstance(x, tuple) else x  # layers that still return (hidden_states, ...)
            if i < len(deepstack):
                x = x + deepstack[i]  # [B, S, D], zero outside the visual rows
    finally:
        restore_experts(switch, saved)
    return x


class DecoderCore(nn.Module):
    """Prefill of a HF text decoder: embeddings in, logits and per-layer K/V out.

    `logits_to_keep` = 0 gives logits for all rows (what `model(**inputs)` returns); n > 0 the
    last n rows (generate needs the last one). The number of DeepStack tensors is fixed at
    construction: they are added, full size and zero at non-visual rows, after layers 0..n-1.
    With `attention_blocks`, the last input is blocks [B, S] (bidirectional blocks of the
    model's mask, vskip_compile.archs.blocks) and every layer gets the block mask.
    """

    def __init__(
        self,
        language_model: nn.Module,
        lm_head: nn.Module,
        logits_to_keep: int = 0,
        num_deepstack: int = 0,
        layout_inputs: bool = False,
        attention: str = "sdpa",
        attention_blocks: bool = False,
    ):
        super().__init__()
        self.windows = attention_windows(language_model)
        self.recurrent = recurrent_layers(language_model)
        check_recurrent_call(language_model)
        self.rotary_types = rotary_layer_types(language_model)
        self.rope_axes = rope_axes(language_model)
        if any(self.recurrent) and attention != "sdpa":
            raise CoreError(f"attention={attention!r} with recurrent (linear-attention) layers; use attention='sdpa'")
        if attention == "flex" and attention_blocks:
            raise CoreError("attention='flex' does not express bidirectional attention blocks (vskip_compile.flex "
                            "masks causally only); use attention='sdpa'")
        if attention not in flex.ATTENTIONS:
            raise ValueError(f"attention must be one of {flex.ATTENTIONS}, got {attention!r}")
        if attention == "flex" and any(w is not None for w in self.windows):
            raise CoreError("attention='flex' does not express sliding-window layers (vskip_compile.flex masks "
                            "causally only); use attention='sdpa'")
        if attention == "flex":
            flex.dispatch_to_flex(language_model.config)
        if logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be >= 0, got {logits_to_keep}")
        if num_deepstack > len(language_model.layers):
            raise ValueError(f"{num_deepstack} DeepStack inputs but only {len(language_model.layers)} layers")
        self.lm = language_model
        self.lm_head = lm_head
        self.logits_to_keep = logits_to_keep
        self.num_deepstack = num_deepstack
        self.layout_inputs = layout_inputs
        self.attention = attention
        self.attention_blocks = attention_blocks
        self.experts_configs = experts_configs(language_model)  # MoE: switched while traced
        self.cache_kw = cache_keyword(language_model.layers[0])  # read here: inspect does not trace
        self.shared_kv = shared_kv(language_model)  # Gemma 4's K/V store (refuses reuse)
        self.embedding_multiplier = embedding_multiplier(language_model)  # Granite; read here, as cache_kw
        self.rotary = rotary_layers(language_model)  # MuseGlimmer's NoPE layers get no rotary embedding

    @classmethod
    def from_model(
        cls, model: nn.Module, adapter, logits_to_keep: int = 0, num_deepstack: int = 0, layout_inputs: bool = False,
        attention: str = "sdpa", attention_blocks: bool = False,
    ) -> "DecoderCore":
        return cls(adapter.language_model(model), adapter.lm_head(model), logits_to_keep, num_deepstack, layout_inputs,
                   attention, attention_blocks)

    @property
    def num_layers(self) -> int:
        return len(self.lm.layers)

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, *rest: torch.Tensor):
        """rest: the DeepStack tensors; with layout_inputs, first kept_index [B, K],
        kept_valid [B, K] (vskip_compile.kept_rows) and attention_mask [B, S] (left padding);
        with attention_blocks, last the blocks [B, S]."""
        inputs_embeds = scale_embeddings(inputs_embeds, self.embedding_multiplier)  # as the text model does first
        blocks = None
        if self.attention_blocks:
            *rest, blocks = rest
        if self.layout_inputs:
            kept_index, kept_valid, attention_mask, *deepstack = rest
        else:
            deepstack = rest
            attention_mask = None
        if len(deepstack) != self.num_deepstack:
            raise ValueError(f"core built for {self.num_deepstack} DeepStack inputs, got {len(deepstack)}")
        roll = None
        recurrent = any(self.recurrent)  # rows read in order: padding stays in front, masked (module doc)
        if self.attention == "sdpa" and attention_mask is not None and not recurrent:  # padding: rotate it to the right (no mask)
            roll = LeftPadRoll(attention_mask)
            inputs_embeds = roll.rows(inputs_embeds)  # [B, S, D]
            position_ids = roll.rows(position_ids, position_ids.ndim - 1)  # [.., B, S]
            deepstack = [roll.rows(d) for d in deepstack]  # [B, S, D] each
            kept_index = roll.index(kept_index)  # [B, K]
            blocks = None if blocks is None else roll.rows(blocks)  # [B, S]: ids travel with their rows
        if self.layout_inputs:
            inputs_embeds = kept_rows(inputs_embeds, kept_index, kept_valid)  # marks the layout inputs
        recorder = KVCache(record=None if roll is None else lambda t: roll.unrolled(t, axis=2),  # [B, KV, S, E]
                           states=recurrent)
        position_embeddings = layer_position_embeddings(self.lm, inputs_embeds,
                                                        rope_position_ids(position_ids, self.rope_axes), self.rotary_types,
                                                        self.rotary)
        if self.attention == "flex":
            if attention_mask is None:
                attention_mask = inputs_embeds.new_ones(inputs_embeds.shape[:2], dtype=torch.bool)  # [B, S]
            x = run_layers(self.lm, inputs_embeds, flex.flex_mask(attention_mask, inputs_embeds),
                           position_embeddings, recorder, self.experts_configs, deepstack, self.cache_kw, self.shared_kv)
        else:
            masks = prefill_masks(self.lm, self.windows, inputs_embeds, blocks, attention_mask if recurrent else None)
            masks = [attention_mask if r else m for r, m in zip(self.recurrent, masks)]  # recurrent: [B, S] or None
            x = run_layers(self.lm, inputs_embeds, masks, position_embeddings, recorder, self.experts_configs,
                           deepstack, self.cache_kw, self.shared_kv)
        if roll is not None:
            x = roll.unrolled(x, last=self.logits_to_keep)  # [B, n or S, D], left-padded again
        elif self.logits_to_keep:
            x = x[:, -self.logits_to_keep :, :]  # [B, n, D]
        x = final_norm(self.lm)(x)
        logits = self.lm_head(x)  # [B, n or S, V] (adapter.lm_head: with the logit transforms the VLM applies)

        kv: list[torch.Tensor] = []
        for i in range(self.num_layers):
            kv.extend(recorder.layer_outputs(i))  # k_i, v_i: [B, KV, S, E] (recurrent: conv, recurrent state)
        return (logits, *kv)


class _AppendCache:
    """Stands in for a HF Cache for one step: attention sees [past slots, new row]; the new
    rows are recorded as graph outputs. 5.24 attention calls
    `cache.update(key_states, value_states, layer_idx, kwargs=...)` with K after RoPE.
    A recurrent layer gets its past (conv, recurrent) state, and its updated ones are recorded:
    the conv state as a copy, which HF's single-token path updates in place
    (causal_conv1d_update; functionalized in the graph)."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]]):
        self.past = past
        self.new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.conv: dict[int, torch.Tensor] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.new[layer_idx] = (key_states, value_states)  # [B, KV, 1, E]
        past_k, past_v = self.past[layer_idx]  # [B, KV, T, E]
        return torch.cat([past_k, key_states], dim=2), torch.cat([past_v, value_states], dim=2)  # [B, KV, T+1, E]

    def get_conv_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor:
        self.conv[layer_idx] = self.past[layer_idx][0].clone()  # [B, C, W]
        return self.conv[layer_idx]

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor:
        return self.past[layer_idx][1]  # [B, H, Dk, Dv]

    def is_recording_past(self, layer_idx: int) -> bool:
        return False

    def update_conv_state(self, conv_states, layer_idx, *args, **kwargs):
        raise CoreError(f"decoder layer {layer_idx} updates its conv state as a prefill does, not one token's step")

    def update_recurrent_state(self, recurrent_states, layer_idx, *args, **kwargs):
        self.new[layer_idx] = (self.conv[layer_idx], recurrent_states)  # updated conv state, [B, H, Dk, Dv]
        return recurrent_states


class DecodeStep(nn.Module):
    """The decoder layers of a HF text model for one token over a masked fixed-size cache."""

    def __init__(self, language_model: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.lm = language_model
        self.lm_head = lm_head
        self.experts_configs = experts_configs(language_model)  # MoE: switched while traced, as in DecoderCore
        self.cache_kw = cache_keyword(language_model.layers[0])
        self.shared_kv = shared_kv(language_model)
        self.windows = attention_windows(language_model)
        self.recurrent = recurrent_layers(language_model)
        check_recurrent_call(language_model)
        self.rotary_types = rotary_layer_types(language_model)
        self.embedding_multiplier = embedding_multiplier(language_model)
        self.rotary = rotary_layers(language_model)

    @property
    def num_layers(self) -> int:
        return len(self.lm.layers)

    def forward(self, inputs_embeds, position_ids, past_mask, *past_kv):
        """past_kv: per layer (k, v) [B, KV, T, E], or a recurrent layer's (conv, recurrent) state."""
        inputs_embeds = scale_embeddings(inputs_embeds, self.embedding_multiplier)  # the new token, as in prefill
        if len(past_kv) != 2 * self.num_layers:
            raise ValueError(f"expected {2 * self.num_layers} past K/V tensors, got {len(past_kv)}")
        cache = _AppendCache([(past_kv[2 * i], past_kv[2 * i + 1]) for i in range(self.num_layers)])
        self_slot = torch.ones_like(past_mask[:, :1])  # [B, 1]
        mask = torch.cat([past_mask, self_slot], dim=1)[:, None, None, :]  # [B, 1, 1, T+1]
        query = None
        if any(w is not None for w in self.windows):  # sliding layers: past slots within the window of slot n
            slots = torch.arange(past_mask.shape[1], device=past_mask.device)  # [T]
            query = (slots * past_mask).amax(dim=1, keepdim=True) + 1  # [B, 1]: the new token's slot n (row T: itself)
        masks = [None if r else layer_mask(windowed(mask, w, query), self.lm, inputs_embeds.dtype)  # recurrent: HF's
                 for w, r in zip(self.windows, self.recurrent)]  # one-token step passes no padding mask
        position_embeddings = layer_position_embeddings(self.lm, inputs_embeds, position_ids, self.rotary_types, self.rotary)
        x = run_layers(self.lm, inputs_embeds, masks, position_embeddings, cache, self.experts_configs,
                       cache_kw=self.cache_kw, shared=self.shared_kv)  # [B, 1, D]
        logits = self.lm_head(final_norm(self.lm)(x))  # [B, 1, V]
        new_kv: list[torch.Tensor] = []
        for i in range(self.num_layers):
            new_kv.extend(cache.new[i])  # k_new_i, v_new_i: [B, KV, 1, E] (recurrent: the new states)
        return (logits, *new_kv)
