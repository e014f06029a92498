"""The fp8 encodings of ComfyUI's and Kijai's single files: which tensors are weights, which
are their scales, and which are markers to drop.

* **plain**: float8_e4m3fn / float8_e5m2 weights, nothing else (scale 1);
* **legacy scaled** (the Comfy-Org Wan2.2 repack, Kijai's ``_scaled_KJ``): a ``scaled_fp8``
  marker of any dtype and shape, a per-tensor ``<layer>.scale_weight`` next to each scaled
  weight (Kijai also reads ``<layer>.weight_scale`` as the same thing), and possibly an
  activation scale ``<layer>.scale_input``, which only fp8 matmuls use;
* **ComfyUI's quantization metadata**: the format of each quantized layer in a uint8 JSON
  tensor ``<layer>.comfy_quant`` or in ``__metadata__["_quantization_metadata"]``
  (``{"layers": {"<layer>": {"format": ...}}}``), its scale in ``<layer>.weight_scale``.

Every form is read as ``weight = stored.to(float32) * scale`` (ComfyUI and Kijai both
multiply). Only the per-tensor float8 formats are read; block-scaled and integer formats
are refused by name. The fp8 kind of a weight is its stored dtype, never the marker's.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch

from wand.common.dtypes import name_of
from wand.common.errors import CheckpointError
from wand.common.spec import Scale
from wand.load.tensorfile import TensorFile

MARKER = "scaled_fp8"
WEIGHT = ".weight"
SCALES = (".scale_weight", ".weight_scale")  # legacy name first
ACTIVATION_SCALES = (".scale_input", ".input_scale")
CONFIG = ".comfy_quant"
METADATA = "_quantization_metadata"
FP8_FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
FP8 = frozenset(FP8_FORMATS.values())
OTHER_FORMATS = {  # ComfyUI's QUANT_ALGOS that need more than a per-tensor scale
    "nvfp4": "4-bit values in blocks of 16 with fp8 block scales",
    "mxfp8": "fp8 values in blocks of 32 with shared exponents",
    "int8_tensorwise": "int8 values",
    "convrot_w4a4": "4-bit values in rotated groups",
    "asym_w4a8_int8": "packed 4-bit values in groups",
    "awq_w4a16": "packed 4-bit values with zero points",
}
MAX_CONFIG_BYTES = 64 << 10


@dataclass
class Encoding:
    """What a file's extra tensors say about its weights (keys as stored in the file)."""

    scales: dict[str, Scale] = field(default_factory=dict)  # weight key → its scale
    consumed: set[str] = field(default_factory=set)  # markers, scales, layer configs
    scale_suffix: str | None = None  # what a scale is called here; None: the file has none


def read_encoding(f: TensorFile, prefixes: tuple[str, ...]) -> Encoding:
    """The encoding of ``f``; ``prefixes`` are those its keys may carry (metadata may name
    layers without them). CheckpointError for a scale or format wand cannot read."""
    keys = set(f.keys())
    enc = Encoding()
    formats = _layer_formats(f, keys, prefixes, enc)
    for layer, (fmt, where) in formats.items():
        _check_format(f, keys, layer, fmt, where)
    legacy = _take_scales(f, keys, enc)
    for layer, (_, where) in formats.items():
        if layer + WEIGHT not in enc.scales:
            raise CheckpointError(
                f"{f.path}: layer {layer!r} is float8 by its {where} but has no "
                f"{layer}{SCALES[1]} (its per-tensor scale)"
            )
    if legacy or enc.scales or formats:
        enc.scale_suffix = SCALES[0] if legacy else SCALES[1]
    return enc


def _take_scales(f: TensorFile, keys: set[str], enc: Encoding) -> bool:
    """Read every weight's scale into ``enc``, and mark scales, activation scales and
    markers consumed; whether the file is in the legacy scaled form."""
    legacy = False
    for key in sorted(keys):
        for suffix in SCALES:
            layer = key.removesuffix(suffix)
            if layer == key or layer + WEIGHT not in keys:
                continue
            if layer + WEIGHT in enc.scales:
                raise CheckpointError(
                    f"{f.path}: {layer + WEIGHT!r} has two scales ({layer}{SCALES[0]} and "
                    f"{layer}{SCALES[1]})"
                )
            enc.scales[layer + WEIGHT] = _scale(f, key)
            enc.consumed.add(key)
            legacy |= suffix == SCALES[0]
        if any(key.endswith(s) and key.removesuffix(s) + WEIGHT in keys for s in ACTIVATION_SCALES):
            enc.consumed.add(key)
        if key == MARKER or key.endswith("." + MARKER):
            enc.consumed.add(key)
            legacy = True
    return legacy


