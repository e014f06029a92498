"""A process's identity: its pid plus its start time, which a later process with the same
pid cannot share.

Clients send their start time with the requests that create or end leases; the daemon
compares it with the start time of the live process that has that pid, so a request sent by
a process that has since exited (and queued while its pid was given to another) is refused
instead of being credited to the newcomer.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

_own: tuple[int, int] | None = None  # (pid, start) of this process, recomputed after fork


def start_time(pid: int) -> int | None:
    """Clock ticks after boot at which ``pid`` started (``/proc/PID/stat`` field 22)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()  # after "pid (comm) ": comm may hold spaces
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def started_at() -> float:
    """When this process started, as ``time.time()`` would have said then (to 1/CLK_TCK)."""
    ticks = start_time(os.getpid()) or 0
    running = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    return time.time() - running


def own_start() -> int:
    global _own
    pid = os.getpid()
    if _own is None or _own[0] != pid:
        _own = (pid, start_time(pid) or 0)
    return _own[1]


def stop(proc: subprocess.Popen, grace: float = 20) -> int:
    """End a child: SIGTERM, then SIGKILL if it has not exited within ``grace`` seconds;
    its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
