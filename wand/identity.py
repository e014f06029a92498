"""When two components are the same bytes, and when a checkpoint changed on disk.

``shape_key`` is cheap (class, config, names, shapes, dtypes, device). Components with equal
shape keys are candidates for sharing one slab; they share it only if their files also have
equal contents (``content_key``: full blake2b of each file, computed only for candidates and
remembered per file version). ``stamp`` is what a reload compares: which file versions a
component was loaded from.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

from wand.spec import ComponentSpec

CHUNK = 64 << 20


def shape_key(spec: ComponentSpec, device: str) -> tuple:
    tensors = tuple((t.name, t.key, t.shape, str(t.dtype), t.aliases) for t in spec.tensors)
    return (spec.cls, json.dumps(spec.config, sort_keys=True), tensors, device)


def stamp(spec: ComponentSpec) -> tuple:
    return tuple(_file_version(f) for f in _files(spec))


def content_key(spec: ComponentSpec) -> tuple:
    return tuple((os.path.getsize(f), _digest(*_file_version(f))) for f in _files(spec))


def _files(spec: ComponentSpec) -> list[Path]:
    return list(dict.fromkeys(t.file for t in spec.tensors))


def _file_version(path: Path) -> tuple:
    st = os.stat(path)
    return (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino)


@cache
def _digest(path: str, size: int, mtime_ns: int, ino: int) -> str:
    """blake2b of a whole file, in parallel 64 MiB pieces (cached per file version)."""

    def piece(offset: int) -> bytes:
        with open(path, "rb", buffering=0) as f:
            f.seek(offset)
            return hashlib.blake2b(f.read(CHUNK), digest_size=32).digest()

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        pieces = pool.map(piece, range(0, size, CHUNK))
        return hashlib.blake2b(b"".join(pieces), digest_size=32).hexdigest()
