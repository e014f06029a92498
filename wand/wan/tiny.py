"""Write small Wan2.2 checkpoints in the real layouts, file formats, key names and configs.

Weights are random (from ``seed``) over the names and shapes of the real diffusers /
transformers classes built with small configs; the original layout is written through
:mod:`wand.wan.original_names`, so every layout of one seed holds the same weights (the
single-file ones in 16 bits or fp8, :mod:`wand.wan.tiny_files`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wand.wan import original_names, tiny_files
from wand.wan.latents import LATENTS
from wand.wan.modules import skeleton
from wand.wan.tasks import (
    DIFFUSERS_EXPERT_DIRS,
    LAYOUTS,
    T5_FILE,
    TASKS,
    TEXT_ENCODER,
    TOKENIZER_DIR,
    TRANSFORMER,
    VAE,
    VAE_FILES,
    Task,
)
from wand.wan.tokenizer import write_tokenizer
from wand.wan.writing import save_safetensors

T5_VOCAB = 128  # ≥ the tiny tokenizer's size
T5_DTYPE = torch.bfloat16  # as the original .pth (and the -Diffusers text encoder)


@dataclass(frozen=True)
class Size:
    layers: int  # DiT blocks per expert
    t5_layers: int
    width: int  # DiT dim and T5 d_model


# "bench" has the real tensor counts of an A14B expert (40 blocks) and UMT5-XXL (24 blocks)
PRESETS = {"tiny": Size(2, 2, 32), "bench": Size(40, 24, 128)}


def write_tiny(
    dest: str | Path,
    task: str,
    layout: str,
    *,
    quant: str = "none",
    preset: str = "tiny",
    layers: int | None = None,
    t5_layers: int | None = None,
    width: int | None = None,
    seed: int = 0,
) -> Path:
    """Write a ``task`` checkpoint in ``layout`` into the new folder ``dest``; return it.

    ``layout`` is a folder layout (``original``, ``diffusers``) or a single-file one
    (``comfy``, ``kijai``: one file per component, where :func:`tiny_files.file_names`
    says, with the fp8 encoding ``quant``).
    """
    layouts = (*LAYOUTS, *tiny_files.LAYOUTS)
    if task not in TASKS or layout not in layouts or preset not in PRESETS:
        raise ValueError(f"unknown task/layout/preset {task!r}/{layout!r}/{preset!r}")
    if quant not in tiny_files.QUANTS or (quant != "none" and layout in LAYOUTS):
        raise ValueError(f"quant {quant!r} is for the single-file layouts: {tiny_files.QUANTS}")
    base = PRESETS[preset]
    size = Size(layers or base.layers, t5_layers or base.t5_layers, width or base.width)
    if size.width % 8 or size.width < 16:
        raise ValueError("width must be a multiple of 8, at least 16")
    info = TASKS[task]
    root = Path(dest)
    root.mkdir(parents=True, exist_ok=False)
    models = _models(info, size, seed)
    if layout == "original":
        _write_original(root, info, models)
    elif layout == "diffusers":
        _write_diffusers(root, info, models)
    else:
        tiny_files.write(root, info, models, layout, quant)
    return root


# ---- configs and weights ------------------------------------------------------------------


@dataclass
class _Model:
    cls: str
    config: dict[str, Any]
    state: dict[str, torch.Tensor]


def transformer_config(info: Task, size: Size) -> dict[str, Any]:
    out = 48 if info.vae == "2.2" else 16
    return {
        "patch_size": [1, 2, 2],
        "num_attention_heads": 2,
        "attention_head_dim": size.width // 2,
        "in_channels": info.in_channels,
        "out_channels": out,
        "text_dim": size.width,
        "freq_dim": 256,
        "ffn_dim": 3 * size.width,
        "num_layers": size.layers,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": 1024,
        "pos_embed_seq_len": None,
    }


def t5_config(size: Size) -> dict[str, Any]:
    return {
        "architectures": ["UMT5EncoderModel"],
        "vocab_size": T5_VOCAB,
        "d_model": size.width,
        "d_kv": size.width // 4,
        "d_ff": 5 * size.width // 2,
        "num_layers": size.t5_layers,
        "num_decoder_layers": size.t5_layers,
        "num_heads": 4,
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "feed_forward_proj": "gated-gelu",
        "dense_act_fn": "gelu_new",
        "tie_word_embeddings": False,
        "scalable_attention": True,
    }


def vae_config(version: str) -> dict[str, Any]:
    mean, std = LATENTS[version]
    wan22 = version == "2.2"
    return {
        "base_dim": 8,
        "decoder_base_dim": 16 if wan22 else None,
        "z_dim": len(mean),
        "dim_mult": [1, 2, 4, 4],
        "num_res_blocks": 2,
        "attn_scales": [],
        "temperal_downsample": [False, True, True],
        "latents_mean": mean,
        "latents_std": std,
        "is_residual": wan22,
        "in_channels": 12 if wan22 else 3,
        "out_channels": 12 if wan22 else 3,
        "patch_size": 2 if wan22 else None,
        "scale_factor_temporal": 4,
        "scale_factor_spatial": 16 if wan22 else 8,
    }


def _models(info: Task, size: Size, seed: int) -> dict[str, _Model]:
    configs = {
        "text_encoder": (TEXT_ENCODER, t5_config(size)),
        "vae": (VAE, vae_config(info.vae)),
        **{e: (TRANSFORMER, transformer_config(info, size)) for e in info.experts},
    }
    models = {}
    for i, (name, (cls, config)) in enumerate(configs.items()):
        state = _random_state(cls, config, seed * 1000 + i)
        if name == "text_encoder":
            state = {k: v.to(T5_DTYPE) for k, v in state.items()}
        models[name] = _Model(cls, config, state)
    return models


def _random_state(cls: str, config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Random weights for every stored entry of ``cls(config)`` (tied copies left out)."""
    module = skeleton(cls, config)
    tied = getattr(module, "_tied_weights_keys", None) or {}
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, meta in module.state_dict().items():
        if name in tied:
            continue
        noise = torch.randn(meta.shape, generator=g)
        if name.endswith("bias"):
            state[name] = 0.1 * noise
        elif meta.dim() >= 2 and "gamma" not in name:
            state[name] = noise / math.sqrt(math.prod(meta.shape[1:]))
        else:  # norm scales
            state[name] = 1.0 + 0.1 * noise
    return state


