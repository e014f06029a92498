"""What the fork server imports once, so that forked clients start with it (see forked)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import wanctl.cli  # noqa: E402,F401
import wand.client  # noqa: E402,F401
from wand.bench import MODULE_CLASSES  # noqa: E402
from wand.modules import resolve_class  # noqa: E402

for _cls in MODULE_CLASSES:
    resolve_class(_cls)
