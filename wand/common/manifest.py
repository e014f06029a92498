"""Manifests: where each tensor of a component lies in its slab, and the slab's checksum.

A manifest is plain data (the daemon builds, stores and sends it without torch); the views a
client builds over a mapped slab from it, and the digests behind the checksum, are
:mod:`wand.common.views`.
"""

from __future__ import annotations

import hashlib
from typing import Any

from wand.common import dtypes
from wand.common.spec import ComponentSpec

ALIGN = 256  # byte alignment of every tensor in a slab (what CUDA kernels like)


def layout(spec: ComponentSpec) -> tuple[list[list[Any]], int]:
    """Assign each tensor an aligned offset: ``[name, dtype, shape, stride, offset]`` rows."""
    rows, offset = [], 0
    for t in spec.tensors:
        shape = list(t.shape)
        rows.append([t.name, t.dtype, shape, _contiguous_stride(shape), offset])
        offset += _align(dtypes.nbytes(t.dtype, shape))
    return rows, max(offset, ALIGN)


def manifest(
    spec: ComponentSpec,
    rows: list[list[Any]],
    nbytes: int,
    scales: dict[str, float] | None = None,
    **info: Any,
) -> dict:
    """``scales``: the per-tensor scale of each fp8 tensor by name (its value is the stored
    value times the scale); manifests of older daemons have none."""
    aliases = {a: t.name for t in spec.tensors for a in t.aliases}
    return {
        "component": spec.name,
        "cls": spec.cls,
        "config": spec.config,
        "nbytes": nbytes,
        "tensors": rows,
        "aliases": aliases,
        "scales": scales or {},
        **info,
    }


def tensor_bytes(rows: list[list[Any]]) -> int:
    """The bytes of the tensors of ``rows`` (:func:`layout`'s), without the alignment
    between them that the slab also holds."""
    return sum(dtypes.nbytes(dtype, shape) for _, dtype, shape, *_ in rows)


def checksum(digests: list[bytes], method: str = "crc32") -> str:
    """The component's checksum from its tensors' digests, in manifest order; the prefix
    names the digest method (``crc32`` for CPU slabs, ``sum64`` for GPU slabs)."""
    return f"{method}:" + hashlib.blake2b(b"".join(digests), digest_size=32).hexdigest()


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _contiguous_stride(shape: list[int]) -> list[int]:
    stride, acc = [], 1
    for d in reversed(shape):
        stride.append(acc)
        acc *= max(d, 1)
    return stride[::-1]
