"""The few CUDA driver calls GPU slabs need, through ``libcuda.so.1`` and ctypes.

Slabs are plain ``cuMemAlloc`` allocations, not PyTorch caching-allocator blocks: one
allocation per slab is exactly what legacy CUDA IPC exports, and neither expandable
segments, the allocator's block splitting nor PyTorch's IPC ref-count files are involved.
Every call runs in the device's *primary* context, the one PyTorch's runtime uses, pushed
for the call, so it works from any thread. :class:`DeviceMemory` exposes a pointer through
``__cuda_array_interface__``, which ``torch.as_tensor`` wraps without copying.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from wand.errors import DeviceError

IPC_HANDLE_BYTES = 64
LAZY_ENABLE_PEER_ACCESS = 0x1  # CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS


class IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * IPC_HANDLE_BYTES)]


_P = ctypes.POINTER
_SIGNATURES: dict[str, list[Any]] = {
    "cuInit": [ctypes.c_uint],
    "cuDeviceGet": [_P(ctypes.c_int), ctypes.c_int],
    "cuDevicePrimaryCtxRetain": [_P(ctypes.c_void_p), ctypes.c_int],
    "cuCtxPushCurrent_v2": [ctypes.c_void_p],
    "cuCtxPopCurrent_v2": [_P(ctypes.c_void_p)],
    "cuCtxSynchronize": [],
    "cuMemAlloc_v2": [_P(ctypes.c_uint64), ctypes.c_size_t],
    "cuMemFree_v2": [ctypes.c_uint64],
    "cuIpcGetMemHandle": [_P(IpcHandle), ctypes.c_uint64],
    "cuIpcOpenMemHandle_v2": [_P(ctypes.c_uint64), IpcHandle, ctypes.c_uint],
    "cuIpcCloseMemHandle": [ctypes.c_uint64],
    "cuGetErrorString": [ctypes.c_int, _P(ctypes.c_char_p)],
}
_lib: ctypes.CDLL | None = None
_contexts: dict[int, ctypes.c_void_p] = {}
_lock = threading.Lock()


def _driver() -> ctypes.CDLL:
    global _lib
    with _lock:
        if _lib is None:
            try:
                lib = ctypes.CDLL("libcuda.so.1")
            except OSError as e:
                raise DeviceError(f"cannot load the CUDA driver (libcuda.so.1): {e}") from None
            for name, args in _SIGNATURES.items():
                fn = getattr(lib, name)
                fn.argtypes, fn.restype = args, ctypes.c_int
            _lib = lib
            _call("cuInit", 0)
        return _lib


def _call(name: str, *args: Any) -> None:
    lib = _lib if _lib is not None else _driver()
    rc = getattr(lib, name)(*args)
    if rc != 0:
        text = ctypes.c_char_p()
        lib.cuGetErrorString(rc, ctypes.byref(text))
        reason = text.value.decode() if text.value else "unknown error"
        raise DeviceError(f"{name} failed: CUDA error {rc} ({reason})")


@contextmanager
def context(index: int) -> Iterator[None]:
    """Make GPU ``index``'s primary context current on this thread for the block."""
    torch.cuda.init()  # PyTorch first: both then use the primary context it set up
    _driver()
    with _lock:
        ctx = _contexts.get(index)
        if ctx is None:
            dev, ctx = ctypes.c_int(), ctypes.c_void_p()
            _call("cuDeviceGet", ctypes.byref(dev), index)
            _call("cuDevicePrimaryCtxRetain", ctypes.byref(ctx), dev)
            _contexts[index] = ctx
    _call("cuCtxPushCurrent_v2", ctx)
    try:
        yield
    finally:
        _call("cuCtxPopCurrent_v2", ctypes.byref(ctypes.c_void_p()))


class DeviceMemory:
    """``nbytes`` of device memory at ``ptr`` on GPU ``index``, as a CUDA array of bytes.

    Owned memory (``cuMemAlloc``) is freed by :meth:`release`; imported memory (an IPC
    handle opened here) is closed by :meth:`release` or when the object is collected, which
    happens once no tensor made from it is left (torch keeps the object alive until then).
    """

    def __init__(self, index: int, ptr: int, nbytes: int, imported: bool) -> None:
        self.index, self.ptr, self.nbytes, self.imported = index, ptr, nbytes, imported

    @classmethod
    def allocate(cls, index: int, nbytes: int) -> DeviceMemory:
        ptr = ctypes.c_uint64()
        with context(index):
            _call("cuMemAlloc_v2", ctypes.byref(ptr), nbytes)
        return cls(index, ptr.value, nbytes, imported=False)

    @classmethod
    def open(cls, index: int, handle: bytes, nbytes: int) -> DeviceMemory:
        """Map another process's allocation, exported by :meth:`ipc_handle`, on GPU ``index``."""
        if len(handle) != IPC_HANDLE_BYTES:
            raise DeviceError(f"a CUDA IPC handle has {IPC_HANDLE_BYTES} bytes, got {len(handle)}")
        ptr = ctypes.c_uint64()
        with context(index):
            _call(
                "cuIpcOpenMemHandle_v2",
                ctypes.byref(ptr),
                IpcHandle.from_buffer_copy(handle),
                LAZY_ENABLE_PEER_ACCESS,
            )
        return cls(index, ptr.value, nbytes, imported=True)

    def ipc_handle(self) -> bytes:
        handle = IpcHandle()
        with context(self.index):
            _call("cuIpcGetMemHandle", ctypes.byref(handle), self.ptr)
        return bytes(handle)

    def synchronize(self) -> None:
        """Wait for all work on the device: what was written is complete and visible."""
        with context(self.index):
            _call("cuCtxSynchronize")

    def tensor(self) -> torch.Tensor:
        """One uint8 tensor over all the bytes (zero-copy; it keeps this object alive)."""
        return torch.as_tensor(self, device=torch.device("cuda", self.index))

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {
            "shape": (self.nbytes,),
            "typestr": "|u1",
            "data": (self.ptr, False),
            "strides": None,
            "version": 2,
        }

    def release(self) -> None:
        """Free (owned) or close (imported) once; later calls do nothing."""
        ptr, self.ptr = self.ptr, 0
        if not ptr:
            return
        with context(self.index):
            _call("cuCtxSynchronize")  # no kernel may still be using it
            _call("cuIpcCloseMemHandle" if self.imported else "cuMemFree_v2", ptr)

    def __del__(self) -> None:
        if self.imported and self.ptr:
            try:
                self.release()
            except Exception:  # at interpreter exit the driver may already be gone
                pass
