"""Phase "messages": hostile requests over raw DEALER sockets, every reply counted.

Each of :data:`SOCKETS` sockets has one case in flight, so every reply is matched to the
case it answers. Beside them, per pass: requests over the transport limit on sockets of
their own (ZeroMQ must drop them: no reply), and an unread burst (a socket that sends
thousands of ``status`` requests and never reads). First the daemon's bounded keeps are
filled (its log ring, its allocator's room for the largest requests), then a warm-up pass;
the daemon's memory and descriptors after it and after the full pass must be the same.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import zmq

from wand.common import protocol
from wand.common.process import own_start
from wand.tools.chaos import Options
from wand.tools.chaos.hostile import Case, Daemon, Hostile
from wand.tools.chaos.target import Target
from wand.tools.chaos.verdict import PhaseResult, flat

SOCKETS = 8
REPLY_SECONDS = 10.0  # a case unanswered this long is a missing reply
DROP_SECONDS = 0.3  # how long an oversized request's socket is watched for a reply
BURST_MAX = 5000
SETTLE_SECONDS = 0.5  # before the daemon's footprint is read


@dataclass
class Tally:
    """The replies to hostile cases, counted; :meth:`report` makes them checks."""

    sent: int = 0
    replies: int = 0
    missing: int = 0
    internal: int = 0
    unexpected: int = 0
    dropped_sent: int = 0  # requests over the transport limit
    dropped_answered: int = 0  # ... that got a reply nonetheless
    burst_sent: int = 0  # unread requests
    outcomes: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def record(self, case: Case | None, frames: list[bytes] | None) -> None:
        """What came back for ``case``: its reply frames, or None if nothing did; a reply
        on a socket with no case in flight is a second reply to the last one."""
        if case is None:
            self.unexpected += 1
            self.problems.append(f"a reply no request was waiting for: {frames!r:.200}")
            return
        if frames is None:
            self.missing += 1
            self.problems.append(f"no reply within {REPLY_SECONDS:g} s to {case.describe()}")
            return
        self.replies += 1
        outcome, reply_id = _outcome(frames)
        self.outcomes[outcome] += 1
        if outcome == "internal":
            self.internal += 1
            self.problems.append(f"'internal' reply to {case.describe()}")
        elif outcome not in case.codes or reply_id not in (case.id, None):
            self.unexpected += 1
            self.problems.append(
                f"reply {outcome!r} (id {protocol.short(reply_id)}) to {case.describe()}; "
                f"expected one of {sorted(case.codes)}"
            )

    def report(self, result: PhaseResult) -> None:
        result.count = self.sent + self.dropped_sent + self.burst_sent
        result.figures.update(
            replies=f"{self.replies}/{self.sent}",
            internal=self.internal,
            unexpected=self.unexpected,
            missing=self.missing,
            transport_dropped=self.dropped_sent,
            unread_burst=self.burst_sent,
            outcomes=dict(self.outcomes.most_common()),
        )
        for problem in self.problems:
            result.fail(problem)
        result.check(
            self.dropped_answered == 0,
            f"{self.dropped_answered} of {self.dropped_sent} requests over the transport limit "
            f"({protocol.TRANSPORT_MAX_BYTES} bytes) were answered: they should be dropped",
        )


def _outcome(frames: list[bytes]) -> tuple[str, Any]:
    """(``"ok"``, an error code or ``"garbled"``; the reply's id)."""
    if len(frames) != 1:
        return "garbled", None
    try:
        reply = protocol.parse_reply(frames[0])
    except Exception:
        return "garbled", None
    if reply["ok"]:
        return "ok", reply["id"]
    error = reply.get("error")
    code = error.get("code") if isinstance(error, dict) else None
    return (code if isinstance(code, str) else "garbled"), reply["id"]


def run(target: Target, rng: random.Random, opts: Options) -> PhaseResult:
    messages = opts.messages
    result = PhaseResult("messages")
    names = Daemon(tuple(target.components()), tuple(target.checkpoints()), own_start())
    hostile, tally = Hostile(rng, names), Tally()
    warm = max(200, messages // 10)
    _pass(target, iter(hostile.priming()), 0, tally, rng)
    _pass(target, (hostile.next() for _ in range(warm)), warm, tally, rng)
    before = target.footprint()
    _pass(target, (hostile.next() for _ in range(messages)), messages, tally, rng)
    flat(result, before, target.footprint())
    tally.report(result)
    result.figures["warm_up"] = warm
    return result


def _pass(target: Target, cases: Iterator[Case], n: int, tally: Tally, rng: random.Random) -> None:
    """The ``cases`` and, at random points among the first ``n`` of them, an unread burst of
    ``n`` requests (at most :data:`BURST_MAX`) and ``max(1, n // 2000)`` requests over the
    transport limit; then what hostile attaches that happened to be valid took is given
    back, and the daemon is left to settle."""
    endpoint = target.endpoint
    burst: list[zmq.Socket] = []
    spots = [tally.sent + i for i in rng.sample(range(n), min(n, 1 + max(1, n // 2000)))]
    specials: dict[int, Callable[[], Any]] = {
        spot: lambda: _oversized(endpoint, rng, tally) for spot in spots[1:]
    }
    if spots:
        specials[spots[0]] = lambda: burst.append(_burst(endpoint, min(BURST_MAX, n), tally))
    _exchange(endpoint, cases, tally, specials)
    for sock in burst:
        sock.close(linger=0)
    _release_leases(target)
    time.sleep(SETTLE_SECONDS)


def _exchange(
    endpoint: str, cases: Iterator[Case], tally: Tally, specials: dict[int, Callable[[], Any]]
) -> None:
    """Send every case, one in flight per socket, and record what comes back for each;
    ``specials[k]`` runs just before the k-th case is sent."""
    socks = [_dealer(endpoint) for _ in range(SOCKETS)]
    poller = zmq.Poller()
    for sock in socks:
        poller.register(sock, zmq.POLLIN)
    inflight: dict[zmq.Socket, tuple[Case, float]] = {}
    more = True
    while more or inflight:
        for sock in socks:
            if more and sock not in inflight:
                case = next(cases, None)
                if case is None:
                    more = False
                    break
                specials.pop(tally.sent, _nothing)()
                sock.send_multipart(case.frames)
                inflight[sock] = (case, time.monotonic())
                tally.sent += 1
        for sock, _ in poller.poll(100):
            frames = sock.recv_multipart()
            tally.record(inflight.pop(sock)[0] if sock in inflight else None, frames)
        now = time.monotonic()
        for sock, (_, since) in list(inflight.items()):
            if now - since > REPLY_SECONDS:
                tally.record(inflight.pop(sock)[0], None)
                poller.unregister(sock)
                sock.close(linger=0)  # a late reply must not be taken for the next one's
                socks[socks.index(sock)] = fresh = _dealer(endpoint)
                poller.register(fresh, zmq.POLLIN)
    for sock in socks:
        sock.close(linger=0)


def _nothing() -> None:
    pass


def _oversized(endpoint: str, rng: random.Random, tally: Tally) -> None:
    """One request over the transport limit on a socket of its own: no reply may come."""
    sock = _dealer(endpoint)
    size = protocol.TRANSPORT_MAX_BYTES + rng.randint(1, 1 << 20)
    sock.send(protocol.request(0, "ping", {"pad": "x" * size}))
    tally.dropped_sent += 1
    if sock.poll(int(DROP_SECONDS * 1000)):
        tally.dropped_answered += 1
    sock.close(linger=0)


def _burst(endpoint: str, n: int, tally: Tally) -> zmq.Socket:
    """A socket that sends up to ``n`` requests and never reads (left open until the end
    of the pass, its replies piling up in the daemon)."""
    sock = _dealer(endpoint)
    sock.setsockopt(zmq.SNDTIMEO, 1000)
    for i in range(n):
        try:
            sock.send(protocol.request(i, "status"))
        except zmq.Again:  # the daemon stopped reading it, as it should
            break
        tally.burst_sent += 1
    return sock


def _dealer(endpoint: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def _release_leases(target: Target) -> None:
    """Detach what hostile attaches that happened to be valid took (this process's leases)."""
    for proc in target.client.ps():
        if proc["pid"] != os.getpid():
            continue
        for lease in proc["leases"]:
            for _ in range(lease["count"]):
                target.client.detach(lease["component"])
