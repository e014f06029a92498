"""The CUDA driver calls GPU slabs need — virtual memory management (VMM) — through ctypes.

ctypes against ``libcuda.so.1`` works with every driver version and needs no package (the
official ``cuda-bindings`` come in one line per CUDA major version and would have to match
the machine's driver). ``$WAND_LIBCUDA`` names another library to load instead: the tests
point it at a strict fake of the driver (``tests/fakecuda``), so everything above this module
runs unchanged without a GPU.

Every call runs in the device's *primary* context, the one PyTorch's runtime uses, pushed
for the call and popped after, so it works from any thread. Sizes are whole multiples of the
allocation granularity the driver reports; allocations are exportable as POSIX file
descriptors, each export a new descriptor its caller owns.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from wand.common.errors import DeviceError

log = logging.getLogger("wand.slabs.cuda")
LIBRARY_ENV = "WAND_LIBCUDA"
SUCCESS = 0
ALLOCATION_TYPE_PINNED = 0x1
HANDLE_TYPE_POSIX_FD = 0x1
LOCATION_TYPE_DEVICE = 0x1
ACCESS_READ, ACCESS_READWRITE = 0x1, 0x3
GRANULARITY_RECOMMENDED = 0x1
ATTRIBUTES = {  # what a device must support for GPU slabs
    "CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED": 102,
    "CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED": 103,
}


class Location(ctypes.Structure):  # CUmemLocation
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class AllocFlags(ctypes.Structure):  # CUmemAllocationProp.allocFlags
    _fields_ = [
        ("compressionType", ctypes.c_ubyte),
        ("gpuDirectRDMACapable", ctypes.c_ubyte),
        ("usage", ctypes.c_ushort),
        ("reserved", ctypes.c_ubyte * 4),
    ]


class AllocationProp(ctypes.Structure):  # CUmemAllocationProp (cuda.h 12.x)
    _fields_ = [
        ("type", ctypes.c_int),
        ("requestedHandleTypes", ctypes.c_int),
        ("location", Location),
        ("win32HandleMetaData", ctypes.c_void_p),
        ("allocFlags", AllocFlags),
    ]


class AccessDesc(ctypes.Structure):  # CUmemAccessDesc
    _fields_ = [("location", Location), ("flags", ctypes.c_int)]


_P, _u64, _size = ctypes.POINTER, ctypes.c_uint64, ctypes.c_size_t
_SIGNATURES: dict[str, list[Any]] = {
    "cuInit": [ctypes.c_uint],
    "cuGetErrorString": [ctypes.c_int, _P(ctypes.c_char_p)],
    "cuDeviceGetCount": [_P(ctypes.c_int)],
    "cuDeviceGet": [_P(ctypes.c_int), ctypes.c_int],
    "cuDeviceGetAttribute": [_P(ctypes.c_int), ctypes.c_int, ctypes.c_int],
    "cuDeviceGetUuid_v2": [ctypes.c_ubyte * 16, ctypes.c_int],
    "cuDevicePrimaryCtxRetain": [_P(ctypes.c_void_p), ctypes.c_int],
    "cuCtxPushCurrent_v2": [ctypes.c_void_p],
    "cuCtxPopCurrent_v2": [_P(ctypes.c_void_p)],
    "cuCtxSynchronize": [],
    "cuMemGetInfo_v2": [_P(_size), _P(_size)],
    "cuMemGetAllocationGranularity": [_P(_size), _P(AllocationProp), ctypes.c_int],
    "cuMemCreate": [_P(_u64), _size, _P(AllocationProp), ctypes.c_ulonglong],
    "cuMemRelease": [_u64],
    "cuMemExportToShareableHandle": [ctypes.c_void_p, _u64, ctypes.c_int, ctypes.c_ulonglong],
    "cuMemImportFromShareableHandle": [_P(_u64), ctypes.c_void_p, ctypes.c_int],
    "cuMemAddressReserve": [_P(_u64), _size, _size, _u64, ctypes.c_ulonglong],
    "cuMemAddressFree": [_u64, _size],
    "cuMemMap": [_u64, _size, _size, _u64, ctypes.c_ulonglong],
    "cuMemUnmap": [_u64, _size],
    "cuMemSetAccess": [_u64, _size, _P(AccessDesc), _size],
    "cuMemcpyHtoD_v2": [_u64, ctypes.c_void_p, _size],
    "cuMemcpyDtoH_v2": [ctypes.c_void_p, _u64, _size],
}
_lib: ctypes.CDLL | None = None
_contexts: dict[int, ctypes.c_void_p] = {}
_lock = threading.RLock()  # context() calls the driver while holding it


def _after_fork() -> None:
    """A forked child has one thread and none of its parent's CUDA state: a lock no other
    thread can be holding, no contexts, the driver to initialise again (if it can)."""
    global _lock, _lib
    _lock = threading.RLock()
    _contexts.clear()
    _lib = None


os.register_at_fork(after_in_child=_after_fork)


def driver() -> ctypes.CDLL:
    """The driver library, loaded and initialised once."""
    global _lib
    with _lock:
        if _lib is None:
            name = os.environ.get(LIBRARY_ENV) or "libcuda.so.1"
            try:
                lib = ctypes.CDLL(name)
            except OSError as e:
                raise DeviceError(f"cannot load the CUDA driver ({name}): {e}") from None
            for fn, args in _SIGNATURES.items():
                try:
                    f = getattr(lib, fn)
                except AttributeError:
                    raise DeviceError(f"the CUDA driver {name} lacks {fn}: too old") from None
                f.argtypes, f.restype = args, ctypes.c_int
            _check(lib, "cuInit", lib.cuInit(0))
            _lib = lib
        return _lib


def call(name: str, *args: Any) -> None:
    lib = driver()
    _check(lib, name, getattr(lib, name)(*args))


def _check(lib: ctypes.CDLL, name: str, rc: int) -> None:
    if rc != SUCCESS:
        raise DeviceError(f"{name} failed: CUDA error {rc} ({error_string(lib, rc)})")


def error_string(lib: ctypes.CDLL, rc: int) -> str:
    text = ctypes.c_char_p()
    lib.cuGetErrorString(rc, ctypes.byref(text))
    return text.value.decode() if text.value else "unknown error"


@contextmanager
def context(index: int) -> Iterator[None]:
    """Make GPU ``index``'s primary context current on this thread for the block."""
    driver()
    with _lock:
        ctx = _contexts.get(index)
        if ctx is None:
            ctx = ctypes.c_void_p()
            call("cuDevicePrimaryCtxRetain", ctypes.byref(ctx), _device(index))
            _contexts[index] = ctx
    call("cuCtxPushCurrent_v2", ctx)
    try:
        yield
    finally:
        call("cuCtxPopCurrent_v2", ctypes.byref(ctypes.c_void_p()))


