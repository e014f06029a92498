"""Read one file per component: the single-file Wan2.2 checkpoints of ComfyUI and Kijai.

Each file is told by its keys: a diffusion model in ``WanModel``'s names, a UMT5 encoder in
transformers' names (Comfy-Org) or in Wan's ``.pth`` names (Kijai), a Wan2.1 or Wan2.2 VAE
in Wan's names; any of them bare or under a ``model.diffusion_model.`` or ``model.``
prefix. Their fp8 encodings are :mod:`wand.wan.quantization`'s; markers, scales, layer
configs, the embedded tokenizer and Kijai's ``model_type.*`` keys are consumed, never
weights. The task comes from the diffusion model's input channels. Nothing inside an expert
says whether it is the high-noise or the low-noise one: only its file name can
(``high_noise``/``low_noise``, ``HIGH``/``LOW``), and a name that contradicts its role is
refused.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from wand.common.errors import CheckpointError
from wand.common.spec import CheckpointSpec, ComponentSpec
from wand.load.files import is_dir, reason
from wand.load.tensorfile import TensorFile
from wand.wan import configs, original_names
from wand.wan.components import component_spec
from wand.wan.latents import LATENTS
from wand.wan.quantization import MARKER, read_encoding
from wand.wan.reader import check_task, original_extras, resident_dtypes
from wand.wan.sources import Source
from wand.wan.tasks import TASKS, TEXT_ENCODER, TRANSFORMER, VAE, Task
from wand.wan.tokenizer import embedded_tokenizer

LAYOUT = "single-file"
EXPERTS_A14B = ("high_noise_model", "low_noise_model")
EXPERT_WORDS = {  # words of a file name (lower case) that say which expert it is
    "high_noise_model": {"high", "highnoise"},
    "low_noise_model": {"low", "lownoise"},
}
COMPONENTS = (*EXPERTS_A14B, "model", "text_encoder", "vae")
PREFIXES = ("model.diffusion_model.", "model.")
TOKENIZER_KEY = "spiece_model"  # ComfyUI's UMT5 files: the SentencePiece model, as uint8
KIJAI_MARKERS = "model_type."  # Kijai's files may say what they are in an empty tensor
MAX_TOKENIZER_BYTES = 64 << 20
OTHER_MODELS = (  # key prefixes of Wan models that are not Wan2.2 t2v/i2v/ti2v
    ("img_emb.", "a Wan2.1 image-to-video or first-last-frame model (it has img_emb)"),
    ("vace_", "a Wan VACE model"),
    ("control_adapter.", "a Wan Fun camera-control model"),
    ("casual_audio_encoder.", "a Wan2.2 speech-to-video model"),
    ("audio_proj.", "a HuMo model"),
    ("face_adapter.", "a Wan2.2 Animate model"),
    ("pose_patch_embedding.", "a Wan2.2 Animate model"),
    ("motion_encoder.", "a Wan2.2 Animate model"),
    ("patch_embedding_", "a Wan Fun control model"),
    ("ref_conv.", "a Wan Fun reference model"),
)
IMAGE_KEYS = re.compile(r"blocks\.\d+\.cross_attn\.(k_img|v_img|norm_k_img)\.")
TIED_COPIES = {"encoder.embed_tokens.weight": "shared.weight"}  # transformers reads one
KINDS = {
    "transformer": "a Wan diffusion model",
    "vae": "a Wan VAE",
    "umt5": "a UMT5 text encoder",
    "t5": "a UMT5 text encoder",
}
NEEDS = {  # role → the kinds of file it takes, in words
    "text_encoder": (("umt5", "t5"), "a UMT5 text encoder"),
    "vae": (("vae",), "a Wan VAE"),
}
EXPERT_NEEDS = (("transformer",), "a Wan2.2 diffusion model")


@dataclass
class _File:
    """One component's file, its keys as the reader names them, and what it holds."""

    tensors: TensorFile
    source: Source
    kind: str
    tokenizer_key: str | None  # where it embeds a SentencePiece model, if it does


