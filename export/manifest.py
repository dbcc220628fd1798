"""manifest.json: what an engine directory holds and for which model, checked before loading.

Written last by every export (after all files), read first by every loader. It names the
model (architecture, text-config hash and fields), the plan, every graph with its role and
static layout, the versions that wrote it, and the sha256 and size of every file. The loader
refuses a missing, modified or corrupt file, a manifest of an unknown format, and (when the
caller says which model it expects) a manifest of another model, with an error that names
the file and what is wrong. Plain JSON and hashlib: no torch, no onnx.

The manifest is bound to what it describes: `manifest_sha256` hashes all of its own content
(plan, plan id, layouts, model, versions, and the file hashes that bind the graphs), and the
plan id is recomputed from the plan. A manifest edited by hand (its plan set to all `full`,
say) no longer verifies: the loader refuses it, and so does an export into its directory.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

from ..plan import PlanError, SkipPlan
from ..errors import VSkipError

MANIFEST = "manifest.json"
CONTENT_HASH = "manifest_sha256"  # sha256 of the manifest's canonical JSON without this key
FORMAT = "vskip-engine"
FORMAT_VERSION = 2  # 2: one polymorphic prefill graph (layout as data), a manifest self-hash
_CHUNK = 1 << 22  # 4 MiB reads keep hashing of multi-GB weight files flat in memory


class EngineError(VSkipError, RuntimeError):
    """An engine directory or its inputs cannot be served."""


class ManifestError(EngineError):
    """manifest.json or a file it lists is missing, modified, corrupt or of another model."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _listed_files(out_dir: Path) -> list[str]:
    """Every regular file under out_dir except the manifest, as sorted posix relative paths."""
    return sorted(
        p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file() and p.name != MANIFEST
    )


def plan_id(plan: SkipPlan) -> dict[str, Any]:
    """The part of a plan that decides the graphs (ops, scope, rows), for same-plan checks.
    `rows` only when it is not the default "visual": engines exported before plans had it
    keep their plan id."""
    out: dict[str, Any] = {"ops": list(plan.ops), "scope": plan.scope}
    if plan.rows != "visual":
        out["rows"] = plan.rows
    return out


