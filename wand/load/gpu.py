"""Filling a GPU slab at the speed of the hardware, with no full copy in host RAM.

A load is planned as chunks: byte ranges of one file of at most ``capacity`` bytes, each
holding pieces of one or more tensors; a tensor larger than a chunk is split at element
boundaries. Reader threads fill a ring of pinned staging buffers, allocated once per load,
with positional reads (``os.preadv``) of whole chunks, :data:`DEPTH` reads in flight. Each
filled buffer goes to the GPU asynchronously on a dedicated stream: pieces whose dtype does
not change are uploaded straight into their place in the slab; the others are uploaded to a
GPU scratch buffer and cast from there (e.g. float32 on disk to bfloat16 resident), or
dequantized (fp8 × its scale), by the GPU; a tensor quantized into fp8 is gathered whole in a
GPU buffer of its own first (its scale is its absolute maximum's). A CUDA event per buffer
says when its uploads are done, so the next read into it overlaps the copies of the others.
Both formats are read by file offset (for ``.pth`` files, the offsets of the tensors' bytes
inside the uncompressed zip archive).

:func:`plan` is pure arithmetic. :func:`fill` also runs on a CPU tensor (no pinning, no
stream, the staging buffer is the scratch), which is how its logic is tested without a GPU.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from wand.common import views
from wand.common.dtypes import torch_dtype
from wand.common.errors import Cancelled
from wand.common.spec import ComponentSpec, Scale
from wand.load.cast import (
    cast_into,
    fp8_scale,
    kept_scale,
    needs_cast,
    quantize_into,
    quantizes,
)
from wand.load.cpu import Progress, open_files, single_threaded, source_info
from wand.load.files import open_regular, read_into

CHUNK_BYTES = 32 << 20  # one staging buffer: a large DMA, a read a thread does in a few ms
DEPTH = 12  # staging buffers: reads in flight while the copy engine drains the others


@dataclass(frozen=True)
class Read:
    """One tensor's bytes in its source."""

    source: int  # index of the file they come from
    offset: int  # where they start in that source
    nbytes: int
    itemsize: int  # a split tensor is split between whole elements


@dataclass(frozen=True)
class Piece:
    read: int  # index of the Read it is part of
    at: int  # byte position in the chunk
    start: int  # byte position in the tensor
    nbytes: int


@dataclass
class Chunk:
    """``nbytes`` of source ``source`` from ``offset``: one read, one upload."""

    source: int
    offset: int
    nbytes: int = 0
    pieces: list[Piece] = field(default_factory=list)


def plan(reads: list[Read], capacity: int) -> list[Chunk]:
    """Chunks covering every read, in source order, none longer than ``capacity``.

    Consecutive tensors of a source share a chunk while they fit; a tensor that does not fit
    in what is left starts a new chunk, unless it is larger than a chunk anyway, in which
    case it fills the rest of the current one and goes on in the next.
    """
    chunks: list[Chunk] = []
    for i in sorted(range(len(reads)), key=lambda i: (reads[i].source, reads[i].offset)):
        r = reads[i]
        if r.itemsize > capacity:
            raise ValueError(f"capacity {capacity} is smaller than one element ({r.itemsize})")
        whole = capacity // r.itemsize * r.itemsize  # the most of it one chunk can take
        done = 0
        while done < r.nbytes:
            pos, left = r.offset + done, r.nbytes - done
            c = chunks[-1] if chunks and chunks[-1].source == r.source else None
            room = c.offset + capacity - pos if c else 0
            if left <= room:
                take = left
            elif left > whole and room >= r.itemsize:
                take = room // r.itemsize * r.itemsize
            else:
                c = Chunk(r.source, pos)
                chunks.append(c)
                take = min(left, whole)
            c.pieces.append(Piece(i, pos - c.offset, done, take))
            c.nbytes = max(c.nbytes, pos + take - c.offset)
            done += take
    return chunks


@dataclass(frozen=True)
class Target:
    """Where a tensor goes: its bytes in the slab, the dtypes on disk and resident, and the
    scale of a quantized weight."""

    bytes: torch.Tensor  # uint8 view of the slab
    src: torch.dtype
    dst: torch.dtype
    scale: Scale | None = None

    @property
    def direct(self) -> bool:
        """Its bytes on disk are its bytes in the slab: copied, not cast."""
        return not needs_cast(self.src, self.dst, self.scale)

    @property
    def count(self) -> int:
        return self.bytes.numel() // self.dst.itemsize


