"""Starting a script in the warm client: the caller's side of ``wanctl run`` and ``wand.run``.

This side imports neither torch nor the model libraries: it finds (or starts) the warm process
of this user, daemon and Python (:mod:`wand.client.warm`), hands it the script's argv, working
folder, environment, umask and its own stdin/stdout/stderr (as descriptors), forwards the
signals it gets to the script's process, and exits with the script's status. The script's
process is a child of the warm process; it writes straight to the caller's terminal or pipes.

Messages are msgpack maps on a Unix ``SOCK_SEQPACKET`` connection (descriptors ride with them
as ``SCM_RIGHTS``): the request, then ``{"pid": N}`` with a pidfd of the script's process, then
``{"exit": CODE}`` or ``{"signal": N}`` — sent by the warm process when it reaps the script, or
by the script itself as it exits (so a warm process that dies meanwhile loses nothing).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack

from wand.common import sockdir
from wand.common.endpoint import resolve, runtime_dir
from wand.common.version import __version__

PROTOCOL = 1
MAX_MESSAGE = 1 << 20  # a request: argv and environment
START_SECONDS = 30.0  # for a new warm process to listen (it imports the libraries after)
FORWARDED = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
    signal.SIGCONT,
)


class Unavailable(Exception):
    """No warm process can run this script; the message says why."""


def socket_path(endpoint: str) -> Path:
    """Where the warm process for ``endpoint`` and this Python listens: one per user (the
    runtime folder is the user's), daemon, interpreter and library version."""
    key = [endpoint, sys.executable, os.environ.get("PYTHONPATH", ""), __version__]
    digest = hashlib.blake2b(json.dumps(key).encode(), digest_size=6).hexdigest()
    return runtime_dir() / f"warm-{digest}.sock"


def connect(
    endpoint: str | None = None, start: bool = True, preload: tuple[str, ...] = ()
) -> socket.socket:
    """A connection to the warm process for ``endpoint``, started first if there is none
    (raises :class:`Unavailable`); a new one imports the modules ``preload`` names too (the
    caller's own, such as ``wanctl.cli``)."""
    path = socket_path(resolve(endpoint, client=True))
    _private_folder(path.parent)
    sock = try_connect(path)
    if sock is not None or not start:
        if sock is None:
            raise Unavailable(f"no warm client at {path}")
        return sock
    proc = _spawn(resolve(endpoint, client=True), path, preload)
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        sock = try_connect(path)
        if sock is not None:
            return sock
        if proc.poll() == 0:  # another held the lock: one starting, or one that was stopping
            time.sleep(0.1)
            proc = _spawn(resolve(endpoint, client=True), path, preload)
        elif proc.poll() is not None:
            raise Unavailable(f"the warm client exited at start ({path.with_suffix('.log')})")
        time.sleep(0.02)
    raise Unavailable(f"the warm client did not start listening within {START_SECONDS:g} s")


def run(sock: socket.socket, argv: list[str], timings: dict[str, float] | None = None) -> int:
    """Run ``argv`` (``[SCRIPT, ARGS…]``, ``["-m", MODULE, ARGS…]`` or ``["-c", CODE, ARGS…]``)
    in the warm process behind ``sock``; the script's exit status (a script killed by a
    signal kills this process with the same signal)."""
    request = {
        "v": PROTOCOL,
        "argv": argv,
        "cwd": os.getcwd(),
        "env": dict(os.environ),
        "umask": _umask(),
        "timings": timings or {},
    }
    data = msgpack.packb(request)
    if len(data) > MAX_MESSAGE:
        raise Unavailable(f"the environment and arguments are over {MAX_MESSAGE} bytes")
    stdio = [_usable(fd) for fd in (0, 1, 2)]
    with _forwarding() as forwarding:  # from now on: a Ctrl-C is the script's, not ours
        try:
            socket.send_fds(sock, [data], stdio)
        except OSError as e:
            raise Unavailable(f"the warm client did not take the script: {e.strerror}") from None
        finally:
            for fd, own in zip(stdio, (0, 1, 2), strict=True):
                if fd != own:
                    os.close(fd)
        while True:  # the script may report its end before the warm client its pid
            try:
                message, fds = receive(sock)
            except OSError:
                message, fds = {}, []
            if fds:
                forwarding.to(fds[0])
            if "exit" in message:
                return int(message["exit"])
            if "signal" in message:
                _die_by(int(message["signal"]))
            if "error" in message or (not message and forwarding.pidfd is None):
                raise Unavailable(str(message.get("error", "the warm client closed at once")))
            if not message:
                print(
                    "wand: the warm client and the script are gone; the script's exit status "
                    "is unknown",
                    file=sys.stderr,
                )
                return 1


def plain(argv: list[str], why: str) -> None:
    """Run ``argv`` the ordinary way, in place of this process, after saying why (once)."""
    print(f"wand: {why}; running without the warm client", file=sys.stderr)
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *argv])


