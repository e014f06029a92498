"""Phase "kills": client processes SIGKILLed at every stage of their work, and newcomers
that must inherit nothing from them.

A victim goes as far as its kill point, says so over a pipe, and carries on (attaching,
mapping, building modules) until the SIGKILL comes, a random moment later. Afterwards the
daemon must hold no lease for anyone, track what it tracked before, and have the memory and
descriptors it had after the warm-up kills. Fresh processes then check ``ps`` lists no lease
of theirs; as root, some take the pids of killed lease holders (whose leases a forced unload
revoked, where the daemon is the suite's own): they must get no lease and no ``revoked``.
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections import Counter
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import zmq

from wand.client.connection import Client, connect
from wand.common import protocol
from wand.common.endpoint import socket_path
from wand.common.errors import WandError
from wand.common.fdsocket import MAGIC
from wand.common.process import own_start
from wand.tools.chaos import Options, forked
from wand.tools.chaos.target import Target
from wand.tools.chaos.verdict import PhaseResult, flat

READY = "ready"
# kill point → (weight, the longest wait between reaching it and the kill, seconds)
POINTS: dict[str, tuple[float, float]] = {
    "start": (1, 0.002),  # forked, nothing sent
    "hello_sent": (1, 0.002),  # its first request on the way (a raw socket)
    "hello": (1, 0.002),  # connected: the daemon tracks it
    "attach_sent": (2, 0.002),  # an attach on the way (a raw socket)
    "ticket": (2, 0.002),  # leased, its fd ticket not redeemed
    "fd_fetch": (2, 0.002),  # half a line written to the fd socket
    "mapping": (2, 0.03),  # attaching and mapping every component
    "module": (1, 0.1),  # building every component's module
}
PARALLEL = 8  # victims alive at once
REACH_SECONDS = 20.0  # a victim that has not reached its point by then is a failure
SETTLE_SECONDS = 10.0  # for a checkpoint to load, holders to attach
NEWCOMERS = 8
REUSED_PIDS = 5
NS_LAST_PID = Path("/proc/sys/kernel/ns_last_pid")
REUSE_CHECKPOINT = "chaos-reuse"


def run(target: Target, rng: random.Random, opts: Options) -> PhaseResult:
    result = PhaseResult("kills")
    components = target.components()
    before = target.status()["daemon"]
    if _can_choose_pids():
        _reused_pids(target, result, components)
    else:
        result.figures["reused_pids"] = "skipped (needs root and a writable ns_last_pid)"
    warm = min(opts.kills, max(10, opts.kills // 10))
    killed = _kill(target.endpoint, rng, components, warm, result)
    target.settle(before, result)
    footprint = target.footprint()
    killed += _kill(target.endpoint, rng, components, opts.kills - warm, result)
    after = target.settle(before, result)
    flat(result, footprint, target.footprint())
    _newcomers(target, result)
    result.count = sum(killed.values())
    result.figures.update(
        clients=[before["clients"], after["clients"]],
        tracked=[before["tracked"], after["tracked"]],
        kill_points=dict(killed),
    )
    return result


def _kill(
    endpoint: str, rng: random.Random, components: list[str], n: int, result: PhaseResult
) -> Counter[str]:
    """``n`` victims, :data:`PARALLEL` at a time, each killed at a point drawn at random."""
    killed: Counter[str] = Counter()
    points = list(POINTS)
    weights = [POINTS[p][0] for p in points]
    for first in range(0, n, PARALLEL):
        batch = []
        for point in rng.choices(points, weights, k=min(PARALLEL, n - first)):
            names = rng.sample(components, len(components))
            batch.append((point, *forked.start(victim, endpoint, point, names)))
        for point, proc, conn in batch:
            if _reached(proc, conn, point, result):
                time.sleep(rng.uniform(0, POINTS[point][1]))
            forked.kill(proc)
            conn.close()
            killed[point] += 1
    return killed


def _reached(proc: BaseProcess, conn: Connection, point: str, result: PhaseResult) -> bool:
    """Whether the victim says it reached ``point``; anything else is a failure."""
    try:
        said = conn.recv() if conn.poll(REACH_SECONDS) else f"nothing in {REACH_SECONDS:g} s"
    except EOFError:
        proc.join(5)
        said = f"it exited with {proc.exitcode}"
    return result.check(said == READY, f"victim pid {proc.pid} did not reach {point}: {said}")


# --- what victims do ------------------------------------------------------------------------


def victim(endpoint: str, point: str, names: list[str], conn: Connection) -> None:
    """Go as far as ``point``, say so, carry on until killed."""
    try:
        STEPS[point](endpoint, names, conn)
    except Exception as e:
        conn.send(f"{type(e).__name__}: {e}")
        return
    time.sleep(3 * REACH_SECONDS)


def _at_start(endpoint: str, names: list[str], conn: Connection) -> None:
    conn.send(READY)


def _hello_sent(endpoint: str, names: list[str], conn: Connection) -> None:
    _raw_request(endpoint, "hello", {"client": "chaos victim"}, conn)


def _hello(endpoint: str, names: list[str], conn: Connection) -> None:
    _client(endpoint)
    conn.send(READY)


def _attach_sent(endpoint: str, names: list[str], conn: Connection) -> None:
    _raw_request(endpoint, "attach", {"name": names[0]}, conn)


def _ticket(endpoint: str, names: list[str], conn: Connection) -> None:
    _client(endpoint).request("attach", name=names[0])
    conn.send(READY)


def _fd_fetch(endpoint: str, names: list[str], conn: Connection) -> None:
    handle = _client(endpoint).request("attach", name=names[0])["handle"]
    path = socket_path(endpoint)
    assert path is not None, "an ipc:// endpoint"
    line = MAGIC + handle["ticket"].encode() + b"\n"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path.parent / handle["fds"]))
    sock.sendall(line[: len(line) // 2])
    conn.send(READY)


def _mapping(endpoint: str, names: list[str], conn: Connection) -> None:
    client = _client(endpoint)
    conn.send(READY)
    for name in names:
        client.attach(name)


def _module(endpoint: str, names: list[str], conn: Connection) -> None:
    client = _client(endpoint)
    conn.send(READY)
    for name in names:
        client.module(name)


STEPS = {
    "start": _at_start,
    "hello_sent": _hello_sent,
    "hello": _hello,
    "attach_sent": _attach_sent,
    "ticket": _ticket,
    "fd_fetch": _fd_fetch,
    "mapping": _mapping,
    "module": _module,
}


def _client(endpoint: str) -> Client:
    return connect(endpoint, timeout=REACH_SECONDS, name="chaos victim")


def _raw_request(endpoint: str, op: str, args: dict[str, Any], conn: Connection) -> None:
    """Send one request from a bare socket, say so, and wait for the reply."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(endpoint)
    sock.send(protocol.request(1, op, {**args, "start": own_start()}))
    conn.send(READY)
    sock.recv()


