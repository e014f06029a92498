"""Write small Wan2.2 LoRA files in the key styles found in the wild, shaped for a checkpoint.

Every style is one that diffusers' ``WanLoraLoaderMixin.lora_state_dict`` reads:

- ``diffusers``: peft names of ``WanTransformer3DModel`` (``transformer.blocks.0.attn1.to_q.
  lora_A.weight``), with diffusers' ``lora_adapter_metadata`` (rank and alpha) in the header;
- ``comfy``: ComfyUI / Kijai files in the original ``WanModel`` names (``diffusion_model.
  blocks.0.self_attn.q.lora_down.weight``, ``lora_up``, ``.alpha``);
- ``musubi``: musubi-tuner files (``lora_unet_blocks_0_self_attn_q.lora_down.weight``,
  ``.alpha``), which diffusers requires to cover all ten linear layers of every block;
- ``lightx2v``: the distilled few-step releases (Wan2.2-Lightning, Wan2.2-Distill-Loras):
  ``diffusion_model.*.lora_A`` / ``lora_B``, bias deltas ``.diff_b``, zero norm deltas
  ``.diff`` (which diffusers drops), a full output-head delta ``head.head.diff``, and LoRAs on
  the time and text embeddings and the time projection.

Values are random (from ``seed``) and large enough to change a video visibly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from wand.wan import original_names
from wand.wan.modules import skeleton
from wand.wan.reader import read_checkpoint
from wand.wan.tasks import TASKS, TRANSFORMER
from wand.wan.tiny import PRESETS, transformer_config
from wand.wan.writing import save_safetensors

STYLES = ("diffusers", "comfy", "musubi", "lightx2v")
# the linear layers of a block, in WanModel names: what Wan LoRAs train
BLOCK_TARGETS = (
    "self_attn.q",
    "self_attn.k",
    "self_attn.v",
    "self_attn.o",
    "cross_attn.q",
    "cross_attn.k",
    "cross_attn.v",
    "cross_attn.o",
    "ffn.0",
    "ffn.2",
)
# outside the blocks: the layers the lightx2v releases adapt with a LoRA
EMBEDDINGS = ("time_embedding.0", "time_embedding.2", "text_embedding.0", "text_embedding.2")
PROJECTION = "time_projection.1"
DTYPE = torch.bfloat16  # as the published files


@dataclass(frozen=True)
class Layer:
    module: str  # WanTransformer3DModel module name
    shape: tuple[int, int]  # weight (out, in)


Layers = dict[str, Layer]  # by WanModel layer name
Tensors = dict[str, torch.Tensor]


def write_tiny_lora(
    dest: str | Path,
    checkpoint: str | Path,
    style: str,
    *,
    expert: str | None = None,
    rank: int = 4,
    seed: int = 0,
    targets: Sequence[str] = BLOCK_TARGETS,
) -> Path:
    """Write a ``style`` LoRA for one expert of ``checkpoint`` to the file ``dest``; return it.

    ``checkpoint`` is a checkpoint folder (its shapes are read) or a task name (the shapes of
    :func:`wand.wan.write_tiny`'s tiny preset). ``expert`` is a component name (default: the
    task's first expert); ``targets`` are the block layers to adapt, in ``WanModel`` names.
    """
    if style not in STYLES:
        raise ValueError(f"unknown LoRA style {style!r}; known: {', '.join(STYLES)}")
    if style == "musubi" and set(targets) != set(BLOCK_TARGETS):
        raise ValueError("diffusers reads musubi LoRAs only with all ten block layers")
    known = _layers(checkpoint, expert)
    blocks = sorted({int(name.split(".")[1]) for name in known if name.startswith("blocks.")})
    names = [f"blocks.{i}.{t}" for i in blocks for t in targets]
    g = torch.Generator().manual_seed(seed)
    state, metadata = _WRITERS[style](names, known, rank, g)
    path = Path(dest)
    save_safetensors({k: v.to(DTYPE).contiguous() for k, v in state.items()}, path, metadata)
    return path


def _layers(checkpoint: str | Path, expert: str | None) -> Layers:
    """Every linear layer of the expert, by its ``WanModel`` name."""
    if str(checkpoint) in TASKS:
        info = TASKS[str(checkpoint)]
        config = transformer_config(info, PRESETS["tiny"])
    else:
        spec = read_checkpoint(checkpoint)
        info = TASKS[spec.task]
        config = spec.components[expert or info.experts[0]].config
    if expert is not None and expert not in info.experts:
        raise ValueError(f"{info.name} has no expert {expert!r}; experts: {info.experts}")
    model = skeleton(TRANSFORMER, config)
    return {
        original_names.transformer(f"{name}.weight").removesuffix(".weight"): Layer(
            name, tuple(m.weight.shape)
        )
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    }


def _pair(shape: tuple[int, int], rank: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """(down, up) of a LoRA whose product is about half a unit-gain matrix."""
    out, inp = shape
    down = torch.randn(rank, inp, generator=g) / math.sqrt(inp)
    up = 0.5 * torch.randn(out, rank, generator=g) / math.sqrt(rank)
    return down, up


def _diffusers(names: list[str], layers: Layers, rank: int, g: torch.Generator):
    state: Tensors = {}
    modules = [layers[name].module for name in names]
    for name, module in zip(names, modules, strict=True):
        down, up = _pair(layers[name].shape, rank, g)
        state[f"transformer.{module}.lora_A.weight"] = down
        state[f"transformer.{module}.lora_B.weight"] = up
    # alpha 2 × rank: a file read without its header would come out at half strength
    config = {"r": rank, "lora_alpha": 2 * rank, "target_modules": modules}
    metadata = {f"transformer.{k}": v for k, v in config.items()}
    return state, {"lora_adapter_metadata": json.dumps(metadata)}


def _kohya(prefix: str, name: Callable[[str], str]):
    """Writer of down/up/alpha files (ComfyUI and musubi), alpha = rank / 2."""

    def write(names: list[str], layers: Layers, rank: int, g: torch.Generator):
        state: Tensors = {}
        for layer in names:
            key = f"{prefix}{name(layer)}"
            state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = _pair(
                layers[layer].shape, rank, g
            )
            state[f"{key}.alpha"] = torch.tensor(rank / 2)
        return state, {}

    return write


def _lightx2v(names: list[str], layers: Layers, rank: int, g: torch.Generator):
    state: Tensors = {}
    for layer in [*names, *EMBEDDINGS, PROJECTION]:
        key = f"diffusion_model.{layer}"
        shape = layers[layer].shape
        state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"] = _pair(shape, rank, g)
        state[f"{key}.diff_b"] = 0.05 * torch.randn(shape[0], generator=g)
    for block in sorted({layer.split(".")[1] for layer in names}):
        dim = layers[f"blocks.{block}.self_attn.q"].shape[0]
        state[f"diffusion_model.blocks.{block}.norm3.diff"] = torch.zeros(dim)
    out, inp = layers["head.head"].shape
    head = 0.5 * torch.randn(out, inp, generator=g) / math.sqrt(inp)  # a full delta
    state["diffusion_model.head.head.diff"] = head
    state["diffusion_model.head.head.diff_b"] = 0.05 * torch.randn(out, generator=g)
    return state, {}


_WRITERS = {
    "diffusers": _diffusers,
    "comfy": _kohya("diffusion_model.", lambda layer: layer),
    "musubi": _kohya("lora_unet_", lambda layer: layer.replace(".", "_")),
    "lightx2v": _lightx2v,
}
