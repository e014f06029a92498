"""A ctypes binding of the driver calls the fake implements, for the tests and their children.

The structures and constants are those of NVIDIA's cuda.h 12.9 (x86-64 Linux);
tests/test_fakecuda.py compiles a probe against the header to check every offset and value.
Nothing here imports more than the standard library, so a child process starts fast.
"""

from __future__ import annotations

import ctypes
import os
from ctypes import POINTER, c_char_p, c_int, c_longlong, c_size_t, c_uint, c_ulonglong, c_void_p

# CUresult codes the fake returns
CUDA_SUCCESS = 0
CUDA_ERROR_INVALID_VALUE = 1
CUDA_ERROR_OUT_OF_MEMORY = 2
CUDA_ERROR_NOT_INITIALIZED = 3
CUDA_ERROR_NO_DEVICE = 100
CUDA_ERROR_INVALID_DEVICE = 101
CUDA_ERROR_INVALID_CONTEXT = 201
CUDA_ERROR_NOT_PERMITTED = 800
CUDA_ERROR_NOT_SUPPORTED = 801

# CUdevice_attribute values the fake answers
CU_DEVICE_ATTRIBUTE_PCI_BUS_ID = 33
CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID = 34
CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING = 41
CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID = 50
CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75
CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76
CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED = 102
CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED = 103

CU_MEM_ALLOCATION_TYPE_PINNED = 1
CU_MEM_LOCATION_TYPE_DEVICE = 1
CU_MEM_LOCATION_TYPE_HOST = 2
CU_MEM_HANDLE_TYPE_NONE = 0
CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR = 1
CU_MEM_HANDLE_TYPE_WIN32 = 2
CU_MEM_HANDLE_TYPE_FABRIC = 8
CU_MEM_ACCESS_FLAGS_PROT_NONE = 0
CU_MEM_ACCESS_FLAGS_PROT_READ = 1
CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3
CU_MEM_ALLOC_GRANULARITY_MINIMUM = 0
CU_MEM_ALLOC_GRANULARITY_RECOMMENDED = 1

GRANULARITY = 2 << 20  # what the fake reports

CUdevice = c_int
CUdeviceptr = c_ulonglong  # unsigned long long on LP64
CUmemGenericAllocationHandle = c_ulonglong
CUcontext = c_void_p
CUresult = c_int  # C enums are int-sized here; all enum arguments below are c_int


class CUuuid(ctypes.Structure):
    _fields_ = [("bytes", ctypes.c_ubyte * 16)]  # c_char would cut the value at a NUL


class CUmemLocation(ctypes.Structure):
    _fields_ = [("type", c_int), ("id", c_int)]  # CUmemLocationType, int


class CUmemAllocationPropAllocFlags(ctypes.Structure):
    _fields_ = [
        ("compressionType", ctypes.c_ubyte),
        ("gpuDirectRDMACapable", ctypes.c_ubyte),
        ("usage", ctypes.c_ushort),
        ("reserved", ctypes.c_ubyte * 4),
    ]


class CUmemAllocationProp(ctypes.Structure):
    _fields_ = [
        ("type", c_int),  # CUmemAllocationType
        ("requestedHandleTypes", c_int),  # CUmemAllocationHandleType
        ("location", CUmemLocation),
        ("win32HandleMetaData", c_void_p),  # offset 16: 8-byte aligned, no padding before it
        ("allocFlags", CUmemAllocationPropAllocFlags),
    ]  # sizeof 32


class CUmemAccessDesc(ctypes.Structure):
    _fields_ = [("location", CUmemLocation), ("flags", c_int)]  # CUmemAccess_flags; sizeof 12


