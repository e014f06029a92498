"""Module skeletons on the meta device, bound to tensors that already exist elsewhere.

A skeleton is the class built on the meta device (``torch.device("meta")``) with its weight
initialisers skipped (they would only fill meta tensors), and its non-persistent buffers —
in these classes only the Wan transformer's rotary tables — computed for real, once per
process and shape. Binding walks the module tree once and sets each state-dict entry as the
module's own parameter or buffer, checking names and shapes, where ``load_state_dict(assign=
True)`` spent four times as long on the same result. A class whose loading is customised
(``_load_from_state_dict`` overrides, load hooks) or that has other non-persistent buffers
goes the general way instead: accelerate's ``init_empty_weights`` and ``load_state_dict``.

A build first moves the objects the imports left out of the garbage collector's way
(:mod:`wand.common.heap`): the full collection that would otherwise walk them lands in the
middle of the first build, and cost more than the rest of it.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
from collections.abc import Iterator
from functools import wraps
from typing import Any

import torch
from torch import nn

from wand.common import heap
from wand.common.errors import BindError, listed

ALLOWED_PACKAGES = ("diffusers", "transformers")
_local = threading.local()  # .skipping: this thread builds a skeleton
_rotary: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # rotary tables, per process
_rotary_lock = threading.Lock()


def resolve_class(cls: str) -> type[nn.Module]:
    """``"diffusers:WanTransformer3DModel"`` → the class; only diffusers and transformers."""
    package, _, name = cls.partition(":")
    if package not in ALLOWED_PACKAGES or not name.isidentifier():
        raise BindError(f"unsupported module class {cls!r}")
    try:
        return getattr(importlib.import_module(package), name)
    except AttributeError:
        raise BindError(f"{package} has no class {name!r}") from None


def skeleton(cls: str, config: dict[str, Any]) -> nn.Module:
    """The module with parameters on meta and non-persistent buffers (rotary tables) real."""
    klass = resolve_class(cls)
    with torch.device("meta"), _initialisers_skipped():
        module = _construct(klass, cls, config)
    if _real_buffers(module):
        return module
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):  # buffers this file does not know
        return _construct(klass, cls, config)


def bind(module: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Make ``tensors`` the module's own parameters and buffers, without copying.

    Every entry of the module's state dict must be provided, in its shape, and nothing else:
    a parameter left on meta would otherwise surface later as an obscure error, or worse as
    random weights.
    """
    slots = _slots(module)
    if slots is None:
        return _bind_by_loading(module, tensors)
    missing = sorted(slots.keys() - tensors.keys())
    extra = sorted(tensors.keys() - slots.keys())
    if missing or extra:
        raise BindError(
            f"{type(module).__name__}: state dict does not match: "
            f"missing {listed(missing)}, unexpected {listed(extra)}"
        )
    wrong = [
        f"{n} {list(tensors[n].shape)} (needs {list(t.shape)})"
        for n, (owner, attr, t) in slots.items()
        if tensors[n].shape != t.shape
    ]
    if wrong:
        raise BindError(f"{type(module).__name__}: shapes do not match: {listed(wrong)}")
    for name, (owner, attr, old) in slots.items():
        t = tensors[name]
        if isinstance(old, nn.Parameter):
            owner._parameters[attr] = nn.Parameter(t, requires_grad=False)
        else:
            owner._buffers[attr] = t
    return _placed(module, tensors)


