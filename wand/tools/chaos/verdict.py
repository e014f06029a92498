"""What a phase found: its count, its figures and the checks that failed."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RSS_MARGIN = 5 << 20  # bytes a flat daemon may still grow by (allocator noise)
FD_MARGIN = 3  # descriptors likewise
MAX_FAILURES = 20  # failures kept per phase, described; the rest are counted


@dataclass
class PhaseResult:
    phase: str
    count: int = 0  # what the phase did: messages sent, processes killed, attaches...
    figures: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    more_failures: int = 0  # failures beyond MAX_FAILURES

    def check(self, ok: bool, failure: str) -> bool:
        """Record ``failure`` unless ``ok``; returns ``ok``."""
        if not ok:
            self.fail(failure)
        return ok

    def fail(self, failure: str) -> None:
        if len(self.failures) < MAX_FAILURES:
            self.failures.append(failure)
        else:
            self.more_failures += 1

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


@dataclass(frozen=True)
class Footprint:
    """The daemon's resident memory and descriptors (from /proc)."""

    rss: int  # bytes
    fds: int
    slabs: int  # memfd descriptors named wand:... (one per slab)

    @classmethod
    def of(cls, pid: int) -> Footprint:
        return cls(_rss(pid), *_descriptors(pid))


def flat(result: PhaseResult, before: Footprint, after: Footprint, slabs: bool = True) -> None:
    """Check that the daemon did not grow from ``before`` to ``after``; record both."""
    result.figures["rss_mb"] = [round(before.rss / 2**20, 1), round(after.rss / 2**20, 1)]
    result.figures["fds"] = [before.fds, after.fds]
    result.check(
        after.rss - before.rss <= RSS_MARGIN,
        f"daemon memory grew from {before.rss / 2**20:.1f} MB to {after.rss / 2**20:.1f} MB",
    )
    result.check(
        after.fds - before.fds <= FD_MARGIN,
        f"daemon descriptors grew from {before.fds} to {after.fds}",
    )
    if slabs:
        result.check(
            after.slabs == before.slabs, f"daemon slabs went from {before.slabs} to {after.slabs}"
        )


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS")


def _descriptors(pid: int) -> tuple[int, int]:
    """(all descriptors, slab memfds) of process ``pid``."""
    fds = slabs = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        fds += 1
        try:
            slabs += os.readlink(fd).startswith("/memfd:wand:")
        except OSError:  # closed while we looked
            pass
    return fds, slabs