# The exported symbol names (what the real libcuda exports; cuda.h #defines the plain names to
# the _v2 ones) and their argument types.
SIGNATURES: dict[str, list] = {
    "cuInit": [c_uint],
    "cuDriverGetVersion": [POINTER(c_int)],
    "cuGetErrorString": [CUresult, POINTER(c_char_p)],
    "cuGetErrorName": [CUresult, POINTER(c_char_p)],
    "cuDeviceGetCount": [POINTER(c_int)],
    "cuDeviceGet": [POINTER(CUdevice), c_int],
    "cuDeviceGetAttribute": [POINTER(c_int), c_int, CUdevice],
    "cuDeviceGetUuid_v2": [POINTER(CUuuid), CUdevice],
    "cuDeviceGetName": [c_char_p, c_int, CUdevice],
    "cuDeviceTotalMem_v2": [POINTER(c_size_t), CUdevice],
    "cuDevicePrimaryCtxRetain": [POINTER(CUcontext), CUdevice],
    "cuDevicePrimaryCtxRelease_v2": [CUdevice],
    "cuCtxPushCurrent_v2": [CUcontext],
    "cuCtxPopCurrent_v2": [POINTER(CUcontext)],
    "cuCtxGetCurrent": [POINTER(CUcontext)],
    "cuCtxSynchronize": [],
    "cuMemGetInfo_v2": [POINTER(c_size_t), POINTER(c_size_t)],
    "cuMemGetAllocationGranularity": [POINTER(c_size_t), POINTER(CUmemAllocationProp), c_int],
    "cuMemCreate": [
        POINTER(CUmemGenericAllocationHandle),
        c_size_t,
        POINTER(CUmemAllocationProp),
        c_ulonglong,
    ],
    "cuMemRelease": [CUmemGenericAllocationHandle],
    # shareableHandle is void *: for POSIX_FILE_DESCRIPTOR it points at an int
    "cuMemExportToShareableHandle": [c_void_p, CUmemGenericAllocationHandle, c_int, c_ulonglong],
    # osHandle is void *: for POSIX_FILE_DESCRIPTOR it is the fd itself, cast to a pointer
    "cuMemImportFromShareableHandle": [POINTER(CUmemGenericAllocationHandle), c_void_p, c_int],
    "cuMemAddressReserve": [POINTER(CUdeviceptr), c_size_t, c_size_t, CUdeviceptr, c_ulonglong],
    "cuMemAddressFree": [CUdeviceptr, c_size_t],
    "cuMemMap": [CUdeviceptr, c_size_t, c_size_t, CUmemGenericAllocationHandle, c_ulonglong],
    "cuMemUnmap": [CUdeviceptr, c_size_t],
    "cuMemSetAccess": [CUdeviceptr, c_size_t, POINTER(CUmemAccessDesc), c_size_t],
    "cuMemGetAccess": [POINTER(c_ulonglong), POINTER(CUmemLocation), CUdeviceptr],
    "cuMemcpyHtoD_v2": [CUdeviceptr, c_void_p, c_size_t],
    "cuMemcpyDtoH_v2": [c_void_p, CUdeviceptr, c_size_t],
}


def load(path) -> ctypes.CDLL:
    """Open the fake (or any libcuda) and set every function's argument and result types."""
    lib = ctypes.CDLL(str(path))
    for name, args in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, CUresult
    lib.fakecuda_counts.argtypes, lib.fakecuda_counts.restype = [POINTER(c_longlong)], c_int
    lib.fakecuda_last_error.argtypes, lib.fakecuda_last_error.restype = [], c_char_p
    lib.fakecuda_thread_ctx_depth.argtypes, lib.fakecuda_thread_ctx_depth.restype = [], c_int
    return lib


COUNT_NAMES = ("allocations", "mappings", "reservations", "exported_fds", "retains", "ctx_depth")


def counts(lib) -> dict[str, int]:
    """fakecuda_counts as a dict keyed by COUNT_NAMES."""
    out = (c_longlong * 6)()
    assert lib.fakecuda_counts(out) == 0
    return dict(zip(COUNT_NAMES, out, strict=True))


def last_error(lib) -> str:
    return lib.fakecuda_last_error().decode()


def error_name(lib, code: int) -> str:
    s = c_char_p()
    return s.value.decode() if lib.cuGetErrorName(code, ctypes.byref(s)) == 0 else str(code)


def prop(device: int = 0, types: int = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR):
    p = CUmemAllocationProp()
    p.type = CU_MEM_ALLOCATION_TYPE_PINNED
    p.requestedHandleTypes = types
    p.location.type = CU_MEM_LOCATION_TYPE_DEVICE
    p.location.id = device
    return p


def access(flags: int, device: int = 0):
    d = CUmemAccessDesc()
    d.location.type = CU_MEM_LOCATION_TYPE_DEVICE
    d.location.id = device
    d.flags = flags
    return d


class CudaError(Exception):
    def __init__(self, call: str, code: int, name: str, detail: str):
        super().__init__(f"{call} -> {name} ({code}): {detail}")
        self.code = code


