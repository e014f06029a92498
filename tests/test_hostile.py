"""Hostile and careless clients: none can kill the daemon, freeze it, grow it without bound,
inherit another process's state by reusing its pid, or lie about who it is."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq
from conftest import ROOT, Raw, as_nobody

import wand
from wand.common import protocol
from wand.common.process import start_time
from wand.daemon.logs import MAX_LINE, RingBuffer


@pytest.fixture
def raw(daemon):
    r = Raw(daemon.endpoint)
    yield r
    r.close()


def _nested(depth: int, leaf: object = "x") -> object:
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


def _alive(daemon) -> None:
    with daemon.connect() as c:
        assert c.ping() < 5


@pytest.mark.parametrize("op", ["hello", "unload", "attach", "ping", "load"])
def test_deep_arguments_are_bad_messages_not_deaths(daemon, raw, op):
    for msg in (
        {"v": 1, "id": 1, "op": op, "args": {"client": _nested(1000), "name": _nested(50)}},
        {"v": _nested(1000), "id": 2, "op": op},
        {"v": 1, "id": 3, "op": op, "args": {f"k{i}": [0] * 1000 for i in range(5)}},
    ):
        reply = raw.ask(msg)
        assert reply["ok"] is False and reply["error"]["code"] == "bad_message", reply
        assert len(reply["error"]["message"]) < 300
    _alive(daemon)


def test_odd_values_get_bad_args_not_internal(daemon, raw):
    cases = [
        ("hello", {"client": "x" * 100_000}),
        ("hello", {"versions": "1"}),
        ("logs", {"since": 2**64 - 1}),
        ("logs", {"limit": -5}),
        ("attach", {"name": "vae", "writable": "yes", "start": 1}),
        ("attach", {"name": "vae\0", "start": 1}),
        ("attach", {"name": "vae", "start": True}),
        ("unload", {"name": 5}),
        ("unload", {"name": "t2v-A14B", "force": "please"}),
        ("detach", {"name": "\udcff".encode("utf-8", "surrogatepass").decode("latin-1")}),
    ]
    for i, (op, args) in enumerate(cases):
        reply = raw.ask({"v": 1, "id": i, "op": op, "args": args})
        assert reply["ok"] is False and reply["error"]["code"] not in ("internal",), (op, reply)
        assert len(reply["error"]["message"]) < 500, reply
    _alive(daemon)
    assert "Traceback" not in daemon.output()


def test_a_client_that_never_reads_freezes_nobody(daemon):
    ctx = zmq.Context()
    greedy = ctx.socket(zmq.DEALER)
    greedy.setsockopt(zmq.LINGER, 0)
    greedy.setsockopt(zmq.SNDTIMEO, 2000)
    greedy.connect(daemon.endpoint)
    sent = 0
    try:
        for i in range(5000):  # status replies are large: they pile up unread
            try:
                greedy.send(protocol.request(i, "status"))
                sent += 1
            except zmq.Again:
                break
        start = time.monotonic()
        with daemon.connect(timeout=10) as c:
            for _ in range(20):
                c.ping()
        assert time.monotonic() - start < 10
    finally:
        greedy.close()
        ctx.term()
    assert sent > 1000
    _alive(daemon)


def test_sigterm_acts_within_a_second_under_an_unread_flood(tiny, start_daemon):
    d = start_daemon(tiny()).wait_ready()
    ctx = zmq.Context()
    greedy = ctx.socket(zmq.DEALER)
    greedy.setsockopt(zmq.LINGER, 0)
    greedy.setsockopt(zmq.SNDTIMEO, 1000)
    greedy.connect(d.endpoint)
    try:
        for i in range(3000):
            try:
                greedy.send(protocol.request(i, "status"))
            except zmq.Again:
                break
        time.sleep(0.5)
        start = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(10) == 0
        assert time.monotonic() - start < 1.5
    finally:
        greedy.close()
        ctx.term()


def test_processes_are_forgotten_when_they_exit(daemon):
    code = (
        "import sys, wand; c = wand.connect(sys.argv[1], name='x' * 60); c.status(); "
        "c.attach('vae') if sys.argv[2] == 'lease' else None"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, daemon.endpoint, kind])
        for kind in ["lease", "hello"] * 10
    ]
    assert [p.wait(120) for p in procs] == [0] * len(procs)
    deadline = time.monotonic() + 10
    while True:
        with daemon.connect() as c:
            tracked = c.status()["daemon"]["tracked"]
        if tracked <= 2 or time.monotonic() > deadline:  # this process (and its wanctl, gone)
            break
        time.sleep(0.1)
    assert tracked <= 2


def test_the_log_ring_is_bounded_in_bytes_and_line_length():
    import logging

    ring = RingBuffer(size=1000, max_bytes=20_000)
    log = logging.getLogger("wand.test-ring")
    log.addHandler(ring)
    try:
        for i in range(200):
            log.warning("%d %s", i, "y" * 5000)
    finally:
        log.removeHandler(ring)
    records = ring.since(0, 2000)
    assert all(len(r["message"]) <= MAX_LINE for r in records)
    assert sum(len(r["message"]) for r in records) <= 20_000
    assert records[-1]["message"].startswith("199 ")


def _spawn_with_pid(pid: int, args: list[str]) -> subprocess.Popen | None:
    """Start ``python args`` as process ``pid`` (via ns_last_pid), or None if it is taken."""
    for _ in range(50):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, text=True)
        if proc.pid == pid:
            return proc
        proc.kill()
        proc.wait()
    return None


def _can_choose_pids() -> bool:
    return os.geteuid() == 0 and os.access("/proc/sys/kernel/ns_last_pid", os.W_OK)


SAY_HELLO = """
import json, sys, wand
with wand.connect(sys.argv[1]) as c:
    c.ping()
    print(json.dumps([p["pid"] for p in c.ps()]))
