"""The GPU slab lifecycle against the strict fake CUDA driver (tests/fakecuda), no GPU needed.

wand's driver layer (``wand.slabs.cuda``) loads the fake through ``$WAND_LIBCUDA``; the daemon's
side of a slab (``VmmSlab``) and a client's (``Mapping`` over an imported descriptor) run in
separate processes, descriptors travel over a socket pair as they do over the fd socket, and
every test ends with no live allocation, mapping, reservation or exported descriptor in any
process. What this cannot cover needs real device memory: copies and casts by torch, kernels,
tensors over the mappings (``Mapping.pin``), the on-device digests.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

PRELUDE = """
import ctypes, json, os, socket, sys, time
from wand.slabs import cuda
from wand.common.placement import Device
from wand.slabs import vmm
lib = ctypes.CDLL(os.environ["WAND_LIBCUDA"])
lib.fakecuda_last_error.restype = ctypes.c_char_p
NAMES = ("allocations", "mappings", "reservations", "exported_fds", "retains", "depth")
ZERO_KEYS = NAMES[:4]
def counts():
    out = (ctypes.c_longlong * 6)()
    lib.fakecuda_counts(out)
    return dict(zip(NAMES, out))
def settled(deadline=10.0):  # the reaper thread unmaps asynchronously
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        c = counts()
        if not any(c[k] for k in (*ZERO_KEYS, "depth")):
            return c
        time.sleep(0.02)
    return counts()
def say(**kw):
    print(json.dumps(kw), flush=True)
def wait(line):
    got = sys.stdin.readline().strip()
    assert got == line, got