class Gpu:
    """One device's primary context pushed on this thread, and bookkeeping of what the caller
    made, so close() can undo whatever a failed test left (in the order the fake demands)."""

    def __init__(self, lib, device: int = 0):
        self.lib, self.device = lib, device
        self.handles: list[int] = []
        self.reservations: list[tuple[int, int]] = []
        self.mappings: list[tuple[int, int]] = []
        self.fds: list[int] = []
        self.check("cuInit", lib.cuInit(0))
        ctx = CUcontext()
        self.check(
            "cuDevicePrimaryCtxRetain", lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), device)
        )
        self.ctx = ctx
        self.check("cuCtxPushCurrent_v2", lib.cuCtxPushCurrent_v2(ctx))

    def check(self, call: str, code: int) -> None:
        if code != CUDA_SUCCESS:
            raise CudaError(call, code, error_name(self.lib, code), last_error(self.lib))

    def create(
        self, size: int = GRANULARITY, types: int = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
    ):
        h = CUmemGenericAllocationHandle()
        self.check(
            "cuMemCreate", self.lib.cuMemCreate(ctypes.byref(h), size, prop(self.device, types), 0)
        )
        self.handles.append(h.value)
        return h.value

    def release(self, handle: int) -> None:
        self.check("cuMemRelease", self.lib.cuMemRelease(handle))
        self.handles.remove(handle)

    def export(self, handle: int) -> int:
        fd = c_int(-1)
        rc = self.lib.cuMemExportToShareableHandle(
            ctypes.byref(fd), handle, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0
        )
        self.check("cuMemExportToShareableHandle", rc)
        self.fds.append(fd.value)
        return fd.value

    def close_fd(self, fd: int) -> None:
        """Close an fd export() gave (always through here, so close() never closes a reused
        number)."""
        self.fds.remove(fd)
        os.close(fd)

    def import_fd(self, fd: int) -> int:
        h = CUmemGenericAllocationHandle()
        rc = self.lib.cuMemImportFromShareableHandle(
            ctypes.byref(h), fd, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        )
        self.check("cuMemImportFromShareableHandle", rc)
        self.handles.append(h.value)
        return h.value

    def reserve(self, size: int) -> int:
        ptr = CUdeviceptr()
        self.check(
            "cuMemAddressReserve", self.lib.cuMemAddressReserve(ctypes.byref(ptr), size, 0, 0, 0)
        )
        self.reservations.append((ptr.value, size))
        return ptr.value

    def free(self, ptr: int, size: int) -> None:
        self.check("cuMemAddressFree", self.lib.cuMemAddressFree(ptr, size))
        self.reservations.remove((ptr, size))

    def map(self, ptr: int, size: int, handle: int) -> None:
        self.check("cuMemMap", self.lib.cuMemMap(ptr, size, 0, handle, 0))
        self.mappings.append((ptr, size))

    def unmap(self, ptr: int, size: int) -> None:
        self.check("cuMemUnmap", self.lib.cuMemUnmap(ptr, size))
        self.mappings.remove((ptr, size))

    def set_access(self, ptr: int, size: int, flags: int) -> None:
        desc = access(flags, self.device)
        self.check("cuMemSetAccess", self.lib.cuMemSetAccess(ptr, size, ctypes.byref(desc), 1))

    def get_access(self, ptr: int) -> int:
        flags, loc = c_ulonglong(), access(0, self.device).location
        self.check(
            "cuMemGetAccess", self.lib.cuMemGetAccess(ctypes.byref(flags), ctypes.byref(loc), ptr)
        )
        return flags.value

    def htod(self, ptr: int, data: bytes) -> None:
        self.check("cuMemcpyHtoD_v2", self.lib.cuMemcpyHtoD_v2(ptr, data, len(data)))

    def dtoh(self, ptr: int, n: int) -> bytes:
        buf = ctypes.create_string_buffer(n)
        self.check("cuMemcpyDtoH_v2", self.lib.cuMemcpyDtoH_v2(buf, ptr, n))
        return buf.raw

    def slab(self, size: int = GRANULARITY, flags: int = CU_MEM_ACCESS_FLAGS_PROT_READWRITE):
        """create + reserve + map + set access: (handle, ptr)."""
        h = self.create(size)
        ptr = self.reserve(size)
        self.map(ptr, size, h)
        self.set_access(ptr, size, flags)
        return h, ptr

    def drop_all(self) -> None:
        """Undo what is left, in the one order the fake accepts: unmap, free, release, close."""
        for ptr, size in list(self.mappings):
            self.unmap(ptr, size)
        for ptr, size in list(self.reservations):
            self.free(ptr, size)
        for h in list(self.handles):
            self.release(h)
        for fd in list(self.fds):
            self.close_fd(fd)

    def close(self) -> None:
        """drop_all, then pop this context and release the primary context."""
        self.drop_all()
        self.check("cuCtxPopCurrent_v2", self.lib.cuCtxPopCurrent_v2(None))
        self.check(
            "cuDevicePrimaryCtxRelease_v2", self.lib.cuDevicePrimaryCtxRelease_v2(self.device)
        )
