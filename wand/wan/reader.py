"""Read a Wan2.2 checkpoint folder (original or ``-Diffusers`` layout) into a CheckpointSpec."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

from wand.common.dtypes import FP8
from wand.common.errors import CheckpointError
from wand.common.spec import CheckpointSpec, ComponentSpec
from wand.load.files import is_dir, is_file, read_small, reason
from wand.wan import configs, original_names
from wand.wan.components import component_spec
from wand.wan.sources import open_file, open_index, open_weights
from wand.wan.tasks import (
    DEFAULT_DTYPES,
    DIFFUSERS_EXPERT_DIRS,
    DIFFUSERS_PIPELINES,
    EXPERT_INDEX,
    T5_FILE,
    TASKS,
    TEXT_ENCODER,
    TOKENIZER_DIR,
    TRANSFORMER,
    VAE,
    VAE_FILES,
    Task,
)


def read_checkpoint(
    path: str | Path,
    task: str | None = None,
    dtypes: Mapping[str, str] | None = None,
) -> CheckpointSpec:
    """Describe every resident tensor of the checkpoint at ``path``.

    ``task`` overrides detection (a folder that contradicts it is an error); ``dtypes`` maps
    component names, or ``"*"`` for all of them, to the dtype they should run in (default:
    what Wan2.2 uses); a named component wins over ``"*"``.
    """
    root = Path(path)
    try:
        is_folder = stat.S_ISDIR(os.stat(root).st_mode)
    except OSError as e:
        raise CheckpointError(f"{root}: {reason(e)}") from None
    if not is_folder:
        raise CheckpointError(f"{root}: not a folder (a checkpoint is a folder)")
    layout = "diffusers" if is_file(root / "model_index.json") else "original"
    detected = _detect_diffusers(root) if layout == "diffusers" else _detect_original(root)
    check_task(root, task, detected, "the folder")
    info = TASKS[detected]
    want = resident_dtypes(root, info, dtypes)
    reader = _read_diffusers if layout == "diffusers" else _read_original
    components, tokenizer, extras = reader(root, info, want)
    return CheckpointSpec(root, detected, layout, components, tokenizer, extras)


def check_task(where: Path, asked: str | None, detected: str, holder: str) -> None:
    """``asked`` (the configured task, if any) is a task and the one ``holder`` holds."""
    if asked is not None and asked not in TASKS:
        raise CheckpointError(f"unknown task {asked!r}; known: {', '.join(TASKS)}")
    if asked is not None and asked != detected:
        raise CheckpointError(f"{where}: asked for task {asked}, but {holder} holds {detected}")


def resident_dtypes(where: Path, info: Task, dtypes: Mapping[str, str] | None) -> dict[str, str]:
    """Every component's resident dtype: its own entry in ``dtypes``, else ``"*"``, else
    what Wan2.2 uses."""
    names = ("text_encoder", "vae", *info.experts)
    dtypes = dict(dtypes or {})
    unknown = set(dtypes) - {"*", *names}
    if unknown:
        raise CheckpointError(f"{where}: {info.name} has no component {sorted(unknown)[0]!r}")
    everywhere = dict.fromkeys(names, dtypes.pop("*")) if "*" in dtypes else {}
    resident = {**DEFAULT_DTYPES, **everywhere, **dtypes}
    if resident["vae"] in FP8:
        raise CheckpointError(
            f"{where}: vae: {resident['vae']} residency is for the Linear weights of the "
            "experts and the text encoder; the VAE is convolutions: give it its own dtype "
            "(vae=float32 or vae=bfloat16)"
        )
    return resident


# ---- detection ----------------------------------------------------------------------------


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(read_small(path))
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: invalid JSON: {str(e)[:200]}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _detect_original(root: Path) -> str:
    if is_dir(root / "high_noise_model"):
        config = root / "high_noise_model" / "config.json"
    elif is_file(root / "config.json"):
        config = root / "config.json"
    else:
        raise CheckpointError(
            f"{root}: not a Wan2.2 checkpoint (no model_index.json, high_noise_model/ "
            "or config.json)"
        )
    model_type = _json(config).get("model_type")
    for name, info in TASKS.items():
        if info.model_type == model_type and (len(info.experts) == 2) == (config.parent != root):
            return name
    raise CheckpointError(f"{config}: model_type {model_type!r} does not fit this folder")


def _detect_diffusers(root: Path) -> str:
    index = _json(root / "model_index.json")
    pipeline = index.get("_class_name")
    if pipeline not in DIFFUSERS_PIPELINES:
        raise CheckpointError(
            f"{root}: not a Wan2.2 pipeline (model_index.json names "
            f"{str(pipeline)[:80]!r}, not one of {', '.join(DIFFUSERS_PIPELINES)})"
        )
    two = (_list_or_none(index.get("transformer_2")) or [None])[0] is not None
    in_channels = _json(root / "transformer" / "config.json").get("in_channels")
    for name, info in TASKS.items():
        if (len(info.experts) == 2) == two and info.in_channels == in_channels:
            return name
    raise CheckpointError(
        f"{root}: no Wan2.2 task has transformer in_channels {in_channels} "
        f"{'with' if two else 'without'} transformer_2"
    )


# ---- original layout ----------------------------------------------------------------------


def _read_original(root: Path, info: Task, dtypes: dict[str, str]):
    components: dict[str, ComponentSpec] = {}
    t5 = open_file(root / T5_FILE)
    components["text_encoder"] = component_spec(
        "text_encoder",
        TEXT_ENCODER,
        configs.t5_config(t5, original_names.t5),
        t5,
        original_names.t5,
        dtypes["text_encoder"],
    )
    vae = open_file(root / VAE_FILES[info.vae])
    if configs.vae_version(vae) != info.vae:
        raise CheckpointError(f"{vae.origin}: holds a Wan{configs.vae_version(vae)} VAE")
    vae_config = configs.vae_config(vae)
    rename = original_names.vae22 if info.vae == "2.2" else original_names.vae21
    to_key = partial(rename, num_res_blocks=vae_config["num_res_blocks"])
    components["vae"] = component_spec("vae", VAE, vae_config, vae, to_key, dtypes["vae"])
    for expert in info.experts:
        folder = root / expert if len(info.experts) == 2 else root
        source = open_index(folder / EXPERT_INDEX)
        config = configs.transformer_config(_json(folder / "config.json"), source)
        components[expert] = component_spec(
            expert, TRANSFORMER, config, source, original_names.transformer, dtypes[expert]
        )
    return components, _tokenizer(root / TOKENIZER_DIR), original_extras(info)


def original_extras(info: Task) -> dict[str, Any]:
    """Pipeline facts of a checkpoint without a scheduler config: the release's."""
    return _extras(info, {**_scheduler_defaults(), "flow_shift": info.sample_shift})


