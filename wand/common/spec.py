"""What to load: the contract between checkpoint knowledge (``wand.wan``) and the store.

A checkpoint reader turns a folder into a :class:`CheckpointSpec`; the store reads exactly
the tensors it names, renamed and cast as it says, and knows nothing else about Wan2.2.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wand.common import dtypes


@dataclass(frozen=True)
class Scale:
    """The per-tensor factor a quantized weight is stored with: the weight is
    ``stored.to(float32) * value`` (ComfyUI's scaled fp8 and its ``weight_scale``)."""

    key: str  # the tensor in the weight's file that holds it ("scale_weight", "weight_scale")
    value: float  # read from that tensor when the checkpoint was read; a float32 value
    shape: tuple[int, ...] = ()  # that tensor's shape on disk: () or (1,), one value


@dataclass(frozen=True)
class TensorSpec:
    """One resident tensor: where its bytes are on disk and how it lives in the slab.

    With a ``scale``, the fill paths write ``stored × scale`` computed in float32 and
    rounded once to ``dtype``; without one, the stored values cast to ``dtype``.
    """

    name: str  # state-dict name in the component's class
    file: Path
    key: str  # key inside ``file``
    shape: tuple[int, ...]  # resident shape; same element count as on disk
    dtype: str  # resident dtype, by torch's name (wand.common.dtypes)
    aliases: tuple[str, ...] = ()  # further state-dict names for the same tensor (tied weights)
    scale: Scale | None = None


@dataclass
class ComponentSpec:
    """One model of a checkpoint, addressed as ``<checkpoint>/<name>``."""

    name: str  # text_encoder, vae, high_noise_model, low_noise_model, model
    cls: str  # "diffusers:WanTransformer3DModel", "transformers:UMT5EncoderModel", ...
    config: dict[str, Any]
    tensors: list[TensorSpec]

    @property
    def nbytes(self) -> int:
        return sum(dtypes.nbytes(t.dtype, t.shape) for t in self.tensors)


LORA_PREFIX = "lora:"  # component names of LoRAs held for a checkpoint: "lora:<name>"
LORA_CLASS = "wand:lora"  # no module class: a state dict for a LoRA loader


def is_lora(component: str) -> bool:
    return component.startswith(LORA_PREFIX)


@dataclass
class CheckpointSpec:
    path: Path
    task: str  # t2v-A14B, i2v-A14B, ti2v-5B
    layout: str  # "original" or "diffusers"
    components: dict[str, ComponentSpec]
    tokenizer: Path | None = None
    extras: dict[str, Any] = field(default_factory=dict)  # pipeline facts (boundary, ...)


def to_record(spec: CheckpointSpec) -> dict[str, Any]:
    """``spec`` as plain data (for systemd's fd store: a restarted daemon need not read the
    folder again to know what it holds)."""
    return {
        "path": str(spec.path),
        "task": spec.task,
        "layout": spec.layout,
        "tokenizer": str(spec.tokenizer) if spec.tokenizer else None,
        "extras": spec.extras,
        "components": [
            {
                "name": c.name,
                "cls": c.cls,
                "config": c.config,
                "tensors": [
                    [
                        t.name,
                        str(t.file),
                        t.key,
                        list(t.shape),
                        t.dtype,
                        list(t.aliases),
                        _scale_record(t.scale),
                    ]
                    for t in c.tensors
                ],
            }
            for c in spec.components.values()
        ],
    }


def from_record(record: dict[str, Any]) -> CheckpointSpec:
    """The spec :func:`to_record` made (KeyError, TypeError or ValueError if it is not one)."""
    components = {}
    for c in record["components"]:
        tensors = [
            TensorSpec(
                name,
                Path(file),
                key,
                tuple(shape),
                _dtype(dtype),
                tuple(aliases),
                _scale(*scale),
            )
            for name, file, key, shape, dtype, aliases, *scale in c["tensors"]
        ]
        components[c["name"]] = ComponentSpec(c["name"], c["cls"], c["config"], tensors)
    tokenizer = record["tokenizer"]
    return CheckpointSpec(
        Path(record["path"]),
        record["task"],
        record["layout"],
        components,
        Path(tokenizer) if tokenizer else None,
        record["extras"],
    )


def _scale_record(scale: Scale | None) -> list | None:
    return None if scale is None else [scale.key, scale.value, list(scale.shape)]


def _scale(record: list | None = None) -> Scale | None:
    """A row's scale; rows of older daemons have none."""
    if record is None:
        return None
    key, value, shape = record
    if not isinstance(key, str) or not isinstance(value, float):
        raise ValueError(f"not a scale: {record!r:.80}")
    return Scale(key, value, tuple(shape))


def _dtype(name: str) -> str:
    if name not in dtypes.ITEMSIZE:
        raise ValueError(f"not a dtype: {name!r}")
    return name
