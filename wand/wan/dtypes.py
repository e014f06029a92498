"""Resident dtypes: the component's dtype, except where ``from_pretrained`` keeps float32.

diffusers keeps ``_keep_in_fp32_modules`` in float32 whatever ``torch_dtype`` is asked for,
matching whole dotted name components. transformers keeps ``_keep_in_fp32_modules`` only
under float16 and ``_keep_in_fp32_modules_strict`` under float16 and bfloat16, matching
regex patterns (``*`` as ``.*``) anywhere in the name. Integer and bool tensors are never cast.

An fp8 dtype (``float8_e4m3fn``, ``float8_e5m2``) is for the weights of Linear layers, the
tensors ComfyUI's fp8 files quantize: every other tensor is resident as in bfloat16, the
dtype the modules compute in (:mod:`wand.client.fp8`), and so are the Linear layers in
``_keep_in_fp32_modules`` (diffusers keeps them in float32; transformers casts the input of
UMT5's ``wo`` to its weight's dtype, which would be fp8).
"""

from __future__ import annotations

import re

import torch

from wand.common.dtypes import FP8, FP8_COMPUTE, name_of, torch_dtype


def resident_dtype(
    cls: str, module: torch.nn.Module, name: str, stored: torch.dtype, dtype: torch.dtype
) -> torch.dtype:
    """Dtype of tensor ``name`` (stored as ``stored``) when component ``cls`` runs in ``dtype``."""
    if not stored.is_floating_point:
        return stored
    fp8 = name_of(dtype) in FP8
    compute = torch_dtype(FP8_COMPUTE) if fp8 else dtype
    if any(_matches(cls, pattern, name) for pattern in keep_in_fp32(cls, module, compute)):
        return torch.float32
    if fp8 and not is_fp8_weight(cls, module, name):
        return compute
    return dtype


def is_fp8_weight(cls: str, module: torch.nn.Module, name: str) -> bool:
    """Is ``name`` a weight fp8 residency holds in fp8: a Linear layer's, outside the
    modules the class keeps out of reduced precision?"""
    layer, _, leaf = name.rpartition(".")
    if leaf != "weight" or not isinstance(module.get_submodule(layer), torch.nn.Linear):
        return False
    kept = getattr(module, "_keep_in_fp32_modules", None) or []
    return not any(_matches(cls, pattern, name) for pattern in kept)


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
