"""What the fork server imports once, so that forked clients start with it (see forked)."""

import gc
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import wanctl.cli  # noqa: E402,F401
import wand.client.connection  # noqa: E402,F401
from wand.tools.bench import MODULE_CLASSES  # noqa: E402
from wand.wan.modules import resolve_class  # noqa: E402

for _cls in MODULE_CLASSES:
    resolve_class(_cls)

# Children must not collect what they inherit: a full collection in a child walks every
# inherited object, writing to its pages (copy-on-write), in each of 64 children at once.
# Seen before this: after "kills", every attacher stalled 5-16 s in one attach.
gc.freeze()
