"""What wand does differently under systemd: notify messages, inherited sockets, journald.

systemd-python is imported only here, and only when it is installed: without it the notify
messages are sent with a plain datagram socket (the protocol is one datagram of ``KEY=VALUE``
lines), and logs go to stderr.
"""

from __future__ import annotations

import array
import logging
import os
import socket
import time

log = logging.getLogger("wand.systemd")
SD_LISTEN_FDS_START = 3


class Notifier:
    """sd_notify(3): a no-op when the daemon was not started by systemd."""

    def __init__(self) -> None:
        self.socket_path = os.environ.get("NOTIFY_SOCKET")
        self._sock: socket.socket | None = None
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        mine = pid is None or pid == str(os.getpid())
        self.watchdog_interval = int(usec) / 2e6 if usec and mine else None
        self._last_ping = 0.0

    def send(self, fds: list[int] | None = None, **fields: object) -> None:
        """One notification; ``fds`` travel with it (``SCM_RIGHTS``, for ``FDSTORE=1``)."""
        if not self.socket_path:
            return
        message = "\n".join(f"{k}={v}" for k, v in fields.items())
        addr = self.socket_path
        if addr.startswith("@"):
            addr = "\0" + addr[1:]
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendmsg([message.encode()], rights, 0, addr)
        except OSError as e:
            log.warning("cannot notify systemd at %s: %s", self.socket_path, e)

    def status(self, text: str) -> None:
        self.send(STATUS=text)

    def ready(self, text: str) -> None:
        self.send(READY=1, STATUS=text)

    def extend_timeout(self, seconds: float) -> None:
        self.send(EXTEND_TIMEOUT_USEC=int(seconds * 1e6))

    def reloading(self) -> None:
        self.send(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self) -> None:
        self.send(STOPPING=1, STATUS="stopping")

    def failed(self, text: str, errno: int) -> None:
        self.send(STATUS=text, ERRNO=errno)

    def watchdog(self) -> None:
        """Ping the watchdog if half its interval has passed; call from the serving loop."""
        if self.watchdog_interval is None:
            return
        now = time.monotonic()
        if now - self._last_ping >= self.watchdog_interval:
            self.send(WATCHDOG=1)
            self._last_ping = now


def listen_fds() -> list[tuple[int, str]]:
    """The descriptors systemd passed us (sd_listen_fds_with_names(3)): sockets of socket
    activation and the fd store's entries, each with its name; marked close-on-exec."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = os.environ.get("LISTEN_FDS", "0")
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)  # not for our children
    fds = range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + (int(count) if count.isdigit() else 0))
    for fd in fds:
        os.set_inheritable(fd, False)
    return [(fd, names[i] if i < len(names) else "unknown") for i, fd in enumerate(fds)]


def socket_address(fd: int) -> str | None:
    """``ipc://PATH`` or ``tcp://HOST:PORT`` of an inherited listening socket; None when
    ``fd`` is not a socket."""
    try:
        s = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    try:
        if s.family == socket.AF_UNIX:
            name = s.getsockname()
            return f"ipc://{name.decode() if isinstance(name, bytes) else name}"
        host, port = s.getsockname()[:2]
        return f"tcp://{host}:{port}"
    finally:
        s.close()


def under_journald() -> bool:
    return bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))


def journal_handler() -> logging.Handler | None:
    """systemd-python's JournalHandler (structured fields), when installed."""
    try:
        from systemd.journal import JournalHandler
    except ImportError:
        return None
    return JournalHandler(SYSLOG_IDENTIFIER="wand")
