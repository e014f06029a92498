"""Logging: journald (structured) under systemd, stderr otherwise, and a ring buffer that
``wanctl logs`` reads through the daemon whichever way the daemon runs."""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any

from wand.daemon import systemd

FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


MAX_LINE = 2000  # characters of one message kept (and logged)


class RingBuffer(logging.Handler):
    """The last records, numbered, for clients to read and follow: at most ``size`` of them
    and ``max_bytes`` of messages in all, each message cut to :data:`MAX_LINE` characters."""

    def __init__(self, size: int = 2000, max_bytes: int = 1 << 20) -> None:
        super().__init__()
        self._records: collections.deque[dict[str, Any]] = collections.deque()
        self._size, self._max_bytes, self._bytes = size, max_bytes, 0
        self._seq = 0
        self._lock_ = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()[:MAX_LINE]
        with self._lock_:
            self._seq += 1
            self._records.append(
                {
                    "seq": self._seq,
                    "time": record.created,
                    "level": record.levelname,
                    "logger": record.name,
                    "message": message,
                }
            )
            self._bytes += len(message)
            while len(self._records) > self._size or self._bytes > self._max_bytes:
                self._bytes -= len(self._records.popleft()["message"])

    def since(self, seq: int, limit: int) -> list[dict[str, Any]]:
        with self._lock_:
            return [r for r in self._records if r["seq"] > seq][-limit:]


class _Bounded(logging.Formatter):
    """Every logged line cut to :data:`MAX_LINE` characters (client data can reach logs)."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record)[: MAX_LINE + 200]


def setup(level: str) -> RingBuffer:
    """Route the ``wand`` loggers; returns the ring buffer the daemon serves."""
    root = logging.getLogger("wand")
    root.setLevel(level)
    root.propagate = False
    journal = systemd.journal_handler() if systemd.under_journald() else None
    handler = journal or logging.StreamHandler()
    handler.setFormatter(_Bounded("%(message)s" if journal else FORMAT))
    ring = RingBuffer()
    for h in (handler, ring):
        root.addHandler(h)
    return ring


def render(record: dict[str, Any]) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record["time"]))
    return f"{stamp} {record['logger']} {record['level']} {record['message']}"
