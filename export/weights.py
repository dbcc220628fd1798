"""Shared weights: every ONNX graph of an engine points its initializers into safetensors files.

ONNX external data is (location, offset, length) into any file, and a safetensors file is a
JSON header followed by raw little-endian tensor bytes, so the two formats can share bytes:
graphs reference ranges of `weights-NNN.safetensors`, which torch / numpy can also read by
key. Tensors are deduplicated by sha256 of (dtype, shape, bytes) across all graphs of the
directory: prefill graphs of every layout and the decode step hold one copy of each weight
on disk. A later export into the same directory appends a new weights file only for tensors
not already stored, so the offsets existing graphs use never move.

Initializers under `MIN_EXTERNAL_BYTES` stay inside the graph (shape constants, scalars).
No torch here: onnx and numpy only.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ..errors import VSkipError

MIN_EXTERNAL_BYTES = 1024

# ONNX TensorProto data type -> safetensors dtype (the types whose raw bytes both agree on).
_ONNX_TO_ST = {1: "F32", 10: "F16", 16: "BF16", 11: "F64", 7: "I64", 6: "I32", 5: "I16", 3: "I8", 2: "U8", 9: "BOOL"}
_ST_TO_NP = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32,
             "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_NP_TO_ST = {np.dtype(v): k for k, v in _ST_TO_NP.items()}


class WeightsError(VSkipError, ValueError):
    """A weights file is unreadable or a tensor cannot be stored in one."""


def read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(byte offset of the data section, header dict) of a safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise WeightsError(f"{path}: truncated safetensors file")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WeightsError(f"{path}: corrupt safetensors header ({e})") from e
    return 8 + n, header


def read_tensor(path: Path, key: str) -> np.ndarray:
    """One tensor of a safetensors file as a read-only numpy memmap (BF16 is widened to F32)."""
    base, header = read_header(path)
    if key not in header:
        raise WeightsError(f"{path}: no tensor {key!r}")
    info = header[key]
    begin, end = info["data_offsets"]
    if info["dtype"] == "BF16":
        raw = np.memmap(path, np.uint16, "r", base + begin, tuple(info["shape"]))
        return (raw.astype(np.uint32) << 16).view(np.float32)
    if info["dtype"] not in _ST_TO_NP:
        raise WeightsError(f"{path}: tensor {key!r} has unsupported dtype {info['dtype']}")
    return np.memmap(path, _ST_TO_NP[info["dtype"]], "r", base + begin, tuple(info["shape"]))


def _digest(dtype: str, shape: tuple[int, ...], data: bytes) -> str:
    h = hashlib.sha256(f"{dtype}{list(shape)}".encode())
    h.update(data)
    return h.hexdigest()


@dataclass
class _Stored:
    file: str
    key: str
    offset: int  # absolute byte offset of the tensor in `file`
    length: int


@dataclass
class _Pending:
    key: str
    dtype: str
    shape: tuple[int, ...]
    data: bytes


class WeightStore:
    """Collects the tensors of one export call, then writes one new weights file (flush)."""

    def __init__(self, out_dir: str | Path, min_external_bytes: int = MIN_EXTERNAL_BYTES):
        self.out_dir = Path(out_dir)
        self.min_external_bytes = min_external_bytes
        self.stored: dict[str, _Stored] = {}  # digest -> where it is on disk
        self.pending: dict[str, _Pending] = {}  # digest -> tensor to write at flush
        self.keys: set[str] = set()
        self._refs: list[tuple[Any, str]] = []  # (TensorProto, digest) to point at the file at flush
        for path in sorted(self.out_dir.glob("weights-*.safetensors")):
            self._index(path)

    def _index(self, path: Path) -> None:
        base, header = read_header(path)
        with open(path, "rb") as f:
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                begin, end = info["data_offsets"]
                f.seek(base + begin)
                digest = _digest(info["dtype"], tuple(info["shape"]), f.read(end - begin))
                self.stored.setdefault(digest, _Stored(path.name, key, base + begin, end - begin))
                self.keys.add(key)

    def _unique_key(self, name: str, digest: str) -> str:
        key = name if name not in self.keys else f"{name}#{digest[:12]}"
        self.keys.add(key)
        return key

    def add_array(self, name: str, array: np.ndarray) -> str:
        """Store a host-side tensor (embedding table, ...); returns its digest (see where)."""
        array = np.ascontiguousarray(array)
        if array.dtype not in _NP_TO_ST:
            raise WeightsError(f"tensor {name!r}: dtype {array.dtype} cannot be stored in safetensors here")
        return self._add(name, _NP_TO_ST[array.dtype], tuple(array.shape), array.tobytes())

    def _add(self, name: str, dtype: str, shape: tuple[int, ...], data: bytes) -> str:
        digest = _digest(dtype, shape, data)
        if digest not in self.stored and digest not in self.pending:
            self.pending[digest] = _Pending(self._unique_key(name, digest), dtype, shape, data)
        return digest

    def add_model(self, model, source_dir: Path) -> None:
        """Claim the large initializers of an onnx ModelProto (external data read from
        source_dir); they are pointed at the weights files by flush()."""
        from onnx import external_data_helper, numpy_helper

        for tensor in model.graph.initializer:
            if tensor.data_type not in _ONNX_TO_ST:
                continue
            if external_data_helper.uses_external_data(tensor):
                external_data_helper.load_external_data_for_tensor(tensor, str(source_dir))
            data = tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()
            if len(data) < self.min_external_bytes:
                continue
            digest = self._add(tensor.name, _ONNX_TO_ST[tensor.data_type], tuple(tensor.dims), data)
            tensor.ClearField("raw_data")
            for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                tensor.ClearField(field)
            self._refs.append((tensor, digest))

    def flush(self) -> str | None:
        """Write the pending tensors as a new weights-NNN.safetensors and point every claimed
        initializer at its bytes. Returns the new file's name, or None if nothing was new."""
        from onnx import TensorProto

        new_file = None
        if self.pending:
            n = len(list(self.out_dir.glob("weights-*.safetensors")))
            new_file = f"weights-{n:03d}.safetensors"
            header: dict[str, Any] = {"__metadata__": {"format": "pt", "writer": "vskip_compile.export"}}
            pos = 0
            for p in self.pending.values():
                header[p.key] = {"dtype": p.dtype, "shape": list(p.shape), "data_offsets": [pos, pos + len(p.data)]}
                pos += len(p.data)
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 64)  # pad: tensor data starts 64-byte aligned
            base = 8 + len(blob)
            with open(self.out_dir / new_file, "wb") as f:
                f.write(struct.pack("<Q", len(blob)))
                f.write(blob)
                for digest, p in self.pending.items():
                    begin = header[p.key]["data_offsets"][0]
                    self.stored[digest] = _Stored(new_file, p.key, base + begin, len(p.data))
                    f.write(p.data)
            self.pending.clear()
        for tensor, digest in self._refs:
            where = self.stored[digest]
            del tensor.external_data[:]
            for k, v in (("location", where.file), ("offset", str(where.offset)), ("length", str(where.length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = k, v
            tensor.data_location = TensorProto.EXTERNAL
        self._refs.clear()
        return new_file

    def where(self, digest: str) -> dict[str, str]:
        """{"file", "key"} of a stored tensor (after flush)."""
        s = self.stored[digest]
        return {"file": s.file, "key": s.key}
