"""What a safetensors or torch ``.pth`` file holds, checked, and where each tensor's bytes are.

Opening a file reads only its header (safetensors) or its pickle (``.pth``, with
``weights_only=True`` and ``map_location="meta"``: no code from the file runs and no tensor
data is read). Every entry is validated before anything trusts it: a known dtype, a
non-negative shape, bytes that lie inside the file's data and overlap no other tensor's, a
size equal to shape × dtype. Each problem is a :class:`CheckpointError` naming the file and
the key. Loaders then read each tensor's bytes with positional reads at :meth:`offset`.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from wand.common.errors import CheckpointError
from wand.load.files import open_regular, read_exact, read_into

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
MAX_HEADER = 100 * 1024 * 1024
MAX_DIMS = 16


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape)


class TensorFile:
    """One checkpoint file: ``keys()``, ``info(key)``, ``offset(key)`` and ``read(key)``."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._infos: dict[str, TensorInfo] = {}
        self._offsets: dict[str, int] = {}  # where each tensor's bytes start in the file
        self.metadata: dict[str, str] = {}  # a safetensors file's __metadata__
        fd = open_regular(self.path)
        try:
            self.size = os.fstat(fd).st_size
            if self.path.name.endswith(".safetensors"):
                self._open_safetensors(fd)
            else:
                self._open_torch(fd)
        finally:
            os.close(fd)

    def keys(self) -> list[str]:
        return list(self._infos)

    def info(self, key: str) -> TensorInfo:
        try:
            return self._infos[key]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor {key!r}") from None

    def offset(self, key: str) -> int:
        """Byte offset of the tensor's (contiguous) bytes in the file."""
        self.info(key)
        return self._offsets[key]

    def read(self, key: str) -> torch.Tensor:
        """A copy of the tensor, read from the file (for tools and tests; loaders read into
        slabs directly)."""
        info = self.info(key)
        out = torch.empty(info.shape, dtype=info.dtype)
        fd = open_regular(self.path)
        try:
            read_into(fd, byte_view(out), self._offsets[key], self.path, repr(key))
        finally:
            os.close(fd)
        return out

    # --- safetensors ----------------------------------------------------------------------

    def _open_safetensors(self, fd: int) -> None:
        if self.size < 8:
            raise CheckpointError(f"{self.path}: truncated (no safetensors header)")
        (hlen,) = struct.unpack("<Q", read_exact(fd, 0, 8, self.path))
        if hlen > MAX_HEADER or 8 + hlen > self.size:
            raise CheckpointError(f"{self.path}: truncated or corrupt safetensors header")
        try:
            header = json.loads(read_exact(fd, 8, hlen, self.path))
        except (ValueError, RecursionError) as e:
            raise CheckpointError(f"{self.path}: corrupt safetensors header: {e}") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: safetensors header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise CheckpointError(f"{self.path}: __metadata__ must map strings to strings")
        self.metadata = metadata
        base, data = 8 + hlen, self.size - 8 - hlen
        spans = []
        for key, entry in header.items():
            info, start, end = self._entry(key, entry)
            if end > data:
                raise CheckpointError(
                    f"{self.path}: truncated: tensor {key!r} ends at byte {base + end}, "
                    f"file has {self.size}"
                )
            self._infos[key], self._offsets[key] = info, base + start
            if end > start:
                spans.append((start, end, key))
        _no_overlap(self.path, spans)

    def _entry(self, key: str, entry: object) -> tuple[TensorInfo, int, int]:
        where = f"{self.path}: tensor {key!r}"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where}: header entry is not an object")
        name = entry.get("dtype")
        dtype = SAFETENSORS_DTYPES.get(name) if isinstance(name, str) else None
        if dtype is None:
            raise CheckpointError(f"{where}: unknown dtype {_short(name)}")
        shape = _shape(entry.get("shape"), where)
        offsets = entry.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
            raise CheckpointError(f"{where}: data_offsets must be two integers")
        start, end = offsets
        if start < 0 or end < start:
            raise CheckpointError(f"{where}: bad data_offsets [{start}, {end}]")
        info = TensorInfo(dtype, shape)
        if end - start != info.nbytes:
            raise CheckpointError(
                f"{where}: spans {end - start} bytes, its dtype and shape need {info.nbytes}"
            )
        return info, start, end

    # --- torch .pth -----------------------------------------------------------------------

    def _open_torch(self, fd: int) -> None:
        with io.FileIO(fd, "rb", closefd=False) as f:
            try:
                sd = torch.load(f, map_location="meta", weights_only=True)
            except Exception as e:  # torch raises RuntimeError, EOFError, pickle errors...
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise CheckpointError(
                    f"{self.path}: cannot read torch checkpoint: {first[:300]}"
                ) from None
        if not isinstance(sd, dict):
            raise CheckpointError(f"{self.path}: expected a state dict, found {type(sd).__name__}")
        for key, t in sd.items():
            if not isinstance(key, str):
                raise CheckpointError(f"{self.path}: key {_short(key)} is not a string")
            if not isinstance(t, torch.Tensor):
                raise CheckpointError(f"{self.path}: entry {key!r} is not a tensor")
            self._infos[key] = TensorInfo(t.dtype, tuple(t.shape))
            self._offsets[key] = self._pth_offset(key, t)

    def _pth_offset(self, key: str, t: torch.Tensor) -> int:
        where = f"{self.path}: tensor {key!r}"
        if t.dtype not in SAFETENSORS_DTYPES.values():
            raise CheckpointError(f"{where}: unsupported dtype {t.dtype}")
        if len(t.shape) > MAX_DIMS:
            raise CheckpointError(f"{where}: {len(t.shape)} dimensions")
        if not t.is_contiguous():
            raise CheckpointError(f"{where}: not stored contiguously")
        storage = t.untyped_storage()
        base = getattr(storage, "_checkpoint_offset", None)
        if not isinstance(base, int):
            raise CheckpointError(f"{self.path}: legacy torch format (re-save it with torch.save)")
        start = t.storage_offset() * t.element_size()
        nbytes = t.numel() * t.element_size()
        if start + nbytes > storage.nbytes():
            raise CheckpointError(f"{where}: lies outside its storage")
        if base + storage.nbytes() > self.size:
            raise CheckpointError(
                f"{self.path}: truncated: tensor {key!r} ends at byte "
                f"{base + storage.nbytes()}, file has {self.size}"
            )
        return base + start


def _shape(value: object, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > MAX_DIMS or not all(map(_is_int, value)):
        raise CheckpointError(f"{where}: shape must be a list of at most {MAX_DIMS} integers")
    if any(d < 0 for d in value):
        raise CheckpointError(f"{where}: negative dimension in shape {value}")
    return tuple(value)


def _no_overlap(path: Path, spans: list[tuple[int, int, str]]) -> None:
    spans.sort()
    for (_, end, first), (start, _, second) in zip(spans, spans[1:], strict=False):
        if start < end:
            raise CheckpointError(f"{path}: tensors {first!r} and {second!r} overlap in the file")


def _is_int(v: object) -> bool:
    return type(v) is int


def _short(v: object) -> str:
    text = repr(v) if isinstance(v, str | int | float | bool | None) else type(v).__name__
    return text[:60]


def byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable in place (what positional reads fill)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())