def read_files(
    files: Mapping[str, str | Path],
    task: str | None = None,
    dtypes: Mapping[str, str] | None = None,
    tokenizer: str | Path | None = None,
    tokenizer_cache: Path | None = None,
) -> CheckpointSpec:
    """Describe every resident tensor of the checkpoint made of ``files`` (component name →
    file): ``text_encoder``, ``vae`` and ``high_noise_model`` + ``low_noise_model`` (A14B)
    or ``model`` (ti2v-5B).

    ``task`` and ``dtypes`` as for :func:`wand.wan.read_checkpoint`. The tokenizer is the
    folder ``tokenizer``; without one, the text encoder's embedded SentencePiece model is
    written as a tokenizer folder under ``tokenizer_cache`` (none without a cache).
    """
    paths = {role: Path(p) for role, p in files.items()}
    experts = _experts(paths)
    for role in experts:
        _check_name(role, paths[role])
    opened = {role: _open(role, path) for role, path in paths.items()}
    main = paths[experts[0]]
    info = _task(opened, experts)
    check_task(main, task, info.name, "its diffusion model")
    want = resident_dtypes(main, info, dtypes)
    components = {
        "text_encoder": _text_encoder(opened["text_encoder"], want["text_encoder"]),
        "vae": _vae(opened["vae"], info, want["vae"]),
    }
    for role in experts:
        f = opened[role]
        config = _transformer_config(f)
        components[role] = component_spec(
            role, TRANSFORMER, config, f.source, original_names.transformer, want[role]
        )
    folder = _tokenizer(opened["text_encoder"], tokenizer, tokenizer_cache)
    return CheckpointSpec(main, info.name, LAYOUT, components, folder, original_extras(info))


# ---- which file is what -------------------------------------------------------------------


def _experts(paths: dict[str, Path]) -> tuple[str, ...]:
    unknown = set(paths) - set(COMPONENTS)
    if unknown:
        raise CheckpointError(
            f"no component {sorted(unknown)[0]!r}; known: {', '.join(COMPONENTS)}"
        )
    experts = ("model",) if "model" in paths else EXPERTS_A14B
    if "model" in paths and set(EXPERTS_A14B) & set(paths):
        raise CheckpointError("model (ti2v-5B) and high/low_noise_model (A14B) do not go together")
    missing = [n for n in ("text_encoder", "vae", *experts) if n not in paths]
    if missing:
        raise CheckpointError(f"single-file checkpoint without {missing[0]!r}")
    if len(experts) == 2:
        high, low = (os.path.realpath(paths[e]) for e in experts)
        if high == low:
            raise CheckpointError(f"{paths[experts[0]]}: given as both experts")
    return experts


def _check_name(role: str, path: Path) -> None:
    """Refuse an expert whose file name says it is the other one."""
    words = set(re.split(r"[^a-z0-9]+", path.name.lower()))
    says = [e for e, named in EXPERT_WORDS.items() if named & words]
    if role in EXPERT_WORDS and len(says) == 1 and says[0] != role:
        raise CheckpointError(
            f"{role}: {path} is the {says[0].removesuffix('_model').replace('_', '-')} expert "
            "by its name (nothing inside the file tells the experts apart): swap the two files"
        )


def _open(role: str, path: Path) -> _File:
    """``path`` read as the file of ``role``: its prefix stripped, its extras consumed (and
    a stored copy of a tied weight, which transformers does not read either)."""
    f = TensorFile(path)
    keys = f.keys()
    prefix = _prefix(keys)
    enc = read_encoding(f, PREFIXES)
    tokenizer_key = next((k for k in (TOKENIZER_KEY, prefix + TOKENIZER_KEY) if k in keys), None)
    stored: dict[str, str] = {}
    for key in keys:
        name = key.removeprefix(prefix)
        if key in enc.consumed or key == tokenizer_key or name.startswith(KIJAI_MARKERS):
            continue
        if name in stored:
            raise CheckpointError(f"{path}: holds both {stored[name]!r} and {key!r}")
        stored[name] = key
    for copy, tied in TIED_COPIES.items():
        if tied in stored:
            stored.pop(copy, None)
    scales = {name: enc.scales[key] for name, key in stored.items() if key in enc.scales}
    renamed = {n: k for n, k in stored.items() if n != k}
    source = Source(path, dict.fromkeys(stored, f), renamed, scales, enc.scale_suffix)
    kind = _kind(role, path, set(stored))
    return _File(f, source, kind, tokenizer_key)


def _prefix(keys: list[str]) -> str:
    """``model.diffusion_model.`` if a key has it (ComfyUI's saves), ``model.`` if every key
    has it (Kijai's), else none; keys that may sit outside the prefix are not counted."""
    named = [
        k for k in keys if k not in (MARKER, TOKENIZER_KEY) and not k.startswith(KIJAI_MARKERS)
    ]
    if any(k.startswith(PREFIXES[0]) for k in named):
        return PREFIXES[0]
    if named and all(k.startswith(PREFIXES[1]) for k in named):
        return PREFIXES[1]
    return ""


