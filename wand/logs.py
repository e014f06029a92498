"""Logging: journald (structured) under systemd, stderr otherwise, and a ring buffer that
``wanctl logs`` reads through the daemon whichever way the daemon runs."""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any

from wand import systemd

FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


class RingBuffer(logging.Handler):
    """The last ``size`` records, numbered, for clients to read and follow."""

    def __init__(self, size: int = 2000) -> None:
        super().__init__()
        self._records: collections.deque[dict[str, Any]] = collections.deque(maxlen=size)
        self._seq = 0
        self._lock_ = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock_:
            self._seq += 1
            self._records.append(
                {
                    "seq": self._seq,
                    "time": record.created,
                    "level": record.levelname,
                    "logger": record.name,
                    "message": record.getMessage(),
                }
            )

    def since(self, seq: int, limit: int) -> list[dict[str, Any]]:
        with self._lock_:
            return [r for r in self._records if r["seq"] > seq][-limit:]


def setup(level: str) -> RingBuffer:
    """Route the ``wand`` loggers; returns the ring buffer the daemon serves."""
    root = logging.getLogger("wand")
    root.setLevel(level)
    root.propagate = False
    journal = systemd.journal_handler() if systemd.under_journald() else None
    handler = journal or logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s" if journal else FORMAT))
    ring = RingBuffer()
    for h in (handler, ring):
        root.addHandler(h)
    return ring


def render(record: dict[str, Any]) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record["time"]))
    return f"{stamp} {record['logger']} {record['level']} {record['message']}"
