"""Tiny single-file checkpoints as ComfyUI and Kijai publish them: one file per component,
in ComfyUI's model folders, with their key names, prefixes, dtypes and fp8 encodings.

``comfy`` is the Comfy-Org repack: bare ``WanModel`` names in fp16, the UMT5 encoder in
transformers' names with its SentencePiece model embedded (``spiece_model``), every Linear
weight of the diffusion models quantized. ``kijai`` is Kijai's: ``model.diffusion_model.``
before the diffusion models' names, bf16, only the blocks' Linear weights quantized, scales
of shape [1], the UMT5 encoder in Wan's ``.pth`` names (never quantized), the VAE under
``model.``. ``quant`` picks the encoding of the quantized weights: ``none`` (16-bit),
``fp8`` / ``fp8_e5m2`` (plain), ``fp8_scaled`` (the ``scaled_fp8`` marker and
``scale_weight``), ``comfy_quant`` (per-layer ``comfy_quant`` JSON and ``weight_scale``).
Quantization is ComfyUI's: per tensor, scale = absmax / the fp8 maximum.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch

from wand.load.cast import to_resident
from wand.wan import original_names
from wand.wan.configs import HEAD_DIM
from wand.wan.modules import skeleton
from wand.wan.tasks import TASKS, Task
from wand.wan.tokenizer import tiny_sentencepiece
from wand.wan.writing import save_safetensors

LAYOUTS = ("comfy", "kijai")
QUANTS = ("none", "fp8", "fp8_e5m2", "fp8_scaled", "comfy_quant")
FOLDERS = {  # ComfyUI's models/ folders
    "high_noise_model": "diffusion_models",
    "low_noise_model": "diffusion_models",
    "model": "diffusion_models",
    "text_encoder": "text_encoders",
    "vae": "vae",
}
FP8 = {"fp8": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}  # plain: no scales


class Model(Protocol):
    cls: str
    config: dict[str, Any]
    state: dict[str, torch.Tensor]  # the class's state-dict names


@dataclass(frozen=True)
class Style:
    dit_prefix: str
    vae_prefix: str
    dtype: torch.dtype  # of every tensor not quantized
    scale_shape: tuple[int, ...]
    marker: Callable[[], torch.Tensor]  # the scaled_fp8 tensor
    blocks_only: bool  # quantize only the blocks' Linear weights
    t5_original_names: bool  # else transformers' names, quantized and with its tokenizer


STYLES = {
    "comfy": Style(
        "", "", torch.float16, (), lambda: torch.tensor([], dtype=torch.float8_e4m3fn), False, False
    ),
    "kijai": Style(
        "model.diffusion_model.",
        "model.",
        torch.bfloat16,
        (1,),
        lambda: torch.zeros((), dtype=torch.bfloat16),
        True,
        True,
    ),
}


def file_names(task: str, layout: str, quant: str = "none") -> dict[str, Path]:
    """Each component's file, relative to the folder ``write`` fills."""
    info = TASKS[task]
    kind = task.split("-")[0]
    if layout == "comfy":
        q = {"none": "fp16", "fp8": "fp8_e4m3fn", "fp8_e5m2": "fp8_e5m2"}.get(quant, "fp8_scaled")
        experts = {
            e: f"wan2.2_{kind}_{e.split('_')[0]}_noise_14B_{q}.safetensors"
            for e in info.experts
            if e != "model"
        } or {"model": f"wan2.2_ti2v_5B_{q}.safetensors"}
        t5 = {"none": "fp16", "fp8": "fp8_e4m3fn", "fp8_e5m2": "fp8_e5m2"}.get(
            quant, "fp8_e4m3fn_scaled"
        )
        names = {
            **experts,
            "text_encoder": f"umt5_xxl_{t5}.safetensors",
            "vae": "wan_2.1_vae.safetensors" if info.vae == "2.1" else "wan2.2_vae.safetensors",
        }
    else:
        q = {"none": "bf16", "fp8": "fp8_e4m3fn", "fp8_e5m2": "fp8_e5m2"}.get(
            quant, "fp8_e4m3fn_scaled_KJ"
        )
        stem = f"Wan2_2-{task.split('-')[0].upper()}-{task.split('-')[1]}"
        experts = {
            e: f"{stem}-{e.split('_')[0].upper()}_{q}.safetensors"
            for e in info.experts
            if e != "model"
        } or {"model": f"{stem}_{q}.safetensors"}
        names = {
            **experts,
            "text_encoder": "umt5-xxl-enc-bf16.safetensors",
            "vae": f"Wan{info.vae.replace('.', '_')}_VAE_bf16.safetensors",
        }
    return {role: Path(FOLDERS[role]) / name for role, name in names.items()}


