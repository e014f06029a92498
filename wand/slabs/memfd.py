"""CPU slabs: sealed memfds.

The daemon creates an anonymous memfd, reserves its pages up front (``fallocate``: running
out of memory is an error there, never a SIGBUS in the middle of a copy), fills it through a
writable shared mapping, drops that mapping and seals the file (``F_SEAL_WRITE |
F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL``). From then on the kernel refuses every writable
shared mapping and every write, whoever asks, root included. The memfd has no name anyone
can open: clients get it only as a file descriptor passed over the fd socket. Who holds its
pages and when they go: ``LIFETIME.md`` in this folder.
"""

from __future__ import annotations

import errno
import fcntl
import gc
import mmap
import os
import warnings
import weakref
from typing import TYPE_CHECKING, Any

from wand.common.errors import WandError
from wand.slabs import room

if TYPE_CHECKING:
    import torch

KIND = "memfd"
SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_mapped: dict[str, weakref.ref[mmap.mmap]] = {}  # token → this process's read-only mapping


class MemfdSlab:
    """A slab the daemon owns: writable until :meth:`seal`, then immutable for everyone."""

    kind = KIND
    read_only = True  # the seals make every shared mapping read-only

    def __init__(self, label: str, nbytes: int, token: str, fd: int | None = None) -> None:
        self.label, self.nbytes, self.token = label, nbytes, token
        self.size = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
        self._writer: mmap.mmap | None = None
        if fd is not None:  # adopted from systemd's fd store
            self.fd = fd
            return
        room.check(nbytes)
        self.fd = os.memfd_create(f"wand:{label}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, nbytes)
            _reserve(self.fd, nbytes, label)
            self._writer = mmap.mmap(self.fd, nbytes, mmap.MAP_SHARED)
        except BaseException:
            os.close(self.fd)
            raise

    def writable(self) -> torch.Tensor:
        """The whole slab as one writable uint8 tensor, for filling it (before :meth:`seal`)."""
        import torch

        if self._writer is None:
            raise WandError(f"slab {self.label} is sealed")
        return torch.frombuffer(self._writer, dtype=torch.uint8)

    def seal(self) -> None:
        """Done writing: unmap the writing mapping and seal (F_SEAL_WRITE needs every
        writable mapping gone, so views of :meth:`writable` left in cycles are collected first)."""
        if self._writer is not None:
            try:
                self._writer.close()
            except BufferError:
                gc.collect()
                self._writer.close()
            self._writer = None
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, SEALS)

    def handle(self) -> dict[str, Any]:
        return {"kind": KIND, "nbytes": self.nbytes, "token": self.token}

    def export(self) -> int:
        """A descriptor for one client (the caller closes it once sent)."""
        return os.dup(self.fd)

    def close(self) -> None:
        """The daemon lets go; the pages stay while any client maps them."""
        if self._writer is not None:
            try:
                self._writer.close()
            except BufferError:  # a cancelled load's views still live: unmapped when collected
                pass
            self._writer = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def adopt(label: str, handle: dict[str, Any], fd: int, man: dict[str, Any]) -> MemfdSlab:
    """A slab handed back by systemd's fd store: it must still be the sealed memfd of
    ``handle``'s size (anything else is refused). Sealed means unchanged since it was
    checksummed, so its bytes are not read again."""
    try:
        check_sealed(fd, int(handle["nbytes"]))
        return MemfdSlab(label, int(handle["nbytes"]), str(handle["token"]), fd=fd)
    except BaseException:
        os.close(fd)
        raise


def check_sealed(fd: int, nbytes: int) -> None:
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        size = os.fstat(fd).st_size
    except OSError as e:
        raise WandError(f"slab descriptor is not a memfd: {e.strerror}") from None
    if seals & SEALS != SEALS:
        raise WandError("slab descriptor is not sealed: refusing to share it")
    if size != nbytes:
        raise WandError(f"slab descriptor holds {size} bytes, its manifest says {nbytes}")


def mapped(handle: dict[str, Any]) -> torch.Tensor | None:
    """This process's read-only mapping of the slab, if it has one already."""
    ref = _mapped.get(str(handle.get("token")))
    mm = ref() if ref is not None else None
    return _tensor(mm) if mm is not None else None


def map_fd(handle: dict[str, Any], fd: int, writable: bool) -> torch.Tensor:
    """Map a slab descriptor: shared and read-only, or private copy-on-write pages.

    Read-only mappings are made once per slab per process (kept while any tensor over them
    lives); each writable one is its own private copy-on-write mapping.
    """
    nbytes = int(handle["nbytes"])
    check_sealed(fd, nbytes)
    if writable:
        mm = mmap.mmap(fd, nbytes, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
    else:
        mm = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ)
        _mapped[str(handle["token"])] = weakref.ref(mm)
    return _tensor(mm)


def _tensor(mm: mmap.mmap) -> torch.Tensor:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable": by design
        return torch.frombuffer(mm, dtype=torch.uint8)


def _reserve(fd: int, nbytes: int, label: str) -> None:
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.ENOMEM):
            raise WandError(
                f"not enough memory for slab {label}: reserving {nbytes / 1e9:.2f} GB failed "
                f"({e.strerror})",
                "memory",
            ) from None
        raise


def seal_bytes(name: str, data: bytes) -> int:
    """A small sealed memfd holding ``data`` (a stored slab's record)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.write(fd, data)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def unseal_bytes(fd: int, limit: int = 64 << 20) -> bytes:
    """What :func:`seal_bytes` wrote (the memfd must still be sealed)."""
    size = os.fstat(fd).st_size
    if size > limit:
        raise WandError(f"sealed record of {size} bytes is larger than {limit}")
    check_sealed(fd, size)
    return os.pread(fd, size, 0)
