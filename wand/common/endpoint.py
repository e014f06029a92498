"""Where the daemon listens: ``WAND_ENDPOINT``, else a Unix socket under the runtime directory."""

from __future__ import annotations

import os
from pathlib import Path

ENV = "WAND_ENDPOINT"
SYSTEM_SOCKET = "/run/wand/wand.sock"


def default_endpoint(client: bool = False) -> str:
    """The endpoint the daemon, ``wanctl`` and the client library agree on.

    A client of a non-root user whose own runtime socket does not exist falls back to the
    system daemon's socket, so members of group ``wand`` need no configuration.
    """
    explicit = os.environ.get(ENV)
    if explicit:
        return explicit
    if os.geteuid() == 0:
        return f"ipc://{SYSTEM_SOCKET}"
    user = runtime_dir() / "wand.sock"
    if client and not user.exists() and Path(SYSTEM_SOCKET).exists():
        return f"ipc://{SYSTEM_SOCKET}"
    return f"ipc://{user}"


def runtime_dir() -> Path:
    """This user's folder for wand's sockets: ``$XDG_RUNTIME_DIR/wand``, else
    ``/tmp/wand-UID/wand``."""
    return Path(os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/wand-{os.geteuid()}") / "wand"


def resolve(endpoint: str | None, client: bool = False) -> str:
    return endpoint or default_endpoint(client)


def describe(endpoint: str) -> str:
    """Where an endpoint came from, for "no daemon" messages."""
    if os.environ.get(ENV) == endpoint:
        return f"{endpoint} (from {ENV})"
    if endpoint in (default_endpoint(), default_endpoint(client=True)):
        return f"{endpoint} (the default; set {ENV} or --endpoint to look elsewhere)"
    return endpoint


def socket_path(endpoint: str) -> Path | None:
    """The filesystem path of an ``ipc://`` endpoint (None for TCP or abstract sockets)."""
    if endpoint.startswith("ipc://") and not endpoint.startswith("ipc://@"):
        return Path(endpoint[len("ipc://") :])
    return None