"""


@pytest.mark.skipif(not _can_choose_pids(), reason="needs root and ns_last_pid")
def test_a_reused_revoked_pid_inherits_nothing(daemon, tiny):
    assert daemon.wanctl("load", str(tiny("ti2v-5B")), "--name", "reuse").returncode == 0
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys,wand,time; c=wand.connect(sys.argv[1]); "
            "c.attach('reuse/model'); print('held', flush=True); time.sleep(60)",
            daemon.endpoint,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    assert daemon.wanctl("unload", "reuse", "--force").returncode == 0
    pid = holder.pid
    holder.kill()
    holder.wait()
    newcomer = _spawn_with_pid(pid, ["-c", SAY_HELLO, daemon.endpoint])
    if newcomer is None:
        pytest.skip(f"pid {pid} was taken by another process")
    out, _ = newcomer.communicate(timeout=60)
    assert newcomer.returncode == 0, out  # its first request was not answered "revoked"
    assert pid not in json.loads(out)


QUEUED_ATTACH = """
import os, sys, zmq
from wand.common import protocol
from wand.common.process import own_start
ctx = zmq.Context()
s = ctx.socket(zmq.DEALER)
s.connect(sys.argv[1])
s.send(protocol.request(1, "hello", {"client": "doomed", "start": own_start()}))
s.send(protocol.request(2, "attach", {"name": "vae", "start": own_start()}))
s.close(linger=5000)  # the requests wait, unread, in the stopped daemon's queue
ctx.term()
print(own_start(), flush=True)
"""


@pytest.mark.skipif(not _can_choose_pids(), reason="needs root and ns_last_pid")
def test_an_attach_queued_by_a_dead_process_is_not_credited_to_its_pid_successor(
    tiny, start_daemon
):
    d = start_daemon(tiny()).wait_ready()
    d.proc.send_signal(signal.SIGSTOP)
    try:
        doomed = subprocess.Popen(
            [sys.executable, "-c", QUEUED_ATTACH, d.endpoint],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        _, err = doomed.communicate(timeout=60)
        assert doomed.returncode == 0, err
        heir = _spawn_with_pid(
            doomed.pid, ["-c", "import time; print('up', flush=True); time.sleep(30)"]
        )
    finally:
        d.proc.send_signal(signal.SIGCONT)
    if heir is None:
        pytest.skip("the pid was taken by another process")
    try:
        assert heir.stdout.readline().strip() == "up"
        time.sleep(0.5)  # the daemon reads the queued requests now
        with d.connect() as c:
            assert heir.pid not in {p["pid"] for p in c.ps()}
    finally:
        heir.kill()
        heir.wait()


class Zmtp:
    """A ZMTP 3.0 DEALER spoken over a plain Unix socket, so that the process that opens the
    connection and the one that uses it can differ (libzmq does not survive a fork)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def greet(self) -> None:
        self.sock.sendall(
            b"\xff" + bytes(8) + b"\x7f\x03\x00" + b"NULL".ljust(20, b"\0") + bytes(32)
        )
        self._read(64)
        ready = b"\x05READY\x0bSocket-Type" + len(b"DEALER").to_bytes(4, "big") + b"DEALER"
        self.sock.sendall(bytes([0x04, len(ready)]) + ready)
        self._frame()  # the daemon's READY

    def ask(self, msg: dict) -> dict:
        body = protocol.pack(msg)
        assert len(body) < 256
        self.sock.sendall(bytes([0, len(body)]) + body)
        return protocol.parse_reply(self._frame())

    def _frame(self) -> bytes:
        flags = self._read(1)[0]
        size = int.from_bytes(self._read(8 if flags & 2 else 1), "big")
        return self._read(size)

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            assert chunk, "the daemon closed the connection"
            data += chunk
        return data


