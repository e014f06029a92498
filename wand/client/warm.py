"""The warm client: scripts start with the libraries imported and the modules built.

One long-lived process per user, daemon and Python (``python -m wand.client.warm``, started by
:mod:`wand.client.launch` on first use, gone after :data:`IDLE_SECONDS` without a script). It
has imported torch, diffusers and transformers, is connected to the daemon, and holds a module
for every resident CPU component, bound to its mapping. Each script it is given runs in a child
forked from it: the child gets the caller's argv, working folder, environment, umask and stdio,
and ``wand.connect()``, ``c.module()`` and ``c.pipeline()`` in it return at once
(:mod:`wand.client.prebuilt`). The child takes leases of its own; this process holds mappings
and no lease (``wand/slabs/LIFETIME.md``), so it never keeps an unload waiting.

Before each fork it asks the daemon what it holds: a component that was reloaded, unloaded or
loaded since is rebuilt or dropped first, so no script sees stale weights. What makes forking
safe: this process never initialises CUDA (a child maps GPU slabs itself) and runs torch on one
thread (an OpenMP pool started here would hang every forked child; each child gets the thread
count a fresh process would have); the client, slab and driver layers reset their locks in
children (``os.register_at_fork``); the heap is frozen before forking (``gc.freeze``), so no
child's collection writes to the pages it inherited. A child that crashes or leaks is only
itself: this process reaps it and reports its status.
"""

from __future__ import annotations

import argparse
import atexit
import fcntl
import gc
import importlib
import io
import logging
import os
import runpy
import select
import signal
import socket
import struct
import sys
import threading
import time
import traceback
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import msgpack

from wand.client import launch, prebuilt
from wand.common.endpoint import socket_path
from wand.common.errors import WandError

log = logging.getLogger("wand.client.warm")
IDLE_SECONDS = float(os.environ.get("WAND_WARM_IDLE", 900))
REFRESH_SECONDS = 30.0  # while idle: let go of what the daemon unloaded
REQUEST_SECONDS = 5.0  # for a launcher to send its request once connected


@dataclass
class _Child:
    pid: int
    conn: socket.socket  # to its launcher