def build(cls: str, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> nn.Module:
    heap.freeze_imports()
    return bind(skeleton(cls, config), tensors)


def _construct(klass: type[nn.Module], cls: str, config: dict[str, Any]) -> nn.Module:
    if cls.startswith("transformers:"):
        return klass(klass.config_class(**config))
    return klass.from_config(config)


@contextlib.contextmanager
def _initialisers_skipped() -> Iterator[None]:
    """``torch.nn.init``'s functions do nothing on this thread for the block (other threads
    are unaffected: the functions are wrapped once, and ask whose call it is)."""
    _wrap_initialisers()
    _local.skipping = True
    try:
        yield
    finally:
        _local.skipping = False


def _wrap_initialisers() -> None:
    with _rotary_lock:
        if getattr(nn.init, "_wand_wrapped", False):
            return
        for name in dir(nn.init):
            fn = getattr(nn.init, name)
            if name.endswith("_") and not name.startswith("_") and callable(fn):
                setattr(nn.init, name, _skippable(fn))
        nn.init._wand_wrapped = True


def _skippable(fn: Any) -> Any:
    @wraps(fn)
    def init(tensor: torch.Tensor, *args: Any, **kw: Any) -> torch.Tensor:
        return tensor if getattr(_local, "skipping", False) else fn(tensor, *args, **kw)

    return init


def _real_buffers(module: nn.Module) -> bool:
    """Give the skeleton's non-persistent buffers their real values; False if it has some
    this file does not know how to make."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    for sub in module.modules():
        meta = [n for n in sub._non_persistent_buffers_set if sub._buffers[n].is_meta]
        if not meta:
            continue
        if type(sub) is not WanRotaryPosEmbed or set(meta) != {"freqs_cos", "freqs_sin"}:
            return False
        cos, sin = _rotary_tables(sub)
        if cos.shape != sub.freqs_cos.shape or sin.shape != sub.freqs_sin.shape:
            return False
        sub._buffers["freqs_cos"], sub._buffers["freqs_sin"] = cos, sin
    return True


def _rotary_tables(rope: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' own rotary tables for ``rope``'s sizes, computed once per process, on one
    thread (these small ops stall on a busy core when torch spreads them over several)."""
    key = (type(rope), rope.attention_head_dim, tuple(rope.patch_size), rope.max_seq_len)
    with _rotary_lock:
        if key not in _rotary:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                with torch.device("cpu"):
                    real = key[0](*key[1:])
            finally:
                torch.set_num_threads(threads)
            _rotary[key] = (real.freqs_cos, real.freqs_sin)
        return _rotary[key]


def _slots(module: nn.Module) -> dict[str, tuple[nn.Module, str, torch.Tensor]] | None:
    """State-dict name → (the module that owns it, its attribute, the skeleton's tensor),
    from one walk that also sets every module to eval mode; None for a module whose loading
    is customised (its entries may not be plain attributes)."""
    slots: dict[str, tuple[nn.Module, str, torch.Tensor]] = {}
    stack = [("", module)]
    while stack:
        prefix, m = stack.pop()
        customised = type(m)._load_from_state_dict is not nn.Module._load_from_state_dict
        if customised or m._load_state_dict_pre_hooks or m._load_state_dict_post_hooks:
            return None
        m.training = False
        for attr, t in m._parameters.items():
            if t is not None:
                slots[prefix + attr] = (m, attr, t)
        for attr, t in m._buffers.items():
            if t is not None and attr not in m._non_persistent_buffers_set:
                slots[prefix + attr] = (m, attr, t)
        stack += [(f"{prefix}{n}.", c) for n, c in m._modules.items() if c is not None]
    return slots


def _bind_by_loading(module: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """The general way: ``load_state_dict(assign=True)``, then nothing may be left on meta."""
    expected = set(module.state_dict(keep_vars=True))
    missing = sorted(expected - tensors.keys())
    extra = sorted(tensors.keys() - expected)
    if missing or extra:
        raise BindError(
            f"{type(module).__name__}: state dict does not match: "
            f"missing {listed(missing)}, unexpected {listed(extra)}"
        )
    module.load_state_dict(tensors, strict=True, assign=True)
    module.eval().requires_grad_(False)
    return _placed(module, tensors)


def _placed(module: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Nothing left on meta; the real buffers follow the bound tensors to their device."""
    left = [n for n, t in _all_tensors(module) if t.is_meta]
    if left:
        raise BindError(f"{type(module).__name__}: left unbound: {listed(left)}")
    device = next(iter(tensors.values())).device if tensors else None
    if device is not None and device.type != "cpu":
        # the rotary tables are on the CPU: .to() moves them, and leaves the bound tensors,
        # which are on that device already, where they are
        module.to(device)
    return module


def _all_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)
