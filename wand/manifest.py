"""Manifests: where each tensor of a component lies in its slab, and views rebuilt from them."""

from __future__ import annotations

import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from wand.errors import ProtocolError
from wand.spec import ComponentSpec

ALIGN = 256  # byte alignment of every tensor in a slab (what CUDA kernels like)
DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
    )
}


def layout(spec: ComponentSpec) -> tuple[list[list[Any]], int]:
    """Assign each tensor an aligned offset: ``[name, dtype, shape, stride, offset]`` rows."""
    rows, offset = [], 0
    for t in spec.tensors:
        shape = list(t.shape)
        rows.append([t.name, dtype_name(t.dtype), shape, _contiguous_stride(shape), offset])
        offset += _align(t.dtype.itemsize * math.prod(shape))
    return rows, max(offset, ALIGN)


def manifest(spec: ComponentSpec, rows: list[list[Any]], nbytes: int, **info: Any) -> dict:
    aliases = {a: t.name for t in spec.tensors for a in t.aliases}
    return {
        "component": spec.name,
        "cls": spec.cls,
        "config": spec.config,
        "nbytes": nbytes,
        "tensors": rows,
        "aliases": aliases,
        **info,
    }


def views(flat: torch.Tensor, man: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Tensors over ``flat`` (one uint8 tensor spanning the slab), without copying."""
    typed: dict[str, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    try:
        for row in man["tensors"]:
            name, dtype, shape, stride, offset = row
            if dtype not in typed:
                typed[dtype] = flat.view(DTYPES[dtype])
            out[name] = typed[dtype].as_strided(shape, stride, offset // DTYPES[dtype].itemsize)
        for alias, name in man["aliases"].items():
            out[alias] = out[name]
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise ProtocolError(f"malformed manifest: {type(e).__name__}: {e}") from None
    return out


def checksum(digests: list[bytes]) -> str:
    """The component's checksum from its tensors' digests, in manifest order."""
    return "blake2b:" + hashlib.blake2b(b"".join(digests), digest_size=32).hexdigest()


def tensor_digest(t: torch.Tensor) -> bytes:
    """blake2b of one tensor's bytes (GIL released while hashing)."""
    return hashlib.blake2b(t.reshape(-1).view(torch.uint8).numpy(), digest_size=32).digest()


def verify(flat: torch.Tensor, man: dict[str, Any], workers: int | None = None) -> bool:
    """Do the slab's bytes still hash to the checksum in its manifest?"""
    tensors = views(flat, man)
    with ThreadPoolExecutor(workers or os.cpu_count()) as pool:
        digests = list(pool.map(lambda row: tensor_digest(tensors[row[0]]), man["tensors"]))
    return checksum(digests) == man["checksum"]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _contiguous_stride(shape: list[int]) -> list[int]:
    stride, acc = [], 1
    for d in reversed(shape):
        stride.append(acc)
        acc *= max(d, 1)
    return stride[::-1]
