"""GPU slabs: one ``cuMemAlloc`` per component per GPU, exported by a CUDA IPC handle.

The daemon allocates, fills, synchronizes (:meth:`CudaSlab.seal`) and only then lets the
resident be attached, so a client never sees a half-written slab. A client opens each
handle once per process (:func:`map_ipc`) and builds every tensor as a view by offset; the
mapping is closed when the last of those tensors is gone. Each process's mapping is its
own, so one client closing it never affects another; the daemon frees a slab only when no
lease holds it.
"""

from __future__ import annotations

import os
import weakref
from typing import Any

import torch

from wand import placement, traps
from wand.cuda import DeviceMemory
from wand.errors import DeviceError, ProtocolError
from wand.placement import Device

_opened: weakref.WeakValueDictionary[tuple, DeviceMemory] = weakref.WeakValueDictionary()


class CudaSlab:
    """A slab the daemon owns on one GPU."""

    def __init__(self, label: str, nbytes: int, device: Device) -> None:
        if device.index is None:
            raise DeviceError(f"{device.name} is not a GPU")
        self.label, self.nbytes, self.device = label, nbytes, device
        self.memory = DeviceMemory.allocate(device.index, nbytes)
        self.flat = self.memory.tensor()
        self._ipc = self.memory.ipc_handle()

    def seal(self) -> None:
        """Done writing: wait until every copy and cast on the device has finished."""
        self.memory.synchronize()

    def handle(self) -> dict[str, Any]:
        return {
            "kind": "cuda_ipc",
            "uuid": self.device.uuid,
            "ipc_handle": self._ipc,
            "nbytes": self.nbytes,
            "pid": os.getpid(),
            "slab": self.label,
        }

    def free(self) -> None:
        self.flat = torch.empty(0, dtype=torch.uint8)
        self.memory.release()


def map_ipc(handle: dict[str, Any]) -> torch.Tensor:
    """This process's mapping of a GPU slab, as one uint8 tensor on the local device."""
    try:
        uuid, ipc, nbytes = handle["uuid"], bytes(handle["ipc_handle"]), int(handle["nbytes"])
        key = (handle["pid"], handle["slab"], ipc)
    except (KeyError, TypeError, ValueError) as e:
        raise ProtocolError(f"malformed cuda_ipc handle: {type(e).__name__}: {e}") from None
    problem = traps.check([uuid]).get("error")
    if problem:
        raise DeviceError(problem)
    memory = _opened.get(key)
    if memory is None:
        visible = placement.visible_uuids()
        index = placement.local_index(uuid, visible, os.environ.get("CUDA_VISIBLE_DEVICES"))
        memory = _opened[key] = DeviceMemory.open(index, ipc, nbytes)
    return memory.tensor()
