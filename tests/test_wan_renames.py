"""Original-layout renames checked against references that do not use wand's own tables.

* transformer, Wan2.1 VAE: diffusers' packaged converters applied to the original files;
* T5: a compact re-implementation of Wan's original T5 encoder, run on the original keys,
  against transformers' UMT5EncoderModel bound from our spec;
* Wan2.2 VAE: the key rules of diffusers' ``scripts/convert_wan_to_diffusers.py``
  (``convert_vae_22``), re-expressed here as string edits. That script is not packaged, so
  this is a re-statement of its rules rather than a run of its code, and no original Wan2.2
  VAE module is run: a mapping that swapped two same-shaped tensors in a way that script
  also would, would pass. Shapes of every tensor are checked against AutoencoderKLWan.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from diffusers.loaders.single_file_utils import (
    convert_wan_transformer_to_diffusers,
    convert_wan_vae_to_diffusers,
)

from wand.load.tensorfile import TensorFile
from wand.wan import load_state_dict, read_checkpoint, write_tiny
from wand.wan.modules import build


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    root = tmp_path_factory.mktemp("orig")
    return {t: write_tiny(root / t, t, "original", seed=3) for t in ("i2v-A14B", "ti2v-5B")}


def _file_state(component) -> dict[str, torch.Tensor]:
    """Every tensor of the component's files, under its original key."""
    state = {}
    for path in {t.file for t in component.tensors}:
        f = TensorFile(path)
        state.update({k: f.read(k) for k in f.keys()})
    return state


def _assert_same_mapping(component, converted: dict[str, torch.Tensor]) -> None:
    names = {n for t in component.tensors for n in (t.name, *t.aliases)}
    assert names == set(converted)
    for t in component.tensors:
        assert torch.equal(converted[t.name], _file_state(component)[t.key]), t.name


def test_transformer_rename_matches_diffusers_converter(original):
    spec = read_checkpoint(original["i2v-A14B"])
    for expert in ("high_noise_model", "low_noise_model"):
        component = spec.components[expert]
        converted = convert_wan_transformer_to_diffusers(dict(_file_state(component)))
        _assert_same_mapping(component, converted)


def test_wan21_vae_rename_matches_diffusers_converter(original):
    component = read_checkpoint(original["i2v-A14B"]).components["vae"]
    _assert_same_mapping(component, convert_wan_vae_to_diffusers(_file_state(component)))


_RESNET = {
    ".residual.0.": ".norm1.",
    ".residual.2.": ".conv1.",
    ".residual.3.": ".norm2.",
    ".residual.6.": ".conv2.",
    ".shortcut.": ".conv_shortcut.",
}
_FIXED = {
    "conv1.": "quant_conv.",
    "conv2.": "post_quant_conv.",
    "encoder.conv1.": "encoder.conv_in.",
    "decoder.conv1.": "decoder.conv_in.",
    "encoder.head.0.": "encoder.norm_out.",
    "encoder.head.2.": "encoder.conv_out.",
    "decoder.head.0.": "decoder.norm_out.",
    "decoder.head.2.": "decoder.conv_out.",
    "encoder.middle.1.": "encoder.mid_block.attentions.0.",
    "decoder.middle.1.": "decoder.mid_block.attentions.0.",
}


def _convert_vae22_key(key: str) -> str:
    """diffusers' convert_vae_22 rules, restated."""
    for old, new in _FIXED.items():
        if key.startswith(old):
            return new + key[len(old) :]
    for part in ("encoder", "decoder"):
        for i, j in (("0", "0"), ("2", "1")):
            old = f"{part}.middle.{i}."
            if key.startswith(old):
                key = f"{part}.mid_block.resnets.{j}." + key[len(old) :]
    outer, inner = ("downsamples", "downsampler"), ("upsamples", "upsampler")
    for part, (plural, single) in (("encoder", outer), ("decoder", inner)):
        if key.startswith(f"{part}.{plural}."):
            key = key.replace(
                f"{part}.{plural}.", f"{part}.{'down' if part == 'encoder' else 'up'}_blocks."
            )
            parts = key.split(".")
            if "residual" in key or "shortcut" in key:
                key = key.replace(f".{plural}.", ".resnets.")
            elif parts[3] == plural:  # the resampler: drop its index
                key = ".".join(parts[:3] + [single] + parts[5:])
    for old, new in _RESNET.items():
        key = key.replace(old, new)
    return key


