"""Where a slab lives: device names, GPU UUIDs, and a process's own view of its GPUs.

Device indices are process-local (they depend on ``CUDA_VISIBLE_DEVICES``), so the daemon
resolves a name such as ``cuda:1`` to the GPU's UUID, and the wire carries the UUID; each
client maps it back to its own index. The parsing and mapping here are pure functions of
their inputs; only :func:`resolve` and :func:`visible_uuids` ask torch.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import cache

from wand.common.errors import DeviceError

_NAME = re.compile(r"^cuda(?::(\d+))?$")
_UUID = re.compile(r"^([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$")


@dataclass(frozen=True)
class Device:
    """A resolved placement: ``cpu``, or one GPU by its index here and its UUID everywhere."""

    name: str  # "cpu" or "cuda:N" (N: index in the daemon's process)
    uuid: str | None = None  # "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"
    model: str | None = None  # e.g. "NVIDIA H100 80GB HBM3"

    @property
    def index(self) -> int | None:
        return None if self.uuid is None else int(self.name.split(":")[1])


CPU = Device("cpu")


def parse(value: str) -> int | None:
    """``"cpu"`` → None, ``"cuda"`` → 0, ``"cuda:N"`` → N; anything else: ValueError."""
    if value == "cpu":
        return None
    m = _NAME.match(value)
    if not m:
        raise ValueError(f"device {value[:60]!r}: expected 'cpu', 'cuda' or 'cuda:N'")
    return int(m.group(1) or 0)


def canonical_uuid(raw: str) -> str:
    """torch prints a GPU UUID bare (``"58e5…"``), nvidia-smi with ``GPU-``: one form."""
    m = _UUID.match(raw.strip().lower().removeprefix("gpu-"))
    if not m:
        raise ValueError(f"not a GPU UUID: {raw!r}")
    return "GPU-" + m.group(1)


def local_index(uuid: str, visible: list[str], cuda_visible_devices: str | None) -> int:
    """This process's index of GPU ``uuid``, given the UUIDs it sees in index order."""
    if uuid in visible:
        return visible.index(uuid)
    shown = "unset" if cuda_visible_devices is None else repr(cuda_visible_devices)
    sees = ", ".join(visible) or "no GPU"
    raise DeviceError(
        f"the component lives on GPU {uuid}, which this process cannot see "
        f"(CUDA_VISIBLE_DEVICES={shown}; visible: {sees}); make that GPU visible to the client",
    )


def describe_missing(index: int, count: int, cuda_visible_devices: str | None) -> str:
    """Why ``cuda:index`` cannot be used by a process that sees ``count`` GPUs."""
    shown = "unset" if cuda_visible_devices is None else repr(cuda_visible_devices)
    if count == 0:
        return f"cuda:{index}: no CUDA GPU is visible (CUDA_VISIBLE_DEVICES={shown})"
    return (
        f"cuda:{index}: this process sees {count} GPU{'s' * (count != 1)} "
        f"(cuda:0..cuda:{count - 1}; CUDA_VISIBLE_DEVICES={shown})"
    )


def resolve(value: str) -> Device:
    """The device a configured name means in this process (raises DeviceError if there is none)."""
    index = parse(value)
    return CPU if index is None else _gpu(index)


@cache
def _gpu(index: int) -> Device:
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= count:
        raise DeviceError(describe_missing(index, count, os.environ.get("CUDA_VISIBLE_DEVICES")))
    props = torch.cuda.get_device_properties(index)
    return Device(f"cuda:{index}", canonical_uuid(str(props.uuid)), props.name)


def visible_uuids() -> list[str]:
    """UUIDs of the GPUs this process sees, in index order (empty without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [
        canonical_uuid(str(torch.cuda.get_device_properties(i).uuid))
        for i in range(torch.cuda.device_count())
    ]