class Quantizer:
    """Tensors quantized into fp8 at load: their pieces gathered in a buffer of their own
    on the slab's device until the last arrives (the scale needs all their values), then
    quantized into the slab; their scales stay on the device until :meth:`result`."""

    def __init__(self) -> None:
        self._pending: dict[int, list] = {}  # target → [its stored bytes, bytes received]
        self._scales: dict[int, torch.Tensor] = {}

    def add(self, i: int, t: Target, src: torch.Tensor, start: int) -> int:
        """Take the stored bytes ``src`` of target ``i`` from byte ``start``; returns the
        slab bytes written (all of the tensor's with its last piece, else none)."""
        if i not in self._pending:
            stored = torch.empty(t.count * t.src.itemsize, dtype=torch.uint8, device=t.bytes.device)
            self._pending[i] = [stored, 0]
        entry = self._pending[i]
        entry[0][start : start + src.numel()].copy_(src, non_blocking=True)
        entry[1] += src.numel()
        if entry[1] < entry[0].numel():
            return 0
        values = self._pending.pop(i)[0].view(t.src)
        scale = fp8_scale(values.abs().amax(), t.src, t.dst)
        quantize_into(t.bytes.view(t.dst), values, scale)
        self._scales[i] = scale
        return t.bytes.numel()

    def result(self) -> dict[int, float]:
        """Each quantized target's scale (waits for the device)."""
        return {i: s.item() for i, s in self._scales.items()}


class FileSource:
    def __init__(self, path: os.PathLike) -> None:
        self.path = path
        self.fd = open_regular(path)

    def read(self, out: torch.Tensor, offset: int) -> None:
        read_into(self.fd, memoryview(out.numpy()), offset, self.path)

    def close(self) -> None:
        os.close(self.fd)


def fill_slab(
    flat: torch.Tensor,
    spec: ComponentSpec,
    rows: list[list],
    progress: Progress,
    cancelled: Callable[[], bool],
) -> tuple[list[bytes], dict[str, float]]:
    """:func:`fill`, then each tensor's sum64 digest computed on the device (a GPU slab's
    bytes never come back to the host); and the fp8 tensors' scales."""
    scales = fill(flat, spec, rows, progress, cancelled=cancelled)
    digests = views.digests(flat, {"tensors": rows, "aliases": {}}, "sum64")
    torch.cuda.empty_cache()  # staging scratch and digest temporaries go back
    return digests, scales


def fill(
    flat: torch.Tensor,
    spec: ComponentSpec,
    rows: list[list],
    progress: Progress = lambda n: None,
    cancelled: Callable[[], bool] = lambda: False,
    workers: int | None = None,
    capacity: int = CHUNK_BYTES,
    depth: int = DEPTH,
) -> dict[str, float]:
    """Copy every tensor of ``spec`` into ``flat`` (a GPU slab) at the offsets of ``rows``,
    casting to the resident dtypes on the device; returns when the bytes are in place, with
    the scale of each fp8 tensor by name."""
    sources: list[FileSource] = []
    quantizer = Quantizer()
    try:
        reads, targets = _inputs(flat, spec, rows, sources)
        chunks = plan(reads, capacity)
        if chunks:
            ring = Ring(flat.device, max(c.nbytes for c in chunks), min(depth, len(chunks)))
            with ring.device_scope():
                _pipeline(ring, chunks, sources, targets, quantizer, progress, cancelled, workers)
    finally:
        for s in sources:
            s.close()
    computed = quantizer.result()
    scales = {i: kept_scale(target.dst, target.scale) for i, target in enumerate(targets)}
    scales.update(computed)
    return {spec.tensors[i].name: s for i, s in scales.items() if s is not None}


def _pipeline(
    ring: Ring,
    chunks: list[Chunk],
    sources: list[FileSource],
    targets: list[Target],
    quantizer: Quantizer,
    progress: Progress,
    cancelled: Callable[[], bool],
    workers: int | None,
) -> None:
    def read(i: int) -> None:
        ring.wait(i % ring.depth)
        sources[chunks[i].source].read(
            ring.host[i % ring.depth][: chunks[i].nbytes], chunks[i].offset
        )

    with ThreadPoolExecutor(workers or os.cpu_count(), initializer=single_threaded) as pool:
        pending = deque(pool.submit(read, i) for i in range(ring.depth))
        for i, chunk in enumerate(chunks):
            pending.popleft().result()
            if cancelled():
                for p in pending:
                    p.cancel()
                raise Cancelled("unloaded while loading")
            progress(ring.upload(i % ring.depth, chunk, targets, quantizer))
            if i + ring.depth < len(chunks):
                pending.append(pool.submit(read, i + ring.depth))
    ring.finish()


