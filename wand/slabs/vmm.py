"""GPU slabs: CUDA VMM allocations shared as POSIX file descriptors.

The daemon makes one physical allocation per component per GPU (``cuMemCreate``, rounded up
to the allocation granularity), maps it read-write to fill it, then sets its own mapping
read-only: it never writes the slab again. Each attach exports a fresh descriptor
(``cuMemExportToShareableHandle``), handed over the fd socket; the client imports it,
reserves an address range, maps it and sets access read-only
(``CU_MEM_ACCESS_FLAGS_PROT_READ``; where the driver refuses that, read-write, and the slab
says so). When the memory goes, and in which order a client tears its mapping down:
``LIFETIME.md`` in this folder.

A :class:`Mapping` is one address range over one allocation. Its users count it explicitly
(:meth:`Mapping.pin` gives a tensor over it; the tensor's death unpins), under a lock; the
last unpin hands it to a reaper thread that waits for the device and unmaps it. So nothing
a weak reference can still hand out is torn down, and no tensor deleter synchronises the
device. Only :meth:`Mapping.pin` touches torch; the rest is driver calls (logged at debug
level, :mod:`wand.slabs.cuda`), which the fake driver in the tests checks.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import weakref
from typing import Any

import torch

from wand.common import placement, views
from wand.common.errors import DeviceError, ProtocolError, WandError
from wand.common.placement import Device
from wand.slabs import cuda

log = logging.getLogger("wand.slabs.vmm")
KIND = "vmm"
_lock = threading.Lock()
_mapped: dict[str, Mapping] = {}  # token → this process's read-only mapping, while pinned
_reaped: queue.SimpleQueue[Mapping] = queue.SimpleQueue()
_reaper: threading.Thread | None = None


def _after_fork() -> None:
    """A forked child has no reaper thread, no GPU mappings (CUDA state does not survive a
    fork) and must not wait for a lock a parent's thread held."""
    global _lock, _reaped, _reaper
    _lock = threading.Lock()
    _reaped = queue.SimpleQueue()
    _reaper = None
    _mapped.clear()


os.register_at_fork(after_in_child=_after_fork)


class Mapping:
    """An address range on GPU ``index`` mapped to an allocation ``handle`` of ``size``."""

    def __init__(self, index: int, handle: int, size: int, read_only: bool, what: str = "") -> None:
        self.index, self.handle, self.size, self.what = index, handle, size, what
        self.ptr = 0
        self.read_only = False
        self.token: str | None = None  # set while this process's cache hands it out
        self._pins = 0
        self._closed = False
        mapped = False
        try:
            self.ptr = cuda.reserve(index, size, what)
            cuda.map_range(index, self.ptr, size, handle, what)
            mapped = True
            self.read_only = _set_access(self, read_only)
        except BaseException:
            self.handle = 0  # the caller still owns the handle: it releases it
            self._teardown(mapped)
            raise

    def pin(self, nbytes: int) -> torch.Tensor:
        """One uint8 tensor over the first ``nbytes``; the mapping lives at least as long."""
        return torch.as_tensor(self.hold(nbytes), device=torch.device("cuda", self.index))

    def hold(self, nbytes: int) -> _Pin:
        """What :meth:`pin` wraps: an owner of the first ``nbytes``, counted until collected."""
        with _lock:
            if self._closed:
                raise WandError("this GPU mapping is closed")
            self._pins += 1
        return self._owner(nbytes)

    def close(self) -> None:
        """No new pins; unmapped once the last one is gone (now, if there is none)."""
        with _lock:
            self._closed = True
            idle = self._pins == 0
        if idle:
            _reap(self)

    def _owner(self, nbytes: int) -> _Pin:
        """The owner of a pin already counted; collecting it unpins."""
        pin = _Pin(self.ptr, nbytes)
        weakref.finalize(pin, _unpin, self).atexit = False  # at exit the driver cleans up
        return pin

    def _teardown(self, mapped: bool = True) -> None:
        """Unmap, free the range, release the handle, in that order (each at most once)."""
        ptr, self.ptr = self.ptr, 0
        if ptr:
            if mapped:
                cuda.unmap(self.index, ptr, self.size, self.what)
            cuda.free_address(self.index, ptr, self.size, self.what)
        handle, self.handle = self.handle, 0
        if handle:
            cuda.release(self.index, handle, self.what)


