"""Module skeletons on the meta device, bound to tensors that already exist elsewhere."""

from __future__ import annotations

import importlib
from typing import Any

import torch
from accelerate import init_empty_weights

from wand.common.errors import BindError, listed

ALLOWED_PACKAGES = ("diffusers", "transformers")


def resolve_class(cls: str) -> type[torch.nn.Module]:
    """``"diffusers:WanTransformer3DModel"`` → the class; only diffusers and transformers."""
    package, _, name = cls.partition(":")
    if package not in ALLOWED_PACKAGES or not name.isidentifier():
        raise BindError(f"unsupported module class {cls!r}")
    try:
        return getattr(importlib.import_module(package), name)
    except AttributeError:
        raise BindError(f"{package} has no class {name!r}") from None


def skeleton(cls: str, config: dict[str, Any]) -> torch.nn.Module:
    """The module with parameters on meta and non-persistent buffers (rotary tables) real."""
    klass = resolve_class(cls)
    with init_empty_weights(include_buffers=False):
        if cls.startswith("transformers:"):
            return klass(klass.config_class(**config))
        return klass.from_config(config)


def bind(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Make ``tensors`` the module's own parameters and buffers, without copying.

    Every entry of the module's state dict must be provided and nothing else: a parameter
    left on meta would otherwise surface later as an obscure error, or worse as random weights.
    """
    expected = set(module.state_dict(keep_vars=True))
    missing = sorted(expected - tensors.keys())
    extra = sorted(tensors.keys() - expected)
    if missing or extra:
        raise BindError(
            f"{type(module).__name__}: state dict does not match: "
            f"missing {listed(missing)}, unexpected {listed(extra)}"
        )
    module.load_state_dict(tensors, strict=True, assign=True)
    left = [n for n, t in _all_tensors(module) if t.is_meta]
    if left:
        raise BindError(f"{type(module).__name__}: left unbound: {listed(left)}")
    device = next(iter(tensors.values())).device if tensors else None
    if device is not None and device.type != "cpu":
        # the skeleton's non-persistent buffers (rotary tables) follow the bound tensors,
        # which are on that device already: .to() leaves them where they are
        module.to(device)
    return module.eval().requires_grad_(False)


def build(cls: str, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    return bind(skeleton(cls, config), tensors)


def _all_tensors(module: torch.nn.Module):
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)