# --- newcomers ------------------------------------------------------------------------------


def newcomer(endpoint: str, conn: Connection) -> None:
    """Once told to go: connect, ping, and report the leases ``ps`` says this process holds
    (none, it took none) or the error the daemon answered."""
    conn.recv()
    try:
        with connect(endpoint, timeout=REACH_SECONDS, name="chaos newcomer") as c:
            c.ping()
            mine = [p for p in c.ps() if p["pid"] == os.getpid()]
        conn.send({"leases": [lease["component"] for p in mine for lease in p["leases"]]})
    except WandError as e:
        conn.send({"error": f"{e.code}: {e}"})


def _newcomers(target: Target, result: PhaseResult) -> None:
    """Fresh processes: whatever pid they got, they must hold nothing."""
    for _ in range(NEWCOMERS):
        proc, conn = forked.start(newcomer, target.endpoint)
        _heard(proc, conn, result, "a fresh process")


def _heard(proc: BaseProcess, conn: Connection, result: PhaseResult, who: str) -> None:
    conn.send("go")
    said = conn.recv() if conn.poll(REACH_SECONDS) else {"error": "no answer"}
    proc.join(REACH_SECONDS)
    result.check(said == {"leases": []}, f"{who} (pid {proc.pid}) inherited something: {said}")


def _reused_pids(target: Target, result: PhaseResult, components: list[str]) -> None:
    """Lease holders killed, their pids given to newcomers; on the suite's own daemon the
    holders' leases on a second checkpoint are revoked first (unload --force)."""
    revoking = target.owned
    if revoking:
        components = components + _load_reuse_checkpoint(target)
    holders = [
        forked.start(victim, target.endpoint, "mapping", components) for _ in range(REUSED_PIDS)
    ]
    for proc, conn in holders:
        _reached(proc, conn, "mapping", result)
    _wait_for_leases(target, {proc.pid for proc, _ in holders}, len(components))
    if revoking:
        revoked = target.client.request("unload", name=REUSE_CHECKPOINT, force=True)["revoked"]
        result.check(
            sorted(revoked) == sorted(p.pid for p, _ in holders),
            f"unload --force revoked the leases of {revoked}, not of every holder",
        )
    reused = 0
    for proc, conn in holders:
        forked.kill(proc)
        conn.close()
        heir = _spawn_at(proc.pid, target.endpoint)
        if heir is not None:
            _heard(*heir, result, "a process given the pid of a killed lease holder")
            reused += 1
    result.figures["reused_pids"] = f"{reused}/{len(holders)}"
    result.figures["revoked_first"] = revoking


def _load_reuse_checkpoint(target: Target) -> list[str]:
    from wand.wan import write_tiny

    path = write_tiny(target.work / REUSE_CHECKPOINT, "t2v-A14B", "original", seed=1)
    names = target.client.request("load", path=str(path), name=REUSE_CHECKPOINT)["components"]
    deadline = time.monotonic() + SETTLE_SECONDS
    while any(c["state"] != "ready" for c in target.status()["components"]):
        if time.monotonic() > deadline:
            raise WandError(f"{REUSE_CHECKPOINT} not ready in {SETTLE_SECONDS:g} s", "failed")
        time.sleep(0.05)
    return names


def _wait_for_leases(target: Target, pids: set[int], leases: int) -> None:
    """Until every holder holds its ``leases`` (they attach after saying they would)."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while time.monotonic() < deadline:
        held = {p["pid"]: len(p["leases"]) for p in target.client.ps() if p["pid"] in pids}
        if len(held) == len(pids) and all(n == leases for n in held.values()):
            return
        time.sleep(0.05)
    raise WandError(f"lease holders {sorted(pids)} did not attach in time", "failed")


def _spawn_at(pid: int, endpoint: str) -> tuple[BaseProcess, Connection] | None:
    """A newcomer forked with pid ``pid`` (via ns_last_pid), or None if others took it."""
    for _ in range(30):
        NS_LAST_PID.write_text(str(pid - 1))
        proc, conn = forked.start(newcomer, endpoint)
        if proc.pid == pid:
            return proc, conn
        forked.kill(proc)
        conn.close()
    return None


def _can_choose_pids() -> bool:
    return os.geteuid() == 0 and os.access(NS_LAST_PID, os.W_OK)
