"""Leases: which live client processes map which residents.

A lease belongs to a process, not to a connection: tensors a client has mapped stay valid
after it closes its socket, so only an explicit detach, a forced unload, or the process's
exit ends a lease. Exit is seen through a pidfd, which becomes readable when the process
dies however it dies (normal exit, exception, SIGKILL) and cannot be fooled by pid reuse.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from wand.errors import WandError


@dataclass
class Lease:
    component: str  # the address it was attached by
    resident: int
    count: int = 0  # attaches minus detaches by this process
    since: float = field(default_factory=time.time)


@dataclass
class ClientProcess:
    pid: int
    uid: int
    name: str
    pidfd: int
    leases: dict[tuple[str, int], Lease] = field(default_factory=dict)


class LeaseTable:
    def __init__(self) -> None:
        self._procs: dict[int, ClientProcess] = {}

    def acquire(self, pid: int, uid: int, name: str, component: str, resident: int) -> Lease:
        proc = self._procs.get(pid) or self._track(pid, uid, name)
        lease = proc.leases.setdefault((component, resident), Lease(component, resident))
        lease.count += 1
        return lease

    def release(self, pid: int, component: str, current: int) -> bool:
        """Drop one attach of ``component`` by ``pid``, preferring the lease on the resident
        the address points at now; False if it held none."""
        proc = self._procs.get(pid)
        held = [k for k in (proc.leases if proc else {}) if k[0] == component]
        if not held:
            return False
        key = (component, current) if (component, current) in held else held[0]
        lease = proc.leases[key]
        lease.count -= 1
        if lease.count <= 0:
            del proc.leases[key]
        if not proc.leases:
            self._forget(pid)
        return True

    def revoke(self, residents: set[int]) -> list[ClientProcess]:
        """End every lease on ``residents``; returns the processes that lost one."""
        hit = []
        for proc in list(self._procs.values()):
            lost = [k for k in proc.leases if k[1] in residents]
            for k in lost:
                del proc.leases[k]
            if lost:
                hit.append(proc)
            if not proc.leases:
                self._forget(proc.pid)
        return hit

    def reap(self, pidfd: int) -> ClientProcess | None:
        """The process behind ``pidfd`` has exited: forget it and all it held."""
        for proc in self._procs.values():
            if proc.pidfd == pidfd:
                self._forget(proc.pid)
                return proc
        return None

    def holders(self, resident: int) -> list[ClientProcess]:
        return [p for p in self._procs.values() if any(k[1] == resident for k in p.leases)]

    def pidfds(self) -> list[int]:
        return [p.pidfd for p in self._procs.values()]

    def processes(self) -> list[ClientProcess]:
        return list(self._procs.values())

    def close(self) -> None:
        for pid in list(self._procs):
            self._forget(pid)

    def _track(self, pid: int, uid: int, name: str) -> ClientProcess:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:  # it died between sending the request and now
            raise WandError(f"client process {pid} has exited", "bad_args") from None
        proc = ClientProcess(pid, uid, name, pidfd)
        self._procs[pid] = proc
        return proc

    def _forget(self, pid: int) -> None:
        proc = self._procs.pop(pid)
        os.close(proc.pidfd)
