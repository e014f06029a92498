"""Phase "attach": ``--clients`` processes attaching and detaching every component for
``--seconds``; every attach must succeed in time. The figures are attach latencies (state
dicts: the request, the views; the mapping is made once per process)."""

from __future__ import annotations

import random
import time
from multiprocessing.connection import Connection, wait
from typing import Any

from wand.client.connection import connect
from wand.common.errors import ConnectError, WandError
from wand.tools.chaos import Options, forked
from wand.tools.chaos.target import Target
from wand.tools.chaos.verdict import PhaseResult

CLIENT_TIMEOUT = 10.0  # an attach not answered within this is a timeout
START_SECONDS = 0.05  # per client, to fork them all and connect before the clock starts


def run(target: Target, rng: random.Random, opts: Options) -> PhaseResult:
    result = PhaseResult("attach")
    names = target.components()
    before = target.status()["daemon"]
    begin = time.monotonic() + 1 + START_SECONDS * opts.clients
    end = begin + opts.seconds
    procs = [
        forked.start(attacher, target.endpoint, names, begin, end) for _ in range(opts.clients)
    ]
    reports = _collect([conn for _, conn in procs], end + 2 * CLIENT_TIMEOUT, result)
    for proc, conn in procs:
        proc.join(CLIENT_TIMEOUT)
        conn.close()
    latencies = sorted(t for r in reports for t in r["latencies"])
    errors = sum(r["errors"] for r in reports)
    timeouts = sum(r["timeouts"] for r in reports)
    for r in reports:
        for problem in r["problems"]:
            result.fail(problem)
    result.count = len(latencies)
    result.figures.update(
        processes=opts.clients,
        errors=errors,
        timeouts=timeouts,
        p50_ms=_ms(latencies, 0.5),
        p99_ms=_ms(latencies, 0.99),
        max_ms=_ms(latencies, 1.0),
        attaches_per_s=round(len(latencies) / opts.seconds),
    )
    result.check(errors == 0, f"{errors} attaches or detaches failed")
    result.check(timeouts == 0, f"{timeouts} attaches or detaches timed out")
    result.check(bool(latencies), "no attach succeeded")
    after = target.settle(before, result)
    result.figures["clients"] = [before["clients"], after["clients"]]
    result.figures["tracked"] = [before["tracked"], after["tracked"]]
    return result


def _collect(conns: list[Connection], deadline: float, result: PhaseResult) -> list[dict]:
    reports: list[dict] = []
    waiting = list(conns)
    while waiting and time.monotonic() < deadline:
        for conn in wait(waiting, timeout=max(0.0, deadline - time.monotonic())):
            waiting.remove(conn)
            try:
                reports.append(conn.recv())
            except EOFError:
                result.fail("an attaching client died without reporting")
    result.check(not waiting, f"{len(waiting)} attaching clients did not report in time")
    return reports


def _ms(sorted_seconds: list[float], q: float) -> float | None:
    if not sorted_seconds:
        return None
    return round(
        sorted_seconds[min(len(sorted_seconds) - 1, int(q * len(sorted_seconds)))] * 1e3, 2
    )


def attacher(endpoint: str, names: list[str], begin: float, end: float, conn: Connection) -> None:
    """From ``begin`` to ``end`` (monotonic clock, the same in every process): attach and
    detach each of ``names`` in turn; report the attach latencies and what went wrong."""
    report: dict[str, Any] = {"latencies": [], "errors": 0, "timeouts": 0, "problems": []}
    try:
        with connect(endpoint, timeout=CLIENT_TIMEOUT, name="chaos attacher") as c:
            time.sleep(max(0.0, begin - time.monotonic()))
            while time.monotonic() < end:
                for name in names:
                    _attach_detach(c, name, report)
    except WandError as e:
        _failed(report, e)
    conn.send(report)


def _attach_detach(c: Any, name: str, report: dict[str, Any]) -> None:
    start = time.perf_counter()
    try:
        c.attach(name)
        report["latencies"].append(time.perf_counter() - start)
        c.detach(name)
    except WandError as e:
        _failed(report, e)


def _failed(report: dict[str, Any], e: WandError) -> None:
    report["timeouts" if isinstance(e, ConnectError) else "errors"] += 1
    if len(report["problems"]) < 3:
        report["problems"].append(f"{e.code}: {e}")
