"""Match a component's files against its class skeleton and describe every resident tensor."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from wand.common.dtypes import FP8, name_of, torch_dtype
from wand.common.errors import CheckpointError
from wand.common.spec import ComponentSpec, TensorSpec
from wand.wan.dtypes import resident_dtype
from wand.wan.modules import skeleton
from wand.wan.sources import Source

MAX_LISTED = 5


def component_spec(
    name: str,
    cls: str,
    config: dict[str, Any],
    source: Source,
    to_key: Callable[[str], str],
    dtype: str,
) -> ComponentSpec:
    """The spec of component ``name``: every state-dict entry of ``cls(config)`` found in
    ``source`` under ``to_key(entry)``, with the right shape, and nothing left over.

    Several entries may share one key (tied weights): the first is the tensor's name, the
    others its aliases.
    """
    try:
        module = skeleton(cls, config)
    except Exception as e:  # whatever the class raises on a config it cannot take
        raise CheckpointError(f"{name}: {source.origin}: config does not build {cls}: {e}") from e
    expected = module.state_dict()
    names_of = _names_by_key(expected, source, to_key, _tied(module))
    problems = [
        f"{source.origin}: missing tensor {k!r} (for {n[0]})"
        for k, n in names_of.items()
        if k not in source
    ]
    problems += [
        f"{source.file(k)}: unexpected tensor {source.stored_key(k)!r}"
        for k in source.keys()
        if k not in names_of
    ]
    tensors = []
    for key, names in names_of.items():
        if key not in source:
            continue
        info, like = source.info(key), expected[names[0]]
        want = tuple(like.shape)
        where = f"{source.file(key)}: tensor {source.stored_key(key)!r}"
        if info.shape != want:
            problems.append(f"{where} has shape {list(info.shape)}, {names[0]} needs {list(want)}")
            continue
        if info.dtype.is_floating_point != like.dtype.is_floating_point:
            kind = "floating-point" if like.dtype.is_floating_point else "integer"
            problems.append(
                f"{where} is stored as {info.dtype}, {names[0]} needs {kind} values ({like.dtype})"
            )
            continue
        resident = name_of(resident_dtype(cls, module, names[0], info.dtype, torch_dtype(dtype)))
        scale = source.scale(key)
        problem = _scaling_problem(module, names[0], source, key, info.dtype) or _fp8_problem(
            name, info.dtype, resident
        )
        if problem:
            problems.append(f"{where} {problem}")
            continue
        tensors.append(
            TensorSpec(
                names[0],
                source.file(key),
                source.stored_key(key),
                want,
                resident,
                tuple(names[1:]),
                scale,
            )
        )
    if problems:
        more = f" (and {len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else ""
        raise CheckpointError(f"{name}: " + "; ".join(problems[:MAX_LISTED]) + more)
    return ComponentSpec(name, cls, config, tensors)


def _scaling_problem(
    module: torch.nn.Module, name: str, source: Source, key: str, stored: torch.dtype
) -> str | None:
    """What is wrong with how a weight is scaled, if anything.

    In a scaled file every float8 weight of a Linear layer has its scale (the layers
    ComfyUI scales); other float8 tensors (embeddings) have none and a scale of 1, as
    ComfyUI reads them.
    """
    if source.scale(key) is not None:
        return None
    layer, _, leaf = name.rpartition(".")
    if source.scale_suffix is None or name_of(stored) not in FP8 or leaf != "weight":
        return None
    if not isinstance(module.get_submodule(layer), torch.nn.Linear):
        return None
    scale = source.stored_key(key).removesuffix(".weight") + source.scale_suffix
    return f"is {name_of(stored)} without its scale {scale!r} in a scaled file"


def _fp8_problem(component: str, stored: torch.dtype, resident: str) -> str | None:
    """An fp8 weight stays in the fp8 dtype it is stored in: it is never quantized again."""
    kind = name_of(stored)
    if kind in FP8 and resident in FP8 and kind != resident:
        return (
            f"is stored as {kind}: held in fp8 it stays {kind} ({component}={kind}), "
            f"or it is dequantized ({component}=bfloat16), never quantized again"
        )
    return None


def _names_by_key(
    expected: dict[str, torch.Tensor],
    source: Source,
    to_key: Callable[[str], str],
    tied: dict[str, str],
) -> dict[str, list[str]]:
    names_of: dict[str, list[str]] = {}
    for name in expected:
        key = to_key(name)
        if key not in source and name in tied:  # a tied copy the writer did not store
            key = to_key(tied[name])
        names_of.setdefault(key, []).append(name)
    return names_of


def _tied(module: torch.nn.Module) -> dict[str, str]:
    """transformers' declared ties (name → name it is tied to); diffusers Wan classes have none."""
    tied = getattr(module, "_tied_weights_keys", None)
    return dict(tied) if isinstance(tied, dict) else {}
