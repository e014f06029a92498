"""The objects that imports leave behind, kept out of the garbage collector's way.

Importing torch leaves some 160k objects the collector tracks, the diffusers and
transformers model classes another 240k (counted with ``gc.get_objects``), and nearly all of
them live as long as the process. Python's full collection walks every one of them
(75 ms after torch alone, on the 2-core VM) and is triggered by allocation counts, so it
lands inside whatever allocates next: decoding the first attach reply's manifest rows,
building the first module. ``gc.freeze`` moves every object the collector tracks into a
permanent generation that no collection walks, at no cost of its own. Freezing only after
new imports bounds the garbage it can keep alive to what existed at those moments.
"""

from __future__ import annotations

import gc
import sys

_modules_at_freeze = 0


def freeze_imports() -> None:
    """Freeze the heap if modules were imported since the last time."""
    global _modules_at_freeze
    if len(sys.modules) != _modules_at_freeze:
        gc.freeze()
        _modules_at_freeze = len(sys.modules)
