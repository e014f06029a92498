"""Stored values to resident ones: a cast, ComfyUI's dequantization of a scaled weight, or
ComfyUI's per-tensor quantization into float8.

A scaled weight (fp8 with a per-tensor scale) resident in 16 or 32 bits becomes
``stored.to(float32) * scale``, rounded once to the resident dtype: what ComfyUI computes,
in float32 rather than in the compute dtype, so at least as accurate. One resident in the
fp8 dtype it is stored in is kept as it is, bytes and scale. A 16- or 32-bit weight resident
in fp8 is quantized the way ComfyUI's ``TensorCoreFP8Layout.quantize`` does (comfy/quant_ops.py
and comfy-kitchen's ``quantize_per_tensor_fp8``): ``scale = absmax / the fp8 maximum`` in
float32, values ``clamp(stored * (1 / scale).to(stored dtype))`` rounded to nearest. Products
run in pieces, so the temporaries stay small whatever the tensor; on a GPU they run on the
device.
"""

from __future__ import annotations

import torch

from wand.common.spec import Scale

PIECE = 1 << 22  # elements per temporary (16 MiB in float32)
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def cast_into(dst: torch.Tensor, src: torch.Tensor, scale: Scale | None) -> None:
    """``dst[:] = src`` (both flat, same length), times ``scale`` when there is one."""
    if scale is None or scale.value == 1.0 or dst.dtype == src.dtype:
        dst.copy_(src)  # fp8 → 16 or 32 bits is exact: a scale of 1 needs no float32 step
        return
    for first in range(0, src.numel(), PIECE):
        last = min(first + PIECE, src.numel())
        dst[first:last].copy_(src[first:last].to(torch.float32).mul_(scale.value))


def needs_cast(stored: torch.dtype, resident: torch.dtype, scale: Scale | None) -> bool:
    """Whether the bytes on disk are not already the resident bytes (an fp8 weight resident
    in its own fp8 dtype keeps its bytes: its scale goes with it, not into it)."""
    return stored != resident or (scale is not None and resident not in FP8)


def quantizes(stored: torch.dtype, resident: torch.dtype) -> bool:
    """Whether values stored as ``stored`` are quantized at load to be ``resident``."""
    return resident in FP8 and stored != resident


def fp8_scale(amax: torch.Tensor, stored: torch.dtype, fp8: torch.dtype) -> torch.Tensor:
    """ComfyUI's per-tensor scale of values stored as ``stored`` whose absolute maximum is
    ``amax``: a float32 scalar, kept so that ``1 / scale`` fits a float16 source; 1 for an
    all-zero tensor (where ComfyUI would divide by zero)."""
    scale = amax.to(torch.float32) / torch.finfo(fp8).max
    if stored not in (torch.float32, torch.bfloat16):
        info = torch.finfo(stored)
        scale = 1.0 / torch.clamp(1.0 / scale, min=info.min, max=info.max)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_into(dst: torch.Tensor, src: torch.Tensor, scale: torch.Tensor) -> None:
    """``dst[:] = src`` quantized to ``dst``'s fp8 dtype with ``scale`` (both flat)."""
    top = torch.finfo(dst.dtype).max
    inverse = (1.0 / scale).to(src.dtype)
    for first in range(0, src.numel(), PIECE):
        last = min(first + PIECE, src.numel())
        dst[first:last].copy_((src[first:last] * inverse).clamp_(-top, top))


def kept_scale(resident: torch.dtype, scale: Scale | None) -> float | None:
    """The scale of a tensor not quantized at load: its file's (1 for plain fp8) when it is
    resident in fp8, else none (it holds its values)."""
    if resident not in FP8:
        return None
    return scale.value if scale is not None else 1.0


def to_resident(dst: torch.Tensor, src: torch.Tensor, scale: Scale | None) -> float | None:
    """``dst[:] = src`` for whole tensors (both flat): cast, dequantized, kept or quantized;
    the scale of an fp8 ``dst``."""
    if not quantizes(src.dtype, dst.dtype):
        cast_into(dst, src, scale)
        return kept_scale(dst.dtype, scale)
    computed = fp8_scale(src.abs().amax(), src.dtype, dst.dtype)
    quantize_into(dst, src, computed)
    return computed.item()
