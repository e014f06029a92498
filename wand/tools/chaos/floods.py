"""Phase "floods": idle connections by the hundred and the thousand, which any process that
may open the sockets can make.

While the fd socket holds more idle connections than the daemon serves at once, another
client's attach must still get its slab. While the ZeroMQ socket holds as many idle
connections as the daemon may open descriptors (and some more), the daemon must live (it
stops accepting connections near its limit: libzmq would abort on EMFILE), and once they
are gone a new client must get its ``ping`` answered again. Afterwards its descriptors are
what they were.
"""

from __future__ import annotations

import random
import resource
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from wand.client.connection import Client
from wand.common.endpoint import socket_path
from wand.common.errors import WandError
from wand.common.fdsocket import MAX_CONNECTIONS, fd_socket_path
from wand.tools.chaos import Options
from wand.tools.chaos.target import FREEZE_SECONDS, Target
from wand.tools.chaos.verdict import PhaseResult, flat

BEYOND = 64  # connections past the limit they test
ZMQ_FLOOD_MAX = 8192  # a daemon allowed more descriptors is not flooded to its limit
CONNECT_SECONDS = 2.0
SETTLE_SECONDS = 1.0
RECOVERY_SECONDS = 10.0  # the daemon checks its descriptors every second


def run(target: Target, rng: random.Random, opts: Options) -> PhaseResult:
    result = PhaseResult("floods")
    path = socket_path(target.endpoint)
    if path is None:
        result.figures["skipped"] = "needs an ipc:// endpoint"
        return result
    before = target.footprint()
    name = target.components()[0]
    with _idle(fd_socket_path(path), MAX_CONNECTIONS + BEYOND) as n:
        result.figures["fd_socket_idle"] = n
        _attach(target, name, result, f"{n} idle connections were open on the fd socket")
    if target.death() is not None:
        result.count = n
        return result
    limit = target.nofile()
    for warm_up in (True, False):  # the first flood leaves libzmq's and malloc's caches warm
        with _idle(path, min(limit + BEYOND, ZMQ_FLOOD_MAX)) as n:
            result.figures.update(zmq_idle=n, daemon_nofile=limit)
            if target.death() is not None:
                result.fail(f"the daemon died while {n} idle connections were open")
        _ping(target, result, f"{n} idle connections had been closed", RECOVERY_SECONDS)
        time.sleep(SETTLE_SECONDS)
        if target.death() is not None:
            break
        if warm_up:
            before = target.footprint()
        else:
            flat(result, before, target.footprint())
    result.count = result.figures["fd_socket_idle"] + n
    return result


@contextmanager
def _idle(path: Path, n: int) -> Iterator[int]:
    """Up to ``n`` connections to the Unix socket ``path`` that never send a byte; how many
    were made (a connect the daemon does not take in time ends the flood)."""
    _allow_descriptors(n + 256)
    socks: list[socket.socket] = []
    try:
        while len(socks) < n and (sock := _connect(path)) is not None:
            socks.append(sock)
        time.sleep(SETTLE_SECONDS)  # for the daemon to accept the last ones
        yield len(socks)
    finally:
        for sock in socks:
            sock.close()


def _connect(path: Path) -> socket.socket | None:
    """A connection to ``path``, retried while its backlog is full (for at most
    :data:`CONNECT_SECONDS`); None if the daemon takes none."""
    deadline = time.monotonic() + CONNECT_SECONDS
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            sock.connect(str(path))
            return sock
        except BlockingIOError:  # the backlog is full: the daemon has yet to accept
            sock.close()
            if time.monotonic() > deadline:
                return None
            time.sleep(0.001)
        except OSError:
            sock.close()
            return None


def _attach(target: Target, name: str, result: PhaseResult, when: str) -> None:
    """An attach that fetches a descriptor from the fd socket (writable: a mapping of its own,
    never the one this process may have already)."""
    try:
        target.client.attachment(name, writable=True)
        target.client.detach(name)
    except WandError as e:
        result.fail(f"attaching {name} failed while {when}: {e.code}: {e}")


def _ping(target: Target, result: PhaseResult, when: str, within: float) -> None:
    """A new client's ping is answered within ``within`` seconds (retrying meanwhile)."""
    deadline = time.monotonic() + within
    while True:
        try:
            with Client(target.endpoint, timeout=FREEZE_SECONDS, name="chaos flood") as c:
                c.ping()
            return
        except WandError as e:
            if time.monotonic() > deadline:
                result.fail(f"a new client got no ping answered {within:g} s after {when}: {e}")
                return
            time.sleep(0.1)


def _allow_descriptors(n: int) -> None:
    """Raise this process's soft limit on descriptors to ``n`` if it is lower (up to the hard
    limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        wanted = n if hard == resource.RLIM_INFINITY else min(n, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
