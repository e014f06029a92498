"""The fake CUDA driver (tests/fakecuda) behaves like the driver and refuses what it must.

In-process tests each load their own copy of the built library (so no other test shares its
state); whatever needs another process, or a process that never called cuInit, runs a
``python -c`` child speaking JSON lines.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from fakecuda import binding as cb
from fakecuda.binding import (
    CU_MEM_ACCESS_FLAGS_PROT_NONE,
    CU_MEM_ACCESS_FLAGS_PROT_READ,
    CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
    CU_MEM_HANDLE_TYPE_NONE,
    CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
    CU_MEM_HANDLE_TYPE_WIN32,
    CUDA_ERROR_INVALID_CONTEXT,
    CUDA_ERROR_INVALID_DEVICE,
    CUDA_ERROR_INVALID_VALUE,
    CUDA_ERROR_NOT_INITIALIZED,
    CUDA_ERROR_NOT_PERMITTED,
    CUDA_ERROR_NOT_SUPPORTED,
    CUDA_ERROR_OUT_OF_MEMORY,
    CUDA_SUCCESS,
    GRANULARITY,
)

TESTS = Path(__file__).resolve().parent
G = GRANULARITY
ZERO = dict.fromkeys(cb.COUNT_NAMES, 0)
ONE_CTX = {**ZERO, "retains": 1, "ctx_depth": 1}  # what a live Gpu() holds on its own


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture
def cu(fake_libcuda: Path, tmp_path: Path):
    """A fresh fake for this test, loaded in this process, after cuInit(0).

    The loader hands back the same copy for the same file, so each test loads its own copy
    of the file: what one test leaves behind cannot spill into the next.
    """
    private = tmp_path / "libcuda.so.1"
    shutil.copy(fake_libcuda, private)
    lib = cb.load(private)
    assert lib.cuInit(0) == CUDA_SUCCESS
    return lib


@pytest.fixture
def gpu(cu):
    """Device 0's primary context pushed on this thread; afterwards nothing may be left."""
    g = cb.Gpu(cu)
    yield g
    g.close()
    assert cb.counts(cu) == ZERO


def refused(lib, rc: int, code: int, words: str) -> None:
    """Assert a call was refused with ``code`` and a last-error sentence containing ``words``."""
    detail = cb.last_error(lib)
    assert rc == code, f"wanted {cb.error_name(lib, code)}, got {cb.error_name(lib, rc)}: {detail}"
    assert words in detail


def in_thread(fn):
    """Run fn on a fresh thread (empty context stack) and return its result."""
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    assert out, "the thread raised"
    return out[0]


def raw_create(lib, size: int, prop=None) -> tuple[int, int]:
    h = cb.CUmemGenericAllocationHandle()
    rc = lib.cuMemCreate(ctypes.byref(h), size, prop or cb.prop(), 0)
    return rc, h.value


def raw_reserve(lib, size: int, alignment: int = 0) -> int:
    ptr = cb.CUdeviceptr()
    return lib.cuMemAddressReserve(ctypes.byref(ptr), size, alignment, 0, 0)


def raw_export(lib, handle: int, kind: int = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR) -> int:
    fd = ctypes.c_int(-1)
    rc = lib.cuMemExportToShareableHandle(ctypes.byref(fd), handle, kind, 0)
    if rc == CUDA_SUCCESS:  # the callers expect a refusal; if not, leak nothing
        os.close(fd.value)
    return rc


def raw_import(lib, fd: int) -> int:
    h = cb.CUmemGenericAllocationHandle()
    rc = lib.cuMemImportFromShareableHandle(
        ctypes.byref(h), fd, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
    )
    if rc == CUDA_SUCCESS:  # the callers expect a refusal; if not, leak nothing
        lib.cuMemRelease(h.value)
    return rc


def set_access_rc(lib, ptr: int, size: int, flags: int, device: int = 0) -> int:
    return lib.cuMemSetAccess(ptr, size, ctypes.byref(cb.access(flags, device)), 1)


def attribute(lib, attr: int, device: int = 0) -> int:
    v = ctypes.c_int(-1)
    rc = lib.cuDeviceGetAttribute(ctypes.byref(v), attr, device)
    assert rc == CUDA_SUCCESS, cb.last_error(lib)
    return v.value


PRELUDE = """\
import ctypes, hashlib, json, os, signal, socket, sys
def say(**kw):
    print(json.dumps(kw), flush=True)
def sha(b):
    return hashlib.sha256(b).hexdigest()
ARGS = [int(a) for a in sys.argv[3:]]
"""
PRELUDE_LIB = """\
sys.path.insert(0, sys.argv[2])
from fakecuda.binding import *
lib = load(sys.argv[1])
"""


