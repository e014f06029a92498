"""systemd's side of the notify protocol and of the file descriptor store, for tests and the
benchmark (nothing the daemon or clients import).

A :class:`NotifyHost` binds a datagram socket for ``NOTIFY_SOCKET``, records every message,
keeps the descriptors sent with ``FDSTORE=1`` under their ``FDNAME=``, drops them on
``FDSTOREREMOVE=1``, and starts a service the way systemd restarts one: with the stored
descriptors (and any sockets) at 3, 4, … and ``LISTEN_FDS``, ``LISTEN_FDNAMES`` and
``LISTEN_PID`` set. ``python -m wand.tools.notifyhost CMD...`` is the small launcher that puts the
descriptors in place and sets ``LISTEN_PID`` to its own pid before it becomes ``CMD``.
"""

from __future__ import annotations

import array
import fcntl
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

LAUNCH_FDS = "NOTIFYHOST_FDS"  # "fd=name,fd=name": what the launcher puts at 3, 4, ...


class NotifyHost:
    def __init__(self, store_max: int = 4096) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="notify-"))
        self.path = str(self.dir / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.store_max = store_max
        self.messages: list[str] = []
        self.stored: dict[str, int] = {}  # FDNAME → descriptor, in the order they came

    def env(self) -> dict[str, str]:
        """What a service started under this host gets (FDSTORE as systemd ≥ 254 sets it)."""
        return {"NOTIFY_SOCKET": self.path, "FDSTORE": str(self.store_max)}

    def receive(self, timeout: float = 0.1) -> bool:
        """Take one message if one comes within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            data, ancdata, _, _ = self.sock.recvmsg(1 << 16, socket.CMSG_SPACE(64 * 4))
        except TimeoutError:
            return False
        fds = array.array("i")
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        message = data.decode()
        self.messages.append(message)
        self._store(message, list(fds))
        return True

    def collect(self, until: Callable[[list[str]], bool], timeout: float = 60.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.receive()
            if until(self.messages):
                return self.messages
        raise AssertionError(f"notify messages so far: {self.messages}")

    def gather(self, seconds: float) -> list[str]:
        """Record whatever arrives in the next ``seconds``."""
        end = time.monotonic() + seconds
        return self.collect(lambda _: time.monotonic() >= end, timeout=seconds + 1)

    def drain(self) -> None:
        while self.receive(0.05):
            pass

    def without_watchdog(self) -> list[str]:
        return [m for m in self.messages if m != "WATCHDOG=1"]

    def start(
        self, cmd: list[str], log: Path, env: dict[str, str] | None = None, **popen
    ) -> subprocess.Popen:
        """Start ``cmd`` as systemd restarts a service: the stored descriptors passed."""
        self.drain()
        named = list(self.stored.items())
        launch = {LAUNCH_FDS: ",".join(f"{fd}={name}" for name, fd in named)}
        with open(log, "ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "wand.tools.notifyhost", *cmd],
                env={**os.environ, **self.env(), **(env or {}), **launch},
                pass_fds=[fd for _, fd in named],
                stdout=out,
                stderr=subprocess.STDOUT,
                **popen,
            )

    def forget(self) -> None:
        """What systemd does on ``systemctl stop``: the store is emptied."""
        for fd in self.stored.values():
            os.close(fd)
        self.stored.clear()

    def close(self) -> None:
        self.forget()
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _store(self, message: str, fds: list[int]) -> None:
        fields = dict(line.split("=", 1) for line in message.splitlines() if "=" in line)
        name = fields.get("FDNAME", "stored")
        if fields.get("FDSTOREREMOVE") == "1":
            if name in self.stored:
                os.close(self.stored.pop(name))
        elif fields.get("FDSTORE") == "1" and len(self.stored) + len(fds) <= self.store_max:
            for fd in fds:
                os.set_inheritable(fd, False)
                if name in self.stored:
                    os.close(self.stored.pop(name))
                self.stored[name] = fd
            return
        for fd in fds:  # not kept (systemd closes what it does not store)
            os.close(fd)


def _launch(cmd: list[str]) -> None:
    """Put the descriptors of ``$NOTIFYHOST_FDS`` at 3, 4, … and become ``cmd``."""
    pairs = [p.split("=", 1) for p in os.environ.pop(LAUNCH_FDS, "").split(",") if p]
    floor = 3 + 2 * len(pairs) + 64  # above every source and target number
    high = []
    for fd, _ in pairs:  # out of the way of the targets first
        high.append(fcntl.fcntl(int(fd), fcntl.F_DUPFD_CLOEXEC, max(floor, int(fd) + 1)))
        os.close(int(fd))
    for target, fd in enumerate(high, start=3):
        os.dup2(fd, target, inheritable=True)
        os.close(fd)
    if pairs:
        os.environ.update(
            LISTEN_FDS=str(len(pairs)),
            LISTEN_FDNAMES=":".join(name for _, name in pairs),
            LISTEN_PID=str(os.getpid()),
        )
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    _launch(sys.argv[1:])
