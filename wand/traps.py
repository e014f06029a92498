"""Environments where GPU slabs cannot be shared, found before anything is allocated.

Each check is a pure function of environment strings or ``/proc`` text, so it is tested
without a GPU; :func:`check` reads the real ones. Findings are errors (the daemon refuses
GPU placement, a client refuses to map) except ``expandable_segments``, a warning: slabs
are plain ``cuMemAlloc`` allocations made outside PyTorch's caching allocator, so that
setting cannot change how they are exported (see docs/gpu.md).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

ALLOC_CONF_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
VISIBLE_VARS = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES")
PROC_FILES = ("/proc/sys/kernel/osrelease", "/proc/version")


def expandable_segments(env: Mapping[str, str]) -> str | None:
    """``VAR=value`` of the allocator setting that turns expandable segments on, if any."""
    for var in ALLOC_CONF_VARS:
        for option in env.get(var, "").split(","):
            key, _, value = option.partition(":")
            if key.strip() == "expandable_segments" and value.strip().lower() == "true":
                return f"{var}={env[var]}"
    return None


def wsl(proc_text: str) -> bool:
    """Does this kernel text (osrelease, /proc/version) say WSL? WSL2 has no CUDA IPC."""
    text = proc_text.lower()
    return "microsoft" in text or "wsl" in text


def mig(env: Mapping[str, str], uuids: Sequence[str] = ()) -> str | None:
    """What names a MIG instance (CUDA IPC does not work across MIG), if anything does."""
    for var in VISIBLE_VARS:
        if any(d.strip().startswith("MIG-") for d in env.get(var, "").split(",")):
            return f"{var}={env[var]}"
    return next((f"GPU {u}" for u in uuids if u.startswith("MIG-")), None)


def findings(env: Mapping[str, str], proc_text: str, uuids: Sequence[str] = ()) -> dict[str, str]:
    """``{"error"|"warning": message}`` for what this environment means for GPU slabs."""
    out = {}
    if wsl(proc_text):
        out["error"] = (
            "this kernel is WSL (" + proc_text.strip().splitlines()[0][:80] + "): WSL2 has no "
            "CUDA IPC, so GPU slabs cannot be shared; place components on 'cpu' here"
        )
    elif found := mig(env, uuids):
        out["error"] = (
            f"{found} names a MIG instance: CUDA IPC is not supported across MIG instances; "
            "use a whole GPU or place components on 'cpu'"
        )
    if found := expandable_segments(env):
        out["warning"] = (
            f"{found}: ignored for wand's slabs (plain cuMemAlloc allocations, not PyTorch's "
            "allocator); it only affects this process's own scratch memory"
        )
    return out


def check(uuids: Sequence[str] = ()) -> dict[str, str]:
    """:func:`findings` for this process's real environment."""
    return findings(os.environ, _proc_text(), uuids)


def _proc_text() -> str:
    parts = []
    for path in PROC_FILES:
        try:
            parts.append(Path(path).read_text())
        except OSError:
            continue
    return "\n".join(parts)
