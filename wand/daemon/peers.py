"""Who sent a request: the process that opened its connection, as the kernel names it.

The kernel's credentials of a Unix socket connection (``SO_PEERCRED``, which libzmq reads
when it accepts one) are those of the process that called ``connect()``, and they stay on
the connection after that process has exited: a process may open a connection, hand it to
another (a parent that forked it, or over ``SCM_RIGHTS``) and exit, and once its pid is
another process's, everything sent there would be credited to that process. So the daemon
takes the opener's start time when the connection greets (ZeroMQ's ZAP handshake, which
runs for every connection before its first message) and writes it, with the pid and uid,
into the connection's ``User-Id``, which libzmq attaches to every message that connection
carries and the other side cannot set. A request is credited only to a live process with
that pid *and* that start time: the opener itself; a connection whose opener has exited
speaks for nobody.

What this leaves open: an opener that exits *before* greeting, whose pid another process
gets within the 5 s a connection has to greet (``HANDSHAKE_MS`` in the server); the
connection is then credited to that newcomer.
"""

from __future__ import annotations

import zmq

from wand.common import protocol
from wand.common.errors import WandError
from wand.common.process import start_time
from wand.daemon.processes import ClientProcess, ClientTable

ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # where libzmq asks (RFC 27), per context
DOMAIN = b"wand"


class Authenticator:
    """The ZAP handler: answers libzmq's question about each connection that greets."""

    def __init__(self, ctx: zmq.Context) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(ZAP_ENDPOINT)

    def serve_some(self) -> None:
        for _ in range(256):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) >= 8:  # identity, delimiter, version, id, domain, address, ...
                self.sock.send_multipart([*frames[:2], b"1.0", frames[3], *_verdict(frames[5])])

    def close(self) -> None:
        self.sock.close(linger=0)


def _verdict(address: bytes) -> list[bytes]:
    """Status, text, User-Id and metadata for a connection from ``address``: over ipc,
    ``localhost:UID:GID:PID`` (the kernel's credentials of the opener); an opener already
    gone is refused. Other transports have no credentials: no User-Id."""
    parts = address.decode("ascii", "replace").split(":")
    if len(parts) != 4 or parts[0] != "localhost" or not (parts[1] + parts[3]).isdigit():
        return [b"200", b"OK", b"", b""]
    uid, pid = int(parts[1]), int(parts[3])
    start = start_time(pid)
    if start is None:
        return [b"400", b"the process that opened the connection has exited", b"", b""]
    return [b"200", b"OK", f"{pid}:{uid}:{start}".encode(), b""]


def opener(frame: zmq.Frame) -> tuple[int, int | None, int | None]:
    """(uid, pid, start time) of the process that opened the connection ``frame`` came by;
    (-1, None, None) when the transport has no credentials (e.g. tcp://)."""
    try:
        user_id = frame.get("User-Id")
    except zmq.ZMQError:
        return -1, None, None
    parts = user_id.split(":") if isinstance(user_id, str) else []
    if len(parts) == 3 and all(p.isdigit() for p in parts):
        pid, uid, start = map(int, parts)
        return uid, pid, start
    return -1, None, None


class Peer:
    """Who sent a request: the process that opened the ipc connection, if it still runs
    (None over transports without credentials)."""

    def __init__(self, frame: zmq.Frame, start: object, clients: ClientTable) -> None:
        self.uid, pid, opened = opener(frame)
        if start is not None and (isinstance(start, bool) or not isinstance(start, int)):
            raise WandError(f"'start' must be an integer, got {protocol.short(start)}", "bad_args")
        self.start: int | None = start
        self.proc: ClientProcess | None = (
            clients.get(pid, self.uid, opened) if pid is not None else None
        )
        if self.proc is not None and start is not None and start != self.proc.start:
            raise WandError(
                f"'start' {start} is not the start time of process {pid}, which sent this "
                f"request ({self.proc.start})",
                "bad_args",
            )

    def needs_start(self) -> None:
        """Lease operations must say which process they come from, beyond its pid."""
        if self.start is None:
            raise WandError(
                "lease operations need 'start', the client process's start time "
                "(/proc/self/stat field 22), so that a reused pid inherits nothing",
                "bad_args",
            )

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None
