"""Tensor dtypes by name, as specs, manifests and configurations carry them, without torch.

Names are torch's (``bfloat16``, ``float8_e4m3fn``); :func:`canonical` also takes the short
names people type (``bf16``, ``fp16``, ``fp32``, ``half``, ``fp8``). Only :func:`torch_dtype`
imports torch, so the daemon can lay out, describe and adopt slabs without it.
"""

from __future__ import annotations

import math
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ITEMSIZE = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}
FLOATING = frozenset({"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"})
FP8 = frozenset({"float8_e4m3fn", "float8_e5m2"})
FP8_COMPUTE = "bfloat16"  # what modules over fp8 weights compute in, and hold the rest in
ALIASES = {
    "fp64": "float64",
    "double": "float64",
    "fp32": "float32",
    "float": "float32",
    "fp16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "fp8": "float8_e4m3fn",
    "fp8_e4m3fn": "float8_e4m3fn",
    "float8_e4m3": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2",
}


def canonical(name: str) -> str:
    """torch's name of the dtype ``name`` (a torch name or a usual short one); ValueError
    for anything else."""
    lowered = name.strip().lower().removeprefix("torch.")
    found = ALIASES.get(lowered, lowered)
    if found not in ITEMSIZE:
        raise ValueError(f"unknown dtype {name[:60]!r}")
    return found


def nbytes(dtype: str, shape: tuple[int, ...] | list[int]) -> int:
    return ITEMSIZE[dtype] * math.prod(shape)


def is_floating(dtype: str) -> bool:
    return dtype in FLOATING


def name_of(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


@cache
def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype called ``name`` (imports torch)."""
    import torch

    if name not in ITEMSIZE:
        raise ValueError(f"unknown dtype {name[:60]!r}")
    return getattr(torch, name)
