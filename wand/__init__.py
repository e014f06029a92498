"""wand: Wan2.2 models resident in one daemon, attached by clients without copying.

>>> import wand
>>> with wand.connect() as c:
...     dit = c.module("high_noise_model")

The package, by side (a file's folder says which process runs it and what it may import;
``tests/test_layout.py`` keeps the rules):

- ``wand.common``: what both sides speak: errors, specs, manifests, dtypes, placement, the
  wire protocol, the fd socket. Imports nothing else of wand's.
- ``wand.slabs``: memory only: sealed memfds, CUDA VMM allocations and the driver layer, both
  sides of each kind (the daemon's slab, the client's mapping). ``wand/slabs/LIFETIME.md``
  says who holds and who frees a slab.
- ``wand.load``: reading checkpoint files into slabs (the CPU and GPU fill paths).
- ``wand.wan``: all Wan2.2 knowledge: layouts, key names, configs, module classes, LoRA keys.
- ``wand.daemon``: the ``wand`` daemon: entry point, server, store, client-process table,
  fd store, systemd, logs, configuration. Never imports ``wand.client``.
- ``wand.client``: the client library: connection, pipelines, LoRAs on pipelines.
- ``wand.tools``: bench, GPU bench and probe, the fd-store emulator, the chaos suite; nothing
  above imports them.

``import wand`` is cheap: the client API below is imported on first use, so the daemon (which
shares the package) starts without torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from wand.common.errors import (
    BindError,
    CheckpointError,
    ConnectError,
    DaemonError,
    DeviceError,
    LoraError,
    ProtocolError,
    WandError,
)
from wand.common.version import __version__

if TYPE_CHECKING:
    from wand.client.connection import Attachment, Client, connect

_LAZY = {"Attachment", "Client", "connect"}  # from wand.client.connection, which needs torch

__all__ = [
    "Attachment",
    "BindError",
    "CheckpointError",
    "Client",
    "ConnectError",
    "DaemonError",
    "DeviceError",
    "LoraError",
    "ProtocolError",
    "WandError",
    "__version__",
    "connect",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module("wand.client.connection"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'wand' has no attribute {name!r}")
