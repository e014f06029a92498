"""Resident dtypes: the component's dtype, except where ``from_pretrained`` keeps float32.

diffusers keeps ``_keep_in_fp32_modules`` in float32 whatever ``torch_dtype`` is asked for,
matching whole dotted name components. transformers keeps ``_keep_in_fp32_modules`` only
under float16 and ``_keep_in_fp32_modules_strict`` under float16 and bfloat16, matching
regex patterns (``*`` as ``.*``) anywhere in the name. Integer and bool tensors are never cast.
"""

from __future__ import annotations

import re

import torch


def resident_dtype(
    cls: str, module: torch.nn.Module, name: str, stored: torch.dtype, dtype: torch.dtype
) -> torch.dtype:
    """Dtype of tensor ``name`` (stored as ``stored``) when component ``cls`` runs in ``dtype``."""
    if not stored.is_floating_point:
        return stored
    if any(_matches(cls, pattern, name) for pattern in keep_in_fp32(cls, module, dtype)):
        return torch.float32
    return dtype


def keep_in_fp32(cls: str, module: torch.nn.Module, dtype: torch.dtype) -> list[str]:
    if cls.startswith("diffusers:"):
        return list(getattr(module, "_keep_in_fp32_modules", None) or [])
    patterns: list[str] = []
    if dtype == torch.float16:
        patterns += getattr(module, "_keep_in_fp32_modules", None) or []
    if dtype in (torch.float16, torch.bfloat16):
        patterns += getattr(module, "_keep_in_fp32_modules_strict", None) or []
    return patterns


def _matches(cls: str, pattern: str, name: str) -> bool:
    if cls.startswith("diffusers:"):
        return pattern in name.split(".")
    return re.search(pattern.replace("*", ".*"), name) is not None