def device_count() -> int:
    n = ctypes.c_int()
    call("cuDeviceGetCount", ctypes.byref(n))
    return n.value


def uuid(index: int) -> str:
    """``GPU-xxxxxxxx-…`` of device ``index``, as nvidia-smi prints it."""
    raw = (ctypes.c_ubyte * 16)()
    call("cuDeviceGetUuid_v2", raw, _device(index))
    h = bytes(raw).hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def attribute(index: int, attr: int) -> int:
    value = ctypes.c_int()
    call("cuDeviceGetAttribute", ctypes.byref(value), attr, _device(index))
    return value.value


def require_vmm(index: int) -> None:
    """GPU slabs need VMM and POSIX-fd handles; say which attribute is missing (WSL2 and
    some virtualised GPUs lack them)."""
    for name, attr in ATTRIBUTES.items():
        if not attribute(index, attr):
            raise DeviceError(
                f"cuda:{index}: the driver reports {name} = 0, so GPU slabs cannot be shared "
                "from here (WSL2 and some virtualised GPUs lack it); place components on 'cpu'"
            )


def memory_info(index: int) -> tuple[int, int]:
    free, total = _size(), _size()
    with context(index):
        call("cuMemGetInfo_v2", ctypes.byref(free), ctypes.byref(total))
    return free.value, total.value


def _prop(index: int) -> AllocationProp:
    prop = AllocationProp()
    prop.type = ALLOCATION_TYPE_PINNED
    prop.requestedHandleTypes = HANDLE_TYPE_POSIX_FD
    prop.location = Location(LOCATION_TYPE_DEVICE, index)
    return prop


def granularity(index: int) -> int:
    g = _size()
    with context(index):
        call(
            "cuMemGetAllocationGranularity", ctypes.byref(g), _prop(index), GRANULARITY_RECOMMENDED
        )
    return g.value


