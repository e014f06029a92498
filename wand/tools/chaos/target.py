"""The daemon under test: one the suite starts on a tiny checkpoint, or a running one, and a
watchdog that keeps asking it for a ``ping``."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from wand.client.connection import Client
from wand.common import process
from wand.common.errors import WandError
from wand.tools import bench
from wand.tools.chaos.verdict import Footprint, PhaseResult

READY_SECONDS = 120.0
FREEZE_SECONDS = 2.0  # a ping not answered within this is a freeze
PING_EVERY = 0.1
SETTLE_SECONDS = 10.0  # for the daemon to see its clients exit
# the suite's own daemon may open as many descriptors as systemd's default soft limit allows
# (the units raise it to 65536): the floods phase reaches it with ~1000 connections
DAEMON_NOFILE = 1024


class Target:
    """A daemon to torment, and a work folder with the tiny checkpoint the suite writes."""

    def __init__(self, endpoint: str | None) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="wand-chaos-"))  # short: ipc paths ≤ 107 bytes
        self.checkpoint = self.work / "tiny"
        self.owned = endpoint is None
        self.endpoint = endpoint or f"ipc://{self.work}/wand.sock"
        self.log = self.work / "daemon.log"
        self.proc: subprocess.Popen | None = None
        self._client: Client | None = None
        self.pid = 0

    def start(self) -> None:
        """Write the tiny checkpoint, start the daemon if it is ours, wait until it is ready."""
        from wand.wan import write_tiny

        write_tiny(self.checkpoint, "t2v-A14B", "original")
        self._serve()

    def restart(self) -> None:
        """A daemon of the suite's own that died is started again (its log kept aside)."""
        self.client.close()
        self.log.rename(self.log.with_suffix(f".{self.pid}.log"))
        self._serve()

    def _serve(self) -> None:
        if self.owned:
            self.proc = _start(self.checkpoint, self.endpoint, self.log)
        self._client = self._wait_ready()
        self.pid = self.client.status()["daemon"]["pid"]
        try:
            Footprint.of(self.pid)  # fails here, not in a phase, if /proc does not show it
        except OSError as e:
            raise WandError(
                f"cannot watch the daemon (pid {self.pid}) in /proc: {e.strerror}; run the "
                "suite on the daemon's machine, as its user or root",
                "forbidden",
            ) from None

    @property
    def client(self) -> Client:
        if self._client is None:
            raise RuntimeError("Target.start() first")
        return self._client

    def status(self) -> dict[str, Any]:
        return self.client.status()

    def components(self) -> list[str]:
        return [c["name"] for c in self.status()["components"]]

    def checkpoints(self) -> list[str]:
        return [c["name"] for c in self.status()["checkpoints"]]

    def footprint(self) -> Footprint:
        return Footprint.of(self.pid)

    def nofile(self) -> int:
        """The daemon's soft limit on open descriptors."""
        for line in Path(f"/proc/{self.pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return int(line.split()[3])
        raise RuntimeError(f"/proc/{self.pid}/limits has no open files limit")

    def death(self) -> str | None:
        """How the daemon died, or None while it lives."""
        if self.proc is not None:
            code = self.proc.poll()
            if code is None:
                return None
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
            return f"daemon died ({how}); its log ends: {self.log_tail()}"
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return f"daemon pid {self.pid} is gone"
        return None

    def tracebacks(self) -> int:
        """Tracebacks in the log of a daemon the suite started (0 for a running one)."""
        return self.log.read_text(errors="replace").count("Traceback") if self.owned else 0

    def log_tail(self, lines: int = 4) -> str:
        if not self.owned:
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])[-1000:]

    def settle(self, before: dict[str, Any], result: PhaseResult) -> dict[str, Any]:
        """Wait until the daemon has no more lease holders and tracks no more processes
        than it did ``before`` (``status()["daemon"]``), as it must once the clients of a
        phase have exited (fewer: some it tracked before have exited too); the daemon's
        figures now."""
        keys = ("clients", "tracked")
        deadline = time.monotonic() + SETTLE_SECONDS
        while True:
            now = self.status()["daemon"]
            if all(now[k] <= before[k] for k in keys) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        for k in keys:
            result.check(
                now[k] <= before[k],
                f"daemon {k} {now[k]} after the phase's clients exited, {before[k]} before",
            )
        return now

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        if self.proc is not None:
            process.stop(self.proc)
        shutil.rmtree(self.work, ignore_errors=True)

    def _wait_ready(self) -> Client:
        deadline = time.monotonic() + READY_SECONDS
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise WandError(f"the daemon exited at start: {self.log_tail()}", "failed")
            try:
                client = Client(self.endpoint, timeout=10, name="wanctl chaos")
                if all(c["state"] == "ready" for c in client.status()["components"]):
                    return client
                client.close()
            except WandError:
                if not self.owned or time.monotonic() > deadline:
                    raise
            time.sleep(0.1)


def _start(checkpoint: Path, endpoint: str, log: Path) -> subprocess.Popen:
    proc = bench.start_daemon(checkpoint, endpoint, log)
    _, hard = resource.prlimit(proc.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (min(DAEMON_NOFILE, hard), hard))
    return proc


class Watchdog:
    """A client that pings the daemon all along; a ping unanswered within
    :data:`FREEZE_SECONDS` is a freeze. :meth:`lap` reports since the previous lap."""

    def __init__(self, endpoint: str) -> None:
        self._client = Client(endpoint, timeout=FREEZE_SECONDS, name="wanctl chaos watchdog")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._lap: dict[str, Any] = _empty_lap()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
        self._thread.start()

    def lap(self) -> dict[str, Any]:
        with self._lock:
            lap, self._lap = self._lap, _empty_lap()
        return lap

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._client.close()

    def _run(self) -> None:
        while not self._stop.wait(PING_EVERY):
            start = time.monotonic()
            try:
                self._client.ping()
                froze = None
            except WandError as e:
                froze = str(e)
            seconds = time.monotonic() - start
            if froze is None and seconds > FREEZE_SECONDS:
                froze = f"ping answered after {seconds:.1f} s"
            with self._lock:
                self._lap["pings"] += 1
                self._lap["max_ping_ms"] = max(self._lap["max_ping_ms"], round(seconds * 1e3, 1))
                if froze is not None:
                    self._lap["freezes"].append(f"{time.strftime('%H:%M:%S')}: {froze}")


def _empty_lap() -> dict[str, Any]:
    return {"pings": 0, "max_ping_ms": 0.0, "freezes": []}
