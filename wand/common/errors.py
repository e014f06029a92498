"""Errors that cross the wire carry a stable code; these are the Python faces of them."""

from __future__ import annotations


def listed(names: list[str], n: int = 5) -> str:
    """The first ``n`` of ``names`` for an error message: ``"a, b, c and 4 more"``."""
    if not names:
        return "none"
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


class WandError(Exception):
    """Base of every wand error; ``code`` is the stable protocol error code."""

    code = "internal"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class CheckpointError(WandError):
    """A checkpoint folder or file that cannot be loaded as it is."""

    code = "checkpoint"


class ProtocolError(WandError):
    """A message that does not follow protocol v1."""

    code = "bad_message"


class DaemonError(WandError):
    """The daemon answered a request with an error reply."""


class ConnectError(WandError):
    """No daemon answered at the endpoint."""

    code = "unreachable"


class DeviceError(WandError):
    """A placement this process cannot use: no such GPU, or no VMM and POSIX-fd handles."""

    code = "device"


class BindError(WandError):
    """A module skeleton could not be bound to the attached tensors."""

    code = "bind"


class Cancelled(WandError):
    """A component was unloaded while it was being loaded; the loader frees its slab."""


class LoraError(WandError, ValueError):
    """A LoRA that cannot go onto a pipeline: unreadable, or not matching its layers."""

    code = "lora"
