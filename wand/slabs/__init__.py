"""Slabs: one contiguous allocation per component per device, shared as a file descriptor.

Two kinds side by side behind one small interface, so neither the daemon nor the client
branches on the device kind:

- ``memfd`` (:mod:`wand.slabs.memfd`): host memory in a sealed memfd;
- ``vmm`` (:mod:`wand.slabs.vmm`): GPU memory from ``cuMemCreate``, exported as a POSIX fd,
  through the driver layer :mod:`wand.slabs.cuda`.

The daemon side is a :class:`Slab`: created, filled once (by :mod:`wand.load`, through
:meth:`Slab.writable`), sealed, then exported as a new descriptor for each attach (and one
for systemd's fd store). The client side maps a descriptor it received: read-only and once
per slab per process, or privately writable. Who holds a slab's memory and who frees it, in
which order, on the CPU and the GPU: ``LIFETIME.md`` in this folder.

This package is memory only: it imports neither the loaders nor the daemon nor the client,
and torch only where a mapping becomes a tensor.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Protocol

from wand.common.errors import ProtocolError
from wand.common.placement import Device
from wand.slabs import memfd

if TYPE_CHECKING:
    import torch


class Slab(Protocol):
    kind: str
    label: str
    nbytes: int  # what the manifest lays out
    size: int  # what the allocation holds: whole pages (memfd) or granules (vmm)
    read_only: bool  # whether clients map it read-only (a driver may refuse that on a GPU)
    token: str  # unique across daemons and restarts; names the slab in the fd store

    def writable(self) -> torch.Tensor:
        """The whole slab as one writable uint8 tensor, for filling it (before :meth:`seal`)."""

    def seal(self) -> None:
        """Done writing: every byte is in place and nothing writes it again."""

    def handle(self) -> dict[str, Any]:
        """What a client needs besides the descriptor to map the slab."""

    def export(self) -> int:
        """A new descriptor of the slab for one client or the fd store (caller closes it)."""

    def close(self) -> None:
        """The daemon lets go; the memory lives while any descriptor or mapping does."""


def create(label: str, nbytes: int, device: Device, token: str) -> Slab:
    if device.uuid is None:
        return memfd.MemfdSlab(label, nbytes, token)
    from wand.slabs import vmm

    return vmm.VmmSlab(label, nbytes, device, token)


def adopt(label: str, handle: dict[str, Any], fd: int, man: dict[str, Any]) -> Slab:
    """A slab from systemd's fd store, checked against its manifest ``man``; ``fd`` is taken
    over (kept by the slab or closed, also when the slab is refused)."""
    try:
        kind = _module(handle)
    except ProtocolError:
        os.close(fd)
        raise
    return kind.adopt(label, handle, fd, man)


def _module(handle: dict[str, Any]):
    kind = handle.get("kind")
    if kind == memfd.KIND:
        return memfd
    from wand.slabs import vmm

    if kind == vmm.KIND:
        return vmm
    raise ProtocolError(f"unsupported slab kind {kind!r}")


def mapped(handle: dict[str, Any]) -> torch.Tensor | None:
    """This process's read-only mapping of the slab behind ``handle``, if it has one."""
    return _module(handle).mapped(handle)


def map_fd(handle: dict[str, Any], fd: int, writable: bool = False) -> torch.Tensor:
    """Map the slab descriptor ``fd`` (closed here once mapped) as one uint8 tensor:
    shared read-only, or with ``writable`` a private copy that writes cannot leak from."""
    try:
        return _module(handle).map_fd(handle, fd, writable)
    finally:
        os.close(fd)