# ---- writers ------------------------------------------------------------------------------


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _write_shards(folder: Path, stem: str, state: dict[str, torch.Tensor], n: int) -> None:
    """``{stem}-0000i-of-0000n.safetensors`` plus ``{stem}.safetensors.index.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(state)
    n = min(n, len(keys))
    weight_map = {}
    for i in range(n):
        shard = f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {
            k: state[k].contiguous() for k in keys[i * len(keys) // n : (i + 1) * len(keys) // n]
        }
        save_safetensors(part, folder / shard)
        weight_map.update(dict.fromkeys(part, shard))
    total = sum(t.numel() * t.element_size() for t in state.values())
    _write_json(
        folder / f"{stem}.safetensors.index.json",
        {"metadata": {"total_size": total}, "weight_map": weight_map},
    )


def _renamed(state: dict[str, torch.Tensor], rename) -> dict[str, torch.Tensor]:
    return {rename(k): v for k, v in state.items()}


def _write_original(root: Path, info: Task, models: dict[str, _Model]) -> None:
    t5 = models["text_encoder"]
    torch.save(_renamed(t5.state, original_names.t5), root / T5_FILE)
    vae = models["vae"]
    rename = original_names.vae22 if info.vae == "2.2" else original_names.vae21
    nrb = vae.config["num_res_blocks"]
    torch.save(_renamed(vae.state, lambda k: rename(k, nrb)), root / VAE_FILES[info.vae])
    for expert in info.experts:
        folder = root / expert if len(info.experts) == 2 else root
        model = models[expert]
        state = _renamed(model.state, original_names.transformer)
        _write_shards(folder, "diffusion_pytorch_model", state, 6 if len(info.experts) == 2 else 3)
        _write_json(folder / "config.json", _wan_model_config(info, model.config))
    write_tokenizer(root / TOKENIZER_DIR)


def _wan_model_config(info: Task, c: dict[str, Any]) -> dict[str, Any]:
    """What ``WanModel.save_config`` writes (its ignore_for_config fields left out)."""
    dim = c["num_attention_heads"] * c["attention_head_dim"]
    return {
        "_class_name": "WanModel",
        "_diffusers_version": "0.33.0",
        "dim": dim,
        "eps": c["eps"],
        "ffn_dim": c["ffn_dim"],
        "freq_dim": c["freq_dim"],
        "in_dim": c["in_channels"],
        "model_type": info.model_type,
        "num_heads": c["num_attention_heads"],
        "num_layers": c["num_layers"],
        "out_dim": c["out_channels"],
        "text_len": 512,
    }


def _write_diffusers(root: Path, info: Task, models: dict[str, _Model]) -> None:
    from diffusers import UniPCMultistepScheduler
    from transformers import UMT5Config

    t5 = models["text_encoder"]
    UMT5Config(**t5.config).save_pretrained(str(root / "text_encoder"))
    _write_shards(root / "text_encoder", "model", t5.state, 2)
    vae = models["vae"]
    skeleton(vae.cls, vae.config).save_config(str(root / "vae"))
    save_safetensors(vae.state, root / "vae" / "diffusion_pytorch_model.safetensors")
    for expert in info.experts:
        model, folder = models[expert], root / DIFFUSERS_EXPERT_DIRS[expert]
        skeleton(model.cls, model.config).save_config(str(folder))
        _write_shards(folder, "diffusion_pytorch_model", model.state, 3)
    shift = 5.0 if info.vae == "2.2" else 3.0  # what convert_wan_to_diffusers.py sets
    UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        num_train_timesteps=1000,
        flow_shift=shift,
    ).save_config(str(root / "scheduler"))
    write_tokenizer(root / "tokenizer")
    _write_json(root / "model_index.json", _model_index(info))


def _model_index(info: Task) -> dict[str, Any]:
    index: dict[str, Any] = {
        "_class_name": info.pipeline,
        "_diffusers_version": "0.35.0.dev0",
        "boundary_ratio": info.boundary_ratio,
        "expand_timesteps": info.expand_timesteps,
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": ["diffusers", "WanTransformer3DModel"]
        if len(info.experts) == 2
        else [None, None],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    if info.pipeline == "WanImageToVideoPipeline":
        index.update(image_encoder=[None, None], image_processor=[None, None])
    return index
