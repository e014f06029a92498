"""A one-line hint when a write into a read-only attach kills the process.

Attached tensors are views of the daemon's sealed memory, mapped read-only: writing one
(``param.add_(1)``, ``param.data.copy_(x)``) is a SIGSEGV, which ends the process and leaves
the bytes every other client sees unchanged. Without a word that looks like a crash of
torch. So the first read-only attach of a process installs a SIGSEGV handler (``sigaction``
through ctypes: a Python-level signal handler would run only after the faulting write
returned, which it never does) that looks up the faulting address in ``/proc/self/maps``;
when it lies in a wand slab (``/memfd:wand:<slab>``) it writes which one and what to do
instead. Then it puts back the handler that was there before (faulthandler's, or the
default) and returns: the write faults again and the process ends as it would have.

"Where it can": the handler runs Python, which is safe here only because the fault is a
plain store into mapped memory, not one inside the allocator; it needs the GIL, which torch
releases while it computes. ``WAND_SEGV_HINT=0`` leaves SIGSEGV alone.
"""

from __future__ import annotations

import ctypes
import os
import signal

SA_SIGINFO, SA_ONSTACK = 0x4, 0x08000000
SI_ADDR_OFFSET = 16  # siginfo_t on Linux: si_signo, si_errno, si_code, (pad), then si_addr
SLAB_PREFIX = "/memfd:wand:"


class _Sigaction(ctypes.Structure):  # glibc's struct sigaction
    _fields_ = [
        ("handler", ctypes.c_void_p),
        ("mask", ctypes.c_ulong * 16),  # sigset_t: 1024 bits
        ("flags", ctypes.c_int),
        ("restorer", ctypes.c_void_p),
    ]


_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_installed: dict[str, object] = {}  # keeps the callback and the previous action alive


def install() -> None:
    """Install the hint once per process (and again in a forked child, whose handler the
    parent's install covers already)."""
    if _installed or os.environ.get("WAND_SEGV_HINT") == "0":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    previous = _Sigaction()
    action = _Sigaction()
    callback = _HANDLER(_on_segv)
    action.handler = ctypes.cast(callback, ctypes.c_void_p).value
    action.flags = SA_SIGINFO | SA_ONSTACK
    if libc.sigaction(signal.SIGSEGV, ctypes.byref(action), ctypes.byref(previous)) != 0:
        return  # no hint, the same crash
    _installed.update(libc=libc, callback=callback, previous=previous)


def slab_at(address: int) -> str | None:
    """The wand slab mapped at ``address`` in this process, by its memfd name."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, _, rest = line.partition(" ")
            start, _, end = span.partition("-")
            if int(start, 16) <= address < int(end, 16):
                fields = rest.split(maxsplit=4)  # perms, offset, device, inode, path
                path = fields[4].strip() if len(fields) == 5 else ""
                if path.startswith(SLAB_PREFIX):
                    return path.removeprefix(SLAB_PREFIX).removesuffix(" (deleted)")
                return None
    return None


def _on_segv(signum: int, info: int, context: int) -> None:
    try:
        address = ctypes.c_void_p.from_address(info + SI_ADDR_OFFSET).value or 0
        slab = slab_at(address)
        if slab is not None:
            os.write(
                2,
                f"wand: a write into the read-only slab {slab} at {address:#x}: attached "
                "tensors are the daemon's memory, shared by every client; attach with "
                "writable=True for a private copy, or replace the parameter "
                "(module.weight = nn.Parameter(new))\n".encode(),
            )
    finally:
        previous = _installed["previous"]
        _installed["libc"].sigaction(signal.SIGSEGV, ctypes.byref(previous), None)