class _Pin:
    """The owner torch keeps alive while any tensor over the mapping lives."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (ptr, False),
            "strides": None,
            "version": 2,
        }


def _unpin(mapping: Mapping) -> None:
    """One tensor over ``mapping`` is gone; after the last, a cached read-only mapping
    leaves the cache, and a closed one is unmapped."""
    with _lock:
        mapping._pins -= 1
        if mapping._pins:
            return
        if mapping.token is not None and _mapped.get(mapping.token) is mapping:
            del _mapped[mapping.token]
            mapping._closed = True
        if not mapping._closed:
            return
    _reap(mapping)


def _reap(mapping: Mapping) -> None:
    """Unmap on the reaper thread, after the device has finished what it was given."""
    global _reaper
    _reaped.put(mapping)
    with _lock:
        if _reaper is None:
            _reaper = threading.Thread(target=_reap_forever, name="wand-unmap", daemon=True)
            _reaper.start()


def _reap_forever() -> None:
    while True:
        mapping = _reaped.get()
        try:
            cuda.synchronize(mapping.index)  # kernels enqueued on it may still run
            mapping._teardown()
        except DeviceError as e:
            log.warning("unmapping a GPU slab failed: %s", e)


def _set_access(m: Mapping, read_only: bool) -> bool:
    """Set access; a read-only request the driver refuses falls back to read-write (False)."""
    if read_only:
        try:
            cuda.set_access(m.index, m.ptr, m.size, True, m.what)
            return True
        except DeviceError as e:
            log.warning("driver refused a read-only mapping (%s): mapping read-write", e)
    cuda.set_access(m.index, m.ptr, m.size, False, m.what)
    return False


class VmmSlab:
    """A slab the daemon owns on one GPU."""

    kind = KIND

    def __init__(
        self, label: str, nbytes: int, device: Device, token: str, fd: int | None = None
    ) -> None:
        if device.index is None:
            raise DeviceError(f"{device.name} is not a GPU")
        self.label, self.nbytes, self.device, self.token = label, nbytes, device, token
        index = device.index
        cuda.require_vmm(index)
        self.size = cuda.rounded(nbytes, index)
        if fd is None:
            handle = cuda.create(index, self.size, label)
        else:
            handle = cuda.import_fd(index, fd, label)
        try:
            self.mapping = Mapping(index, handle, self.size, fd is not None, label)
        except BaseException:
            cuda.release(index, handle, label)  # the constructor failed: nothing may leak
            raise
        self.read_only = self.mapping.read_only  # what clients get: known at seal, adoption

    def writable(self) -> torch.Tensor:
        """The whole slab as one uint8 tensor on its GPU, for filling it (before :meth:`seal`)."""
        return self.mapping.pin(self.nbytes)

    def seal(self) -> None:
        """Every copy is done; from now on the daemon's own mapping is read-only too."""
        m = self.mapping
        cuda.synchronize(m.index)
        self.read_only = _set_access(m, read_only=True)
        if not self.read_only:
            log.warning("%s: clients of this slab map it read-write", self.label)

    def handle(self) -> dict[str, Any]:
        return {
            "kind": KIND,
            "uuid": self.device.uuid,
            "nbytes": self.nbytes,
            "size": self.size,
            "token": self.token,
            "read_only": self.read_only,
            "label": self.label,  # names the slab in clients' debug logs of driver calls
        }

    def export(self) -> int:
        return cuda.export(self.mapping.index, self.mapping.handle, self.label)

    def verify(self, man: dict[str, Any]) -> bool:
        return views.verify(self.mapping.pin(self.nbytes), man)

    def close(self) -> None:
        self.mapping.close()


def adopt(label: str, handle: dict[str, Any], fd: int, man: dict[str, Any]) -> VmmSlab:
    """A slab handed back by systemd's fd store, imported and checked against the on-device
    digests of its manifest (its bytes never leave the GPU)."""
    try:
        device = _device(handle)
        slab = VmmSlab(label, int(handle["nbytes"]), device, str(handle["token"]), fd=fd)
    finally:
        os.close(fd)  # the imported handle holds the memory now
    if not slab.verify(man):
        slab.close()
        raise WandError(f"stored GPU slab {label} no longer matches its checksum")
    return slab


def mapped(handle: dict[str, Any]) -> torch.Tensor | None:
    with _lock:
        mapping = _mapped.get(str(handle.get("token")))
        if mapping is None:
            return None
        mapping._pins += 1  # under the same lock as the look-up: it cannot go meanwhile
    owner = mapping._owner(int(handle["nbytes"]))
    return torch.as_tensor(owner, device=torch.device("cuda", mapping.index))


def map_fd(handle: dict[str, Any], fd: int, writable: bool) -> torch.Tensor:
    """Import and map a GPU slab descriptor read-only (kept while pinned), or with
    ``writable`` copy it into private device memory of this process (the shared mapping is
    let go of as soon as the copy is done)."""
    try:
        nbytes, size, token = int(handle["nbytes"]), int(handle["size"]), str(handle["token"])
    except (KeyError, TypeError, ValueError) as e:
        raise ProtocolError(f"malformed vmm handle: {type(e).__name__}: {e}") from None
    index = _device(handle).index
    torch.cuda.init()  # the primary context is PyTorch's, and ours
    what = str(handle.get("label") or token[:8])
    mapping = Mapping(index, cuda.import_fd(index, fd, what), size, True, what)
    if writable:
        try:
            copy = mapping.pin(nbytes).clone()
            torch.cuda.current_stream(index).synchronize()
            return copy
        finally:
            mapping.close()
    flat = mapping.pin(nbytes)
    with _lock:
        mapping.token = token
        _mapped[token] = mapping
    return flat


def _device(handle: dict[str, Any]) -> Device:
    """The local device of the slab's GPU, by UUID (indices differ between processes)."""
    uuid = handle.get("uuid")
    if not isinstance(uuid, str):
        raise ProtocolError("vmm handle without a GPU uuid")
    visible = placement.visible_uuids()
    index = placement.local_index(uuid, visible, os.environ.get("CUDA_VISIBLE_DEVICES"))
    return Device(f"cuda:{index}", uuid)
