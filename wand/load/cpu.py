"""Filling a CPU slab from checkpoint files: positional reads, dtype cast on the way, progress.

Sources are read with ``preadv``, never mapped: a file truncated under the loader is a short
read and a :class:`CheckpointError` naming the file and the key, not a SIGBUS. A tensor whose
dtype does not change is read straight into its place in the slab; one that is cast (float32
on disk, bfloat16 resident), dequantized (fp8 × its scale) or quantized (into fp8, with a
scale from its absolute maximum: :mod:`wand.load.cast`) is read in pieces into a per-thread
scratch buffer and cast from there; quantizing reads a tensor larger than the scratch twice,
once for its maximum. Copies run on a thread pool (reads and torch's casts release the GIL).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import torch

from wand.common.dtypes import torch_dtype
from wand.common.errors import Cancelled, CheckpointError
from wand.common.spec import ComponentSpec, TensorSpec
from wand.common.views import tensor_digest
from wand.load.cast import (
    cast_into,
    fp8_scale,
    kept_scale,
    needs_cast,
    quantize_into,
    quantizes,
)
from wand.load.files import open_regular, read_into
from wand.load.tensorfile import TensorFile, TensorInfo, byte_view

Progress = Callable[[int], None]  # called with the bytes just written
SCRATCH_BYTES = 16 << 20


def fill(
    flat: torch.Tensor,
    spec: ComponentSpec,
    rows: list[list],
    progress: Progress = lambda n: None,
    cancelled: Callable[[], bool] = lambda: False,
    workers: int | None = None,
) -> tuple[list[bytes], dict[str, float]]:
    """Copy every tensor of ``spec`` into ``flat`` at the offsets of ``rows``; return each
    tensor's digest, hashed while its bytes are still in cache, and the scale of each fp8
    tensor by name."""
    files = open_files(spec)
    lock = threading.Lock()
    local = threading.local()
    with ExitStack() as stack:
        fds = {p: open_regular(p) for p in files}
        for fd in fds.values():
            stack.callback(os.close, fd)

        def copy(item: tuple[TensorSpec, list]) -> tuple[bytes, float | None]:
            if cancelled():
                raise Cancelled(f"{spec.name}: unloaded while loading")
            t, (_, dtype, shape, stride, offset) = item
            f = files[t.file]
            info = source_info(f, t)
            resident = torch_dtype(dtype)
            dst = flat.view(resident).as_strided(shape, stride, offset // resident.itemsize)
            scale = read_tensor(fds[t.file], f, t, info, dst, local)
            digest = tensor_digest(dst)
            with lock:
                progress(dst.nbytes)
            return digest, scale

        with ThreadPoolExecutor(workers or os.cpu_count(), initializer=single_threaded) as pool:
            done = list(pool.map(copy, zip(spec.tensors, rows, strict=True)))
    scales = {t.name: s for t, (_, s) in zip(spec.tensors, done, strict=True) if s is not None}
    return [d for d, _ in done], scales


def single_threaded() -> None:
    """A loader thread's torch ops use one core: the pool already has a thread per core, and
    an OpenMP team per thread would oversubscribe them (this is per thread in torch)."""
    torch.set_num_threads(1)


def read_tensor(
    fd: int, f: TensorFile, t: TensorSpec, info: TensorInfo, dst: torch.Tensor, local
) -> float | None:
    """Read ``t``'s bytes from ``f`` into the contiguous tensor ``dst``, casting (and
    dequantizing or quantizing) if need be; the scale of an fp8 ``dst``."""
    start, what = f.offset(t.key), repr(t.key)
    if not needs_cast(info.dtype, dst.dtype, t.scale):
        read_into(fd, byte_view(dst), start, f.path, what)
        return kept_scale(dst.dtype, t.scale)
    scratch = getattr(local, "scratch", None)
    if scratch is None:
        scratch = local.scratch = torch.empty(SCRATCH_BYTES, dtype=torch.uint8)
    per_piece = SCRATCH_BYTES // info.dtype.itemsize
    out = dst.reshape(-1)
    pieces = range(0, out.numel(), per_piece)

    def read(first: int) -> torch.Tensor:
        n = min(per_piece, out.numel() - first)
        piece = scratch[: n * info.dtype.itemsize]
        read_into(fd, byte_view(piece), start + first * info.dtype.itemsize, f.path, what)
        return piece.view(info.dtype)

    if not quantizes(info.dtype, dst.dtype):
        for first in pieces:
            cast_into(out[first : first + per_piece], read(first), t.scale)
        return kept_scale(dst.dtype, t.scale)
    amax, values = torch.zeros((), dtype=info.dtype), None
    for first in pieces:
        values = read(first)
        amax = torch.maximum(amax, values.abs().amax())
    scale = fp8_scale(amax, info.dtype, dst.dtype)
    for first in pieces:  # a tensor of one piece is still in the scratch: read once
        values = values if len(pieces) == 1 else read(first)
        quantize_into(out[first : first + per_piece], values, scale)
    return scale.item()


def open_files(spec: ComponentSpec) -> dict:
    return {path: TensorFile(path) for path in {t.file for t in spec.tensors}}


def source_info(f: TensorFile, t: TensorSpec) -> TensorInfo:
    """What ``t`` is on disk, checked to still be what the checkpoint was read as: the
    element count it needs resident, and a dtype of the same kind (float or not)."""
    info = f.info(t.key)
    if math.prod(info.shape) != math.prod(t.shape):
        raise CheckpointError(
            f"{f.path}: tensor {t.key!r} has shape {list(info.shape)}, "
            f"expected {math.prod(t.shape)} elements for {t.name} {list(t.shape)}"
        )
    if info.dtype.is_floating_point != torch_dtype(t.dtype).is_floating_point:
        raise CheckpointError(
            f"{f.path}: tensor {t.key!r} is stored as {info.dtype}, {t.name} needs {t.dtype}"
        )
    return info