HOLD_VAE = """
import sys, time, wand
c = wand.connect(sys.argv[1])
c.attach("vae")
print("held", flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(not _can_choose_pids(), reason="needs root and ns_last_pid")
def test_a_connection_kept_after_its_opener_exited_speaks_for_nobody(daemon):
    """The spoof: a child opens a connection and greets, then exits; its parent keeps the
    connection, waits until another process has the child's pid and a lease, and sends a
    detach with that process's start time (anyone may read it in /proc). The kernel's
    credentials of the connection still name the pid."""
    path = daemon.endpoint.removeprefix("ipc://")
    opened = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    child = os.fork()
    if child == 0:
        try:
            opened.connect(path)
            Zmtp(opened).greet()
        finally:
            os._exit(0)
    os.waitpid(child, 0)
    victim = _spawn_with_pid(child, ["-c", HOLD_VAE, daemon.endpoint])
    if victim is None:
        pytest.skip(f"pid {child} was taken by another process")
    try:
        assert victim.stdout.readline().strip() == "held"
        spoof = {"name": "vae", "start": start_time(victim.pid)}
        for op in ("detach", "attach", "detach"):
            reply = Zmtp(opened).ask({"v": 1, "id": 1, "op": op, "args": spoof})
            assert not reply["ok"] and reply["error"]["code"] == "bad_args", reply
            assert "has exited" in reply["error"]["message"], reply
        with daemon.connect() as c:
            held = {p["pid"]: [(x["component"], x["count"]) for x in p["leases"]] for p in c.ps()}
        assert held[victim.pid] == [("t2v-A14B/vae", 1)], held
    finally:
        opened.close()
        victim.kill()
        victim.wait()


def test_attach_over_tcp_is_refused(tiny, start_daemon):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = start_daemon(tiny(), "--endpoint", f"tcp://127.0.0.1:{port}")
    d.endpoint = f"tcp://127.0.0.1:{port}"
    d.wait_ready()
    with wand.connect(d.endpoint) as c:
        assert c.status()["daemon"]["state"] == "ready"
        with pytest.raises(wand.DaemonError) as e:
            c.attach("vae")
    assert e.value.code == "forbidden" and "ipc://" in str(e.value)
    with wand.connect(d.endpoint) as c:
        c.request("ps")


def _start(endpoint: str, tiny, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "wand.daemon", "--checkpoint", str(tiny()), "--endpoint", endpoint],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        **kw,
    )


def test_a_socket_directory_others_may_write_is_refused(tiny, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    out = _start(f"ipc://{shared}/wand.sock", tiny)
    assert out.returncode == 78 and "writable by others" in out.stderr, out.stderr
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o755)
        os.chown(theirs, 65534, 65534)
        out = _start(f"ipc://{theirs}/wand.sock", tiny)
        assert out.returncode == 78 and "belongs to uid 65534" in out.stderr, out.stderr


def test_directories_made_under_umask_000_are_not_world_writable(tiny, start_daemon, tmp_path):
    old = os.umask(0)
    try:
        d = start_daemon(tiny(), "--endpoint", f"ipc://{tmp_path}/a/b/wand.sock")
        d.endpoint = f"ipc://{tmp_path}/a/b/wand.sock"
        d.wait_ready()
    finally:
        os.umask(old)
    for p in (tmp_path / "a", tmp_path / "a" / "b"):
        assert p.stat().st_mode & 0o777 == 0o755, oct(p.stat().st_mode)
    for name in ("wand.sock", "wand.fds.sock"):
        assert (tmp_path / "a" / "b" / name).stat().st_mode & 0o777 == 0o660


def test_a_stale_socket_is_reported_at_once(tiny, start_daemon):
    d = start_daemon(tiny()).wait_ready()
    d.proc.kill()
    d.proc.wait()
    start = time.monotonic()
    out = d.wanctl("ping", "--timeout", "30")
    assert out.returncode == 3 and time.monotonic() - start < 5
    assert "no daemon is listening" in out.stderr and "stale" in out.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_a_user_without_permission_is_told_so(daemon):
    path = Path(daemon.endpoint.removeprefix("ipc://"))
    os.chmod(path.parent, 0o755)

    def connect() -> bytes:
        try:
            wand.connect(daemon.endpoint, timeout=30)
            return b"connected"
        except wand.WandError as e:
            return str(e).encode()

    start = time.monotonic()
    try:
        message = as_nobody(connect).decode()
    finally:
        os.chmod(path.parent, 0o700)
    assert time.monotonic() - start < 5
    assert f"permission denied on {path}" in message and "group root" in message, message


def test_start_time_is_what_proc_says():
    assert start_time(os.getpid()) == start_time(os.getpid()) > 0
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        assert start_time(child.pid) >= start_time(os.getpid())
    finally:
        child.kill()
        child.wait()
    assert start_time(2**22 + 1) is None


def test_wanctl_into_a_closed_pipe_is_quiet(daemon):
    out = subprocess.run(
        f"{sys.executable} -m wanctl --endpoint {daemon.endpoint} status | head -c1",
        shell=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr, out.stderr