def content_hash(manifest: Mapping[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys), its own hash left out."""
    body = {k: v for k, v in manifest.items() if k != CONTENT_HASH}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest(out_dir: str | Path, body: Mapping[str, Any]) -> dict[str, Any]:
    """Write manifest.json = body + format header + sha256/size of every file in out_dir +
    the content hash over all of it."""
    out_dir = Path(out_dir)
    files = {rel: {"sha256": sha256_file(out_dir / rel), "bytes": (out_dir / rel).stat().st_size} for rel in _listed_files(out_dir)}
    body = {k: v for k, v in body.items() if k not in (CONTENT_HASH, "format", "format_version", "files")}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **body, "files": files}
    manifest[CONTENT_HASH] = content_hash(manifest)
    tmp = out_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    tmp.replace(out_dir / MANIFEST)  # atomic: a crash never leaves a half-written manifest
    return manifest


def load_manifest(out_dir: str | Path) -> dict[str, Any]:
    """Parse manifest.json and check its format header; files are not checked (see verify)."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{path}: missing; not an engine directory (export one with export_onnx)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: corrupt, not JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ManifestError(f"{path}: not a {FORMAT} manifest (format={manifest.get('format') if isinstance(manifest, dict) else None!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ManifestError(
            f"{path}: engine format version {version!r}, this build reads version {FORMAT_VERSION}; "
            f"re-export the engine with this version of vskip-compile"
        )
    for key in ("model", "plan", "plan_id", "graphs", "runtime", "files", "versions"):
        if key not in manifest:
            raise ManifestError(f"{path}: corrupt, required key {key!r} is missing")
    for key in ("model", "graphs", "runtime", "files", "versions"):
        if not isinstance(manifest[key], dict):
            raise ManifestError(f"{path}: corrupt, {key!r} must be a JSON object")
    return manifest


def verify_content(path: Path, manifest: Mapping[str, Any]) -> None:
    """Refuse a manifest edited after its export: its content hash, and its plan id recomputed
    from its plan (the graphs were made for the plan id's ops)."""
    if CONTENT_HASH not in manifest:
        raise ManifestError(f"{path}: has no {CONTENT_HASH} (written by an older vskip-compile, or not by an export); "
                            "re-export the engine")
    if manifest[CONTENT_HASH] != content_hash(manifest):
        raise ManifestError(f"{path}: edited after export: its {CONTENT_HASH} does not match its content (plan, "
                            "layouts, model or file list changed); re-export the engine into a new directory")
    try:
        plan = SkipPlan.from_dict(manifest["plan"])
    except PlanError as e:
        raise ManifestError(f"{path}: corrupt plan ({e})") from e
    if manifest["plan_id"] != plan_id(plan):
        raise ManifestError(f"{path}: its plan ({list(plan.ops)}) is not the plan its graphs were exported for "
                            f"(plan_id {manifest['plan_id']})")


def verify_files(out_dir: str | Path, manifest: Mapping[str, Any]) -> None:
    """Refuse any listed file that is missing, of another size or of another sha256."""
    out_dir = Path(out_dir)
    for rel, want in manifest["files"].items():
        path = out_dir / rel
        if not isinstance(want, dict) or not isinstance(want.get("bytes"), int) or not isinstance(want.get("sha256"), str):
            raise ManifestError(f"{out_dir / MANIFEST}: corrupt, files[{rel!r}] needs 'bytes' and 'sha256'")
        if not path.is_file():
            raise ManifestError(f"{path}: missing (listed in {MANIFEST})")
        size = path.stat().st_size
        if size != want["bytes"]:
            raise ManifestError(f"{path}: modified or truncated: {size} bytes, {MANIFEST} says {want['bytes']}")
        digest = sha256_file(path)
        if digest != want["sha256"]:
            raise ManifestError(f"{path}: modified or corrupt: sha256 {digest[:16]}..., {MANIFEST} says {want['sha256'][:16]}...")


def check_model(manifest: Mapping[str, Any], expect: Mapping[str, Any], where: str) -> None:
    """Refuse a manifest of another model: `expect` holds any of architecture, config_hash."""
    have = manifest["model"]
    for key in ("architecture", "config_hash"):
        if expect.get(key) is not None and have.get(key) != expect[key]:
            raise ManifestError(
                f"{where}: engine is for another model: {key} {have.get(key)!r}, expected {expect[key]!r}"
            )


def verify(out_dir: str | Path, expect_model: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """load_manifest + verify_files + (optionally) check_model; returns the manifest."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ManifestError(f"{out_dir}: not a directory (an engine is a directory with {MANIFEST})")
    manifest = load_manifest(out_dir)
    if expect_model:
        check_model(manifest, expect_model, str(out_dir / MANIFEST))
    verify_files(out_dir, manifest)
    verify_content(out_dir / MANIFEST, manifest)
    return manifest


def check_out_dir(out_dir: str | Path) -> dict[str, Any] | None:
    """Where an export may write: a new or empty directory (None), or an engine directory
    whose manifest verifies (its manifest, to be extended). Anything else is refused, naming
    the directory and what did not verify: an export never mixes its graphs into files that
    no verified manifest describes."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return None
    if not out_dir.is_dir():
        raise EngineError(f"{out_dir}: exists and is not a directory; give a new or empty engine directory")
    if not (out_dir / MANIFEST).exists():
        if any(out_dir.iterdir()):
            raise EngineError(f"{out_dir}: holds files but no {MANIFEST} (not an engine directory, or an interrupted "
                              "export); give a new or empty directory")
        return None
    try:
        return verify(out_dir)
    except ManifestError as e:
        raise ManifestError(f"{out_dir}: cannot export into this engine directory, its manifest does not verify: {e}") from e
