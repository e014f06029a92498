"""Shared-memory slabs: one file in /dev/shm per component, filled once, mapped read-only.

Names carry the owner's uid and pid, so a daemon starting after a killed one can tell which
files are orphans. A slab's name is removed when it is freed or the daemon exits; memory that
clients still map stays valid until they unmap it (the kernel keeps the pages).
"""

from __future__ import annotations

import mmap
import os
import re
import warnings
from itertools import count
from pathlib import Path
from typing import Any

import torch

from wand.errors import WandError

SHM_DIR = Path(os.environ.get("WAND_SHM_DIR", "/dev/shm"))
_NAME = re.compile(r"^wand-(\d+)-(\d+)-\d+-[\w.-]*$")
_seq = count()


class ShmSlab:
    """A slab the daemon owns: writable here, exported by path, read-only for clients."""

    def __init__(self, label: str, nbytes: int, shm_dir: Path = SHM_DIR) -> None:
        safe = re.sub(r"[^\w.-]", "_", label)
        self.path = shm_dir / f"wand-{os.geteuid()}-{os.getpid()}-{next(_seq)}-{safe}"
        self.nbytes = nbytes
        _check_room(shm_dir, nbytes)
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, nbytes)
        finally:
            os.close(fd)
        storage = torch.UntypedStorage.from_file(str(self.path), shared=True, nbytes=nbytes)
        self.flat = torch.empty(0, dtype=torch.uint8).set_(storage)

    def seal(self) -> None:
        """Done writing: from now on the file is readable, not writable, by its owner's group."""
        os.chmod(self.path, 0o440)

    def handle(self) -> dict[str, Any]:
        return {"kind": "shm", "path": str(self.path), "nbytes": self.nbytes}

    def free(self) -> None:
        self.path.unlink(missing_ok=True)
        self.flat = torch.empty(0, dtype=torch.uint8)


def _check_room(shm_dir: Path, nbytes: int) -> None:
    """Fail now with a clear error rather than with SIGBUS when a page cannot be had mid-load.

    (Reserving the pages with fallocate would do the same but costs a zero-fill pass.)
    """
    st = os.statvfs(shm_dir)
    free = st.f_bavail * st.f_frsize
    if nbytes > free:
        raise WandError(
            f"{shm_dir} has {free / 1e9:.2f} GB free, a slab of {nbytes / 1e9:.2f} GB does not fit"
        )


def map_readonly(handle: dict[str, Any]) -> torch.Tensor:
    """Map a slab ``PROT_READ``: a write through any view kills the writer, not the data."""
    path, nbytes = handle["path"], int(handle["nbytes"])
    fd = os.open(path, os.O_RDONLY)
    try:
        mm = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ)
    finally:
        os.close(fd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable": by design
        return torch.frombuffer(mm, dtype=torch.uint8)


def remove_stale(shm_dir: Path = SHM_DIR) -> list[Path]:
    """Unlink slabs of this user whose daemon process is gone."""
    removed = []
    for path in shm_dir.glob("wand-*"):
        m = _NAME.match(path.name)
        if not m or int(m.group(1)) != os.geteuid() or _alive(int(m.group(2))):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
