"""The client processes the daemon knows: who they are, what they hold, what they are owed.

A process is known from the first request it sends (its pid comes from the kernel's peer
credentials of the connection) until it exits: the daemon takes a pidfd of it right away, so
everything kept about it — its name, its leases, its one-time fd tickets, a revocation it
has yet to hear of — belongs to that process and goes when it does, never to a later process
that happens to get the same pid.

A lease belongs to a process, not to a connection: tensors a client has mapped stay valid
after it closes its socket, so only an explicit detach, a forced unload, or the process's
exit ends a lease.
"""

from __future__ import annotations

import os
import secrets
import select
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from wand.common.errors import WandError
from wand.common.process import start_time

MAX_PROCESSES = 4096  # processes tracked at once
MAX_TICKETS = 64  # unredeemed fd tickets per process
TICKET_SECONDS = 30.0


@dataclass
class Lease:
    component: str  # the address it was attached by
    resident: int
    count: int = 0  # attaches minus detaches by this process
    since: float = field(default_factory=time.time)


@dataclass
class Ticket:
    """One right to fetch one slab's descriptor over the fd socket, once."""

    resident: int
    writable: bool
    expires: float


@dataclass
class ClientProcess:
    pid: int
    uid: int
    pidfd: int
    start: int | None  # process.start_time, read once the pidfd was open
    name: str = ""
    leases: dict[tuple[str, int], Lease] = field(default_factory=dict)
    tickets: OrderedDict[str, Ticket] = field(default_factory=OrderedDict)
    revoked: str | None = None  # why its leases were taken away, until it has been told

    def alive(self) -> bool:
        poller = select.poll()  # (not select(): pidfds may be numbered above FD_SETSIZE)
        poller.register(self.pidfd, select.POLLIN)
        return not poller.poll(0)

    def idle(self) -> bool:
        return not (self.leases or self.tickets or self.revoked)


class ClientTable:
    def __init__(self, max_processes: int = MAX_PROCESSES) -> None:
        self._procs: OrderedDict[int, ClientProcess] = OrderedDict()  # least recently seen first
        self.max_processes = max_processes

    def get(self, pid: int, uid: int, start: int | None = None) -> ClientProcess:
        """The process ``pid`` (of ``uid``) that sent a request now; tracked from now on.

        ``start`` is the start time the request says its sender has: a request queued by a
        process that exited before it was read, whose pid another process has now, is
        refused rather than credited to that other process.
        """
        proc = self._procs.get(pid)
        if proc is not None and (proc.uid != uid or not proc.alive()):
            self._forget(proc)  # an exited process whose pid was given to another
            proc = None
        if proc is None:
            proc = self._track(pid, uid)
        self._procs.move_to_end(pid)
        if start is not None and start != proc.start:
            raise WandError(
                f"the process that sent this request (pid {pid}, started at {start}) has "
                "exited; that pid now belongs to another process",
                "bad_args",
            )
        return proc

    def acquire(self, proc: ClientProcess, component: str, resident: int) -> Lease:
        lease = proc.leases.setdefault((component, resident), Lease(component, resident))
        lease.count += 1
        return lease

    def release(self, proc: ClientProcess, component: str, current: int) -> bool:
        """Drop one attach of ``component``, preferring the lease on the resident the address
        points at now; False if it held none."""
        held = [k for k in proc.leases if k[0] == component]
        if not held:
            return False
        key = (component, current) if (component, current) in held else held[0]
        lease = proc.leases[key]
        lease.count -= 1
        if lease.count <= 0:
            del proc.leases[key]
        return True

    def revoke(self, residents: set[int], why: str) -> list[ClientProcess]:
        """End every lease and ticket on ``residents``; returns the processes that lost one."""
        hit = []
        for proc in self._procs.values():
            lost = [k for k in proc.leases if k[1] in residents]
            for k in lost:
                del proc.leases[k]
            for t in [t for t, v in proc.tickets.items() if v.resident in residents]:
                del proc.tickets[t]
            if lost:
                proc.revoked = why
                hit.append(proc)
        return hit

    def issue(self, proc: ClientProcess, resident: int, writable: bool) -> str:
        """A one-time ticket for ``proc`` to fetch ``resident``'s descriptor."""
        while len(proc.tickets) >= MAX_TICKETS:
            proc.tickets.popitem(last=False)
        ticket = secrets.token_hex(16)
        proc.tickets[ticket] = Ticket(resident, writable, time.monotonic() + TICKET_SECONDS)
        return ticket

    def redeem(self, pid: int, uid: int, ticket: str) -> Ticket:
        """The ticket ``ticket`` presented by process ``pid`` of ``uid`` (kernel credentials
        of the fd socket connection); it is spent. Anything else is refused."""
        proc = self._procs.get(pid)
        found = proc.tickets.pop(ticket, None) if proc is not None else None
        if proc is None or found is None or proc.uid != uid or not proc.alive():
            raise WandError("no such ticket for this process", "forbidden")
        if found.expires < time.monotonic():
            raise WandError("the ticket has expired; attach again", "forbidden")
        if not any(k[1] == found.resident for k in proc.leases):
            raise WandError("this process no longer holds that lease", "not_attached")
        return found

    def reap(self, pidfd: int) -> ClientProcess | None:
        """The process behind ``pidfd`` has exited: forget it and all it held."""
        for proc in self._procs.values():
            if proc.pidfd == pidfd:
                self._forget(proc)
                return proc
        return None

    def expire(self) -> None:
        now = time.monotonic()
        for proc in self._procs.values():
            for t in [t for t, v in proc.tickets.items() if v.expires < now]:
                del proc.tickets[t]

    def holders(self, resident: int) -> list[ClientProcess]:
        return [p for p in self._procs.values() if any(k[1] == resident for k in p.leases)]

    def leaseholders(self) -> list[ClientProcess]:
        return [p for p in self._procs.values() if p.leases]

    def pidfds(self) -> list[int]:
        return [p.pidfd for p in self._procs.values()]

    def __len__(self) -> int:
        return len(self._procs)

    def close(self) -> None:
        for proc in list(self._procs.values()):
            self._forget(proc)

    def _track(self, pid: int, uid: int) -> ClientProcess:
        if len(self._procs) >= self.max_processes:
            idle = next((p for p in self._procs.values() if p.idle()), None)
            if idle is None:
                raise WandError(
                    f"the daemon already tracks {self.max_processes} client processes", "busy"
                )
            self._forget(idle)
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:  # it died between sending the request and now
            raise WandError(f"client process {pid} has exited", "bad_args") from None
        except OSError as e:
            raise WandError(f"cannot watch client process {pid}: {e.strerror}", "busy") from None
        proc = ClientProcess(pid, uid, pidfd, start_time(pid))
        if not proc.alive():  # the start time read may be another process's
            os.close(pidfd)
            raise WandError(f"client process {pid} has exited", "bad_args")
        self._procs[pid] = proc
        return proc

    def _forget(self, proc: ClientProcess) -> None:
        if self._procs.get(proc.pid) is proc:
            del self._procs[proc.pid]
        os.close(proc.pidfd)