def rounded(nbytes: int, index: int) -> int:
    """``nbytes`` rounded up to whole allocation granules of device ``index``."""
    g = granularity(index)
    return max(-(-nbytes // g), 1) * g


# The VMM operations below take ``what``, the slab they act for (its label), and log each
# call at debug level with its sizes, addresses and outcome: the first runs on a new GPU or
# driver are read from these lines.


def create(index: int, size: int, what: str = "") -> int:
    """A new physical allocation of ``size`` bytes (a whole number of granules), exportable
    as a POSIX fd; the allocation handle."""
    handle = _u64()
    _vmm(
        "create",
        what,
        index,
        "cuMemCreate",
        ctypes.byref(handle),
        size,
        _prop(index),
        0,
        size=size,
        result=lambda: f"handle {handle.value:#x}",
    )
    return handle.value


def export(index: int, handle: int, what: str = "") -> int:
    """A new descriptor of the allocation (its caller closes it)."""
    fd = ctypes.c_int(-1)
    _vmm(
        "export",
        what,
        index,
        "cuMemExportToShareableHandle",
        ctypes.byref(fd),
        handle,
        HANDLE_TYPE_POSIX_FD,
        0,
        handle=handle,
        result=lambda: f"fd {fd.value}",
    )
    return fd.value


def import_fd(index: int, fd: int, what: str = "") -> int:
    """An allocation handle for the memory behind ``fd`` (which the caller may close now)."""
    handle = _u64()
    _vmm(
        "import",
        what,
        index,
        "cuMemImportFromShareableHandle",
        ctypes.byref(handle),
        fd,
        HANDLE_TYPE_POSIX_FD,
        fd=fd,
        result=lambda: f"handle {handle.value:#x}",
    )
    return handle.value


def release(index: int, handle: int, what: str = "") -> None:
    _vmm("release", what, index, "cuMemRelease", handle, handle=handle)


def reserve(index: int, size: int, what: str = "") -> int:
    ptr = _u64()
    _vmm(
        "reserve",
        what,
        index,
        "cuMemAddressReserve",
        ctypes.byref(ptr),
        size,
        0,
        0,
        0,
        size=size,
        result=lambda: f"address {ptr.value:#x}",
    )
    return ptr.value


def free_address(index: int, ptr: int, size: int, what: str = "") -> None:
    _vmm("free address", what, index, "cuMemAddressFree", ptr, size, address=ptr, size=size)


def map_range(index: int, ptr: int, size: int, handle: int, what: str = "") -> None:
    _vmm(
        "map",
        what,
        index,
        "cuMemMap",
        ptr,
        size,
        0,
        handle,
        0,
        address=ptr,
        size=size,
        handle=handle,
    )


def unmap(index: int, ptr: int, size: int, what: str = "") -> None:
    _vmm("unmap", what, index, "cuMemUnmap", ptr, size, address=ptr, size=size)


def set_access(index: int, ptr: int, size: int, read_only: bool, what: str = "") -> None:
    desc = AccessDesc(
        Location(LOCATION_TYPE_DEVICE, index), ACCESS_READ if read_only else ACCESS_READWRITE
    )
    access = "read-only" if read_only else "read-write"
    _vmm(
        f"set access {access}",
        what,
        index,
        "cuMemSetAccess",
        ptr,
        size,
        ctypes.byref(desc),
        1,
        address=ptr,
        size=size,
    )


def _vmm(
    op: str,
    what: str,
    index: int,
    fn: str,
    *args: Any,
    result: Callable[[], str] = lambda: "",
    **fields: int,
) -> None:
    """Driver call ``fn`` in GPU ``index``'s primary context, logged at debug level."""
    shown = " ".join(
        f"{k} {v}" if k in ("size", "fd") else f"{k} {v:#x}" for k, v in fields.items()
    )
    where = f"{op} {what or '-'} on cuda:{index} ({shown})"
    try:
        with context(index):
            call(fn, *args)
    except DeviceError as e:
        log.debug("%s: failed: %s", where, e)
        raise
    log.debug("%s: ok%s", where, f", {r}" if (r := result()) else "")


def synchronize(index: int) -> None:
    """Wait for all work in the device's primary context."""
    with context(index):
        call("cuCtxSynchronize")


def copy_to_device(index: int, ptr: int, data: bytes) -> None:
    with context(index):
        call("cuMemcpyHtoD_v2", ptr, data, len(data))


def copy_to_host(index: int, ptr: int, nbytes: int) -> bytes:
    out = ctypes.create_string_buffer(nbytes)
    with context(index):
        call("cuMemcpyDtoH_v2", out, ptr, nbytes)
    return out.raw


def _device(index: int) -> int:
    dev = ctypes.c_int()
    call("cuDeviceGet", ctypes.byref(dev), index)
    return dev.value
