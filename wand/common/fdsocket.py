"""The fd socket: where a client holding a lease fetches its slab's file descriptor.

ZeroMQ cannot carry file descriptors, so beside the ZeroMQ endpoint ``…/wand.sock`` the daemon
listens on a plain Unix stream socket ``…/wand.fds.sock`` (same directory, same mode and
group). An attach reply carries a one-time ticket; the client connects, sends
``WAND1 <ticket>\\n``, and gets back one msgpack map and, on success, the descriptor
(``SCM_RIGHTS``). The daemon checks the ticket against the kernel's credentials of the
connection (``SO_PEERCRED``): only the process the ticket was issued to gets the descriptor.

The daemon side never blocks: connections are non-blocking, read in the serving loop, and
dropped if they have not sent a ticket within two seconds. Connections that say nothing
cannot crowd out the others: past :data:`MAX_PER_UID` waiting connections of one user, or
:data:`MAX_CONNECTIONS` in all, the oldest one that has been silent for
:data:`SILENT_SECONDS` is dropped for the newcomer (a real client's ticket arrives within a
round trip of its connect), and a burst of young ones is let in up to :data:`CEILING`.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

from wand.common.errors import DaemonError, WandError

log = logging.getLogger("wand.common.fdsocket")
SUFFIX = ".fds.sock"
MAGIC = b"WAND1 "
MAX_LINE = 128
MAX_CONNECTIONS = 256  # waiting connections before silent ones are shed
MAX_PER_UID = 64  # waiting connections of one user before its silent ones are shed
CEILING = 1024  # waiting connections at all, however young
SILENT_SECONDS = 0.25  # a real client's ticket comes within a round trip of its connect
CONNECTION_SECONDS = 2.0  # a connection that has sent no ticket by then is dropped

# (pid, uid, ticket) → (descriptor to send or None, reply); the server closes the descriptor
Redeem = Callable[[int, int, str], tuple[int | None, dict[str, Any]]]


def fd_socket_path(zmq_socket: Path) -> Path:
    """``/run/wand/wand.sock`` → ``/run/wand/wand.fds.sock``."""
    return zmq_socket.with_name(zmq_socket.name.removesuffix(".sock") + SUFFIX)


class FdServer:
    """The daemon's side: a listening socket and the connections it has accepted."""

    def __init__(self, sock: socket.socket, redeem: Redeem) -> None:
        self.sock = sock
        self.sock.setblocking(False)
        self.redeem = redeem
        self._conns: dict[int, _Conn] = {}

    @classmethod
    def bind(cls, path: Path, redeem: Redeem, mode: int = 0o660) -> FdServer:
        path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o777 & ~mode)  # created with the right mode: no window
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        sock.listen(256)
        return cls(sock, redeem)

    def fds(self) -> list[int]:
        """Descriptors the serving loop polls for input: the listener and each connection."""
        return [self.sock.fileno(), *self._conns]

    def ready(self, fd: int) -> None:
        """Input on ``fd`` (the listener or a connection)."""
        if fd == self.sock.fileno():
            self._accept()
        elif fd in self._conns:
            self._read(self._conns[fd])

    def expire(self) -> None:
        late = time.monotonic() - CONNECTION_SECONDS
        for conn in [c for c in self._conns.values() if c.since < late]:
            self._drop(conn)

    def close(self) -> None:
        for conn in list(self._conns.values()):
            self._drop(conn)
        self.sock.close()

    def _accept(self) -> None:
        for _ in range(64):  # a batch per wake-up; the rest wait in the backlog
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and the like: try again later
                log.warning("fd socket: accept failed: %s", e)
                return
            sock.setblocking(False)
            uid = _credentials(sock)[1]
            if not self._make_room(uid):
                sock.close()
                continue
            conn = _Conn(sock, uid, time.monotonic())
            self._conns[sock.fileno()] = conn
            self._read(conn)  # the ticket often came with the connect

    def _make_room(self, uid: int) -> bool:
        """Room for one more waiting connection of ``uid``: shed the oldest silent one past
        a limit; refuse only past the ceiling."""
        mine = [c for c in self._conns.values() if c.uid == uid]
        crowd = mine if len(mine) >= MAX_PER_UID else list(self._conns.values())
        if len(mine) >= MAX_PER_UID or len(self._conns) >= MAX_CONNECTIONS:
            silent = time.monotonic() - SILENT_SECONDS
            oldest = next((c for c in crowd if c.since < silent), None)
            if oldest is not None:
                self._drop(oldest)
        return len(self._conns) < CEILING

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(MAX_LINE + 1 - len(conn.buf))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        conn.buf += data
        if not data or len(conn.buf) > MAX_LINE:
            self._drop(conn)
        elif conn.buf.endswith(b"\n"):
            self._answer(conn)

    def _answer(self, conn: _Conn) -> None:
        fd = None
        try:
            line = conn.buf.rstrip(b"\n")
            if not line.startswith(MAGIC):
                raise WandError("expected 'WAND1 <ticket>'", "bad_message")
            pid, uid = _credentials(conn.sock)
            fd, reply = self.redeem(pid, uid, line[len(MAGIC) :].decode("ascii", "replace"))
        except WandError as e:
            reply = {"ok": False, "error": {"code": e.code, "message": str(e)}}
        try:
            fds = [fd] if fd is not None else []
            socket.send_fds(conn.sock, [msgpack.packb(reply)], fds)
        except OSError as e:  # the client went away, or will not read: its loss
            log.debug("fd socket: reply not delivered: %s", e)
        finally:
            if fd is not None:
                os.close(fd)
            self._drop(conn)

    def _drop(self, conn: _Conn) -> None:
        self._conns.pop(conn.sock.fileno(), None)
        conn.sock.close()


class _Conn:
    def __init__(self, sock: socket.socket, uid: int, since: float) -> None:
        self.sock, self.uid, self.since, self.buf = sock, uid, since, b""


def _credentials(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end, as the kernel saw it at connect()."""
    pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return pid, uid


def fetch(path: Path, ticket: str, timeout: float, tries: int = 5) -> int:
    """The client's side: redeem ``ticket`` at the fd socket ``path`` for a descriptor; a
    connection the daemon shed under a flood is tried again (the ticket is not spent)."""
    for attempt in range(tries):
        try:
            return _fetch(path, ticket, timeout)
        except _Shed as e:
            why = e
            time.sleep(0.05 * 2**attempt)
    raise DaemonError(
        f"cannot fetch the slab at {path}: the daemon dropped the connection {tries} times ({why})",
        "unreachable",
    )


class _Shed(Exception):
    """The daemon closed the connection before answering."""


def _fetch(path: Path, ticket: str, timeout: float) -> int:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
            sock.sendall(MAGIC + ticket.encode("ascii") + b"\n")
            data, fds, _, _ = socket.recv_fds(sock, 1 << 16, 1, socket.MSG_CMSG_CLOEXEC)
        except (ConnectionResetError, BrokenPipeError) as e:
            raise _Shed(str(e)) from None
        except OSError as e:
            raise DaemonError(f"cannot fetch the slab at {path}: {e}", "unreachable") from None
    finally:
        sock.close()
    if not data:
        raise _Shed("closed without an answer")
    try:
        reply = msgpack.unpackb(data)
        if reply.get("ok") and len(fds) == 1:
            return fds[0]
        err = reply.get("error") or {"code": "internal", "message": "no descriptor came"}
    except Exception:
        err = {"code": "bad_message", "message": "the fd socket sent garbage"}
    for fd in fds:
        os.close(fd)
    raise DaemonError(err["message"], err["code"])