def _scheduler_defaults() -> dict[str, Any]:
    """The UniPC flow-matching scheduler diffusers pairs with Wan (shift set per task)."""
    return {
        "_class_name": "UniPCMultistepScheduler",
        "prediction_type": "flow_prediction",
        "use_flow_sigmas": True,
        "num_train_timesteps": 1000,
    }


# ---- diffusers layout ---------------------------------------------------------------------


def _read_diffusers(root: Path, info: Task, dtypes: dict[str, str]):
    index = _json(root / "model_index.json")
    components: dict[str, ComponentSpec] = {}
    folder = root / "text_encoder"
    components["text_encoder"] = _diffusers_component(
        "text_encoder", TEXT_ENCODER, folder, "model", dtypes["text_encoder"]
    )
    components["vae"] = _diffusers_component(
        "vae", VAE, root / "vae", "diffusion_pytorch_model", dtypes["vae"]
    )
    for expert in info.experts:
        folder = root / DIFFUSERS_EXPERT_DIRS[expert]
        components[expert] = _diffusers_component(
            expert, TRANSFORMER, folder, "diffusion_pytorch_model", dtypes[expert]
        )
    scheduler = _json(root / "scheduler" / "scheduler_config.json")
    extras = _extras(info, scheduler)
    for key in ("boundary_ratio", "expand_timesteps"):
        if key in index:
            extras[key] = index[key]
    return components, _tokenizer(root / "tokenizer"), extras


def _diffusers_component(name: str, cls: str, folder: Path, stem: str, dtype: str) -> ComponentSpec:
    config = {k: v for k, v in _json(folder / "config.json").items() if not k.startswith("_")}
    source = open_weights(folder, f"{stem}.safetensors.index.json", f"{stem}.safetensors")
    return component_spec(name, cls, config, source, lambda n: n, dtype)


# ---- shared -------------------------------------------------------------------------------


def _extras(info: Task, scheduler: dict[str, Any]) -> dict[str, Any]:
    return {
        "boundary_ratio": info.boundary_ratio,
        "expand_timesteps": info.expand_timesteps,
        "pipeline": info.pipeline,
        "scheduler": scheduler,
    }


def _tokenizer(folder: Path) -> Path | None:
    return folder if is_dir(folder) else None


def _list_or_none(value: Any) -> list | None:
    return value if isinstance(value, list) else None
