"""Class configs for components in Wan's own names (the release folders, single files),
from their config.json, metadata and tensor shapes.

Nothing here knows a full-size number: a tiny checkpoint in the real layout yields a tiny
config the same way the release yields the real one. The one rule of thumb, a single file's
head size of 128 (it has no config.json), gives way to the file's metadata when it says.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

from wand.common.errors import CheckpointError
from wand.wan.latents import LATENTS
from wand.wan.sources import Source

HEAD_DIM = 128  # every Wan2.2 DiT: 5120 / 40 heads, 3072 / 24 heads


def _shape(source: Source, key: str) -> tuple[int, ...]:
    if key not in source:
        raise CheckpointError(f"{source.origin}: missing tensor {key!r}")
    return source.info(key).shape


def _count(source: Source, pattern: str) -> int:
    """How many distinct values the ``(\\d+)`` in ``pattern`` takes among the keys."""
    found = {m[1] for k in source.keys() if (m := re.fullmatch(pattern, k))}
    return len(found)


def transformer_channels(source: Source) -> tuple[int, int]:
    """(input, output) channels of a ``WanModel``: its patch embedding's and its head's."""
    _, in_channels, *patch = _shape(source, "patch_embedding.weight")
    out_features, numel = _shape(source, "head.head.weight")[0], math.prod(patch)
    if not numel or out_features % numel:
        raise CheckpointError(f"{source.origin}: head of {out_features} for patch {patch}")
    return in_channels, out_features // numel


def transformer_config(wan: dict[str, Any], source: Source) -> dict[str, Any]:
    """``WanTransformer3DModel`` config from a ``WanModel`` config.json (which only has the
    fields WanModel registers) and the expert's tensor shapes."""
    try:
        heads, layers, eps = int(wan["num_heads"]), int(wan["num_layers"]), float(wan["eps"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{source.origin}: WanModel config lacks {e}") from None
    dim, _, *patch = _shape(source, "patch_embedding.weight")
    in_channels, out_channels = transformer_channels(source)
    if heads <= 0 or dim % heads:
        raise CheckpointError(f"{source.origin}: dim {dim} in {heads} heads")
    return {
        "patch_size": patch,
        "num_attention_heads": heads,
        "attention_head_dim": dim // heads,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "text_dim": _shape(source, "text_embedding.0.weight")[1],
        "freq_dim": _shape(source, "time_embedding.0.weight")[1],
        "ffn_dim": _shape(source, "blocks.0.ffn.0.weight")[0],
        "num_layers": layers,
        "cross_attn_norm": "blocks.0.norm3.weight" in source,
        "qk_norm": "rms_norm_across_heads"
        if "blocks.0.self_attn.norm_q.weight" in source
        else None,
        "eps": eps,
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": 1024,
        "pos_embed_seq_len": None,
    }


def wan_model_settings(metadata: dict[str, str], source: Source) -> dict[str, Any]:
    """What a ``WanModel`` config.json would say that shapes do not, for a single file,
    which has none: ComfyUI's rules (attention heads of 128, eps 1e-6, blocks counted),
    unless the file's ``__metadata__["config"]`` says otherwise (``{"transformer": {...}}``,
    which ComfyUI reads too)."""
    where = f"{source.origin}: __metadata__['config']"
    try:
        given = json.loads(metadata.get("config", "{}")).get("transformer", {})
    except (ValueError, AttributeError, RecursionError) as e:
        raise CheckpointError(f"{where} is not a JSON object of configs: {e}") from None
    if not isinstance(given, dict):
        raise CheckpointError(f"{where}: 'transformer' must be an object")
    dim = _shape(source, "patch_embedding.weight")[0]
    heads = given.get("num_heads")
    if heads is None:
        if dim % HEAD_DIM:
            raise CheckpointError(
                f"{source.origin}: dim {dim} is not a multiple of {HEAD_DIM} (Wan2.2's head "
                "size) and the file's metadata does not say its number of heads"
            )
        heads = dim // HEAD_DIM
    return {
        "num_heads": heads,
        "num_layers": _count(source, r"blocks\.(\d+)\..*"),
        "eps": given.get("eps", 1e-6),
    }


def t5_config(source: Source, to_key: Callable[[str], str]) -> dict[str, Any]:
    """``UMT5Config`` fields for a UMT5 encoder (umt5 family, gated GELU) from its shapes;
    ``to_key`` maps ``UMT5EncoderModel`` names to the file's keys (Wan's ``.pth`` names,
    or the identity for transformers' own)."""

    def shape(name: str) -> tuple[int, ...]:
        return _shape(source, to_key(name))

    vocab, d_model = shape("shared.weight")
    attention = "encoder.block.0.layer.0.SelfAttention."
    buckets, heads = shape(attention + "relative_attention_bias.weight")
    inner = shape(attention + "q.weight")[0]
    layers = 0
    while to_key(f"encoder.block.{layers}.layer.0.layer_norm.weight") in source:
        layers += 1
    return {
        "model_type": "umt5",
        "architectures": ["UMT5EncoderModel"],
        "vocab_size": vocab,
        "d_model": d_model,
        "d_kv": inner // heads,
        "d_ff": shape("encoder.block.0.layer.1.DenseReluDense.wi_1.weight")[0],
        "num_layers": layers,
        "num_decoder_layers": layers,
        "num_heads": heads,
        "relative_attention_num_buckets": buckets,
        "relative_attention_max_distance": 128,
        "dropout_rate": 0.1,
        "layer_norm_epsilon": 1e-6,
        "feed_forward_proj": "gated-gelu",
        "dense_act_fn": "gelu_new",
        "is_gated_act": True,
        "tie_word_embeddings": False,
        "scalable_attention": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
    }


def vae_version(source: Source) -> str:
    """ "2.2" when the encoder stages nest their blocks (``downsamples.K.downsamples.J``)."""
    nested = any(k.startswith("encoder.downsamples.0.downsamples.") for k in source.keys())
    return "2.2" if nested else "2.1"


def vae_config(source: Source) -> dict[str, Any]:
    """``AutoencoderKLWan`` config from the encoder's structure (the decoder mirrors it)."""
    version = vae_version(source)
    stages = _encoder_stages(source, version)
    base_dim, in_channels = _shape(source, "encoder.conv1.weight")[:2]
    z_dim = _shape(source, "conv2.weight")[0]
    patch = round((in_channels / 3) ** 0.5)
    mean, std = LATENTS[version]
    if len(mean) != z_dim:
        raise CheckpointError(
            f"{source.origin}: Wan{version} VAE with z_dim {z_dim}, not {len(mean)}"
        )
    temporal = [t for _, _, t in stages[:-1]]
    mult = [out // base_dim for out, _, _ in stages]
    decoder_base = _shape(source, "decoder.head.0.gamma")[0] // mult[0]
    return {
        "base_dim": base_dim,
        "decoder_base_dim": None if decoder_base == base_dim else decoder_base,
        "z_dim": z_dim,
        "dim_mult": mult,
        "num_res_blocks": stages[0][1],
        "attn_scales": [],
        "temperal_downsample": temporal,
        "dropout": 0.0,
        "latents_mean": mean,
        "latents_std": std,
        "is_residual": version == "2.2",
        "in_channels": in_channels,
        "out_channels": _shape(source, "decoder.head.2.weight")[0],
        "patch_size": patch if patch > 1 else None,
        "scale_factor_temporal": 2 ** sum(temporal),
        "scale_factor_spatial": 2 ** (len(stages) - 1) * patch,
    }


def _encoder_stages(source: Source, version: str) -> list[tuple[int, int, bool]]:
    """Per encoder stage: (output channels, resnet count, temporal downsampling)."""
    if version == "2.2":
        items = [
            [
                f"encoder.downsamples.{i}.downsamples.{j}."
                for j in range(
                    _count(source, rf"encoder\.downsamples\.{i}\.downsamples\.(\d+)\..*")
                )
            ]
            for i in range(_count(source, r"encoder\.downsamples\.(\d+)\..*"))
        ]
    else:
        flat = [
            f"encoder.downsamples.{i}."
            for i in range(_count(source, r"encoder\.downsamples\.(\d+)\..*"))
        ]
        items, stage = [], []
        for prefix in flat:
            stage.append(prefix)
            if prefix + "resample.1.weight" in source:
                items.append(stage)
                stage = []
        items.append(stage)
    stages = []
    for stage in items:
        resnets = [p for p in stage if p + "residual.6.weight" in source]
        if not resnets:
            raise CheckpointError(f"{source.origin}: VAE encoder stage without residual blocks")
        out = _shape(source, resnets[-1] + "residual.6.weight")[0]
        stages.append((out, len(resnets), stage[-1] + "time_conv.weight" in source))
    return stages