DEVICE = Device("cuda:0", cuda.uuid(0))
SIZE = 3 << 20  # rounds up to two 2 MiB granules
DATA = bytes(range(256)) * (SIZE // 256)
"""

DAEMON = (
    PRELUDE
    + """
link = socket.socket(fileno=int(sys.argv[1]))
slab = vmm.VmmSlab("7-vae", SIZE, DEVICE, "token")
cuda.copy_to_device(0, slab.mapping.ptr, DATA)  # what the loader does, without torch
slab.seal()
fds = [slab.export(), slab.export()]  # one per attach
socket.send_fds(link, [json.dumps(slab.handle()).encode()], fds)
for fd in fds:
    os.close(fd)
say(exported=len(set(fds)), read_only=slab.read_only, handle=slab.handle())
wait("close")
slab.close()
say(counts=settled())
wait("exit")
"""
)

CLIENT = (
    PRELUDE
    + """
link = socket.socket(fileno=int(sys.argv[1]))
data, fds, _, _ = socket.recv_fds(link, 4096, 2)
handle = json.loads(data)
maps = []
for fd in fds:  # two attaches: two imports, each mapped read-only
    h = cuda.import_fd(0, fd)
    os.close(fd)
    maps.append(vmm.Mapping(0, h, handle["size"], read_only=True))
def reads():
    return all(cuda.copy_to_host(0, m.ptr, SIZE) == DATA for m in maps)
try:
    cuda.copy_to_device(0, maps[0].ptr, b"x")
    refused = False
except Exception as e:
    refused = "CUDA_ERROR_INVALID_VALUE" in str(e) or "invalid argument" in str(e)
say(reads=reads(), write_refused=refused, read_only=[m.read_only for m in maps])
for line in sys.stdin:
    if line.strip() == "read":
        say(reads=reads())
    elif line.strip() == "close":
        for m in maps:
            m.close()
        say(counts=settled())
"""
)


class Proc:
    def __init__(self, code: str, fake: str, fd: int, env: dict | None = None) -> None:
        self.p = subprocess.Popen(
            [sys.executable, "-c", code, str(fd)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            pass_fds=[fd],
            env={**os.environ, "WAND_LIBCUDA": fake, **(env or {})},
        )

    def read(self) -> dict:
        line = self.p.stdout.readline()
        assert line, self.p.stderr.read()
        return json.loads(line)

    def tell(self, line: str) -> dict | None:
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        return None

    def ask(self, line: str) -> dict:
        self.tell(line)
        return self.read()

    def end(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(30)


ZERO = {"allocations": 0, "mappings": 0, "reservations": 0, "exported_fds": 0}


def _zero(counts: dict) -> None:
    assert {k: counts[k] for k in ZERO} == ZERO, counts
    assert counts["depth"] == 0 and counts["retains"] <= 1, counts  # the primary context


@pytest.fixture
def pair(fake_libcuda):
    """A daemon-side and a client-side process joined by a socket pair."""
    a, b = socket.socketpair()
    daemon = Proc(DAEMON, str(fake_libcuda), a.fileno())
    client = Proc(CLIENT, str(fake_libcuda), b.fileno())
    a.close()
    b.close()
    yield daemon, client
    daemon.end()
    client.end()


@pytest.mark.parametrize("first", ["daemon", "client"])
def test_export_import_map_read_only_and_let_go_in_either_order(pair, first):
    daemon, client = pair
    made = daemon.read()
    assert made["exported"] == 2 and made["read_only"] and made["handle"]["read_only"]
    assert made["handle"]["size"] == 4 << 20 and made["handle"]["nbytes"] == 3 << 20
    seen = client.read()
    assert seen == {"reads": True, "write_refused": True, "read_only": [True, True]}
    if first == "daemon":
        assert daemon.ask("close")["counts"]["mappings"] == 0  # the daemon's mapping is gone...
        assert client.ask("read")["reads"]  # ...and the client still reads every byte
        _zero(client.ask("close")["counts"])
    else:
        _zero(client.ask("close")["counts"])
        _zero(daemon.ask("close")["counts"])
    daemon.tell("exit")


def test_a_killed_daemon_leaves_the_clients_memory_alone(pair):
    daemon, client = pair
    daemon.read()
    client.read()
    daemon.p.send_signal(signal.SIGKILL)
    daemon.p.wait(30)
    assert client.ask("read")["reads"]
    _zero(client.ask("close")["counts"])


ADOPTER = (
    PRELUDE
    + """
fd = int(sys.argv[1])
handle = json.loads(sys.stdin.readline())
m = vmm.Mapping(0, cuda.import_fd(0, fd), handle["size"], read_only=True)
os.close(fd)
same = cuda.copy_to_host(0, m.ptr, SIZE) == DATA
m.close()
say(same=same, counts=settled())
"""
)


def test_a_descriptor_held_without_a_context_keeps_the_memory_for_a_restart(fake_libcuda):
    """What systemd's fd store does: hold the exported fd in a process with no CUDA at all
    while the exporter exits; a new process imports it and finds every byte."""
    a, b = socket.socketpair()
    daemon = Proc(DAEMON, str(fake_libcuda), a.fileno())
    a.close()
    try:
        made = daemon.read()
        data, fds, _, _ = socket.recv_fds(b, 4096, 2)
        daemon.tell("close")
        _zero(daemon.read()["counts"])
        daemon.tell("exit")
        assert daemon.p.wait(30) == 0
        os.close(fds[1])
        adopter = subprocess.run(
            [sys.executable, "-c", ADOPTER, str(fds[0])],
            input=json.dumps(made["handle"]) + "\n",
            capture_output=True,
            text=True,
            timeout=120,
            pass_fds=[fds[0]],
            env={**os.environ, "WAND_LIBCUDA": str(fake_libcuda)},
        )
        os.close(fds[0])
        assert adopter.returncode == 0, adopter.stderr
        result = json.loads(adopter.stdout)
        assert result["same"]
        _zero(result["counts"])
    finally:
        b.close()
        daemon.end()


def _run(code: str, fake, **env: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "WAND_LIBCUDA": str(fake), **env},
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_slab_closed_while_still_held_is_unmapped_only_when_let_go(fake_libcuda):
    r = _run(
        """
        slab = vmm.VmmSlab("3-dit", SIZE, DEVICE, "t")
        held = slab.mapping.hold(SIZE)  # the loader still writing when an unload comes
        slab.close()
        time.sleep(0.2)
        during = counts()
        del held
        say(during=during, after=settled())
        """,
        fake_libcuda,
    )
    assert r["during"]["mappings"] == 1 and r["during"]["allocations"] == 1
    _zero(r["after"])


def test_constructors_that_fail_leak_nothing(fake_libcuda):
    r = _run(
        """
        errors = []
        try:
            vmm.VmmSlab("1-big", 1 << 30, DEVICE, "t")  # more than the fake GPU has
        except Exception as e:
            errors.append(str(e))
        h = cuda.create(0, 2 << 20)
        try:
            vmm.Mapping(0, h, 4 << 20, read_only=True)  # larger than the allocation
        except Exception as e:
            errors.append(str(e))
        cuda.release(0, h)  # the handle is still the caller's
        say(errors=errors, counts=settled())
        """,
        fake_libcuda,
        FAKECUDA_TOTAL_MEM=str(256 << 20),
    )
    assert "cuMemCreate failed" in r["errors"][0] and "cuMemMap failed" in r["errors"][1]
    _zero(r["counts"])


@pytest.mark.parametrize(
    ("switch", "attribute"),
    [
        ("FAKECUDA_NO_VMM", "CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED"),
        ("FAKECUDA_NO_POSIX_FD", "CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED"),
    ],
)
def test_a_driver_without_vmm_or_posix_fds_is_a_clear_error(fake_libcuda, switch, attribute):
    r = _run(
        """
        try:
            vmm.VmmSlab("1-vae", SIZE, DEVICE, "t")
            say(error=None)
        except Exception as e:
            say(error=str(e), counts=settled())
        """,
        fake_libcuda,
        **{switch: "1"},
    )
    assert attribute in r["error"] and "'cpu'" in r["error"]
    _zero(r["counts"])


def test_a_driver_refusing_read_only_mappings_is_reported(fake_libcuda):
    r = _run(
        """
        slab = vmm.VmmSlab("1-vae", SIZE, DEVICE, "t")
        slab.seal()
        fd = slab.export()
        m = vmm.Mapping(0, cuda.import_fd(0, fd), slab.size, read_only=True)
        os.close(fd)
        result = dict(slab=slab.read_only, handle=slab.handle()["read_only"], client=m.read_only)
        m.close()
        slab.close()
        say(**result, counts=settled())
        """,
        fake_libcuda,
        FAKECUDA_NO_READONLY="1",
    )
    assert r["slab"] is False and r["handle"] is False and r["client"] is False
    _zero(r["counts"])


def test_the_fake_refuses_what_wand_must_never_do(fake_libcuda):
    """The rules the fake enforces bite through wand's own layer too: a release before the
    unmap, and an export of an allocation made without the POSIX-fd handle type."""
    r = _run(
        """
        out = {}
        h = cuda.create(0, 2 << 20)
        m = vmm.Mapping(0, h, 2 << 20, read_only=False)
        try:
            cuda.release(0, h)
        except Exception as e:
            out["release"] = str(e) + " / " + lib.fakecuda_last_error().decode()
        m.close()
        settled()
        prop = cuda._prop(0)
        prop.requestedHandleTypes = 0
        plain = ctypes.c_uint64()
        with cuda.context(0):
            cuda.call("cuMemCreate", ctypes.byref(plain), 2 << 20, prop, 0)
        try:
            cuda.export(0, plain.value)
        except Exception as e:
            out["export"] = str(e)
        cuda.release(0, plain.value)
        say(**out, counts=settled())
        """,
        fake_libcuda,
    )
    assert "cuMemRelease failed" in r["release"] and "unmap" in r["release"].lower()
    assert "cuMemExportToShareableHandle failed" in r["export"]
    _zero(r["counts"])


def test_a_wrong_library_is_a_clear_device_error(tmp_path):
    code = (
        "from wand.slabs import cuda\ntry:\n    cuda.driver()\nexcept Exception as e:\n    print(e)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "WAND_LIBCUDA": str(tmp_path / "nope.so")},
    )
    assert "cannot load the CUDA driver" in out.stdout and "nope.so" in out.stdout


def _probe(fake, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "wand.tools.gpuprobe", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "WAND_LIBCUDA": str(fake), **env},
    )


def test_the_device_checks_probe_runs_its_steps(fake_libcuda):
    out = _probe(fake_libcuda)
    assert out.returncode == 0, out.stdout + out.stderr
    found = json.loads(out.stdout)
    (device,) = found["devices"]["devices"]
    assert device["vmm"] and device["posix_fd"] and device["granularity"] == 2 << 20
    assert found["read_only"]["read_only"] and found["export"]["exported"]
    assert found["kept_by_fd"]["same"]  # the exporter had gone; a context-less fd held it
    found = json.loads(_probe(fake_libcuda, FAKECUDA_NO_READONLY="1").stdout)
    assert (
        found["read_only"]["read_only"] is False
        and "cuMemSetAccess" in found["read_only"]["refused"]
    )
    refused = _probe(fake_libcuda, FAKECUDA_NO_POSIX_FD="1")
    assert refused.returncode == 1
    assert not json.loads(refused.stdout)["devices"]["devices"][0]["posix_fd"]
