"""Read-only access to tensors in safetensors and torch ``.pth`` files without loading them.

Both formats are opened through a memory map of the file, so listing keys reads only the
header and a tensor costs nothing until its bytes are touched. Truncated files are found
from the header alone and reported with the file and the first key that does not fit.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from wand.errors import CheckpointError

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


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape)


class TensorFile:
    """One checkpoint file: ``keys()``, ``info(key)`` and zero-copy ``tensor(key)``."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: file not found")
        self._infos: dict[str, TensorInfo] = {}
        self._tensors: dict[str, torch.Tensor] = {}
        self._offsets: dict[str, int] = {}  # safetensors: where each tensor's bytes start
        if self.path.name.endswith(".safetensors"):
            self._open_safetensors()
        else:
            self._open_torch()

    def keys(self) -> list[str]:
        return list(self._infos)

    def info(self, key: str) -> TensorInfo:
        try:
            return self._infos[key]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor {key!r}") from None

    def tensor(self, key: str) -> torch.Tensor:
        """The tensor's bytes as they lie in the file (CPU, page-cache backed, do not write)."""
        self.info(key)
        return self._tensors[key]

    def offset(self, key: str) -> int | None:
        """Byte offset of the tensor's bytes in the file (safetensors), None for .pth files,
        whose tensors lie inside a zip archive."""
        self.info(key)
        return self._offsets.get(key)

    def _open_safetensors(self) -> None:
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: truncated (no safetensors header)")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > MAX_HEADER or 8 + hlen > size:
                raise CheckpointError(f"{self.path}: truncated or corrupt safetensors header")
            try:
                header = json.loads(f.read(hlen))
            except ValueError as e:
                raise CheckpointError(f"{self.path}: corrupt safetensors header: {e}") from None
        header.pop("__metadata__", None)
        base = 8 + hlen
        storage = torch.UntypedStorage.from_file(str(self.path), shared=False, nbytes=size)
        flat = torch.empty(0, dtype=torch.uint8).set_(storage)
        for key, entry in header.items():
            info, start, end = self._parse_entry(key, entry)
            if base + end > size:
                raise CheckpointError(
                    f"{self.path}: truncated: tensor {key!r} ends at byte {base + end}, "
                    f"file has {size}"
                )
            raw = flat[base + start : base + end]
            self._infos[key] = info
            self._offsets[key] = base + start
            self._tensors[key] = _view(raw, info)

    def _parse_entry(self, key: str, entry: dict) -> tuple[TensorInfo, int, int]:
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            start, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{self.path}: bad header entry for {key!r}: {entry}") from None
        info = TensorInfo(dtype, shape)
        if end - start != info.nbytes:
            raise CheckpointError(
                f"{self.path}: tensor {key!r} spans {end - start} bytes, "
                f"its dtype and shape need {info.nbytes}"
            )
        return info, start, end

    def _open_torch(self) -> None:
        try:
            sd = torch.load(self.path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # torch raises RuntimeError, EOFError, pickle errors...
            raise CheckpointError(f"{self.path}: cannot read torch checkpoint: {e}") from None
        if not isinstance(sd, dict):
            raise CheckpointError(f"{self.path}: expected a state dict, found {type(sd).__name__}")
        for key, t in sd.items():
            if not isinstance(t, torch.Tensor):
                raise CheckpointError(f"{self.path}: entry {key!r} is not a tensor")
            self._infos[key] = TensorInfo(t.dtype, tuple(t.shape))
            self._tensors[key] = t


def _view(raw: torch.Tensor, info: TensorInfo) -> torch.Tensor:
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.dtype)
    if raw.storage_offset() % info.dtype.itemsize:
        raw = raw.clone()  # unaligned data: a copy is the only way to view it
    return raw.view(info.dtype).view(info.shape)
