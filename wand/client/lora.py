"""LoRA adapters on pipelines whose experts are views of the daemon's memory.

Loading, scaling, enabling and unloading are diffusers' own (``WanLoraLoaderMixin``, peft
underneath): adapters live in new peft layers around the attached weights and never write
them. What wand adds:

- **a check first**: diffusers skips keys that match no layer with a warning, or none at all;
  here every key must name a layer of the expert, with fitting shapes, or nothing is loaded;
- **fusing into private copies**: peft fuses by adding into the base layer's weight in place,
  which would write the daemon's read-only memory. Each layer about to be fused first gets a
  private copy of what it will write (of an fp8 weight, its bfloat16 dequantization: a
  bfloat16 delta never goes into fp8 bytes); unfusing puts the shared views themselves back.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from wand.client import fp8
from wand.common.errors import LoraError
from wand.wan.lora_keys import EXPERTS, check, describe, label, read

if TYPE_CHECKING:
    from peft.tuners.lora import LoraLayer

ADAPTER_METADATA = "lora_adapter_metadata"  # diffusers' key in a LoRA file's __metadata__


@dataclass
class ResidentLora:
    """A LoRA the daemon holds, attached: the file's tensors as it stores them (copy-on-write
    views of the daemon's memory), the file's metadata (diffusers keeps rank and alpha
    there), and the expert it goes into unless told otherwise."""

    name: str
    expert: str
    metadata: dict[str, str]
    tensors: dict[str, torch.Tensor]
    release: Callable[[], None] = lambda: None  # ends the lease (the adapters keep copies)

    def adapter_metadata(self) -> dict[str, Any] | None:
        """What diffusers reads from a file's ``lora_adapter_metadata``."""
        raw = self.metadata.get(ADAPTER_METADATA)
        return json.loads(raw) if raw else None


Source = str | Path | Mapping[str, torch.Tensor] | ResidentLora


def tuner_layers(model: nn.Module) -> list[LoraLayer]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


class SharedViews:
    """The attached parameters that fusing replaced with private copies, to be put back."""

    def __init__(self) -> None:
        self._saved: dict[nn.Module, dict[str, nn.Parameter]] = {}

    def privatize(self, model: nn.Module, adapter_names: list[str] | None) -> None:
        """Give every layer of ``model`` that fusing ``adapter_names`` (default: the active
        ones) will write a private copy of its weight, and of its bias if a LoRA adds to it."""
        for layer in tuner_layers(model):
            names = layer.active_adapters if adapter_names is None else adapter_names
            merging = [a for a in names if a in layer.lora_A and a not in layer.merged_adapters]
            if not merging:
                continue
            written = ["weight", *(["bias"] if any(layer.lora_bias[a] for a in merging) else [])]
            base = layer.get_base_layer()
            saved = self._saved.setdefault(layer, {})
            for attr in written:
                if attr not in saved:
                    saved[attr] = getattr(base, attr)
                    private = nn.Parameter(fp8.private_copy(base, attr), requires_grad=False)
                    setattr(base, attr, private)

    def restore(self, everything: bool = False) -> None:
        """Put the shared views back into every layer no longer fused (all with
        ``everything``), dropping the private copies."""
        for layer in [la for la in self._saved if everything or not la.merged]:
            base = layer.get_base_layer()
            for attr, shared in self._saved.pop(layer).items():
                setattr(base, attr, shared)