class Warm:
    def __init__(
        self, endpoint: str, listener: socket.socket, preload: tuple[str, ...] = ()
    ) -> None:
        self.endpoint = endpoint
        self.preload = preload
        self.listener = listener
        self.children: dict[int, _Child] = {}  # pidfd → child
        self.held: dict[str, str] = {}  # address → slab token of its module in prebuilt
        self.client: Any = None
        self.threads = 1  # torch's thread count in a fresh process here
        self.started = time.time()

    def prepare(self) -> None:
        """Import the libraries and build what the daemon holds."""
        import torch

        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)
        from diffusers import (  # noqa: F401  (pipelines import these lazily)
            UniPCMultistepScheduler,
            WanImageToVideoPipeline,
            WanPipeline,
        )
        from diffusers.utils import export_to_video  # noqa: F401  (what wanctl generate uses)
        from peft.tuners.lora import LoraLayer  # noqa: F401  (what LoRAs on pipelines use)
        from PIL import Image  # noqa: F401

        from wand.client import pipeline  # noqa: F401  (with diffusers' pipelines)
        from wand.wan.modules import resolve_class
        from wand.wan.tasks import TEXT_ENCODER, TRANSFORMER, VAE

        for cls in (TEXT_ENCODER, TRANSFORMER, VAE):
            resolve_class(cls)
        for name in self.preload:  # what its starter's scripts import (wanctl's, say)
            importlib.import_module(name)
        self.refresh()

    def refresh(self) -> None:
        """Bring the modules in line with what the daemon holds now: build the new ones, drop
        those whose slab changed or went. Without a daemon there is nothing to hold."""
        status = self._status()
        ready = {
            c["name"]: (c["slab"], c["device"])
            for c in (status or {}).get("components", [])
            if c["state"] == "ready" and c["class"] != "wand:lora"
        }
        for address, token in list(self.held.items()):
            if ready.get(address, (None,))[0] != token:
                prebuilt.drop(token)
                del self.held[address]
        for address in ready.keys() - self.held.keys():
            self._build(address, on_gpu=ready[address][1] != "cpu")
        if status is not None:
            self._pipeline_parts(status)
        gc.collect()
        gc.freeze()

    def _status(self) -> dict[str, Any] | None:
        from wand.client.connection import Client

        try:
            if self.client is None:
                self.client = Client(self.endpoint, name="wand warm client")
            return self.client.status()
        except WandError as e:
            log.info("no daemon at %s (%s): holding nothing", self.endpoint, e)
            if self.client is not None:
                self.client.close()
            self.client = None
            return None

    def _build(self, address: str, on_gpu: bool) -> None:
        """A CPU component's module, bound to its mapping; a GPU component's skeleton only
        (mapping it would initialise CUDA here: each script maps and binds it itself)."""
        from wand.wan.modules import skeleton

        try:
            if on_gpu:
                reply = self.client.request("attach", name=address)  # its manifest, unmapped
                man, token = reply["manifest"], str(reply["handle"]["token"])
                prebuilt.put_skeleton(token, skeleton(man["cls"], man["config"]))
            else:
                att = self.client.attachment(address)
                token, built = att.slab, att.module()
                prebuilt.put(token, built)
            self.client.detach(address)  # the mapping stays; the lease is each script's
        except WandError as e:
            log.warning("%s: not built ahead (%s)", address, e)
            return
        self.held[address] = token
        log.info("%s %s ahead (slab %s)", address, "skeleton" if on_gpu else "built", token)

    def _pipeline_parts(self, status: dict[str, Any]) -> None:
        """Each checkpoint's tokenizer and scheduler, for ``c.pipeline()`` in the scripts."""
        from wand.client.pipeline import ahead

        for ckpt in status.get("checkpoints", []):
            try:
                ahead(ckpt)
            except (OSError, ValueError, KeyError) as e:
                log.warning("pipeline parts of %s not made ahead: %s", ckpt["name"], e)

    # --- serving --------------------------------------------------------------------------

    def serve(self) -> None:
        """Run scripts until idle for :data:`IDLE_SECONDS` (or told to stop)."""
        poller = select.poll()
        poller.register(self.listener, select.POLLIN)
        last_use = last_refresh = time.monotonic()
        while True:
            for fd, _ in poller.poll(1000):
                if fd == self.listener.fileno():
                    if self._accept(poller) == "stop":
                        return
                    last_use = last_refresh = time.monotonic()
                elif fd in self.children:
                    self._reap(poller, fd)
                    last_use = time.monotonic()
                else:
                    self._launcher_gone(poller, fd)
            now = time.monotonic()
            if not self.children and now - last_use > IDLE_SECONDS:
                log.info("idle for %.0f s: stopping", now - last_use)
                return
            if not self.children and self._daemon_gone():
                log.info("the daemon's socket folder is gone: stopping")
                return
            if now - last_refresh > REFRESH_SECONDS:
                self.refresh()
                last_refresh = now

    def _daemon_gone(self) -> bool:
        """The daemon's socket folder no longer exists: that daemon is gone for good (a
        restart keeps the folder), and holding the libraries for it would only keep memory
        until the idle timeout."""
        path = socket_path(self.endpoint)
        return path is not None and not path.parent.exists()

    def _accept(self, poller: select.poll) -> str | None:
        conn, _ = self.listener.accept()
        try:
            uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
            conn.settimeout(REQUEST_SECONDS)
            request, fds = launch.receive(conn)
            conn.settimeout(None)
        except OSError as e:
            log.warning("dropped a connection: %s", e)
            conn.close()
            return None
        if uid != os.geteuid():
            return self._refuse(conn, fds, f"this warm client serves uid {os.geteuid()} only")
        if request.get("v") != launch.PROTOCOL:
            return self._refuse(
                conn, fds, f"protocol {request.get('v')!r} is not {launch.PROTOCOL}"
            )
        op = request.get("op", "run")
        if op == "status":
            conn.sendall(msgpack.packb(self._describe()))
            conn.close()
            return None
        if op == "stop":
            conn.sendall(msgpack.packb({"stopping": True}))
            conn.close()
            return "stop"
        if len(fds) != 3:
            return self._refuse(conn, fds, "expected the caller's stdin, stdout and stderr")
        self.refresh()
        self._fork(poller, conn, request, fds)
        return None

    def _refuse(self, conn: socket.socket, fds: list[int], why: str) -> None:
        for fd in fds:
            os.close(fd)
        try:
            conn.sendall(msgpack.packb({"error": why}))
        except OSError:
            pass
        conn.close()

    def _describe(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "endpoint": self.endpoint,
            "since": self.started,
            "modules": sorted(self.held),
            "scripts": len(self.children),
        }

    def _fork(
        self, poller: select.poll, conn: socket.socket, request: dict[str, Any], fds: list[int]
    ) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _Script(self, conn, request, fds).run()
        for fd in fds:
            os.close(fd)
        pidfd = os.pidfd_open(pid)
        try:
            socket.send_fds(conn, [msgpack.packb({"pid": pid})], [pidfd])
        except OSError:
            pass  # the launcher is gone already: its script goes too, below
        self.children[pidfd] = _Child(pid, conn)
        poller.register(pidfd, select.POLLIN)
        poller.register(conn, select.POLLIN)  # the launcher's end closing: see _reap

    def _launcher_gone(self, poller: select.poll, conn_fd: int) -> None:
        """A launcher's end closed before its script ended (it was killed): the script goes
        with it, as a command's own process would."""
        poller.unregister(conn_fd)
        for pidfd, child in self.children.items():
            if child.conn.fileno() == conn_fd:
                log.debug("the command of script %d has closed: ending the script", child.pid)
                try:
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def _reap(self, poller: select.poll, pidfd: int) -> None:
        child = self.children.pop(pidfd)
        _, status = os.waitpid(child.pid, 0)
        if os.WIFSIGNALED(status):
            message = {"signal": os.WTERMSIG(status)}
        else:
            message = {"exit": os.waitstatus_to_exitcode(status)}
        try:
            child.conn.sendall(msgpack.packb(message))
        except OSError:
            pass
        poller.unregister(pidfd)
        try:
            poller.unregister(child.conn)
        except KeyError:
            pass  # its launcher went first
        child.conn.close()
        os.close(pidfd)


