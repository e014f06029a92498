"""Slabs are sealed file descriptors: read-only for everyone by the kernel's word, alive while
anyone holds them, handed only to the process holding the lease, kept across restarts by
systemd's fd store, and reachable from another mount namespace through the socket alone."""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import ROOT, Service, as_nobody

import wand
from wand.common import fdsocket
from wand.wan import write_tiny

COMPONENTS = ("text_encoder", "vae", "high_noise_model", "low_noise_model")


def _slab_fds(pid: int) -> list[Path]:
    out = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd).startswith("/memfd:wand:"):
                out.append(fd)
        except OSError:
            pass
    return out


def test_no_process_can_write_a_slab(daemon):
    fds = _slab_fds(daemon.proc.pid)
    assert len(fds) == 4
    for path in fds:
        fd = os.open(path, os.O_RDWR)  # reopening read-write succeeds...
        try:
            with pytest.raises(PermissionError):
                os.write(fd, b"\0")  # ...but the seal refuses every write
            with pytest.raises(PermissionError):
                mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            with pytest.raises(OSError) as e:
                os.ftruncate(fd, 0)
            assert e.value.errno == errno.EPERM
        finally:
            os.close(fd)
    with daemon.connect() as c:
        assert all(c.attachment(name).verify() for name in COMPONENTS)
        for name in COMPONENTS:
            c.detach(name)


PRIVATE_WRITER = """
import json, sys, torch, wand
def anon():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    return int(fields["RssAnon"].split()[0]) * 1024
with wand.connect(sys.argv[1]) as c:
    shared = c.attachment("high_noise_model")
    mine = c.attachment("high_noise_model", writable=True)
    big = max(mine.tensors, key=lambda k: mine.tensors[k].numel())
    before = anon()
    mine.tensors[big].view(-1)[0] += 1  # one page of this process's own
    grown = anon() - before
    print(json.dumps({
        "nbytes": mine.manifest["nbytes"], "grown": grown,
        "mine_ok": mine.verify(), "shared_ok": shared.verify(),
        "differ": not torch.equal(mine.tensors[big], shared.tensors[big]),
    }))
"""