class Ring:
    """Staging buffers (pinned on a GPU), the scratch they are uploaded to, and the stream."""

    def __init__(self, device: torch.device, size: int, depth: int) -> None:
        self.device, self.depth = device, depth
        self.cuda = device.type == "cuda"
        self.host = [
            torch.empty(size, dtype=torch.uint8, pin_memory=self.cuda) for _ in range(depth)
        ]
        if self.cuda:
            self.scratch = torch.empty(size, dtype=torch.uint8, device=device)
            self.stream = torch.cuda.Stream(device)
            self.uploaded = [torch.cuda.Event() for _ in range(depth)]

    def device_scope(self) -> torch.cuda.device | nullcontext:
        return torch.cuda.device(self.device) if self.cuda else nullcontext()

    def wait(self, slot: int) -> None:
        """Block until buffer ``slot``'s last upload is done (it may then be overwritten)."""
        if self.cuda:
            self.uploaded[slot].synchronize()

    def upload(self, slot: int, chunk: Chunk, targets: list[Target], quantizer: Quantizer) -> int:
        """Enqueue buffer ``slot`` → slab for ``chunk``; returns the slab bytes it writes.
        Pieces that keep their dtype go from the pinned buffer straight into the slab."""
        staged = self.host[slot][: chunk.nbytes]
        if not self.cuda:
            return _place(staged, chunk, targets, quantizer)
        direct = [p for p in chunk.pieces if targets[p.read].direct]
        cast = [p for p in chunk.pieces if not targets[p.read].direct]
        with torch.cuda.stream(self.stream):
            direct_chunk = Chunk(chunk.source, chunk.offset, 0, direct)
            written = _place(staged, direct_chunk, targets, quantizer)
            if cast:
                end = max(p.at + p.nbytes for p in cast)
                self.scratch[:end].copy_(staged[:end], non_blocking=True)
                written += _place(self.scratch[:end], Chunk(0, 0, 0, cast), targets, quantizer)
            self.uploaded[slot].record(self.stream)
        return written

    def finish(self) -> None:
        if self.cuda:
            self.stream.synchronize()


def _place(staged: torch.Tensor, chunk: Chunk, targets: list[Target], quantizer: Quantizer) -> int:
    """Copy (same dtype), cast (and dequantize) or hand to ``quantizer`` each piece of
    ``staged`` for its slab bytes."""
    written = 0
    for p in chunk.pieces:
        src, t = staged[p.at : p.at + p.nbytes], targets[p.read]
        if t.direct:
            t.bytes[p.start : p.start + p.nbytes].copy_(src, non_blocking=True)
            written += p.nbytes
            continue
        if quantizes(t.src, t.dst):
            written += quantizer.add(p.read, t, src, p.start)
            continue
        first = p.start // t.src.itemsize
        count = p.nbytes // t.src.itemsize
        if p.at % t.src.itemsize:
            src = src.clone()  # a misaligned tensor in the file: an aligned copy to view
        cast_into(t.bytes.view(t.dst)[first : first + count], src.view(t.src), t.scale)
        written += count * t.dst.itemsize
    return written


def _inputs(
    flat: torch.Tensor, spec: ComponentSpec, rows: list[list], sources: list[FileSource]
) -> tuple[list[Read], list[Target]]:
    """Reads and targets; appends to ``sources`` (one per file)."""
    files = open_files(spec)
    by_path: dict = {}
    reads, targets = [], []
    for t, (_, dtype, _, _, offset) in zip(spec.tensors, rows, strict=True):
        f = files[t.file]
        info = source_info(f, t)
        if t.file not in by_path:
            sources.append(FileSource(t.file))
            by_path[t.file] = len(sources) - 1
        dst = torch_dtype(dtype)
        size = info.nbytes // info.dtype.itemsize * dst.itemsize
        reads.append(Read(by_path[t.file], f.offset(t.key), info.nbytes, info.dtype.itemsize))
        targets.append(Target(flat[offset : offset + size], info.dtype, dst, t.scale))
    return reads, targets
