"""When two components are the same bytes, when a checkpoint changed on disk, and when a slab
from systemd's fd store is the one a configuration asks for.

``shape_key`` is cheap (class, config, names, shapes, dtypes, device). Components with equal
shape keys are candidates for sharing one slab; they share it only if their files also have
equal contents. That is decided in three steps, each only for files that passed the one
before: sizes, then a sample (the first 64 KiB, where the headers are, and 16 pieces of
64 KiB spread over the file), then a full blake2b remembered per file version. Files of
different experts differ in the sample, so a start never hashes 114 GB of experts.
``stamp`` is what a reload compares: which file versions a component was loaded from.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

from wand.common import placement
from wand.common.spec import ComponentSpec
from wand.daemon.config import CheckpointConfig
from wand.load.files import open_regular, read_exact

CHUNK = 64 << 20
SAMPLE = 64 << 10
SAMPLES = 16


def shape_key(spec: ComponentSpec, device: str) -> tuple:
    tensors = tuple(
        (t.name, t.key, t.shape, str(t.dtype), t.aliases, *([t.scale] if t.scale else []))
        for t in spec.tensors
    )  # unscaled tensors keep the key older daemons stored their slabs under
    return (spec.cls, json.dumps(spec.config, sort_keys=True), tensors, device)


def component_key(entry: CheckpointConfig, spec: ComponentSpec) -> tuple:
    """``spec``'s shape key on the device ``entry`` places it on."""
    return shape_key(spec, placement.resolve(entry.device_for(spec.name)).name)


def same_component(a: ComponentSpec, key_a: tuple, b: ComponentSpec, key_b: tuple) -> bool:
    """Would ``a`` and ``b`` (of shape keys ``key_a``, ``key_b``) be held in one slab?"""
    return key_a == key_b and same_bytes(a, b)


def stamp(spec: ComponentSpec) -> tuple:
    return tuple(_file_version(f) for f in _files(spec))


def same_bytes(a: ComponentSpec, b: ComponentSpec) -> bool:
    """Do the files of ``a`` and ``b`` hold the same bytes, pairwise in tensor order?"""
    fa, fb = _files(a), _files(b)
    if len(fa) != len(fb):
        return False
    versions = [(_file_version(x), _file_version(y)) for x, y in zip(fa, fb, strict=True)]
    pairs = [(vx, vy) for vx, vy in versions if vx != vy]
    for step in (_size, _sample, _digest):
        if any(step(*vx) != step(*vy) for vx, vy in pairs):
            return False
    return True


def adoption_key(path: Path, layout: str, spec: ComponentSpec, device: str, versions: tuple) -> str:
    """What a stored slab must have been loaded from to be adopted for ``spec``: the
    checkpoint folder and layout, the component's shape key on ``device`` (a GPU UUID or
    ``cpu``), and ``versions``, its :func:`stamp` (path, size, mtime, inode of its files)."""
    text = json.dumps(
        [str(path), layout, spec.name, repr(shape_key(spec, device)), versions],
        sort_keys=True,
    )
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _files(spec: ComponentSpec) -> list[Path]:
    return list(dict.fromkeys(t.file for t in spec.tensors))


def _file_version(path: Path) -> tuple:
    return (os.path.realpath(path), *_size_mtime_inode(path))  # (realpath never raises)


def _size_mtime_inode(path: Path) -> tuple[int, int, int]:
    """A file's version without its resolved path (a folder's files are named relative to it)."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino


def _size(path: str, size: int, mtime_ns: int, ino: int) -> int:
    return size


@cache
def _sample(path: str, size: int, mtime_ns: int, ino: int) -> str:
    """blake2b of the first 64 KiB and of 16 evenly spread 64 KiB pieces."""
    offsets = sorted({0, *(size * i // SAMPLES for i in range(1, SAMPLES))})
    h = hashlib.blake2b(digest_size=32)
    fd = open_regular(path)
    try:
        for offset in offsets:
            h.update(read_exact(fd, offset, min(SAMPLE, size - offset), path))
    finally:
        os.close(fd)
    return h.hexdigest()


@cache
def _digest(path: str, size: int, mtime_ns: int, ino: int) -> str:
    """blake2b of a whole file, in parallel 64 MiB pieces (cached per file version)."""

    def piece(offset: int) -> bytes:
        fd = open_regular(path)
        try:
            data = read_exact(fd, offset, min(CHUNK, size - offset), path)
        finally:
            os.close(fd)
        return hashlib.blake2b(data, digest_size=32).digest()

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        pieces = pool.map(piece, range(0, size, CHUNK))
        return hashlib.blake2b(b"".join(pieces), digest_size=32).hexdigest()


def entry_fingerprint(entry: CheckpointConfig) -> str:
    """What a checkpoint's spec depends on: the entry's settings (not its name) and the
    version of every file below its folder (or of each of its files, and below its
    tokenizer folder) and of its LoRA files. Equal fingerprints mean reading the
    checkpoint again would give the same spec."""
    if entry.path is not None:
        where, files = _folder_versions(entry.path)
    else:
        where = [[name, _file_version(p)] for name, p in sorted(entry.files.items())]
        files = _folder_versions(entry.tokenizer) if entry.tokenizer is not None else None
    loras = [(x.name, x.expert, _file_version(x.path)) for x in entry.loras]
    text = json.dumps([where, entry.task, entry.device, entry.dtype, loras, files], sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _folder_versions(path: Path) -> tuple[str, list]:
    """A folder's resolved path and the version of every file below it, by relative name."""
    folder = Path(os.path.realpath(path))
    files = sorted(
        (str(Path(root, f).relative_to(folder)), *_size_mtime_inode(Path(root, f)))
        for root, _, names in os.walk(folder)
        for f in names
    )
    return str(folder), files
