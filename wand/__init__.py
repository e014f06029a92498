"""wand: Wan2.2 models resident in one daemon, attached by clients without copying.

>>> import wand
>>> with wand.connect() as c:
...     dit = c.module("high_noise_model")
"""

__version__ = "0.1.0"

from wand.client import Attachment, Client, connect  # noqa: E402
from wand.errors import (  # noqa: E402
    BindError,
    CheckpointError,
    ConnectError,
    DaemonError,
    DeviceError,
    LoraError,
    ProtocolError,
    WandError,
)

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
