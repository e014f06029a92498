"""Filling a slab from checkpoint files: parallel copies, dtype cast on the way, progress."""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from wand.errors import CheckpointError
from wand.manifest import DTYPES, tensor_digest
from wand.spec import ComponentSpec, TensorSpec
from wand.tensorfile import TensorFile, TensorInfo

Progress = Callable[[int], None]  # called with the bytes just written


def fill(
    flat: torch.Tensor,
    spec: ComponentSpec,
    rows: list[list],
    progress: Progress = lambda n: None,
    workers: int | None = None,
) -> list[bytes]:
    """Copy every tensor of ``spec`` into ``flat`` at the offsets of ``rows``; return each
    tensor's digest, hashed while its bytes are still in cache.

    Source tensors are memory maps of the files, so the only full pass over the bytes is the
    copy itself, which also casts to the resident dtype. Copies run on a thread pool (torch
    and hashlib release the GIL), one thread per core.
    """
    files = open_files(spec)
    lock = threading.Lock()

    def copy(item: tuple[TensorSpec, list]) -> bytes:
        t, (_, dtype, shape, stride, offset) = item
        src = _source(files[t.file], t)
        dst = flat.view(DTYPES[dtype]).as_strided(shape, stride, offset // t.dtype.itemsize)
        dst.copy_(src.reshape(shape))
        digest = tensor_digest(dst)
        with lock:
            progress(dst.nbytes)
        return digest

    with ThreadPoolExecutor(workers or os.cpu_count()) as pool:
        return list(pool.map(copy, zip(spec.tensors, rows, strict=True)))


def open_files(spec: ComponentSpec) -> dict:
    return {path: TensorFile(path) for path in {t.file for t in spec.tensors}}


def source_info(f: TensorFile, t: TensorSpec) -> TensorInfo:
    """What ``t`` is on disk, checked to have the element count it needs resident."""
    info = f.info(t.key)
    if math.prod(info.shape) != math.prod(t.shape):
        raise CheckpointError(
            f"{f.path}: tensor {t.key!r} has shape {list(info.shape)}, "
            f"expected {math.prod(t.shape)} elements for {t.name} {list(t.shape)}"
        )
    return info


def _source(f: TensorFile, t: TensorSpec) -> torch.Tensor:
    source_info(f, t)
    return f.tensor(t.key)
