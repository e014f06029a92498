"""How long and how large a video a Wan checkpoint can make, and what making it holds in memory.

The hard limit is the transformer's rotary table: ``rope_max_seq_len`` positions on each axis
(latent frames, patch rows, patch columns). diffusers' ``WanRotaryPosEmbed`` slices the table
without a check, so a longer video is a shape error in the first denoising step.

Memory is an *estimate* from the shapes of the largest tensors diffusers keeps alive at once in
each phase (read from its Wan code: the transformer block, the VAE decoder, the frame
post-processing), not a measurement: allocator overhead, the text encoder and the weights
themselves (already resident in the daemon) are not in it, and it assumes a fused attention
kernel (PyTorch's ``scaled_dot_product_attention`` picks one for these shapes on the CPU and on
CUDA), so attention costs memory linear in the tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

BF16, FP32, FP64 = 2, 4, 8  # bytes per element
SOLVER_COPIES = 6  # latents, both noise predictions, the guided one, two kept by the solver
FRAME_COPIES = 3  # decoded video, rescaled to [0, 1], as numpy frames (post-processing)
CONCAT_COPIES = 2  # the VAE appends each decoded chunk with torch.cat: old and new at once
DECODER_LIVE = 4  # a causal conv block at full resolution: input, output, cache, residual


@dataclass(frozen=True)
class Geometry:
    """What sizes a video, from the transformer's and the VAE's configs."""

    temporal: int  # frames per latent frame (VAE scale_factor_temporal)
    spatial: int  # pixels per latent row or column (VAE scale_factor_spatial)
    patch: tuple[int, int, int]  # transformer patch (frames, rows, columns)
    rope: int  # rope_max_seq_len: rotary positions per axis
    channels: int  # latent channels (VAE z_dim)
    dim: int  # transformer width
    ffn: int  # feed-forward width
    head_dim: int
    token_timesteps: bool  # ti2v-5B (expand_timesteps): the time modulation is per token
    decoder: tuple[int, int]  # VAE decoder: channels at full resolution, its pixel patch

    @classmethod
    def of(
        cls, transformer: dict[str, Any], vae: dict[str, Any], expand_timesteps: bool
    ) -> Geometry:
        """From the configs the modules are built with (missing keys: diffusers' defaults)."""
        heads, head_dim = transformer["num_attention_heads"], transformer["attention_head_dim"]
        dims = vae.get("dim_mult") or [1]
        return cls(
            temporal=vae.get("scale_factor_temporal", 4),
            spatial=vae.get("scale_factor_spatial", 8),
            patch=tuple(transformer.get("patch_size", (1, 2, 2))),
            rope=transformer.get("rope_max_seq_len", 1024),
            channels=vae.get("z_dim", 16),
            dim=heads * head_dim,
            ffn=transformer["ffn_dim"],
            head_dim=head_dim,
            token_timesteps=expand_timesteps,
            decoder=(
                (vae.get("decoder_base_dim") or vae.get("base_dim", 96)) * dims[0],
                vae.get("patch_size") or 1,
            ),
        )

    def latent(self, frames: int, width: int, height: int) -> tuple[int, int, int]:
        """(frames, rows, columns) of the latent video."""
        return (frames - 1) // self.temporal + 1, height // self.spatial, width // self.spatial

    def grid(self, frames: int, width: int, height: int) -> tuple[int, int, int]:
        """(frames, rows, columns) of transformer tokens: what the rotary table indexes."""
        t, h, w = self.latent(frames, width, height)
        return t // self.patch[0], h // self.patch[1], w // self.patch[2]

    def tokens(self, frames: int, width: int, height: int) -> int:
        return math.prod(self.grid(frames, width, height))


def beyond_rope(g: Geometry, frames: int, width: int, height: int) -> str | None:
    """Why the transformer cannot place every token of this video, or None."""
    t, rows, cols = g.grid(frames, width, height)
    most = g.rope
    if t > most:
        longest = (most * g.patch[0] - 1) * g.temporal + 1
        return (
            f"{frames} frames are {t} latent frames, and the model's rotary table covers {most} "
            f"(rope_max_seq_len): at most {longest} frames"
        )
    for side, n, patch in (("high", rows, g.patch[1]), ("wide", cols, g.patch[2])):
        if n > most:
            pixels = height if side == "high" else width
            return (
                f"{pixels} pixels {side} are {n} patches, and the model's rotary table covers "
                f"{most} (rope_max_seq_len): at most {most * patch * g.spatial} pixels"
            )
    return None


def phases(g: Geometry, frames: int, width: int, height: int) -> dict[str, dict[str, int]]:
    """Estimated bytes alive at once in each phase, by part: ``denoise`` (on the experts'
    device), ``decode`` (on the VAE's) and ``frames`` (post-processing, ending on the CPU)."""
    t, h, w = g.latent(frames, width, height)
    n = g.tokens(frames, width, height)
    video = frames * 3 * height * width * FP32
    channels, pixel_patch = g.decoder
    return {
        "denoise": {
            "latents": SOLVER_COPIES * g.channels * t * h * w * FP32,
            "transformer activations": n * _per_token(g),
        },
        "decode": {
            "VAE decoder": DECODER_LIVE
            * g.temporal
            * channels
            * (height // pixel_patch)
            * (width // pixel_patch)
            * FP32,
            "decoded video": CONCAT_COPIES * video,
        },
        "frames": {"decoded video": FRAME_COPIES * video},
    }


def _per_token(g: Geometry) -> int:
    """Bytes per token inside one transformer block (blocks run one after another).

    Held through the block: the hidden state (bf16), the rotary cos/sin tables (float64), and
    for per-token timesteps the six modulation vectors (bf16, and their float32 sum with the
    block's table). Then the larger of the attention step — its input, q, k, v and output
    (bf16) and the two float64 half-width products of the rotary embedding — and the
    feed-forward step: its input, the inner activation before and after GELU (bf16) and the
    float32 gated residual sum.
    """
    held = g.dim * BF16 + 2 * g.head_dim * FP64
    if g.token_timesteps:
        held += 6 * g.dim * (BF16 + FP32)
    attention = 5 * g.dim * BF16 + 2 * (g.dim // 2) * FP64
    feed_forward = g.dim * BF16 + 2 * g.ffn * BF16 + 3 * g.dim * FP32
    return held + max(attention, feed_forward)
