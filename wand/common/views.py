"""Tensor views over a mapped slab, rebuilt from its manifest, and the digests of their bytes.

This is the torch side of :mod:`wand.common.manifest`: clients build their tensors here, the
loaders digest what they wrote, and ``verify`` re-checks a slab against its checksum.
"""

from __future__ import annotations

import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from typing import Any

import torch

from wand.common.dtypes import torch_dtype
from wand.common.errors import ProtocolError
from wand.common.manifest import checksum

SUM_BLOCK = 1 << 22  # int16 words per block of a sum64 digest


def views(flat: torch.Tensor, man: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Tensors over ``flat`` (one uint8 tensor spanning the slab), without copying."""
    typed: dict[str, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    try:
        for row in man["tensors"]:
            name, dtype, shape, stride, offset = row
            if dtype not in typed:
                typed[dtype] = flat.view(torch_dtype(dtype))
            typed_flat = typed[dtype]
            out[name] = typed_flat.as_strided(shape, stride, offset // typed_flat.itemsize)
        for alias, name in man["aliases"].items():
            out[alias] = out[name]
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise ProtocolError(f"malformed manifest: {type(e).__name__}: {e}") from None
    return out


def tensor_digest(t: torch.Tensor) -> bytes:
    """CRC-32 and size of one tensor's bytes (GIL released while it runs).

    The checksum guards against corruption, not forgery (whoever can write a slab can
    rewrite its manifest too); CRC-32 runs about five times faster than blake2b here, which
    shows in every load.
    """
    return struct.pack("<IQ", zlib.crc32(t.reshape(-1).view(torch.uint8).numpy()), t.nbytes)


def sum64_digests(tensors: list[torch.Tensor]) -> list[bytes]:
    """A cheap digest computed where the tensors are (a GPU slab never leaves the GPU):
    per tensor, the sum of its bytes read as little-endian int16 words and the sum of each
    word times its 1-based position, both modulo 2**64, and its byte count.

    Blocks of :data:`SUM_BLOCK` words keep every device-side sum exact in int64
    (|word| ≤ 2**15, position in block ≤ 2**22); blocks are combined here in Python ints.
    One device-to-host transfer for all tensors.
    """
    parts, spans = [], []
    for t in tensors:
        first = len(parts)
        parts += _block_sums(t.reshape(-1).view(torch.uint8))
        spans.append((first, len(parts), t.nbytes))
    values = torch.stack([p for p, _ in parts]).cpu().tolist() if parts else []
    out = []
    for first, last, nbytes in spans:
        s1 = s2 = 0
        for (a, b), (_, offset) in zip(values[first:last], parts[first:last], strict=True):
            s1, s2 = s1 + a, s2 + b + offset * a
        out.append(struct.pack("<QQQ", nbytes, s1 % 2**64, s2 % 2**64))
    return out


def _block_sums(b: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
    """``(tensor([sum w, sum (j+1)·w]), word offset)`` per block of the bytes ``b``."""
    n = b.numel()
    words = b[: n - n % 2].view(torch.int16)
    blocks = [(words[o : o + SUM_BLOCK], o) for o in range(0, words.numel(), SUM_BLOCK)]
    if n % 2:
        blocks.append((b[n - 1 :], n // 2))  # the odd last byte is one more word
    out = []
    for w, offset in blocks:
        w = w.to(torch.int64)
        weights = _positions(w.device)[: w.numel()]
        out.append((torch.stack([w.sum(), (w * weights).sum()]), offset))
    return out


@cache
def _positions(device: torch.device) -> torch.Tensor:
    return torch.arange(1, SUM_BLOCK + 1, dtype=torch.int64, device=device)


def digests(
    flat: torch.Tensor, man: dict[str, Any], method: str | None = None, workers: int | None = None
) -> list[bytes]:
    """Each tensor's digest, in manifest order, by ``method`` (default: the method of
    ``man["checksum"]``)."""
    tensors = views(flat, man)
    ordered = [tensors[row[0]] for row in man["tensors"]]
    method = method or _method(man)
    if method == "sum64":
        return sum64_digests(ordered)
    if method != "crc32":
        raise ProtocolError(f"unknown checksum method {method!r}")
    with ThreadPoolExecutor(workers or os.cpu_count()) as pool:
        return list(pool.map(tensor_digest, ordered))


def verify(flat: torch.Tensor, man: dict[str, Any], workers: int | None = None) -> bool:
    """Do the slab's bytes still match the checksum in its manifest?"""
    method = _method(man)
    return checksum(digests(flat, man, method, workers), method) == man["checksum"]


def _method(man: dict[str, Any]) -> str:
    return str(man.get("checksum") or "").partition(":")[0]