def test_wan22_vae_rename_matches_convert_vae_22_rules(original):
    component = read_checkpoint(original["ti2v-5B"]).components["vae"]
    assert len(component.tensors) == 196
    files = _file_state(component)
    _assert_same_mapping(component, {_convert_vae22_key(k): v for k, v in files.items()})
    # convert_vae_22 drops the resampler's index, so check it here: the original stages are
    # nn.Sequential lists, numbered 0..n without gaps, the resampler last
    for part, plural in (("encoder", "downsamples"), ("decoder", "upsamples")):
        stages: dict[str, set[int]] = {}
        for key in files:
            m = re.match(rf"{part}\.{plural}\.(\d+)\.{plural}\.(\d+)\.(\w+)", key)
            if m:
                stages.setdefault(m[1], set()).add(int(m[2]))
                if m[3] in ("resample", "time_conv"):
                    stages.setdefault(m[1] + "r", set()).add(int(m[2]))
        for stage, indices in stages.items():
            if not stage.endswith("r"):
                assert indices == set(range(len(indices))), (part, stage)
                assert stages.get(stage + "r", {max(indices)}) == {max(indices)}, (part, stage)


# ---- T5: the original Wan encoder, compactly ------------------------------------------------


def _bucket(rel: torch.Tensor, num_buckets: int, max_dist: int = 128) -> torch.Tensor:
    half = num_buckets // 2
    buckets = (rel > 0).long() * half
    rel = rel.abs()
    exact = half // 2
    large = (
        exact
        + (torch.log(rel.float() / exact) / math.log(max_dist / exact) * (half - exact)).long()
    )
    return buckets + torch.where(rel < exact, rel, large.clamp(max=half - 1))


def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


def _wan_t5(sd: dict[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Wan's T5Encoder (shared_pos=False): pre-norm blocks, unscaled attention with a
    per-layer bidirectional relative bias, gated tanh-GELU feed-forward."""
    x = sd["token_embedding.weight"][ids]
    b, n = ids.shape
    layers = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
    for i in range(layers):
        p = lambda k, i=i: sd[f"blocks.{i}.{k}"]  # noqa: E731
        table = p("pos_embedding.embedding.weight")
        heads = table.shape[1]
        bias = table[_bucket(rel, table.shape[0])].permute(2, 0, 1)[None]
        bias = bias.masked_fill(mask[:, None, None, :] == 0, torch.finfo(x.dtype).min)
        h = _rms(x, p("norm1.weight"))
        q, k, v = (F.linear(h, p(f"attn.{c}.weight")).view(b, n, heads, -1) for c in "qkv")
        attn = torch.softmax(torch.einsum("binc,bjnc->bnij", q, k) + bias, dim=-1)
        x = x + F.linear(
            torch.einsum("bnij,bjnc->binc", attn, v).reshape(b, n, -1), p("attn.o.weight")
        )
        h = _rms(x, p("norm2.weight"))
        gate = F.gelu(F.linear(h, p("ffn.gate.0.weight")), approximate="tanh")
        x = x + F.linear(F.linear(h, p("ffn.fc1.weight")) * gate, p("ffn.fc2.weight"))
    return _rms(x, sd["norm.weight"])


def test_t5_pth_matches_original_encoder(original):
    spec = read_checkpoint(original["ti2v-5B"], dtypes={"text_encoder": "float32"})
    component = spec.components["text_encoder"]
    files = {k: v.float() for k, v in _file_state(component).items()}
    model = build(component.cls, component.config, load_state_dict(component))
    ids = torch.randint(
        3, component.config["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(0)
    )
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0  # long enough for the logarithmic buckets; padding masked
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).last_hidden_state
    expected = _wan_t5(files, ids, mask)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    # the reference is sensitive to the layer order: swapping two blocks must show
    swapped = dict(files)
    for k in [k for k in files if k.startswith("blocks.0.")]:
        swapped[k], swapped[k.replace("blocks.0.", "blocks.1.", 1)] = (
            files[k.replace("blocks.0.", "blocks.1.", 1)],
            files[k],
        )
    assert not torch.allclose(_wan_t5(swapped, ids, mask), expected, atol=1e-3)
