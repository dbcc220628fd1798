"""SkipPlan: which operator updates the visual rows get, per decoder layer.

Plain data (no torch, no transformers). A plan is a versioned JSON file; everything that
reads one refuses what it does not understand, with an error naming the problem.

Schema versions: 1 (ops, scope) and 2, which adds `rows`: the visual rows a skip freezes,
"visual" (image and video rows alike, the default), "image" or "video". A version-1 file
reads as version 2 with rows "visual" (`migrate`), which is what it meant; plans are written
as version 2.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping
from .errors import VSkipError

PLAN_VERSION = 2
READS = (1, 2)  # plan file versions this build reads (1 is migrated on load)
OPS = ("full", "skip_attn", "skip_ffn", "skip_both")
SCOPES = ("visual", "prefix_through_visual")
ROWS = ("visual", "image", "video")  # = vskip_compile.layout.ROWS
_KEYS = {"version", "num_layers", "ops", "model", "name", "provenance", "scope", "rows"}

# Text-config fields that decide whether a plan fits a model.
_HASHED_CONFIG_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)


# OpSkip list name -> our op for the layers it lists (their lists name what is KEPT).
_OPSKIP_LISTS = {"attention_only": "skip_ffn", "ffn_only": "skip_attn", "freeze": "skip_both"}
# Keys of theirs that carry no semantics for us; kept in provenance for the round trip.
_OPSKIP_EXTRA = {"preset", "checkpoint", "source", "use_triton", "mlp_chunk_size", "rmsnorm_backend"}
_OPSKIP_KEYS = set(_OPSKIP_LISTS) | _OPSKIP_EXTRA | {"model_family", "num_layers", "budget", "freeze_scope"}


class PlanError(VSkipError, ValueError):
    """A skip plan is malformed or does not fit the model it is applied to."""


def _is_int(value: Any) -> bool:
    """An int that is not a bool (JSON `true` parses to True, which Python counts as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object_pairs_hook: a key given twice is refused (json keeps the last one silently)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise PlanError(f"key {key!r} appears twice")
        out[key] = value
    return out


def config_hash(text_config: Mapping[str, Any]) -> str:
    """Short stable hash of the text-config fields a plan depends on."""
    picked = {k: text_config.get(k) for k in _HASHED_CONFIG_KEYS}
    blob = json.dumps(picked, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class SkipPlan:
    """One op per decoder layer, out of OPS; `scope` and `rows` say which rows a skip freezes
    (`rows`: every visual span, or only the image or only the video spans)."""

    ops: tuple[str, ...]
    num_layers: int | None = None
    name: str | None = None
    model: Mapping[str, Any] | None = field(default=None, compare=False)
    provenance: Mapping[str, Any] | None = field(default=None, compare=False)
    scope: str = "visual"
    version: int = PLAN_VERSION
    rows: str = "visual"

    def __post_init__(self) -> None:
        if isinstance(self.ops, (str, bytes, Mapping)):
            raise PlanError(f"plan field 'ops' must be a list of op names, got {type(self.ops).__name__}")
        object.__setattr__(self, "ops", tuple(self.ops))
        if self.num_layers is None:
            object.__setattr__(self, "num_layers", len(self.ops))
        # JSON true/false are Python bools, which are ints: refused where an int is meant.
        if not _is_int(self.version) or self.version != PLAN_VERSION:
            raise PlanError(f"unknown plan version {self.version!r} (this build reads "
                            f"{', '.join(map(str, READS))}; a version-1 plan is migrated by SkipPlan.from_dict / load)")
        if not _is_int(self.num_layers) or self.num_layers < 1:
            raise PlanError(f"num_layers must be a positive int, got {self.num_layers!r}")
        for i, op in enumerate(self.ops):
            if not isinstance(op, str) or op not in OPS:
                raise PlanError(f"unknown op {op!r} at layer {i}; expected one of {', '.join(OPS)}")
        if len(self.ops) != self.num_layers:
            raise PlanError(f"plan has {len(self.ops)} ops but num_layers={self.num_layers}")
        if not isinstance(self.scope, str) or self.scope not in SCOPES:
            raise PlanError(f"unknown scope {self.scope!r}; expected one of {', '.join(SCOPES)}")
        if not isinstance(self.rows, str) or self.rows not in ROWS:
            raise PlanError(f"unknown rows {self.rows!r}; expected one of {', '.join(ROWS)}")
        if self.name is not None and not isinstance(self.name, str):
            raise PlanError(f"plan field 'name' must be a string, got {self.name!r} ({type(self.name).__name__})")
        for key in ("model", "provenance"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, Mapping):
                raise PlanError(f"plan field {key!r} must be a JSON object, got {value!r} ({type(value).__name__})")
        for key in ("architecture", "config_hash"):
            value = (self.model or {}).get(key)
            if value is not None and not isinstance(value, str):
                raise PlanError(f"plan field 'model.{key}' must be a string, got {value!r} ({type(value).__name__})")

    # -- construction -------------------------------------------------------------------
    @classmethod
    def full(cls, num_layers: int, **kw: Any) -> "SkipPlan":
        return cls(("full",) * num_layers, num_layers, **kw)

    @classmethod
    def from_ops(cls, ops: Iterable[str], **kw: Any) -> "SkipPlan":
        return cls(tuple(ops), **kw)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SkipPlan":
        """A plan from its JSON object, of any version in READS (older ones migrated)."""
        if not isinstance(d, Mapping):
            raise PlanError(f"a plan is a JSON object, got {type(d).__name__}")
        d = migrate(d)
        unknown = set(d) - _KEYS
        if unknown:
            raise PlanError(f"unknown plan key(s): {', '.join(sorted(unknown))}")
        for key in ("version", "num_layers", "ops"):
            if key not in d:
                raise PlanError(f"plan is missing required key {key!r}")
        if not isinstance(d["ops"], list):
            raise PlanError("plan key 'ops' must be a list of op names")
        return cls(
            ops=tuple(d["ops"]),
            num_layers=d["num_layers"],
            name=d.get("name"),
            model=d.get("model"),
            provenance=d.get("provenance"),
            scope=d.get("scope", "visual"),
            version=d["version"],
            rows=d.get("rows", "visual"),
        )

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"version": self.version, "num_layers": self.num_layers, "ops": list(self.ops)}
        if self.scope != "visual":
            d["scope"] = self.scope
        if self.rows != "visual":
            d["rows"] = self.rows
        for key in ("name", "model", "provenance"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        return d

    @classmethod
    def load(cls, path: str | Path) -> "SkipPlan":
        """Read a plan file; every refusal names the file (and the field)."""
        path = Path(path)
        if path.is_dir():
            raise PlanError(f"{path}: is a directory, not a plan file")
        if not path.exists():
            raise PlanError(f"plan file not found: {path}")
        try:
            d = json.loads(path.read_text(), object_pairs_hook=_unique_keys)
        except OSError as e:
            raise PlanError(f"{path}: cannot read the plan file ({e.strerror or e})") from e
        except (json.JSONDecodeError, UnicodeDecodeError, PlanError) as e:
            raise PlanError(f"{path}: not a JSON plan file ({e})") from e
        try:
            return cls.from_dict(d)
        except PlanError as e:
            raise PlanError(f"{path}: {e}") from e

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    # -- queries --------------------------------------------------------------------------
    def skips_attn(self, layer: int) -> bool:
        return self.ops[layer] in ("skip_attn", "skip_both")

    def skips_ffn(self, layer: int) -> bool:
        return self.ops[layer] in ("skip_ffn", "skip_both")

    @property
    def is_full(self) -> bool:
        return all(op == "full" for op in self.ops)

    def with_model(self, architecture: str, text_config: Mapping[str, Any]) -> "SkipPlan":
        """The same plan stamped with the model it was made for."""
        model = {"architecture": architecture, "config_hash": config_hash(text_config)}
        return dataclasses.replace(self, model=model)

    def check_model(
        self, architecture: str, num_layers: int, text_config: Mapping[str, Any], aliases: Iterable[str] = (),
    ) -> None:
        """Refuse a plan made for another model (layer count, architecture or config hash).

        `aliases` are other names of the same architecture (an HF model_type such as
        "qwen3_vl", the family name OpSkip policies use) that a plan may carry instead."""
        if self.num_layers != num_layers:
            raise PlanError(f"plan has {self.num_layers} layers but the model has {num_layers}")
        if not self.model:
            return
        want_arch = self.model.get("architecture")
        if want_arch and want_arch != architecture and want_arch not in set(aliases):
            raise PlanError(f"plan was made for architecture {want_arch!r}, model is {architecture!r}")
        want_hash = self.model.get("config_hash")
        if want_hash and want_hash != config_hash(text_config):
            raise PlanError(
                f"plan was made for a model with text-config hash {want_hash}, "
                f"this model's is {config_hash(text_config)}"
            )

    # -- the authors' policy format (GitHub zayan-l/OpSkip, configs/<family>/preset{N}.json) --
    @classmethod
    def from_opskip(cls, policy: Mapping[str, Any], num_layers: int | None = None) -> "SkipPlan":
        """Read an OpSkip policy. Its lists name what visual rows KEEP: `attention_only`
        (skip the FFN), `ffn_only` (skip attention), `freeze` (skip both)."""
        if not isinstance(policy, Mapping):
            raise PlanError(f"an OpSkip policy is a JSON object, got {type(policy).__name__}")
        unknown = set(policy) - _OPSKIP_KEYS
        if unknown:
            raise PlanError(f"unknown OpSkip policy key(s): {', '.join(sorted(unknown))}")
        n = policy.get("num_layers")
        if not _is_int(n) or n < 1:
            raise PlanError(f"OpSkip policy needs a positive int num_layers, got {n!r}")
        if num_layers is not None and n != num_layers:
            raise PlanError(f"OpSkip policy has num_layers={n} but the model has {num_layers} layers")
        ops = ["full"] * n
        owner: dict[int, str] = {}
        for key, op in _OPSKIP_LISTS.items():
            layers = policy.get(key, [])
            if not isinstance(layers, list):
                raise PlanError(f"OpSkip key {key!r} must be a list of layer indices")
            for layer in layers:
                if not _is_int(layer) or not 0 <= layer < n:
                    raise PlanError(f"OpSkip {key}: layer {layer!r} is out of range 0..{n - 1}")
                if layer in owner:
                    where = "twice in " + key if owner[layer] == key else f"in both {owner[layer]} and {key}"
                    raise PlanError(f"OpSkip policy lists layer {layer} {where}")
                owner[layer] = key
                ops[layer] = op
        budget = policy.get("budget")
        if budget is not None and not _is_int(budget):
            raise PlanError(f"OpSkip budget must be an int (the number of layers listed), got {budget!r}")
        if budget is not None and budget != len(owner):
            raise PlanError(f"OpSkip budget {budget!r} does not match the {len(owner)} layers listed")
        scope = policy.get("freeze_scope", "visual")
        if not isinstance(scope, str) or scope not in SCOPES:
            raise PlanError(f"OpSkip freeze_scope: unknown scope {scope!r}; expected one of {', '.join(SCOPES)}")
        family = policy.get("model_family")
        if family is not None and (not isinstance(family, str) or not family):
            raise PlanError(f"OpSkip model_family must be a non-empty string, got {family!r}")
        model = {"architecture": family} if family is not None else None
        extra = {k: policy[k] for k in sorted(_OPSKIP_EXTRA) if k in policy}
        preset = policy.get("preset")
        name = f"{policy.get('model_family', 'opskip')}-preset{preset}" if preset is not None else None
        return cls(tuple(ops), n, name, model, {"imported_from": "opskip", **extra}, scope)

    def to_opskip(self) -> dict[str, Any]:
        """This plan as an OpSkip policy dict (layers in ascending order)."""
        if self.rows != "visual":
            raise PlanError(f"plan rows {self.rows!r}: OpSkip policies freeze every visual row and cannot say so")
        lists: dict[str, list[int]] = {key: [] for key in _OPSKIP_LISTS}
        for layer, op in enumerate(self.ops):
            for key, key_op in _OPSKIP_LISTS.items():
                if op == key_op:
                    lists[key].append(layer)
        out: dict[str, Any] = {}
        family = (self.model or {}).get("architecture")
        if family:
            out["model_family"] = family
        out["num_layers"] = self.num_layers
        out.update(lists)
        out["budget"] = sum(len(v) for v in lists.values())
        out["freeze_scope"] = self.scope
        extra = dict(self.provenance or {})
        for key in sorted(_OPSKIP_EXTRA):
            if key in extra:
                out[key] = extra[key]
        return out

    def __str__(self) -> str:
        short = {"full": ".", "skip_attn": "A", "skip_ffn": "F", "skip_both": "B"}
        counts = {op: self.ops.count(op) for op in OPS if op != "full" and self.ops.count(op)}
        what = ", ".join(f"{n} {op}" for op, n in counts.items()) or "no skips"
        label = f"{self.name!r} " if self.name else ""
        rows = f", {self.rows} rows only" if self.rows != "visual" else ""
        return f"SkipPlan {label}[{''.join(short[o] for o in self.ops)}] ({self.num_layers} layers: {what}{rows})"


def migrate(d: Mapping[str, Any]) -> Mapping[str, Any]:
    """A plan's JSON object in the current schema. Version 1 had no `rows` (every visual row
    was frozen): it becomes version 2 with the default rows "visual". Anything else is
    returned as it is, for the checks to accept or refuse."""
    version = d.get("version")
    if not (_is_int(version) and version == 1):
        return d
    if "rows" in d:
        raise PlanError("plan key 'rows' needs plan version 2 (this file says version 1)")
    return {**d, "version": PLAN_VERSION}
