"""Where the daemon writes what it derives from checkpoints for its clients to read: the
tokenizer folders of text encoders that embed theirs.

systemd's ``CacheDirectory=wand`` (``$CACHE_DIRECTORY``, ``/var/cache/wand``) under the
service, else ``/var/cache/wand`` for root and ``$XDG_CACHE_HOME/wand`` for anyone else.
"""

from __future__ import annotations

import os
from pathlib import Path

SYSTEM_CACHE = Path("/var/cache/wand")


def tokenizers() -> Path:
    return _base() / "tokenizers"


def _base() -> Path:
    given = os.environ.get("CACHE_DIRECTORY", "").split(":")[0]  # systemd may list several
    if given:
        return Path(given)
    if os.geteuid() == 0:
        return SYSTEM_CACHE
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "wand"