class _Script:
    """What runs in the forked child: the caller's script, in the caller's surroundings."""

    def __init__(
        self, warm: Warm, conn: socket.socket, request: dict[str, Any], fds: list[int]
    ) -> None:
        self.warm, self.conn, self.request, self.fds = warm, conn, request, fds

    def run(self) -> NoReturn:
        code, sig = 1, None
        try:
            self._surroundings()
            code, sig = _execute(list(self.request["argv"]))
        except BaseException:  # noqa: BLE001  (nothing may escape into the warm's loop)
            traceback.print_exc()
        finally:
            self._report(code, sig)

    def _surroundings(self) -> None:
        os.setsid()  # its own session: signals for the warm's group never reach it
        self.warm.listener.close()
        for fd, child in self.warm.children.items():
            child.conn.close()
            os.close(fd)
        for sig in launch.FORWARDED + (signal.SIGTSTP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for target, fd in enumerate(self.fds):
            os.dup2(fd, target)
            if fd > 2:
                os.close(fd)
        env = self.request["env"]
        os.environ.clear()
        os.environ.update(env)
        _reopen_stdio(bool(env.get("PYTHONUNBUFFERED")))
        os.chdir(self.request["cwd"])
        os.umask(int(self.request["umask"]))
        import torch

        threads = env.get("OMP_NUM_THREADS", "")
        torch.set_num_threads(
            int(threads) if threads.isdigit() and int(threads) > 0 else self.warm.threads
        )
        _reseed()
        atexit._clear()
        prebuilt.launched.update(self.request.get("timings") or {}, forked=time.time())

    def _report(self, code: int, sig: int | None) -> NoReturn:
        """Tell the launcher how the script ended (the warm process may be gone), then end
        the same way."""
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        try:
            self.conn.sendall(msgpack.packb({"signal": sig} if sig else {"exit": code}))
        except OSError:
            pass
        if sig:
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)
        os._exit(code)