def _private_folder(folder: Path) -> None:
    """The runtime folder: created 0700, and refused unless it is this user's alone."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.stat(folder)
    except OSError as e:
        raise Unavailable(f"cannot use {folder}: {e.strerror}") from None
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise Unavailable(
            f"{folder} is not this user's private folder (uid {st.st_uid}, mode "
            f"{stat.S_IMODE(st.st_mode):04o})"
        )
    mine = sockdir.Trust(frozenset({0, os.geteuid()}), f"root or you (uid {os.geteuid()})")
    problem = sockdir.folder_problem(folder.parent, mine)  # could anyone swap it for theirs?
    if problem:
        raise Unavailable(problem)


def try_connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.connect(str(path))
        return sock
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None


def _spawn(endpoint: str, path: Path, preload: tuple[str, ...]) -> subprocess.Popen:
    """Start the warm process in a session of its own; its log is ``<socket>.log``."""
    cmd = [sys.executable, "-m", "wand.client.warm", "--endpoint", endpoint, str(path)]
    cmd += [f"--preload={name}" for name in preload]
    with open(path.with_suffix(".log"), "ab") as log:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )


def receive(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """One message and its descriptors; ``{}`` once the connection has ended."""
    data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 4)
    if not data:
        for fd in fds:
            os.close(fd)
        return {}, []
    message = msgpack.unpackb(data)
    return (message if isinstance(message, dict) else {}), fds


def _usable(fd: int) -> int:
    """``fd`` if it is open, else a descriptor of /dev/null to stand for it."""
    try:
        os.fstat(fd)
        return fd
    except OSError:
        return os.open(os.devnull, os.O_RDWR)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _forwarding:
    """While active, the signals a terminal or a supervisor sends this process go to the
    script's process instead (Ctrl-Z stops both; ``fg`` continues both). Signals that come
    before the script's process is known wait for it; without one they are this process's
    again."""

    def __init__(self) -> None:
        self.pidfd: int | None = None
        self.pending: list[int] = []
        self.saved: dict[int, Any] = {}

    def __enter__(self) -> _forwarding:
        for sig in FORWARDED:
            self.saved[sig] = signal.signal(sig, self._forward)
        self.saved[signal.SIGTSTP] = signal.signal(signal.SIGTSTP, self._stop)
        return self

    def to(self, pidfd: int) -> None:
        """The script's process is known: what came meanwhile goes to it."""
        self.pidfd = pidfd
        for sig in self.pending:
            self._send(sig)
        self.pending.clear()

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
        if self.pidfd is not None:
            os.close(self.pidfd)
        for sig in self.pending:  # no script came: a Ctrl-C meanwhile was meant for us
            os.kill(os.getpid(), sig)

    def _forward(self, sig: int, _frame: object) -> None:
        if self.pidfd is None:
            self.pending.append(sig)
        else:
            self._send(sig)

    def _send(self, sig: int) -> None:
        try:
            signal.pidfd_send_signal(self.pidfd, sig)
        except ProcessLookupError:
            pass  # it has exited: its status is on the way

    def _stop(self, sig: int, frame: object) -> None:
        self._forward(sig, frame)
        if self.pidfd is not None:
            os.kill(os.getpid(), signal.SIGSTOP)


def _die_by(sig: int) -> None:
    """Exit as the script did: killed by ``sig`` (without a core file of this process)."""
    sys.stdout.flush()
    sys.stderr.flush()
    resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
    os.kill(os.getpid(), sig)
    os._exit(128 + sig)  # a signal that does not kill (it was caught or ignored before)


def main(
    argv: list[str],
    endpoint: str | None = None,
    timings: dict[str, float] | None = None,
    preload: tuple[str, ...] = (),
) -> int:
    """``wanctl run`` / ``python -m wand.run``: ``argv`` in the warm client, or plainly when
    there can be none (``WAND_WARM=0`` asks for that)."""
    if not argv or argv[0] in ("-m", "-c") and len(argv) < 2:
        raise Unavailable("nothing to run: give SCRIPT [ARGS...], -m MODULE or -c CODE")
    if os.environ.get("WAND_WARM") == "0":
        os.execv(sys.executable, [sys.executable, *argv])
    try:
        with connect(endpoint, preload=preload) as sock:
            return run(sock, argv, timings)
    except (Unavailable, OSError) as e:  # (before the script started: it runs once)
        plain(argv, str(e))
