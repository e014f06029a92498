"""LoRA files for Wan experts, as diffusers reads them: their key styles, and whether they fit.

diffusers' Wan loader (``WanLoraLoaderMixin.lora_state_dict``) converts every key style it
knows — diffusers/peft (``transformer.blocks.0.attn1.to_q.lora_A.weight``), ComfyUI/Kijai files
in the original names (``diffusion_model.blocks.0.self_attn.q.lora_down.weight`` + ``.alpha``),
musubi-tuner's ``lora_unet_blocks_0_self_attn_q…``, the lightx2v distilled releases — to
``transformer.<module>.lora_A.weight``; :func:`check` then requires every key to name a layer of
the expert with a fitting shape (diffusers would skip what does not match, with a warning).
The daemon checks a LoRA it is asked to hold with these; clients check one before loading it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wand.common.errors import LoraError, listed

PREFIX = "transformer."  # what diffusers' Wan loader keeps of a converted state dict
EXPERTS = {
    "high": ("transformer",),
    "low": ("transformer_2",),
    "both": ("transformer", "transformer_2"),
}
ROLES = {"transformer": "high-noise expert", "transformer_2": "low-noise expert"}
Source = str | Path | Mapping[str, torch.Tensor]


def describe(task: str, component: str, one_model: bool) -> str:
    """How an error names the model a LoRA goes into: "t2v-A14B high-noise expert"."""
    return f"{task} model" if one_model else f"{task} {ROLES[component]}"


def label(source: Source) -> str:
    return "the LoRA state dict" if isinstance(source, Mapping) else str(source)


def read(source: Source, **kw: Any) -> dict[str, torch.Tensor]:
    """The LoRA as diffusers converts it for Wan: ``transformer.<module>.lora_A.weight``...

    Any key style diffusers reads is accepted (diffusers/peft, ComfyUI/Kijai, musubi-tuner,
    the lightx2v distilled releases); ``kw`` are ``lora_state_dict``'s (``weight_name``...).
    A path must exist here: diffusers would take anything else for a model hub name.
    """
    from diffusers import WanPipeline
    from safetensors import SafetensorError

    if not isinstance(source, Mapping) and not Path(source).exists():
        raise LoraError(f"{source}: no such file")
    try:
        state = WanPipeline.lora_state_dict(
            dict(source) if isinstance(source, Mapping) else str(source),
            **{"local_files_only": True, **kw},
        )
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise LoraError(f"{label(source)}: diffusers cannot read it as a Wan LoRA: {e}") from e
    if not state:
        raise LoraError(f"{label(source)}: holds no LoRA weights")
    return state


def check(state: Mapping[str, torch.Tensor], model: nn.Module, where: str, what: str) -> None:
    """Every key of ``state`` (from :func:`read`) names a linear or convolution layer of
    ``model`` and fits its shape, else :class:`LoraError` naming the keys that do not."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    ours = {k.removeprefix(PREFIX): v for k, v in state.items() if k.startswith(PREFIX)}
    unmatched = [k for k in state if not k.startswith(PREFIX)]
    if ours and "lora_A" not in next(iter(ours)):  # older diffusers names, as load_lora_adapter
        ours = convert_unet_state_dict_to_peft(ours)
    layers = dict(model.named_modules())
    misfits, ranks = [], {}
    for key, tensor in ours.items():
        name, found, part = key.partition(".lora_")
        layer = layers.get(name) if found else None
        weight = getattr(getattr(layer, "base_layer", layer), "weight", None)
        if weight is None or weight.dim() < 2:
            unmatched.append(PREFIX + key)
        elif not _fits(part, tensor.shape, weight.shape):
            misfits.append(f"{PREFIX}{key} {tuple(tensor.shape)} (weight {tuple(weight.shape)})")
        elif part in ("A.weight", "B.weight"):
            ranks.setdefault(name, set()).add(tensor.shape[0 if part[0] == "A" else 1])
    misfits += [f"{PREFIX}{n} ranks {sorted(r)}" for n, r in ranks.items() if len(r) > 1]
    if unmatched:
        raise LoraError(
            f"{what}: {len(unmatched)} of {len(state)} keys match no layer of the {where}: "
            f"{listed(unmatched)} (names as diffusers converts them)"
        )
    if misfits:
        raise LoraError(f"{what}: does not fit the {where}: {listed(misfits)}")


def _fits(part: str, shape: torch.Size, weight: torch.Size) -> bool:
    """Does a LoRA tensor fit a layer with this weight: down (rank, in, ...), up (out, rank,
    ...), up bias (out,)."""
    if part == "A.weight":
        return shape[1:] == weight[1:]
    if part == "B.weight":
        return shape[0] == weight[0] and len(shape) == len(weight)
    if part == "B.bias":
        return tuple(shape) == (weight[0],)
    return True
