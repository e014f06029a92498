"""Stored values to resident ones: a cast, or ComfyUI's dequantization of a scaled weight.

A scaled weight (fp8 with a per-tensor scale) becomes ``stored.to(float32) * scale``,
rounded once to the resident dtype: what ComfyUI computes, in float32 rather than in the
compute dtype, so at least as accurate. The product runs in pieces, so the float32
temporaries stay small whatever the tensor; on a GPU it runs on the device.
"""

from __future__ import annotations

import torch

from wand.common.spec import Scale

PIECE = 1 << 22  # elements per float32 temporary (16 MiB)


def cast_into(dst: torch.Tensor, src: torch.Tensor, scale: Scale | None) -> None:
    """``dst[:] = src`` (both flat, same length), times ``scale`` when there is one."""
    if scale is None or scale.value == 1.0:
        dst.copy_(src)  # fp8 → 16 or 32 bits is exact: a scale of 1 needs no float32 step
        return
    for first in range(0, src.numel(), PIECE):
        last = min(first + PIECE, src.numel())
        dst[first:last].copy_(src[first:last].to(torch.float32).mul_(scale.value))


def needs_cast(stored: torch.dtype, resident: torch.dtype, scale: Scale | None) -> bool:
    """Whether the bytes on disk are not already the resident bytes."""
    return stored != resident or scale is not None
