"""Client processes forked from one parent that has imported torch, the client library,
wanctl and the diffusers/transformers classes already: a victim starts in milliseconds, not
the 3-7 s a fresh interpreter spends importing."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext
from multiprocessing.process import BaseProcess
from typing import Any

_context: ForkServerContext | None = None


def context() -> ForkServerContext:
    """The fork server, started on first use (its imports then run beside whatever this
    process does next)."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(["wand.tools.chaos.preload"])
        from multiprocessing import forkserver

        forkserver.ensure_running()
    return _context


def start(target: Callable[..., Any], *args: Any) -> tuple[BaseProcess, Connection]:
    """Run ``target(*args, conn)`` in a forked process; returns it and the other end of
    ``conn`` (a duplex pipe)."""
    ours, theirs = context().Pipe()
    proc = context().Process(target=target, args=(*args, theirs), daemon=True)
    proc.start()
    theirs.close()
    return proc, ours


def kill(proc: BaseProcess) -> None:
    proc.kill()
    proc.join()