class LoraMixin:
    """The LoRA methods of :class:`wand.client.pipeline.VideoPipeline`, delegated to diffusers on
    ``self.pipe``: its experts are the very modules of the other inner pipeline too."""

    task: str
    pipe: Any  # the diffusers pipeline
    _shared: SharedViews
    _resident_lora: Any  # name → ResidentLora | None, the daemon's LoRAs for this checkpoint

    def load_lora_weights(
        self,
        source: Source,
        adapter_name: str | None = None,
        expert: str | None = None,
        **kw: Any,
    ) -> str:
        """Load a LoRA — a file, a folder with ``weight_name=``, a state dict, or the name of
        one the daemon holds (``wanctl load-lora``; attached, no file read) — into the
        high-noise expert (``expert="high"``, diffusers' default), the low-noise one
        (``"low"``, diffusers' ``load_into_transformer_2=True``) or ``"both"``; a LoRA the
        daemon holds defaults to the expert it was loaded for. Returns the adapter name
        (default ``default_N``). Checked against every target before loading."""
        if kw.pop("load_into_transformer_2", False):
            expert = "low"
        held = self._held(source)
        by_name = held is not None and not isinstance(source, ResidentLora)
        components = self._components(expert or (held.expert if held else "high"))
        kw = {"local_files_only": True, **kw}  # never a model hub
        state = read(dict(held.tensors) if held else source, **kw)
        what = f"LoRA {held.name}" if held else label(source)
        for c in components:
            check(state, getattr(self.pipe, c), describe(self.task, c, self._one_model()), what)
        name = adapter_name or self._new_adapter_name()
        taken = self.get_list_adapters()
        if not kw.get("hotswap") and any(name in taken.get(c, ()) for c in components):
            raise LoraError(f"an adapter named {name!r} is already loaded")
        for c in components:
            if held:  # diffusers' own loading, from the attached tensors and the file's metadata
                self.pipe.load_lora_into_transformer(
                    state,
                    transformer=getattr(self.pipe, c),
                    adapter_name=name,
                    metadata=held.adapter_metadata(),
                    _pipeline=self.pipe,
                    hotswap=kw.get("hotswap", False),
                    # diffusers' default: peft takes the tensors as they are, no init and copy
                    low_cpu_mem_usage=kw.get("low_cpu_mem_usage", True),
                )
                continue
            self.pipe.load_lora_weights(
                source if isinstance(source, Mapping) else str(source),
                adapter_name=name,
                load_into_transformer_2=c == "transformer_2",
                **kw,
            )
        if by_name:
            held.release()  # peft copied what it needs: the daemon may let go of it
        return name

    def _held(self, source: Source) -> ResidentLora | None:
        """``source`` as a LoRA the daemon holds: given as such, or by a name that is not a
        path here."""
        if isinstance(source, ResidentLora):
            return source
        if isinstance(source, str) and not Path(source).exists():
            return self._resident_lora(source)
        return None

    def _one_model(self) -> bool:
        return self.pipe.transformer_2 is None

    def set_adapters(self, adapter_names: str | list[str], adapter_weights: Any = None) -> None:
        """Activate adapters with their scales: one number per adapter, or per adapter a dict
        ``{"transformer": high, "transformer_2": low}`` (diffusers' ``set_adapters``)."""
        self.pipe.set_adapters(adapter_names, adapter_weights)

    def get_active_adapters(self) -> list[str]:
        return self.pipe.get_active_adapters()

    def get_list_adapters(self) -> dict[str, list[str]]:
        return self.pipe.get_list_adapters()

    def enable_lora(self) -> None:
        self.pipe.enable_lora()

    def disable_lora(self) -> None:
        """Disable the adapters; fused ones are unfused first (peft would otherwise subtract
        them in place at the next call, leaving a private, rounded copy of the weights)."""
        if self.fused_loras:
            self.unfuse_lora()
        self.pipe.disable_lora()

    def delete_adapters(self, adapter_names: str | list[str]) -> None:
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        if names & self.fused_loras:
            raise LoraError(f"adapters {sorted(names & self.fused_loras)} are fused: unfuse first")
        self.pipe.delete_adapters(adapter_names)

    @property
    def fused_loras(self) -> set[str]:
        """Names of the adapters fused into some layer of an expert."""
        return {a for layer in self._tuner_layers() for a in layer.merged_adapters}

    def fuse_lora(
        self,
        components: list[str] | None = None,
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: list[str] | None = None,
    ) -> None:
        """diffusers' ``fuse_lora`` into private copies of the layers it writes. Default
        components: every expert (diffusers' Wan default is ``["transformer"]`` alone)."""
        components = components or self._experts()
        for c in components:
            self._shared.privatize(getattr(self.pipe, c), adapter_names)
        try:
            self.pipe.fuse_lora(
                components=components,
                lora_scale=lora_scale,
                safe_fusing=safe_fusing,
                adapter_names=adapter_names,
            )
        finally:
            self._shared.restore()  # layers left unfused (an error, nothing to merge)

    def unfuse_lora(self, components: list[str] | None = None) -> None:
        """Unfuse; the layers get the daemon's shared views back (the same tensors as before
        fusing, not the private copies with the LoRA subtracted again)."""
        try:
            self.pipe.unfuse_lora(components=components or self._experts())
        finally:
            self._shared.restore()

    def unload_lora_weights(self) -> None:
        """Remove every adapter. Unlike diffusers, fused LoRAs go too: the experts return to
        the shared views rather than keep private fused copies."""
        self._shared.restore(everything=True)
        self.pipe.unload_lora_weights()

    def _experts(self) -> list[str]:
        return [c for c in EXPERTS["both"] if getattr(self.pipe, c, None) is not None]

    def _tuner_layers(self) -> list[LoraLayer]:
        return [la for c in self._experts() for la in tuner_layers(getattr(self.pipe, c))]

    def _components(self, expert: str) -> tuple[str, ...]:
        if expert not in EXPERTS:
            raise ValueError(f"expert must be 'high', 'low' or 'both', not {expert!r}")
        if expert != "high" and self.pipe.transformer_2 is None:
            raise LoraError(f"{self.task} has one model: expert must be 'high' (the default)")
        return EXPERTS[expert]

    def _new_adapter_name(self) -> str:
        taken = {a for names in self.get_list_adapters().values() for a in names}
        return next(n for i in count(len(taken)) if (n := f"default_{i}") not in taken)