def write(root: Path, info: Task, models: dict[str, Model], layout: str, quant: str) -> None:
    """Write the files of ``models`` into ``root`` (``file_names`` says where)."""
    style = STYLES[layout]
    paths = {role: root / p for role, p in file_names(info.name, layout, quant).items()}
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    for expert in info.experts:
        m = models[expert]
        linear = _linear(m, blocks_only=style.blocks_only)
        state = {original_names.transformer(k): v for k, v in m.state.items()}
        rename = {original_names.transformer(k) for k in linear}
        tensors = _encode(state, rename, set(), quant, style)
        _save(paths[expert], tensors, style.dit_prefix, _config_metadata(m.config))
    t5 = models["text_encoder"]
    if style.t5_original_names:
        state = {original_names.t5(k): v.to(style.dtype) for k, v in t5.state.items()}
        _save(paths["text_encoder"], state, "", {})
    else:
        tensors = _encode(dict(t5.state), _linear(t5), {"shared.weight"}, quant, style)
        proto = tiny_sentencepiece()
        tensors["spiece_model"] = torch.frombuffer(bytearray(proto), dtype=torch.uint8)
        _save(paths["text_encoder"], tensors, "", {})
    vae = models["vae"]
    rename = original_names.vae22 if info.vae == "2.2" else original_names.vae21
    to_key = partial(rename, num_res_blocks=vae.config["num_res_blocks"])
    state = {to_key(k): v.to(style.dtype) for k, v in vae.state.items()}
    _save(paths["vae"], state, style.vae_prefix, {})


def _linear(m: Model, blocks_only: bool = False) -> set[str]:
    """The state-dict names of the Linear weights of ``m`` (those ComfyUI quantizes)."""
    module = skeleton(m.cls, m.config)
    return {
        f"{name}.weight"
        for name, sub in module.named_modules()
        if isinstance(sub, torch.nn.Linear)
        and f"{name}.weight" in m.state
        and (name.startswith("blocks.") or not blocks_only)
    }


def _encode(
    state: dict[str, torch.Tensor],
    quantized: set[str],
    plain: set[str],
    quant: str,
    style: Style,
) -> dict[str, torch.Tensor]:
    """``state`` as the file stores it: ``quantized`` weights in fp8 with their scales,
    ``plain`` ones in fp8 without (an embedding ComfyUI reads with a scale of 1)."""
    if quant == "none":
        return {k: v.to(style.dtype) for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        layer = key.removesuffix(".weight")
        if key in plain or (key in quantized and quant in FP8):
            out[key] = value.to(FP8.get(quant, torch.float8_e4m3fn))
        elif key in quantized:
            out[key] = torch.empty(value.shape, dtype=torch.float8_e4m3fn)
            scale = torch.tensor(to_resident(out[key].view(-1), value.reshape(-1), None))
            if quant == "fp8_scaled":
                out[layer + ".scale_weight"] = scale.reshape(style.scale_shape)
            else:
                out[layer + ".weight_scale"] = scale
                conf = json.dumps({"format": "float8_e4m3fn"}).encode()
                out[layer + ".comfy_quant"] = torch.frombuffer(bytearray(conf), dtype=torch.uint8)
        else:
            out[key] = value.to(style.dtype)
    if quant == "fp8_scaled":
        out["scaled_fp8"] = style.marker()
    return out


def _config_metadata(config: dict[str, Any]) -> dict[str, str]:
    """``__metadata__["config"]`` with the head count, where ComfyUI's rule (heads of
    128) would not find it."""
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    heads = config["num_attention_heads"]
    if dim % HEAD_DIM == 0 and dim // HEAD_DIM == heads:
        return {}
    return {"config": json.dumps({"transformer": {"num_heads": heads}})}


def _save(
    path: Path, state: dict[str, torch.Tensor], prefix: str, metadata: dict[str, str]
) -> None:
    """The markers (``scaled_fp8``) and the tokenizer stay outside the prefix, as Kijai
    looks for them."""
    keep = ("scaled_fp8", "spiece_model")
    named = {(k if k in keep else prefix + k): v.contiguous() for k, v in state.items()}
    save_safetensors(named, path, metadata)