def test_writable_attachments_write_private_pages_only(big_daemon):
    out = subprocess.run(
        [sys.executable, "-c", PRIVATE_WRITER, big_daemon.endpoint],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["differ"] and not r["mine_ok"] and r["shared_ok"]
    assert r["grown"] < 0.05 * r["nbytes"]  # copy on write: a page, not the component
    with big_daemon.connect() as c:  # and nobody else sees the write
        assert c.attachment("high_noise_model").verify()
        c.detach("high_noise_model")


HOLDER = """
import sys, wand
c = wand.connect(sys.argv[1])
atts = {n: c.attachment(n) for n in sys.argv[2:]}
print("held", flush=True)
for line in sys.stdin:
    print(all(a.verify() for a in atts.values()), flush=True)
"""


class Holder:
    def __init__(self, endpoint: str, *names: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, endpoint, *names],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout.readline().strip() == "held"

    def verified(self) -> bool:
        self.proc.stdin.write("check\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip() == "True"

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _shmem() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Shmem:"))


@pytest.mark.parametrize("how", ["sigkill", "sigterm", "unload-force"])
def test_tensors_outlive_the_daemon_and_then_the_memory_goes(ckpt_root, start_daemon, how):
    path = ckpt_root / "t2v-A14B-wide-slabs"  # ~1 GB resident: well above Shmem's noise
    if not path.exists():
        write_tiny(path, "t2v-A14B", "original", width=1024, layers=12)
    before = _shmem()
    d = start_daemon(path).wait_ready()
    resident = sum(c["bytes"] for c in d.connect().status()["components"])
    holder = Holder(d.endpoint, *COMPONENTS)
    try:
        if how == "unload-force":
            assert d.wanctl("unload", "t2v-A14B", "--force").returncode == 0
        else:
            d.proc.send_signal(signal.SIGKILL if how == "sigkill" else signal.SIGTERM)
            d.proc.wait(30)
        assert holder.verified()  # every byte still right, whatever the daemon did
        assert _shmem() > before + 0.8 * resident  # the client's mappings keep the pages
    finally:
        holder.close()
        d.stop()
    deadline = time.monotonic() + 10
    while _shmem() > before + 0.2 * resident and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _shmem() < before + 0.2 * resident  # the kernel freed them with the last holder


TICKET = """
import sys, wand
c = wand.connect(sys.argv[1])
print(c.request("attach", name="vae")["handle"]["ticket"], flush=True)
sys.stdin.readline()
"""


def test_the_fd_socket_gives_descriptors_only_to_the_lease_holder(daemon):
    fds_path = Path(daemon.endpoint.removeprefix("ipc://")).with_name("wand.fds.sock")
    with pytest.raises(wand.DaemonError) as e:
        fdsocket.fetch(fds_path, "00" * 16, 5)
    assert e.value.code == "forbidden"
    other = subprocess.Popen(
        [sys.executable, "-c", TICKET, daemon.endpoint],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        theirs = other.stdout.readline().strip()
        with pytest.raises(wand.DaemonError) as e:  # a ticket of another process
            fdsocket.fetch(fds_path, theirs, 5)
        assert e.value.code == "forbidden"
    finally:
        other.kill()
        other.wait()
    with daemon.connect() as c:
        ticket = c.request("attach", name="vae")["handle"]["ticket"]
        os.close(fdsocket.fetch(fds_path, ticket, 5))
        with pytest.raises(wand.DaemonError):  # spent
            fdsocket.fetch(fds_path, ticket, 5)
        c.detach("vae")
    for garbage in (b"", b"GET / HTTP/1.0\r\n\r\n", b"WAND1 " + b"x" * 500):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(fds_path))
            s.sendall(garbage)
            s.shutdown(socket.SHUT_WR)
            s.settimeout(10)
            with contextlib.suppress(ConnectionResetError):  # dropped unread: a reset
                s.recv(100)
    with daemon.connect() as c:
        assert c.ping() < 5


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_the_fd_socket_is_closed_to_users_outside_its_group(daemon):
    fds_path = Path(daemon.endpoint.removeprefix("ipc://")).with_name("wand.fds.sock")
    os.chmod(fds_path.parent, 0o755)

    def connect() -> bytes:
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(fds_path))
                return b"connected"
            except PermissionError:
                return b"refused"

    try:
        answer = as_nobody(connect)
    finally:
        os.chmod(fds_path.parent, 0o700)
    assert answer == b"refused"


@pytest.fixture
def service(tmp_path):
    ckpt = write_tiny(tmp_path / "ckpt", "t2v-A14B", "original", width=384, layers=4)
    workdir = tmp_path / "run"
    workdir.mkdir(mode=0o700)
    s = Service(workdir, "--checkpoint", str(ckpt))
    s.ckpt = ckpt
    yield s
    s.close()


def _components(status: dict) -> dict[str, dict]:
    return {c["component"]: c for c in status["components"]}


def test_a_restarted_daemon_adopts_every_slab_from_the_fd_store(service):
    cold = service.start()
    assert len(service.host.stored) == 9  # 4 slabs, their records, the checkpoint's spec
    disk = sum(f.stat().st_size for f in service.ckpt.rglob("*") if f.is_file())
    holder = Holder(service.endpoint, "vae")
    try:
        service.crash()  # SIGKILL: systemd restarts it with the stored descriptors
        adopted = service.start()
        assert holder.verified()
    finally:
        holder.close()
    comps, before = _components(adopted), _components(cold)
    assert all(c["adopted"] and c["state"] == "ready" for c in comps.values())
    assert adopted["daemon"]["adopted"] == 4
    assert {k: c["checksum"] for k, c in comps.items()} == {
        k: c["checksum"] for k, c in before.items()
    }
    assert cold["rchar"] - adopted["rchar"] > 0.8 * disk  # it read no checkpoint bytes
    assert _libraries(service.proc.pid) == []  # nor loaded torch (or anything that needs it)
    log = service.log.read_text()
    assert "adopted from the fd store" in log
    assert "unchanged since it was read, spec from the fd store" in log  # folder not read
    with wand.connect(service.endpoint) as c:
        assert all(c.attachment(name).verify() for name in COMPONENTS)


def _libraries(pid: int) -> list[str]:
    """torch's shared libraries mapped in process ``pid`` (what importing torch, or diffusers,
    transformers, accelerate or the client library, would have loaded)."""
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return sorted({line.split()[-1] for line in maps if "libtorch" in line})


def test_a_changed_component_is_reloaded_and_the_rest_adopted(service, tmp_path):
    service.start()
    spec = {n for n in service.host.stored if n.startswith("wand-spec-")}
    other = write_tiny(tmp_path / "other", "t2v-A14B", "original", width=384, layers=4, seed=5)
    service.crash()
    shutil.rmtree(service.ckpt / "low_noise_model")
    shutil.copytree(other / "low_noise_model", service.ckpt / "low_noise_model")
    status = service.start()
    comps = _components(status)
    assert not comps["low_noise_model"]["adopted"]
    assert all(comps[n]["adopted"] for n in COMPONENTS if n != "low_noise_model")
    assert len(service.host.stored) == 9  # the stale slab was taken out, the new one put in
    assert any(m.startswith("FDSTOREREMOVE=1") for m in service.host.messages)
    assert {n for n in service.host.stored if n.startswith("wand-spec-")} != spec  # read again


def test_a_stopped_service_leaves_no_slab_memory(service):
    before = _shmem()
    status = service.start()
    resident = sum(c["bytes"] for c in status["components"])
    assert _shmem() > before + 0.8 * resident
    with wand.connect(service.endpoint) as c:
        c.stop()
    assert service.proc.wait(30) == 0
    service.host.forget()  # systemctl stop: systemd empties the store
    assert _shmem() < before + 0.2 * resident


CONTAINER = r"""
set -e
mount --make-rprivate /
mkdir -p /mnt/wand-box && mount -t tmpfs box /mnt/wand-box
mkdir /mnt/wand-box/sock /mnt/wand-box/code /mnt/wand-box/python
mount --bind "$SOCKDIR" /mnt/wand-box/sock
mount --bind "$CODE" /mnt/wand-box/code
mount -t tmpfs shm /dev/shm
mount -t tmpfs tmp /tmp
mkdir -p "$CODE" && mount --bind /mnt/wand-box/code "$CODE"
cd "$CODE"
WAND_ENDPOINT=ipc:///mnt/wand-box/sock/wand.sock "$PYTHON" -c '
import os, wand
with wand.connect() as c:
    ok = [c.attachment(n).verify() for n in ("text_encoder", "vae")]
print("verified" if all(ok) else "MISMATCH", os.path.exists(os.environ["MARKER"]))
'
"""


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare"
)
def test_a_client_in_another_mount_namespace_attaches(daemon):
    sockdir = Path(daemon.endpoint.removeprefix("ipc://")).parent
    marker = Path(tempfile.mkstemp(prefix="wand-host-")[1])  # in this machine's /tmp
    env = {"SOCKDIR": str(sockdir), "CODE": str(ROOT), "PYTHON": sys.executable}
    try:
        out = subprocess.run(
            ["unshare", "--mount", "sh", "-c", CONTAINER],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, **env, "MARKER": str(marker)},
        )
    finally:
        marker.unlink()
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["verified", "False"]  # attached, with a /tmp of its own


@pytest.mark.parametrize(("task", "layout"), [("t2v-A14B", "original"), ("ti2v-5B", "original")])
def test_a_checkpoint_spec_survives_its_stored_record(tiny, task, layout):
    import msgpack

    from wand.common.spec import from_record, to_record
    from wand.wan import read_checkpoint

    spec = read_checkpoint(tiny(task, layout))
    assert from_record(msgpack.unpackb(msgpack.packb(to_record(spec)))) == spec
