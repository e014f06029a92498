"""Modules over fp8 slabs: Linear weights held in float8 with a per-tensor scale, computed in
bfloat16.

Each such layer becomes a :class:`Float8Linear` (the same object, its class swapped; still
an ``nn.Linear`` to peft and diffusers), whose forward dequantizes its weight into a
temporary and runs ``F.linear`` on it: the shared fp8 bytes are read, never written or
privately copied, on the CPU and the GPU alike. The temporary is ``weight × scale``
computed in float32 and rounded once to bfloat16, bit for bit the weight the loader would
have dequantized at load (and what ``weight.to(bfloat16) * scale`` gives, torch multiplying
a bfloat16 tensor by a Python float in float32; going through float32 is twice as fast on
CPUs without bfloat16 arithmetic).

diffusers' ``enable_layerwise_casting`` does not fit here: its hook calls ``module.to(dtype)``
before and after every forward, which replaces each parameter's data with a new tensor, so
the first forward would swap the shared views for private copies (and it knows no scales).

Casting such a module to another dtype (``module.to(torch.bfloat16)``) casts each fp8 weight
into a private copy and multiplies its scale in, so it computes what it did.

peft wraps a Float8Linear like any Linear and calls its forward; it puts the adapters in
``compute_dtype`` (bfloat16) rather than in the base weight's dtype. Fusing a LoRA first
gives the layer a private bfloat16 copy of its weight (:func:`private_copy`, used by
:class:`wand.client.lora.SharedViews`); a layer whose weight is not fp8 computes as a plain
Linear, and gets its fp8 view back when unfused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Self

import torch
import torch.nn.functional as F
from torch import nn

from wand.common.dtypes import FP8, FP8_COMPUTE, name_of, torch_dtype
from wand.common.errors import BindError

COMPUTE = torch_dtype(FP8_COMPUTE)


class Float8Linear(nn.Linear):
    """A Linear layer whose weight may be float8 with a per-tensor scale."""

    weight_scale: float = 1.0
    compute_dtype = COMPUTE  # where peft puts the adapters (it asks bitsandbytes' 4-bit layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight(self), self.bias)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Self:
        """``module.to(dtype)`` and the like: a float8 weight cast to another dtype (a new,
        private tensor) gets its scale multiplied in, so its values stay what they were."""
        was_fp8 = name_of(self.weight.dtype) in FP8
        super()._apply(fn, recurse)
        if was_fp8 and name_of(self.weight.dtype) not in FP8:
            with torch.no_grad():
                self.weight.mul_(self.weight_scale)
            self.weight_scale = 1.0
        return self

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight_scale={self.weight_scale:g}"


def apply(module: nn.Module, manifest: dict[str, Any]) -> nn.Module:
    """Make every Linear layer of ``module`` whose weight is one of the manifest's fp8
    tensors compute in bfloat16 with the weight's scale (the manifest's ``scales``)."""
    scales = manifest.get("scales") or {}
    if not scales:
        return module
    aliases = manifest.get("aliases") or {}
    layers = dict(module.named_modules())
    for name, param in module.named_parameters(remove_duplicate=False):
        if name_of(param.dtype) not in FP8:
            continue
        layer, _, leaf = name.rpartition(".")
        found = scales.get(name, scales.get(aliases.get(name)))
        if leaf != "weight" or type(layers.get(layer)) not in LINEAR or found is None:
            raise BindError(f"{type(module).__name__}: {name!r} is float8 without a scale")
        layers[layer].__class__ = Float8Linear
        layers[layer].weight_scale = float(found)
    for name in scales:
        if not isinstance(layers.get(name.rpartition(".")[0]), Float8Linear):
            raise BindError(
                f"{type(module).__name__}: the manifest scales {name!r}, which is not the "
                "weight of a Linear layer in float8"
            )
    return module


LINEAR = (nn.Linear, Float8Linear)  # a subclass of Linear may compute otherwise: left alone


def weight(layer: nn.Linear) -> torch.Tensor:
    """The weight ``layer`` computes with: a bfloat16 temporary for a float8 one."""
    w = layer.weight
    if name_of(w.dtype) not in FP8:
        return w
    return w.to(torch.float32).mul_(getattr(layer, "weight_scale", 1.0)).to(COMPUTE)


def private_copy(layer: nn.Module, attr: str) -> torch.Tensor:
    """A private copy of ``layer``'s parameter ``attr`` for writing into (fusing a LoRA):
    a float8 weight dequantized to bfloat16, anything else cloned."""
    value = getattr(layer, attr).detach()
    if attr == "weight" and name_of(value.dtype) in FP8:
        return weight(layer)
    return value.clone()