def _kind(role: str, path: Path, keys: set[str]) -> str:
    """What the file holds, checked to be what ``role`` needs."""
    if {"patch_embedding.weight", "head.modulation"} <= keys:
        kind = "transformer"
    elif "decoder.middle.0.residual.0.gamma" in keys:
        kind = "vae"
    elif {"shared.weight", "encoder.block.0.layer.0.SelfAttention.q.weight"} & keys:
        kind = "umt5"
    elif "token_embedding.weight" in keys:
        kind = "t5"
    else:
        kind = None
    wanted, need = NEEDS.get(role, EXPERT_NEEDS)
    if kind is None:
        lora = any("lora" in k for k in keys)
        sample = ", ".join(repr(k) for k in sorted(keys)[:3])
        what = "a LoRA" if lora else f"none of its keys is one's (it has {sample or 'no tensors'})"
        raise CheckpointError(f"{role}: {path} is not {need}: {what}")
    if kind not in wanted:
        raise CheckpointError(f"{role}: {path} is {KINDS[kind]}, not {need}")
    if kind == "transformer":
        for start, what in OTHER_MODELS:
            if any(k.startswith(start) for k in keys):
                raise CheckpointError(f"{role}: {path} is {what}, not {need}")
        image = next((k for k in sorted(keys) if IMAGE_KEYS.match(k)), None)
        if image:
            raise CheckpointError(
                f"{role}: {path} is a Wan2.1 image-to-video model ({image!r}), not {need}"
            )
    return kind


def _task(opened: dict[str, _File], experts: tuple[str, ...]) -> Task:
    """The task the diffusion models are for, from their input channels; both experts of
    an A14B checkpoint are for the same one, in the same shapes."""
    tasks = {role: _task_of(role, opened[role], len(experts)) for role in experts}
    first, *rest = experts
    for role in rest:
        if tasks[role] != tasks[first]:
            raise CheckpointError(
                f"{role}: {opened[role].source.origin} holds a {tasks[role].name} model, "
                f"{first} a {tasks[first].name} one"
            )
        if _shapes(opened[role]) != _shapes(opened[first]):
            raise CheckpointError(
                f"{role}: {opened[role].source.origin} and {opened[first].source.origin} "
                "differ in shape: not the two experts of one checkpoint"
            )
    return tasks[first]


def _shapes(f: _File) -> dict[str, tuple[int, ...]]:
    return {k: f.source.info(k).shape for k in f.source.keys()}


def _task_of(role: str, f: _File, experts: int) -> Task:
    in_channels, out_channels = configs.transformer_channels(f.source)
    where = f"{role}: {f.source.origin}"
    found = [t for t in TASKS.values() if t.in_channels == in_channels]
    if not found:
        known = ", ".join(f"{t.name} {t.in_channels}" for t in TASKS.values())
        raise CheckpointError(
            f"{where}: {in_channels} input channels, which no Wan2.2 task has ({known})"
        )
    info = found[0]
    if len(info.experts) != experts:
        names = " and ".join(info.experts)
        raise CheckpointError(f"{where} holds a {info.name} model, whose files are {names}")
    latent = len(LATENTS[info.vae][0])
    if out_channels != latent:
        raise CheckpointError(
            f"{where}: {out_channels} output channels, {info.name} has {latent} latent channels"
        )
    return info


# ---- components ---------------------------------------------------------------------------


def _transformer_config(f: _File) -> dict:
    settings = configs.wan_model_settings(f.tensors.metadata, f.source)
    return configs.transformer_config(settings, f.source)


def _text_encoder(f: _File, dtype: str) -> ComponentSpec:
    to_key = original_names.t5 if f.kind == "t5" else _same
    config = configs.t5_config(f.source, to_key)
    return component_spec("text_encoder", TEXT_ENCODER, config, f.source, to_key, dtype)


def _vae(f: _File, info: Task, dtype: str) -> ComponentSpec:
    version = configs.vae_version(f.source)
    if version != info.vae:
        raise CheckpointError(
            f"vae: {f.source.origin} is a Wan{version} VAE; {info.name} uses the Wan{info.vae} one"
        )
    config = configs.vae_config(f.source)
    rename = original_names.vae22 if version == "2.2" else original_names.vae21
    to_key = partial(rename, num_res_blocks=config["num_res_blocks"])
    return component_spec("vae", VAE, config, f.source, to_key, dtype)


def _same(name: str) -> str:
    return name


def _tokenizer(f: _File, folder: str | Path | None, cache: Path | None) -> Path | None:
    """The tokenizer folder given, else the one written from the text encoder's own."""
    if folder is not None:
        if not is_dir(Path(folder)):
            raise CheckpointError(f"tokenizer: {folder}: not a folder")
        return Path(folder)
    if f.tokenizer_key is None or cache is None:
        return None
    where = f"{f.tensors.path}: {f.tokenizer_key!r}"
    info = f.tensors.info(f.tokenizer_key)
    if info.dtype != torch.uint8 or len(info.shape) != 1 or info.nbytes > MAX_TOKENIZER_BYTES:
        raise CheckpointError(f"{where} is not a SentencePiece model (1-D uint8 bytes)")
    proto = bytes(f.tensors.read(f.tokenizer_key).numpy())
    try:
        return embedded_tokenizer(proto, cache)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
    except OSError as e:
        raise CheckpointError(
            f"{where}: cannot write its tokenizer to {cache}: {reason(e)}"
        ) from None
