"""Where each state-dict name of the ecosystem classes lives in the original Wan2.2 files.

Each function maps a name of the class that runs the component (diffusers / transformers)
to the key of the same tensor in the original release. Mapping in this direction lets the
reader walk the class skeleton's state dict, and lets the tiny-checkpoint writer produce
original files from the same table. All mappings are pure renames.
"""

from __future__ import annotations

import re
from collections.abc import Callable

# (prefix pattern, replacement): a template rewrites the matched prefix and keeps the rest;
# a callable receives the match and returns the whole new name.
Rule = tuple[str, str | Callable[[re.Match], str]]


def _apply(name: str, rules: list[Rule]) -> str:
    """Rewrite ``name`` with the first rule whose pattern matches at its start; else keep it."""
    for pattern, repl in rules:
        m = re.match(pattern, name)
        if m:
            return repl(m) if callable(repl) else m.expand(repl) + name[m.end() :]
    return name


def _nested(rules: list[Rule]) -> Callable[[re.Match], str]:
    """Keep the matched prefix and rename the rest of the name with ``rules``."""
    return lambda m: m.group(0) + _apply(m.string[m.end() :], rules)


# ---- WanTransformer3DModel → WanModel ---------------------------------------------------

_TRANSFORMER_BLOCK: list[Rule] = [
    (r"scale_shift_table$", "modulation"),
    (r"attn1\.to_out\.0\.", "self_attn.o."),
    (r"attn1\.to_", "self_attn."),
    (r"attn1\.", "self_attn."),
    (r"attn2\.to_out\.0\.", "cross_attn.o."),
    (r"attn2\.to_", "cross_attn."),
    (r"attn2\.", "cross_attn."),
    (r"norm2\.", "norm3."),  # diffusers numbers the norms in call order: original norm3
    (r"ffn\.net\.0\.proj\.", "ffn.0."),
    (r"ffn\.net\.2\.", "ffn.2."),
]

_TRANSFORMER: list[Rule] = [
    (r"condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"condition_embedder\.time_proj\.", "time_projection.1."),
    (r"scale_shift_table$", "head.modulation"),
    (r"proj_out\.", "head.head."),
    (r"blocks\.\d+\.", _nested(_TRANSFORMER_BLOCK)),
]


def transformer(name: str) -> str:
    """``WanTransformer3DModel`` name → original ``WanModel`` key."""
    return _apply(name, _TRANSFORMER)


# ---- UMT5EncoderModel → Wan T5Encoder (models_t5_umt5-xxl-enc-bf16.pth) -------------------

_T5_BLOCK: list[Rule] = [
    (r"layer\.0\.SelfAttention\.relative_attention_bias\.", "pos_embedding.embedding."),
    (r"layer\.0\.SelfAttention\.", "attn."),
    (r"layer\.0\.layer_norm\.", "norm1."),
    (r"layer\.1\.DenseReluDense\.wi_0\.", "ffn.gate.0."),
    (r"layer\.1\.DenseReluDense\.wi_1\.", "ffn.fc1."),
    (r"layer\.1\.DenseReluDense\.wo\.", "ffn.fc2."),
    (r"layer\.1\.layer_norm\.", "norm2."),
]

_T5: list[Rule] = [
    (r"(shared|encoder\.embed_tokens)\.", "token_embedding."),  # one tensor, two names
    (r"encoder\.final_layer_norm\.", "norm."),
    (
        r"encoder\.block\.(\d+)\.",
        lambda m: f"blocks.{m[1]}." + _apply(m.string[m.end() :], _T5_BLOCK),
    ),
]


def t5(name: str) -> str:
    """``UMT5EncoderModel`` name → original Wan T5 encoder key."""
    return _apply(name, _T5)


# ---- AutoencoderKLWan → WanVAE_ (Wan2.1_VAE.pth, Wan2.2_VAE.pth) ---------------------------

_RESNET: list[Rule] = [
    (r"norm1\.", "residual.0."),
    (r"conv1\.", "residual.2."),
    (r"norm2\.", "residual.3."),
    (r"conv2\.", "residual.6."),
    (r"conv_shortcut\.", "shortcut."),
]


def _resnet(prefix: str) -> Callable[[re.Match], str]:
    return lambda m: m.expand(prefix) + _apply(m.string[m.end() :], _RESNET)


_VAE_COMMON: list[Rule] = [
    (r"quant_conv\.", "conv1."),
    (r"post_quant_conv\.", "conv2."),
    (r"(encoder|decoder)\.conv_in\.", r"\1.conv1."),
    (r"(encoder|decoder)\.norm_out\.", r"\1.head.0."),
    (r"(encoder|decoder)\.conv_out\.", r"\1.head.2."),
    (r"(encoder|decoder)\.mid_block\.resnets\.0\.", _resnet(r"\1.middle.0.")),
    (r"(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.middle.1."),
    (r"(encoder|decoder)\.mid_block\.resnets\.1\.", _resnet(r"\1.middle.2.")),
]


def vae21(name: str, num_res_blocks: int) -> str:
    """Wan2.1 VAE: the encoder is one flat list; the decoder groups ``num_res_blocks + 1``
    resnets and an upsampler per stage into one flat list too."""
    per_stage = num_res_blocks + 2
    rules = _VAE_COMMON + [
        (r"encoder\.down_blocks\.(\d+)\.", _resnet(r"encoder.downsamples.\1.")),
        (
            r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
            lambda m: _resnet(f"decoder.upsamples.{int(m[1]) * per_stage + int(m[2])}.")(m),
        ),
        (
            r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
            lambda m: (
                f"decoder.upsamples.{int(m[1]) * per_stage + per_stage - 1}." + m.string[m.end() :]
            ),
        ),
    ]
    return _apply(name, rules)


def vae22(name: str, num_res_blocks: int) -> str:
    """Wan2.2 VAE: per stage ``downsamples.K.downsamples.J`` / ``upsamples.K.upsamples.J``,
    with the resampler as the entry after the resnets."""
    rules = _VAE_COMMON + [
        (
            r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.",
            _resnet(r"encoder.downsamples.\1.downsamples.\2."),
        ),
        (
            r"encoder\.down_blocks\.(\d+)\.downsampler\.",
            rf"encoder.downsamples.\1.downsamples.{num_res_blocks}.",
        ),
        (
            r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
            _resnet(r"decoder.upsamples.\1.upsamples.\2."),
        ),
        (
            r"decoder\.up_blocks\.(\d+)\.upsampler\.",
            rf"decoder.upsamples.\1.upsamples.{num_res_blocks + 1}.",
        ),
    ]
    return _apply(name, rules)