def _execute(argv: list[str]) -> tuple[int, int | None]:
    """Run ``argv`` as ``python`` would in ``__main__``: (exit code, signal to die by)."""
    code, sig = 0, None
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            sys.path[0] = os.getcwd()
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        elif argv[0] == "-c":
            sys.argv = ["-c", *argv[2:]]
            sys.path[0] = ""
            main = sys.modules["__main__"] = types.ModuleType("__main__")
            exec(compile(argv[1], "<string>", "exec"), main.__dict__)
        else:
            sys.argv = list(argv)
            sys.path[0] = str(Path(argv[0]).resolve().parent)
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        code = _exit_code(e.code)
    except KeyboardInterrupt as e:
        traceback.print_exception(_from_script(e))
        sig = signal.SIGINT  # as CPython ends on an uncaught KeyboardInterrupt
    except BaseException as e:  # noqa: BLE001
        e = _from_script(e)
        sys.excepthook(type(e), e, e.__traceback__)
        code = 1
    threading._shutdown()  # join the script's threads, as the interpreter does at exit
    atexit._run_exitfuncs()
    return code, sig


def _from_script(e: BaseException) -> BaseException:
    """``e`` with its traceback from the script's first frame on, as ``python`` shows it
    (without this module's frames and runpy's)."""
    ours = (__file__, runpy.run_path.__code__.co_filename)
    tb = e.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename in ours:
        tb = tb.tb_next
    return e.with_traceback(tb)


def _exit_code(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, int):
        return value & 0xFF
    print(value, file=sys.stderr)
    return 1


def _reopen_stdio(unbuffered: bool) -> None:
    """Text streams over descriptors 0-2 (now the caller's), buffered as Python buffers them
    for what they are: line by line on a terminal and for stderr."""
    sys.stdin = sys.__stdin__ = io.TextIOWrapper(
        io.BufferedReader(io.FileIO(0, "r", closefd=False)), encoding="utf-8"
    )
    for fd, name in ((1, "stdout"), (2, "stderr")):
        stream = io.TextIOWrapper(
            io.BufferedWriter(io.FileIO(fd, "w", closefd=False)),
            encoding="utf-8",
            errors="backslashreplace" if fd == 2 else "strict",
            line_buffering=fd == 2 or os.isatty(fd),
            write_through=unbuffered,
        )
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


def _reseed() -> None:
    """Every child must not draw the same "random" numbers: Python's random reseeds itself
    after a fork; numpy's legacy global generator does not."""
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()


def _listen(path: Path) -> socket.socket:
    """Listen at ``path`` (0600), replacing a stale socket. One warm process per path: it
    holds ``<path>.lock`` while it lives, and a second one exits quietly."""
    lock = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(0) from None
    path.unlink(missing_ok=True)  # stale: its warm process let go of the lock
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(64)
    return sock


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m wand.client.warm", description=__doc__.split("\n")[0]
    )
    p.add_argument("--endpoint", required=True)
    p.add_argument("socket", type=Path)
    p.add_argument("--preload", action="append", default=[], help="also import this module")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    listener = _listen(args.socket)  # first: launchers wait in the backlog while we import
    warm = Warm(args.endpoint, listener, tuple(args.preload))
    try:
        warm.prepare()
        log.info("ready: %s", ", ".join(sorted(warm.held)) or "no components")
        warm.serve()
    finally:
        listener.close()
        args.socket.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
