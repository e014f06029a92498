"""``wanctl chaos``: a seeded reliability suite that torments a daemon and counts.

Phases, each in a module of its own: ``messages`` (hostile requests), ``kills`` (clients
SIGKILLed at every stage of their work), ``attach`` (many clients attaching at once),
``files`` (broken checkpoints) and ``floods`` (idle connections by the thousand). Around
every phase a watchdog pings the daemon (a ping unanswered within 2 s is a freeze), and the
daemon must be alive at its end with no new traceback in its log; a daemon of the suite's
own that died is started again for the next phase. Like the benchmark, this is a tool around
the library: nothing in the daemon or the client imports it.
"""

from __future__ import annotations

import argparse
import importlib
import random
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from wand.tools.chaos.verdict import PhaseResult

if TYPE_CHECKING:
    from wand.tools.chaos.target import Target, Watchdog

PHASES = ("messages", "kills", "attach", "files", "floods")


@dataclass(frozen=True)
class Options:
    seed: int = 0
    messages: int = 10_000
    kills: int = 1000
    clients: int = 64
    seconds: float = 60.0
    only: tuple[str, ...] = PHASES
    endpoint: str | None = None  # a running daemon instead of one the suite starts

    @classmethod
    def of(cls, args: argparse.Namespace) -> Options:
        """From ``wanctl chaos``'s arguments (phases in their usual order, each once)."""
        only = tuple(p for p in PHASES if p in (args.only or PHASES))
        return cls(
            args.seed, args.messages, args.kills, args.clients, args.seconds, only, args.endpoint
        )


def positive(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def seconds(text: str) -> float:
    """An argparse type: a duration above 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def run(opts: Options) -> dict[str, Any]:
    """Every phase of ``opts.only``, in order; the result is what ``--json`` prints."""
    from wand.tools.chaos import forked
    from wand.tools.chaos.target import Target, Watchdog

    started = time.monotonic()
    forked.context()  # the fork server imports while the daemon starts
    target = Target(opts.endpoint)
    try:
        target.start()
        watchdog = Watchdog(target.endpoint)
        try:
            results = [_phase(name, target, watchdog, opts) for name in opts.only]
        finally:
            watchdog.close()
    finally:
        target.close()
    return {
        "seed": opts.seed,
        "endpoint": opts.endpoint or "(own daemon)",
        "seconds": round(time.monotonic() - started, 1),
        "passed": all(r.passed for r in results),
        "phases": [r.to_json() for r in results],
    }


def _phase(name: str, target: Target, watchdog: Watchdog, opts: Options) -> PhaseResult:
    """One phase, inside the checks every phase gets: no freeze, no death, no traceback."""
    if target.death() is not None:
        if not target.owned:
            return PhaseResult(name, failures=["not run: the daemon is dead"])
        target.restart()  # the phase that killed it has said so
    rng = random.Random(f"{opts.seed}:{name}")  # --only gives a phase the same cases
    tracebacks = target.tracebacks()
    watchdog.lap()
    start = time.monotonic()
    try:
        result = _runner(name)(target, rng, opts)
    except Exception as e:  # a phase that cannot go on is a failure, not a crash of the suite
        result = PhaseResult(name, failures=[f"the phase stopped: {type(e).__name__}: {e}"])
    result.figures["seconds"] = round(time.monotonic() - start, 1)
    lap = watchdog.lap()
    death = target.death()
    result.figures.update(
        deaths=int(death is not None),
        freezes=len(lap["freezes"]),
        max_ping_ms=lap["max_ping_ms"],
    )
    if death is not None:
        result.fail(death)
    for freeze in lap["freezes"]:
        result.fail(f"freeze: {freeze}")
    new = target.tracebacks() - tracebacks
    result.check(new == 0, f"{new} new tracebacks in the daemon's log: {target.log_tail()}")
    return result


def _runner(name: str) -> Callable[[Target, random.Random, Options], PhaseResult]:
    """A phase module's ``run(target, rng, opts)``."""
    return importlib.import_module(f"wand.tools.chaos.{name}").run


# --- the table --------------------------------------------------------------------------

HIDDEN = {"outcomes", "kill_points", "cases"}  # too long for the table: --json has them


def render(result: dict[str, Any]) -> str:
    rows = [("PHASE", "COUNT", "FAILURES", "RESULT", "FIGURES")]
    for p in result["phases"]:
        figures = ", ".join(f"{k} {_figure(v)}" for k, v in p["figures"].items() if k not in HIDDEN)
        failures = len(p["failures"]) + p["more_failures"]
        rows.append((p["phase"], str(p["count"]), str(failures), _verdict(p["passed"]), figures))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    indent = sum(widths) + 8
    lines = []
    for row in rows:
        head = "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False))
        wrapped = textwrap.wrap(row[4], max(40, 110 - indent)) or [""]
        lines.append(f"{head}  {wrapped[0]}")
        lines += [" " * indent + more for more in wrapped[1:]]
    for p in result["phases"]:
        lines += [f"FAIL {p['phase']}: {f}" for f in p["failures"]]
        if p["more_failures"]:
            lines.append(f"FAIL {p['phase']}: ... and {p['more_failures']} more")
    lines.append(f"seed {result['seed']}, {result['seconds']} s: {_verdict(result['passed'])}")
    return "\n".join(lines)


def _figure(value: Any) -> str:
    if isinstance(value, list) and len(value) == 2:
        return f"{value[0]} -> {value[1]}"
    return str(value)


def _verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"
