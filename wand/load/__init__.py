"""Reading checkpoint files into slabs: safetensors and ``.pth`` files, the CPU and GPU fill paths.

The daemon imports this package only when a checkpoint must really be read; the model
libraries and torch come with the fill paths, not with the package.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from wand.common.spec import ComponentSpec
    from wand.slabs import Slab


def fill(
    slab: Slab,
    spec: ComponentSpec,
    rows: list[list],
    progress: Callable[[int], None],
    cancelled: Callable[[], bool],
) -> tuple[str, dict[str, float]]:
    """Copy every tensor of ``spec`` into ``slab`` at the manifest rows ``rows``; the slab's
    checksum, and the scale of each fp8 tensor by name (kept from its file, or computed as
    it was quantized). ``cancelled`` is asked between tensors (it raises
    :class:`~wand.common.errors.Cancelled`).

    Host slabs are filled by positional reads and CPU casts, digested with CRC-32s while
    their bytes are in cache (:mod:`wand.load.cpu`); GPU slabs through pinned staging, cast
    and digested on the device, so their bytes never come back (:mod:`wand.load.gpu`).
    """
    from wand.common.manifest import checksum

    flat = slab.writable()
    if flat.device.type == "cpu":
        from wand.load import cpu

        digests, scales = cpu.fill(flat, spec, rows, progress, cancelled)
        return checksum(digests), scales
    from wand.load import gpu

    digests, scales = gpu.fill_slab(flat, spec, rows, progress, cancelled)
    return checksum(digests, "sum64"), scales