def child_env(extra: dict | None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAKECUDA_")}
    env.pop("PYTHONFAULTHANDLER", None)
    env.update(extra or {})
    return env


def child_argv(lib: Path | None, body: str, args) -> list[str]:
    code = PRELUDE + (PRELUDE_LIB if lib else "") + textwrap.dedent(body)
    return [sys.executable, "-c", code, str(lib or ""), str(TESTS), *map(str, args)]


_children: list[Child] = []


@pytest.fixture(autouse=True)
def _reap_children():
    """Kill whatever child a failed test left running."""
    yield
    while _children:
        child = _children.pop()
        child.timer.cancel()
        if child.proc.poll() is None:
            child.proc.kill()
            child.proc.wait()
        for stream in (child.proc.stdin, child.proc.stdout, child.proc.stderr):
            stream.close()


class Child:
    """A python child that prints JSON lines and reads commands on stdin, killed after 20 s."""

    def __init__(self, lib: Path | None, body: str, *, args=(), pass_fds=(), env=None):
        self.proc = subprocess.Popen(
            child_argv(lib, body, args),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            pass_fds=pass_fds,
            env=child_env(env),
        )
        self.timer = threading.Timer(20, self.proc.kill)
        self.timer.daemon = True
        self.timer.start()
        _children.append(self)

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            rc = self.proc.wait()
            raise AssertionError(f"child ended (rc {rc}): {self.proc.stderr.read()}")
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def finish(self) -> None:
        """Close its stdin and wait: it must end with status 0."""
        self.proc.stdin.close()
        rc = self.proc.wait()
        self.timer.cancel()
        assert rc == 0, self.proc.stderr.read()


def run_child(lib: Path | None, body: str, *, args=(), pass_fds=(), env=None):
    """Run a child to its end: (returncode, list of its JSON lines, stderr)."""
    done = subprocess.run(
        child_argv(lib, body, args),
        capture_output=True,
        text=True,
        pass_fds=pass_fds,
        env=child_env(env),
        timeout=20,
    )
    lines = [json.loads(x) for x in done.stdout.splitlines() if x.strip()]
    return done.returncode, lines, done.stderr


def one(lib, body: str, **kw) -> dict:
    """Run a child that must succeed and print exactly one JSON line; return it."""
    rc, lines, err = run_child(lib, body, **kw)
    assert rc == 0 and len(lines) == 1, err
    return lines[0]


# A client: import the fd it was given (then close it: the import keeps its own reference),
# map it read-only, and answer "read" and "close".
IMPORTER = """
fd, size = ARGS
gpu = Gpu(lib)
h = gpu.import_fd(fd)
os.close(fd)
ptr = gpu.reserve(size)
gpu.map(ptr, size, h)
gpu.set_access(ptr, size, CU_MEM_ACCESS_FLAGS_PROT_READ)
say(sha=sha(gpu.dtoh(ptr, size)), access=gpu.get_access(ptr))
for line in sys.stdin:
    if line.strip() == "read":
        say(sha=sha(gpu.dtoh(ptr, size)))
    elif line.strip() == "close":
        gpu.close()
        say(counts=counts(lib))
"""

# Map read-only, read through the host pointer (fine), then write through it (SIGSEGV).
WRITER = """
fd, size = ARGS
gpu = Gpu(lib)
h = gpu.import_fd(fd)
ptr = gpu.reserve(size)
gpu.map(ptr, size, h)
gpu.set_access(ptr, size, CU_MEM_ACCESS_FLAGS_PROT_READ)
say(read=sha(ctypes.string_at(ptr, size)))
ctypes.memmove(ptr, b"x", 1)
say(survived=True)
"""


# ------------------------------------------------------------------------------------------
# The library itself


def test_exports_exactly_the_driver_calls_wand_uses(fake_libcuda):
    nm = shutil.which("nm")
    if not nm:
        pytest.skip("nm (binutils) is not installed")
    out = subprocess.run([nm, "-D", "--defined-only", str(fake_libcuda)], capture_output=True)
    names = {line.split()[-1] for line in out.stdout.decode().splitlines() if " T " in line}
    helpers = {"fakecuda_counts", "fakecuda_last_error", "fakecuda_thread_ctx_depth"}
    assert len(cb.SIGNATURES) == 30
    assert names == set(cb.SIGNATURES) | helpers


def _fields(struct, prefix=""):
    for name, ctype, *_ in struct._fields_:
        yield prefix + name, getattr(struct, name).offset, ctypes.sizeof(ctype)
        if isinstance(ctype, type) and issubclass(ctype, ctypes.Structure):
            base = getattr(struct, name).offset
            for sub, off, size in _fields(ctype, f"{prefix}{name}."):
                yield sub, base + off, size


def test_ctypes_structs_and_constants_match_cuda_h(fake_libcuda, tmp_path):
    """Compile a probe against the same cuda.h and compare every size, offset and value."""
    from fakecuda import build

    want: dict[str, int] = {}
    structs = {
        "CUuuid": cb.CUuuid,
        "CUmemLocation": cb.CUmemLocation,
        "CUmemAllocationProp": cb.CUmemAllocationProp,
        "CUmemAccessDesc": cb.CUmemAccessDesc,
    }
    for cname, struct in structs.items():
        want[f"sizeof({cname})"] = ctypes.sizeof(struct)
        want[f"_Alignof({cname})"] = ctypes.alignment(struct)
        for path, offset, size in _fields(struct):
            want[f"offsetof({cname}, {path})"] = offset
            want[f"sizeof((({cname} *)0)->{path})"] = size
    for ctype, cname in [
        (cb.CUdeviceptr, "CUdeviceptr"),
        (cb.CUmemGenericAllocationHandle, "CUmemGenericAllocationHandle"),
        (cb.CUdevice, "CUdevice"),
        (cb.CUresult, "CUresult"),
        (cb.CUcontext, "CUcontext"),
        (ctypes.c_int, "CUmemAllocationHandleType"),
        (ctypes.c_int, "CUdevice_attribute"),
        (ctypes.c_int, "CUmemAllocationGranularity_flags"),
    ]:
        want[f"sizeof({cname})"] = ctypes.sizeof(ctype)
    for name in dir(cb):
        if name.startswith(("CUDA_", "CU_")):
            want[name] = getattr(cb, name)
    probe = tmp_path / "probe.c"
    lines = [f'    printf("%lld\\n", (long long)({expr}));' for expr in want]
    body = "\n".join(lines)
    probe.write_text(
        f"#include <cuda.h>\n#include <stddef.h>\n#include <stdio.h>\n"
        f"int main(void)\n{{\n{body}\n    return 0;\n}}\n"
    )
    exe = tmp_path / "probe"
    cmd = [build.compiler(), "-Wall", "-Werror", f"-I{build.cuda_include()}", "-o", exe, probe]
    subprocess.run(cmd, check=True)
    got = subprocess.run([exe], capture_output=True, text=True, check=True).stdout.split()
    assert dict(zip(want, map(int, got), strict=True)) == want


def test_error_names_and_strings(cu):
    s = ctypes.c_char_p()
    for code, name, text in [
        (CUDA_SUCCESS, "CUDA_SUCCESS", "no error"),
        (CUDA_ERROR_INVALID_VALUE, "CUDA_ERROR_INVALID_VALUE", "invalid argument"),
        (CUDA_ERROR_OUT_OF_MEMORY, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"),
        (CUDA_ERROR_NOT_INITIALIZED, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"),
        (cb.CUDA_ERROR_NO_DEVICE, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected"),
        (CUDA_ERROR_INVALID_DEVICE, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"),
        (CUDA_ERROR_INVALID_CONTEXT, "CUDA_ERROR_INVALID_CONTEXT", "invalid device context"),
        (
            304,
            "CUDA_ERROR_OPERATING_SYSTEM",
            "OS call failed or operation not supported on this OS",
        ),
        (CUDA_ERROR_NOT_PERMITTED, "CUDA_ERROR_NOT_PERMITTED", "operation not permitted"),
        (CUDA_ERROR_NOT_SUPPORTED, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported"),
    ]:
        assert cu.cuGetErrorName(code, ctypes.byref(s)) == CUDA_SUCCESS
        assert s.value == name.encode()
        assert cu.cuGetErrorString(code, ctypes.byref(s)) == CUDA_SUCCESS
        assert s.value == text.encode()
    assert cu.cuGetErrorName(12345, ctypes.byref(s)) == CUDA_ERROR_INVALID_VALUE and s.value is None
    assert cu.cuGetErrorString(12345, ctypes.byref(s)) == CUDA_ERROR_INVALID_VALUE
    assert s.value is None


# ------------------------------------------------------------------------------------------
# Init, devices, contexts


def test_every_call_but_four_needs_cuinit_first(fake_libcuda):
    rc, lines, err = run_child(
        fake_libcuda,
        """
        exempt = {"cuInit", "cuDriverGetVersion", "cuGetErrorString", "cuGetErrorName"}
        got = {}
        for name, argtypes in SIGNATURES.items():
            if name not in exempt:
                args = [None if hasattr(t, "contents") or t in (ctypes.c_char_p, ctypes.c_void_p)
                        else 0 for t in argtypes]
                got[name] = getattr(lib, name)(*args)
        msg = last_error(lib)
        v = ctypes.c_int()
        s = ctypes.c_char_p()
        say(got=got, msg=msg, version=(lib.cuDriverGetVersion(ctypes.byref(v)), v.value),
            name=(lib.cuGetErrorName(3, ctypes.byref(s)), s.value.decode()),
            bad_flags=lib.cuInit(1), init=lib.cuInit(0), again=lib.cuInit(0),
            after=lib.cuDeviceGetCount(ctypes.byref(v)), count=v.value)
        """,
    )
    assert rc == 0, err
    (out,) = lines
    assert set(out["got"].values()) == {CUDA_ERROR_NOT_INITIALIZED}, out["got"]
    assert len(out["got"]) == 26
    assert "before cuInit" in out["msg"]
    assert out["version"] == [CUDA_SUCCESS, 12090]
    assert out["name"] == [CUDA_SUCCESS, "CUDA_ERROR_NOT_INITIALIZED"]
    assert out["bad_flags"] == CUDA_ERROR_INVALID_VALUE
    assert (out["init"], out["again"], out["after"], out["count"]) == (0, 0, 0, 1)


def test_device_queries(cu):
    n = ctypes.c_int()
    assert cu.cuDeviceGetCount(ctypes.byref(n)) == CUDA_SUCCESS and n.value == 1
    dev = cb.CUdevice()
    assert cu.cuDeviceGet(ctypes.byref(dev), 0) == CUDA_SUCCESS and dev.value == 0
    refused(cu, cu.cuDeviceGet(ctypes.byref(dev), 1), CUDA_ERROR_INVALID_DEVICE, "device 1")
    name = ctypes.create_string_buffer(64)
    assert cu.cuDeviceGetName(name, 64, 0) == CUDA_SUCCESS and name.value == b"Fake CUDA GPU 0"
    uuid = cb.CUuuid()
    assert cu.cuDeviceGetUuid_v2(ctypes.byref(uuid), 0) == CUDA_SUCCESS
    assert bytes(uuid.bytes) == b"fakecuda-gpu-00\x00"
    total = ctypes.c_size_t()
    assert cu.cuDeviceTotalMem_v2(ctypes.byref(total), 0) == CUDA_SUCCESS
    assert total.value == 16 << 30
    assert attribute(cu, cb.CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED) == 1
    assert attribute(cu, cb.CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED) == 1
    assert attribute(cu, cb.CU_DEVICE_ATTRIBUTE_PCI_BUS_ID) == 1
    v = ctypes.c_int()
    refused(cu, cu.cuDeviceGetAttribute(ctypes.byref(v), 1, 0), CUDA_ERROR_INVALID_VALUE, "1 is")
    refused(
        cu,
        cu.cuDeviceGetAttribute(ctypes.byref(v), cb.CU_DEVICE_ATTRIBUTE_PCI_BUS_ID, 3),
        CUDA_ERROR_INVALID_DEVICE,
        "does not exist",
    )


def test_several_devices_have_stable_distinct_identities(fake_libcuda):
    body = """
    lib.cuInit(0)
    n = ctypes.c_int()
    lib.cuDeviceGetCount(ctypes.byref(n))
    out = []
    for d in range(n.value):
        u, name, bus = CUuuid(), ctypes.create_string_buffer(64), ctypes.c_int()
        lib.cuDeviceGetUuid_v2(ctypes.byref(u), d)
        lib.cuDeviceGetName(name, 64, d)
        lib.cuDeviceGetAttribute(ctypes.byref(bus), CU_DEVICE_ATTRIBUTE_PCI_BUS_ID, d)
        out.append([bytes(u.bytes).hex(), name.value.decode(), bus.value])
    say(devices=out)
    """
    first = one(fake_libcuda, body, env={"FAKECUDA_DEVICES": "3"})["devices"]
    assert first == one(fake_libcuda, body, env={"FAKECUDA_DEVICES": "3"})["devices"]
    assert [d[1] for d in first] == ["Fake CUDA GPU 0", "Fake CUDA GPU 1", "Fake CUDA GPU 2"]
    assert [d[0] for d in first] == [(b"fakecuda-gpu-00" + bytes([i])).hex() for i in range(3)]
    assert [d[2] for d in first] == [1, 2, 3]
    rc, _, _ = run_child(fake_libcuda, "sys.exit(lib.cuInit(0))", env={"FAKECUDA_DEVICES": "0"})
    assert rc == cb.CUDA_ERROR_NO_DEVICE


def test_context_stack_is_per_thread_and_balanced(cu):
    ctx = cb.CUcontext()
    assert cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), 0) == CUDA_SUCCESS
    assert cu.cuCtxPushCurrent_v2(ctx) == CUDA_SUCCESS
    assert cu.cuCtxPushCurrent_v2(ctx) == CUDA_SUCCESS
    assert cb.counts(cu) == {**ZERO, "retains": 1, "ctx_depth": 2}
    assert cu.fakecuda_thread_ctx_depth() == 2
    cur = cb.CUcontext()
    assert cu.cuCtxGetCurrent(ctypes.byref(cur)) == CUDA_SUCCESS and cur.value == ctx.value
    assert cu.cuCtxSynchronize() == CUDA_SUCCESS

    def other_thread():  # sees none of this thread's stack
        c = cb.CUcontext(1)
        return cu.cuCtxGetCurrent(ctypes.byref(c)), c.value, cu.cuCtxSynchronize()

    assert in_thread(other_thread) == (CUDA_SUCCESS, None, CUDA_ERROR_INVALID_CONTEXT)
    for _ in range(2):
        popped = cb.CUcontext()
        assert cu.cuCtxPopCurrent_v2(ctypes.byref(popped)) == CUDA_SUCCESS
        assert popped.value == ctx.value
    refused(cu, cu.cuCtxPopCurrent_v2(None), CUDA_ERROR_INVALID_CONTEXT, "context stack is empty")
    assert cu.cuDevicePrimaryCtxRelease_v2(0) == CUDA_SUCCESS
    refused(
        cu, cu.cuDevicePrimaryCtxRelease_v2(0), CUDA_ERROR_INVALID_CONTEXT, "release below zero"
    )
    refused(cu, cu.cuCtxPushCurrent_v2(ctx), CUDA_ERROR_INVALID_CONTEXT, "not retained")
    refused(cu, cu.cuCtxPushCurrent_v2(1234), CUDA_ERROR_INVALID_CONTEXT, "not a context")
    assert cb.counts(cu) == ZERO


def test_an_ended_thread_takes_its_stack_along(cu):
    def push_and_leave():
        ctx = cb.CUcontext()
        cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), 0)
        cu.cuCtxPushCurrent_v2(ctx)
        return cb.counts(cu)

    assert in_thread(push_and_leave) == {**ZERO, "retains": 1, "ctx_depth": 1}
    # join() returns before the OS thread has quite ended (and run its key destructors)
    deadline = time.monotonic() + 5
    while cb.counts(cu)["ctx_depth"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cb.counts(cu) == {**ZERO, "retains": 1}  # the retain is the caller's to release
    assert cu.cuDevicePrimaryCtxRelease_v2(0) == CUDA_SUCCESS


def test_a_released_primary_context_is_no_current_context(cu):
    g = cb.Gpu(cu)
    assert cu.cuDevicePrimaryCtxRelease_v2(0) == CUDA_SUCCESS  # still on the stack, though
    refused(cu, raw_create(cu, G)[0], CUDA_ERROR_INVALID_CONTEXT, "no longer retained")
    ctx = cb.CUcontext()
    assert cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), 0) == CUDA_SUCCESS
    g.close()
    assert cb.counts(cu) == ZERO


# ------------------------------------------------------------------------------------------
# 1. The happy path, across two processes, in both release orders


@pytest.mark.parametrize("first", ["exporter", "importer"])
def test_share_a_slab_with_another_process(cu, gpu, fake_libcuda, first):
    size = 2 * G
    g = ctypes.c_size_t()
    for option in (cb.CU_MEM_ALLOC_GRANULARITY_MINIMUM, cb.CU_MEM_ALLOC_GRANULARITY_RECOMMENDED):
        assert cu.cuMemGetAllocationGranularity(ctypes.byref(g), cb.prop(), option) == 0
        assert g.value == G
    h, ptr = gpu.slab(size, CU_MEM_ACCESS_FLAGS_PROT_READWRITE)
    data = os.urandom(size)
    gpu.htod(ptr, data)
    gpu.set_access(ptr, size, CU_MEM_ACCESS_FLAGS_PROT_READ)
    assert gpu.get_access(ptr) == CU_MEM_ACCESS_FLAGS_PROT_READ
    assert gpu.dtoh(ptr, size) == data
    fd = gpu.export(h)
    live = {"allocations": 1, "mappings": 1, "reservations": 1, "exported_fds": 1}
    assert cb.counts(cu) == {**ONE_CTX, **live}

    importer = Child(fake_libcuda, IMPORTER, args=[fd, size], pass_fds=[fd])
    assert importer.read() == {"sha": sha(data), "access": CU_MEM_ACCESS_FLAGS_PROT_READ}

    rc, lines, err = run_child(fake_libcuda, WRITER, args=[fd, size], pass_fds=[fd])
    assert rc == -signal.SIGSEGV, err
    assert lines == [{"read": sha(data)}]  # reading was fine; the write killed it

    # The same memory, not a copy: what the exporter writes now, the importer reads.
    gpu.set_access(ptr, size, CU_MEM_ACCESS_FLAGS_PROT_READWRITE)
    data = os.urandom(size)
    gpu.htod(ptr, data)
    assert importer.ask("read") == {"sha": sha(data)}

    gpu.close_fd(fd)
    assert cb.counts(cu)["exported_fds"] == 0
    if first == "exporter":  # the daemon drops a slab a client still maps
        gpu.unmap(ptr, size)
        gpu.free(ptr, size)
        gpu.release(h)
        assert cb.counts(cu) == ONE_CTX
        assert importer.ask("read") == {"sha": sha(data)}
        assert importer.ask("close") == {"counts": ZERO}
    else:  # a client goes first
        assert importer.ask("close") == {"counts": ZERO}
        assert gpu.dtoh(ptr, size) == data
        gpu.unmap(ptr, size)
        gpu.free(ptr, size)
        gpu.release(h)
    importer.finish()
    # the gpu fixture checks that this process ends at zero too


def test_a_mapping_without_access_really_faults(fake_libcuda):
    rc, lines, err = run_child(
        fake_libcuda,
        """
        gpu = Gpu(lib)
        h = gpu.create(ARGS[0])
        ptr = gpu.reserve(ARGS[0])
        gpu.map(ptr, ARGS[0], h)
        say(access=gpu.get_access(ptr))
        ctypes.string_at(ptr, 1)
        say(survived=True)
        """,
        args=[G],
    )
    assert rc == -signal.SIGSEGV, err
    assert lines == [{"access": CU_MEM_ACCESS_FLAGS_PROT_NONE}]


def test_export_hands_out_a_fresh_fd_each_time_and_counts_it_until_closed(cu, gpu):
    h, ptr = gpu.slab()
    data = os.urandom(G)
    gpu.htod(ptr, data)
    fd1, fd2 = gpu.export(h), gpu.export(h)
    assert fd1 != fd2 and cb.counts(cu)["exported_fds"] == 2
    h2 = gpu.import_fd(fd1)  # importing in the same process is fine too
    gpu.close_fd(fd1)
    assert cb.counts(cu)["exported_fds"] == 1
    ptr2 = gpu.reserve(G)
    gpu.map(ptr2, G, h2)
    gpu.set_access(ptr2, G, CU_MEM_ACCESS_FLAGS_PROT_READ)
    assert gpu.dtoh(ptr2, G) == data
    gpu.close_fd(fd2)
    assert cb.counts(cu)["exported_fds"] == 0


# ------------------------------------------------------------------------------------------
# 2. The fake bites: each rule broken once


def test_release_before_unmap_is_refused(cu, gpu):
    h, ptr = gpu.slab()
    refused(cu, cu.cuMemRelease(h), CUDA_ERROR_NOT_PERMITTED, "release only after unmap")
    gpu.htod(ptr, b"still here")  # the refusal changed nothing


def test_export_of_a_handle_type_not_requested_is_refused(cu, gpu):
    h = gpu.create(types=CU_MEM_HANDLE_TYPE_NONE)
    refused(cu, raw_export(cu, h), CUDA_ERROR_INVALID_VALUE, "not requested at creation")
    h2 = gpu.create()
    refused(cu, raw_export(cu, h2, CU_MEM_HANDLE_TYPE_WIN32), CUDA_ERROR_NOT_SUPPORTED, "type 2")
    refused(cu, raw_export(cu, 0xDEAD), CUDA_ERROR_INVALID_VALUE, "unknown allocation handle")


def test_unaligned_sizes_are_refused(cu, gpu):
    words = "multiple of the granularity"
    refused(cu, raw_create(cu, G + 4096)[0], CUDA_ERROR_INVALID_VALUE, words)
    refused(cu, raw_create(cu, 0)[0], CUDA_ERROR_INVALID_VALUE, words)
    refused(cu, raw_reserve(cu, G // 2), CUDA_ERROR_INVALID_VALUE, words)
    refused(cu, raw_reserve(cu, G, alignment=3 * G), CUDA_ERROR_INVALID_VALUE, "power of two")
    h = gpu.create(2 * G)
    ptr = gpu.reserve(2 * G)
    refused(cu, cu.cuMemMap(ptr, G // 2, 0, h, 0), CUDA_ERROR_INVALID_VALUE, words)
    refused(cu, cu.cuMemMap(ptr + 4096, G, 0, h, 0), CUDA_ERROR_INVALID_VALUE, words)
    refused(cu, cu.cuMemMap(ptr, G, G, h, 0), CUDA_ERROR_INVALID_VALUE, "offset")
    refused(cu, cu.cuMemMap(ptr, G, 0, h, 1), CUDA_ERROR_INVALID_VALUE, "flags")
    small = gpu.create(G)
    refused(cu, cu.cuMemMap(ptr, 2 * G, 0, small, 0), CUDA_ERROR_INVALID_VALUE, "larger than")


def test_map_outside_a_reservation_is_refused(cu, gpu):
    h = gpu.create(2 * G)
    ptr = gpu.reserve(2 * G)
    words = "not inside a reservation"
    refused(cu, cu.cuMemMap(ptr + 2 * G, G, 0, h, 0), CUDA_ERROR_INVALID_VALUE, words)
    refused(cu, cu.cuMemMap(ptr + G, 2 * G, 0, h, 0), CUDA_ERROR_INVALID_VALUE, words)
    refused(cu, cu.cuMemMap(ptr, G, 0, h + 1000, 0), CUDA_ERROR_INVALID_VALUE, "unknown")


def test_overlapping_maps_are_refused(cu, gpu):
    a, b = gpu.create(2 * G), gpu.create(G)
    ptr = gpu.reserve(3 * G)
    gpu.map(ptr, 2 * G, a)
    refused(cu, cu.cuMemMap(ptr + G, G, 0, b, 0), CUDA_ERROR_INVALID_VALUE, "overlaps")
    refused(cu, cu.cuMemMap(ptr, G, 0, b, 0), CUDA_ERROR_INVALID_VALUE, "overlaps")
    gpu.map(ptr + 2 * G, G, b)  # right after it is fine


def test_address_free_with_a_live_mapping_is_refused(cu, gpu):
    h, ptr = gpu.slab(2 * G)
    refused(cu, cu.cuMemAddressFree(ptr, 2 * G), CUDA_ERROR_NOT_PERMITTED, "live mapping")
    refused(cu, cu.cuMemAddressFree(ptr, G), CUDA_ERROR_INVALID_VALUE, "reservation exactly")
    refused(cu, cu.cuMemUnmap(ptr, G), CUDA_ERROR_INVALID_VALUE, "mapping exactly")


def test_a_memory_call_without_a_current_context_is_refused(cu, gpu):
    def fresh_thread():
        return raw_create(cu, G)[0], cb.last_error(cu), cu.cuMemGetInfo_v2(None, None)

    rc, msg, rc2 = in_thread(fresh_thread)
    assert rc == rc2 == CUDA_ERROR_INVALID_CONTEXT
    assert "no current context" in msg


def test_pop_of_an_empty_stack_is_refused(cu):
    rc = in_thread(lambda: cu.cuCtxPopCurrent_v2(None))
    refused(cu, rc, CUDA_ERROR_INVALID_CONTEXT, "context stack is empty")


def test_copies_need_the_right_access(cu, gpu):
    h, ptr = gpu.slab(G, CU_MEM_ACCESS_FLAGS_PROT_READ)
    data = b"x" * 100
    refused(cu, cu.cuMemcpyHtoD_v2(ptr, data, 100), CUDA_ERROR_INVALID_VALUE, "write access")
    gpu.set_access(ptr, G, CU_MEM_ACCESS_FLAGS_PROT_NONE)
    buf = ctypes.create_string_buffer(100)
    refused(cu, cu.cuMemcpyDtoH_v2(buf, ptr, 100), CUDA_ERROR_INVALID_VALUE, "read access")
    other = gpu.reserve(G)
    refused(cu, cu.cuMemcpyHtoD_v2(other, data, 100), CUDA_ERROR_INVALID_VALUE, "not mapped")
    gpu.set_access(ptr, G, CU_MEM_ACCESS_FLAGS_PROT_READWRITE)
    refused(cu, cu.cuMemcpyHtoD_v2(ptr + G - 50, data, 100), CUDA_ERROR_INVALID_VALUE, "not mapped")


def test_set_access_on_a_range_not_exactly_mapped_is_refused(cu, gpu):
    a, b = gpu.create(G), gpu.create(G)
    ptr = gpu.reserve(3 * G)
    gpu.map(ptr, G, a)
    words = "not exactly covered"
    rw = CU_MEM_ACCESS_FLAGS_PROT_READWRITE
    refused(cu, set_access_rc(cu, ptr, 2 * G, rw), CUDA_ERROR_INVALID_VALUE, words)
    refused(cu, set_access_rc(cu, ptr, G // 2, rw), CUDA_ERROR_INVALID_VALUE, words)
    refused(cu, set_access_rc(cu, ptr + G, G, rw), CUDA_ERROR_INVALID_VALUE, words)
    refused(cu, set_access_rc(cu, ptr, G, rw, device=1), CUDA_ERROR_INVALID_DEVICE, "device 1")
    refused(cu, set_access_rc(cu, ptr, G, 2), CUDA_ERROR_INVALID_VALUE, "flags")
    # two back-to-back mappings are one range: set at once, copied across
    gpu.map(ptr + G, G, b)
    gpu.set_access(ptr, 2 * G, rw)
    data = os.urandom(2 * G)
    gpu.htod(ptr, data)
    assert gpu.dtoh(ptr + G - 10, 20) == data[G - 10 : G + 10]


def test_double_release_is_refused(cu, gpu):
    h = gpu.create()
    gpu.release(h)
    refused(cu, cu.cuMemRelease(h), CUDA_ERROR_INVALID_VALUE, "already released")


def test_bad_allocation_props_are_refused(cu, gpu):
    g = ctypes.c_size_t()
    bad_type, bad_loc, bad_dev = cb.prop(), cb.prop(), cb.prop(device=4)
    bad_type.type = 0
    bad_loc.location.type = cb.CU_MEM_LOCATION_TYPE_HOST
    for p, words in [(bad_type, "prop.type"), (bad_loc, "location.type"), (bad_dev, "not a dev")]:
        rc = cu.cuMemGetAllocationGranularity(ctypes.byref(g), p, 0)
        refused(cu, rc, CUDA_ERROR_INVALID_VALUE, words)
        refused(cu, raw_create(cu, G, p)[0], CUDA_ERROR_INVALID_VALUE, words)
    fabric = cb.prop(types=cb.CU_MEM_HANDLE_TYPE_FABRIC)
    refused(cu, raw_create(cu, G, fabric)[0], CUDA_ERROR_NOT_SUPPORTED, "requestedHandleTypes")


def test_import_takes_only_a_fakecuda_fd_by_value(cu, gpu):
    r, w = os.pipe()
    other = os.memfd_create("not-ours")
    os.ftruncate(other, G)
    try:
        refused(cu, raw_import(cu, r), CUDA_ERROR_INVALID_VALUE, "not an open memfd")
        refused(cu, raw_import(cu, other), CUDA_ERROR_INVALID_VALUE, "not an allocation")
    finally:
        for fd in (r, w, other):
            os.close(fd)
    refused(cu, raw_import(cu, r), CUDA_ERROR_INVALID_VALUE, "not an open memfd")  # closed
    fd = ctypes.c_int(gpu.export(gpu.create()))
    # the classic mistake: a pointer to the fd instead of the fd itself
    rc = raw_import(cu, ctypes.addressof(fd))
    refused(cu, rc, CUDA_ERROR_INVALID_VALUE, "not a file descriptor")


def test_memory_info_counts_live_allocations(cu, gpu):
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    assert cu.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)) == CUDA_SUCCESS
    assert free.value == total.value == 16 << 30
    h = gpu.create(4 * G)
    cu.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total))
    assert free.value == total.value - 4 * G
    refused(cu, raw_create(cu, 16 << 30)[0], CUDA_ERROR_OUT_OF_MEMORY, "free")
    gpu.release(h)
    cu.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total))
    assert free.value == total.value


def test_concurrent_threads_keep_the_books_straight(cu):
    errors: list[BaseException] = []

    def worker():
        try:
            g = cb.Gpu(cu)
            for i in range(25):
                h, ptr = g.slab()
                g.htod(ptr, bytes([i]) * 4096)
                assert g.dtoh(ptr, 4096) == bytes([i]) * 4096
                g.drop_all()
            g.close()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert cb.counts(cu) == ZERO


# ------------------------------------------------------------------------------------------
# 3. Memory lifetime: the memory lives as long as any fd or handle to it


def test_memory_outlives_its_exporter_and_rests_in_a_bare_fd(fake_libcuda):
    size = G
    to_test, to_exporter = socket.socketpair()
    exporter = Child(
        fake_libcuda,
        """
        sock = socket.socket(fileno=ARGS[0])
        gpu = Gpu(lib)
        h, ptr = gpu.slab(ARGS[1])
        data = os.urandom(ARGS[1])
        gpu.htod(ptr, data)
        fd = gpu.export(h)
        socket.send_fds(sock, [b"fd"], [fd])
        gpu.close_fd(fd)
        say(sha=sha(data))
        sys.stdin.read()  # until killed
        """,
        args=[to_exporter.fileno(), size],
        pass_fds=[to_exporter.fileno()],
    )
    to_exporter.close()
    want = exporter.read()["sha"]
    _, (fd,), _, _ = socket.recv_fds(to_test, 16, 1)
    to_test.close()

    importer = Child(fake_libcuda, IMPORTER, args=[fd, size], pass_fds=[fd])
    assert importer.read()["sha"] == want

    # The holder has no CUDA at all, just the fd: systemd's fd store in miniature.
    from_holder, to_later = socket.socketpair()
    holder = Child(
        None,
        """
        fd, sock = ARGS
        maps = open("/proc/self/maps").read()
        say(holding=True, libcuda_loaded="libcuda" in maps)
        sys.stdin.readline()
        socket.send_fds(socket.socket(fileno=sock), [b"fd"], [fd])
        os.close(fd)
        say(sent=True)
        """,
        args=[fd, from_holder.fileno()],
        pass_fds=[fd, from_holder.fileno()],
    )
    from_holder.close()
    assert holder.read() == {"holding": True, "libcuda_loaded": False}
    os.close(fd)  # from here on, this process has no reference to the memory

    exporter.proc.kill()
    assert exporter.proc.wait() == -signal.SIGKILL
    exporter.timer.cancel()
    assert importer.ask("read")["sha"] == want
    assert importer.ask("close") == {"counts": ZERO}
    importer.finish()

    # Nobody maps it, nobody has a handle; only the holder's fd keeps it.
    later = Child(
        fake_libcuda,
        """
        sock, size = ARGS
        _, (fd,), _, _ = socket.recv_fds(socket.socket(fileno=sock), 16, 1)
        gpu = Gpu(lib)
        h = gpu.import_fd(fd)
        os.close(fd)
        ptr = gpu.reserve(size)
        gpu.map(ptr, size, h)
        gpu.set_access(ptr, size, CU_MEM_ACCESS_FLAGS_PROT_READ)
        data = gpu.dtoh(ptr, size)
        gpu.close()
        say(sha=sha(data), counts=counts(lib))
        """,
        args=[to_later.fileno(), size],
        pass_fds=[to_later.fileno()],
    )
    to_later.close()
    assert holder.ask("send") == {"sent": True}
    holder.finish()
    assert later.read() == {"sha": want, "counts": ZERO}
    later.finish()


# ------------------------------------------------------------------------------------------
# 4. The switches


def test_no_vmm_switch(cu, gpu, monkeypatch):
    monkeypatch.setenv("FAKECUDA_NO_VMM", "1")
    assert attribute(cu, cb.CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED) == 0
    assert attribute(cu, cb.CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED) == 1
    g = ctypes.c_size_t()
    rc = cu.cuMemGetAllocationGranularity(ctypes.byref(g), cb.prop(), 0)
    refused(cu, rc, CUDA_ERROR_NOT_SUPPORTED, "FAKECUDA_NO_VMM")
    refused(cu, raw_create(cu, G)[0], CUDA_ERROR_NOT_SUPPORTED, "FAKECUDA_NO_VMM")
    refused(cu, raw_reserve(cu, G), CUDA_ERROR_NOT_SUPPORTED, "FAKECUDA_NO_VMM")
    monkeypatch.setenv("FAKECUDA_NO_VMM", "0")  # 0 (or empty) means off
    assert attribute(cu, cb.CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED) == 1


def test_no_posix_fd_switch(cu, gpu, monkeypatch):
    made_before = gpu.create()
    monkeypatch.setenv("FAKECUDA_NO_POSIX_FD", "1")
    assert attribute(cu, cb.CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED) == 0
    assert attribute(cu, cb.CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED) == 1
    refused(cu, raw_create(cu, G)[0], CUDA_ERROR_NOT_SUPPORTED, "FAKECUDA_NO_POSIX_FD")
    refused(cu, raw_export(cu, made_before), CUDA_ERROR_NOT_SUPPORTED, "FAKECUDA_NO_POSIX_FD")
    monkeypatch.delenv("FAKECUDA_NO_POSIX_FD")
    fd = gpu.export(made_before)
    monkeypatch.setenv("FAKECUDA_NO_POSIX_FD", "1")
    refused(cu, raw_import(cu, fd), CUDA_ERROR_NOT_SUPPORTED, "FAKECUDA_NO_POSIX_FD")
    h = gpu.create(types=CU_MEM_HANDLE_TYPE_NONE)  # plain VMM still works
    ptr = gpu.reserve(G)
    gpu.map(ptr, G, h)
    gpu.set_access(ptr, G, CU_MEM_ACCESS_FLAGS_PROT_READWRITE)


def test_no_readonly_switch(cu, gpu, monkeypatch):
    h, ptr = gpu.slab(G, CU_MEM_ACCESS_FLAGS_PROT_NONE)
    monkeypatch.setenv("FAKECUDA_NO_READONLY", "1")
    rc = set_access_rc(cu, ptr, G, CU_MEM_ACCESS_FLAGS_PROT_READ)
    refused(cu, rc, CUDA_ERROR_INVALID_VALUE, "FAKECUDA_NO_READONLY")
    assert gpu.get_access(ptr) == CU_MEM_ACCESS_FLAGS_PROT_NONE  # unchanged
    gpu.set_access(ptr, G, CU_MEM_ACCESS_FLAGS_PROT_READWRITE)  # the fallback works
    assert gpu.get_access(ptr) == CU_MEM_ACCESS_FLAGS_PROT_READWRITE


def test_switches_set_before_the_process_starts(fake_libcuda):
    body = """
    gpu = Gpu(lib)
    v = ctypes.c_int()
    got = []
    for a in (CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED,
              CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED):
        lib.cuDeviceGetAttribute(ctypes.byref(v), a, 0)
        got.append(v.value)
    readonly = None
    if got[0]:
        h = gpu.create(types=CU_MEM_HANDLE_TYPE_NONE)
        ptr = gpu.reserve(GRANULARITY)
        gpu.map(ptr, GRANULARITY, h)
        desc = access(CU_MEM_ACCESS_FLAGS_PROT_READ)
        readonly = lib.cuMemSetAccess(ptr, GRANULARITY, ctypes.byref(desc), 1)
    gpu.close()
    say(attributes=got, readonly=readonly)
    """
    no_fd_no_ro = {"FAKECUDA_NO_POSIX_FD": "1", "FAKECUDA_NO_READONLY": "1"}
    assert one(fake_libcuda, body, env=no_fd_no_ro) == {
        "attributes": [1, 0],
        "readonly": CUDA_ERROR_INVALID_VALUE,
    }
    no_vmm = {"FAKECUDA_NO_VMM": "1"}
    assert one(fake_libcuda, body, env=no_vmm) == {"attributes": [0, 1], "readonly": None}
    assert one(fake_libcuda, body) == {"attributes": [1, 1], "readonly": CUDA_SUCCESS}


def test_access_is_per_device_and_an_allocation_keeps_its_device(fake_libcuda):
    to_test, to_child = socket.socketpair()
    two = Child(
        fake_libcuda,
        """
        sock, size = ARGS
        gpu0 = Gpu(lib, 0)
        gpu1 = Gpu(lib, 1)  # device 1's context is on top now
        h, ptr = gpu1.slab(size, CU_MEM_ACCESS_FLAGS_PROT_READWRITE)  # access for device 1 only
        on1 = lib.cuMemcpyHtoD_v2(ptr, b"abc", 3)
        lib.cuCtxPushCurrent_v2(gpu0.ctx)
        on0 = lib.cuMemcpyHtoD_v2(ptr, b"abc", 3)
        msg = last_error(lib)
        lib.cuCtxPopCurrent_v2(None)
        fd = gpu1.export(h)
        socket.send_fds(socket.socket(fileno=sock), [b"fd"], [fd])
        say(on1=on1, on0=on0, msg=msg)
        sys.stdin.readline()
        gpu1.close()
        gpu0.close()
        say(counts=counts(lib))
        """,
        args=[to_child.fileno(), G],
        pass_fds=[to_child.fileno()],
        env={"FAKECUDA_DEVICES": "2"},
    )
    to_child.close()
    out = two.read()
    assert out["on1"] == CUDA_SUCCESS
    assert out["on0"] == CUDA_ERROR_INVALID_VALUE and "device 0 no access" in out["msg"], out
    _, (fd,), _, _ = socket.recv_fds(to_test, 16, 1)
    to_test.close()
    try:  # the memory lives on device 1, which a one-device process does not have
        reply = one(
            fake_libcuda,
            """
            gpu = Gpu(lib)
            h = CUmemGenericAllocationHandle()
            rc = lib.cuMemImportFromShareableHandle(ctypes.byref(h), ARGS[0], 1)
            say(rc=rc, msg=last_error(lib))
            """,
            args=[fd],
            pass_fds=[fd],
        )
    finally:
        os.close(fd)
    assert reply["rc"] == CUDA_ERROR_INVALID_DEVICE and "device 1" in reply["msg"], reply
    assert two.ask("close") == {"counts": ZERO}
    two.finish()
