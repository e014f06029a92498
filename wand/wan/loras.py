"""LoRAs the daemon holds for a checkpoint: a LoRA file becomes one more component.

The component ``lora:<name>`` holds the file's tensors as they are stored (keys and dtypes
unchanged), so a client hands them to diffusers exactly as diffusers would have read them
from the file, in any key style it accepts; the file's ``__metadata__`` (diffusers keeps a
LoRA's rank and alpha there) and the default expert travel in the component's config. A
LoRA is checked against the experts it is meant for when it is read, so one that fits no
layer of this checkpoint is refused before the daemon holds it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from wand.common.dtypes import name_of
from wand.common.errors import CheckpointError, LoraError, WandError
from wand.common.spec import LORA_CLASS, LORA_PREFIX, CheckpointSpec, ComponentSpec, TensorSpec
from wand.load.tensorfile import TensorFile
from wand.wan.lora_keys import EXPERTS, check, describe, read
from wand.wan.modules import skeleton
from wand.wan.tasks import TASKS


class LoraEntry(Protocol):
    """What names a LoRA to hold (the daemon's ``LoraConfig``)."""

    name: str
    path: Path
    expert: str  # "high", "low" or "both"


def read_lora(entry: LoraEntry, spec: CheckpointSpec) -> ComponentSpec:
    """The component of ``entry``'s LoRA file for checkpoint ``spec`` (raises
    CheckpointError naming the file when it is unreadable or fits no expert)."""
    if not entry.path.name.endswith(".safetensors"):
        raise CheckpointError(f"{entry.path}: LoRAs are read from .safetensors files")
    f = TensorFile(entry.path)
    if not f.keys():
        raise CheckpointError(f"{entry.path}: holds no tensors")
    _check_fits(entry, spec)
    tensors = [
        TensorSpec(k, f.path, k, f.info(k).shape, name_of(f.info(k).dtype)) for k in f.keys()
    ]
    config = {"expert": entry.expert, "metadata": f.metadata, "file": str(entry.path)}
    return ComponentSpec(LORA_PREFIX + entry.name, LORA_CLASS, config, tensors)


def _check_fits(entry: LoraEntry, spec: CheckpointSpec) -> None:
    """diffusers' reading of the file, checked against the experts it goes into."""

    experts = TASKS[spec.task].experts
    if entry.expert != "high" and len(experts) == 1:
        raise CheckpointError(
            f"LoRA {entry.name}: {spec.task} has one model, expert must be 'high'"
        )
    try:
        state = read(entry.path)
        for component, expert in zip(EXPERTS["both"], experts, strict=False):
            if component in EXPERTS[entry.expert]:
                model = skeleton(spec.components[expert].cls, spec.components[expert].config)
                check(state, model, describe(spec.task, component, len(experts) == 1), entry.name)
    except LoraError as e:
        raise CheckpointError(f"{entry.path}: {e}") from None
    except WandError:
        raise
    except Exception as e:  # whatever diffusers' converters raise on a strange file
        raise CheckpointError(f"{entry.path}: not a LoRA diffusers can read: {e}") from None