def _layer_formats(
    f: TensorFile, keys: set[str], prefixes: tuple[str, ...], enc: Encoding
) -> dict[str, tuple[str, str]]:
    """Layer (as stored) → (format, where it was said) from ``comfy_quant`` tensors and the
    ``_quantization_metadata`` header entry."""
    formats: dict[str, tuple[str, str]] = {}
    for key in sorted(k for k in keys if k.endswith(CONFIG)):
        enc.consumed.add(key)
        formats[key.removesuffix(CONFIG)] = (_format(f, repr(key), _config(f, key)), repr(key))
    text = f.metadata.get(METADATA)
    if text is None:
        return formats
    where = f"__metadata__[{METADATA!r}]"
    try:
        layers = json.loads(text)["layers"]
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise CheckpointError(f"{f.path}: {where} is not quantization metadata: {e}") from None
    if not isinstance(layers, dict):
        raise CheckpointError(f"{f.path}: {where}: 'layers' must map layer names to formats")
    for name, conf in layers.items():
        layer = next((p + name for p in ("", *prefixes) if p + name + WEIGHT in keys), None)
        if layer is None:
            raise CheckpointError(f"{f.path}: {where} names layer {name!r}, which it lacks")
        fmt = _format(f, f"{where}, layer {name!r}", conf)
        if formats.get(layer, (fmt,))[0] != fmt:
            raise CheckpointError(
                f"{f.path}: layer {layer!r} is {formats[layer][0]} by {formats[layer][1]} "
                f"and {fmt} by {where}"
            )
        formats.setdefault(layer, (fmt, where))
    return formats


def _config(f: TensorFile, key: str) -> object:
    info = f.info(key)
    if info.dtype != torch.uint8 or len(info.shape) != 1 or info.nbytes > MAX_CONFIG_BYTES:
        raise CheckpointError(
            f"{f.path}: {key!r} must be a 1-D uint8 tensor of JSON, "
            f"found {name_of(info.dtype)} {list(info.shape)}"
        )
    try:
        return json.loads(bytes(f.read(key).numpy()))
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{f.path}: {key!r} is not JSON: {str(e)[:200]}") from None


def _format(f: TensorFile, where: str, conf: object) -> str:
    fmt = conf.get("format") if isinstance(conf, dict) else None
    if not isinstance(fmt, str):
        raise CheckpointError(f"{f.path}: {where} names no quantization format")
    if fmt in FP8_FORMATS:
        return fmt
    what = OTHER_FORMATS.get(fmt)
    kind = f" ({what})" if what else ""
    raise CheckpointError(
        f"{f.path}: {where}: quantization format {fmt[:60]!r}{kind} is not one wand reads "
        f"(it reads {' and '.join(FP8_FORMATS)} with per-tensor scales)"
    )


def _check_format(f: TensorFile, keys: set[str], layer: str, fmt: str, where: str) -> None:
    weight = layer + WEIGHT
    if weight not in keys:
        raise CheckpointError(f"{f.path}: {where} is for layer {layer!r}, which has no weight")
    stored = f.info(weight).dtype
    if stored != FP8_FORMATS[fmt]:
        raise CheckpointError(
            f"{f.path}: {weight!r} is stored as {name_of(stored)}, its {where} says {fmt}"
        )


def _scale(f: TensorFile, key: str) -> Scale:
    """The per-tensor scale in ``key``: one finite floating-point value, shape [] or [1]."""
    info = f.info(key)
    if info.shape not in ((), (1,)):
        raise CheckpointError(
            f"{f.path}: scale {key!r} has shape {list(info.shape)}; wand reads per-tensor "
            "scales (shape [] or [1]), not per-channel or per-block ones"
        )
    if not info.dtype.is_floating_point:
        raise CheckpointError(f"{f.path}: scale {key!r} is stored as {name_of(info.dtype)}")
    value = f.read(key).to(torch.float32).reshape(()).item()
    if not math.isfinite(value):
        raise CheckpointError(f"{f.path}: scale {key!r} is {value}")
    return Scale(key, value, info.shape)
