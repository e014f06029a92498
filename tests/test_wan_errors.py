"""Broken checkpoints fail with a CheckpointError that names the file and the key."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from wand.common.errors import CheckpointError
from wand.wan import read_checkpoint, write_tiny

T5 = "models_t5_umt5-xxl-enc-bf16.pth"
SHARD = "diffusion_pytorch_model-00002-of-00006.safetensors"


@pytest.fixture
def ckpt(tmp_path):
    return write_tiny(tmp_path / "ckpt", "t2v-A14B", "original")


def _raises(path, *fragments, **kw):
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path, **kw)
    for fragment in fragments:
        assert str(fragment) in str(err.value), str(err.value)
    return str(err.value)


def _edit_pth(path, edit):
    sd = torch.load(path, weights_only=True)
    edit(sd)
    torch.save(sd, path)


def test_missing_tensor(ckpt):
    _edit_pth(ckpt / T5, lambda sd: sd.pop("blocks.1.ffn.fc2.weight"))
    _raises(ckpt, ckpt / T5, "'blocks.1.ffn.fc2.weight'", "missing")


def test_extra_tensor(ckpt):
    vae = ckpt / "Wan2.1_VAE.pth"
    _edit_pth(vae, lambda sd: sd.update({"decoder.extra.weight": torch.zeros(3)}))
    _raises(ckpt, vae, "'decoder.extra.weight'", "unexpected")


def test_misshaped_tensor_in_shard(ckpt):
    shard = ckpt / "low_noise_model" / SHARD
    sd = load_file(shard)
    key = next(iter(sd))
    sd[key] = torch.zeros(*sd[key].shape[:-1], sd[key].shape[-1] + 1)
    save_file(sd, shard)
    _raises(ckpt, shard, repr(key), "shape")


def test_truncated_shard(ckpt):
    shard = ckpt / "high_noise_model" / SHARD
    shard.write_bytes(shard.read_bytes()[:-100])
    last = list(load_file(ckpt / "low_noise_model" / SHARD))[-1]  # same layout in both experts
    _raises(ckpt, shard, repr(last), "truncated")


def test_missing_shard_file(ckpt):
    shard = ckpt / "high_noise_model" / SHARD
    shard.unlink()
    _raises(ckpt, ckpt / "high_noise_model", SHARD, "missing")


def test_index_names_absent_key(ckpt):
    index = ckpt / "high_noise_model" / "diffusion_pytorch_model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["blocks.9.ffn.0.weight"] = SHARD
    index.write_text(json.dumps(data))
    _raises(ckpt, ckpt / "high_noise_model" / SHARD, "'blocks.9.ffn.0.weight'")


def test_index_escaping_folder(ckpt):
    index = ckpt / "high_noise_model" / "diffusion_pytorch_model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["head.head.weight"] = "../" + T5
    index.write_text(json.dumps(data))
    _raises(ckpt, index, "'head.head.weight'")


def test_diffusers_missing_and_unexpected(tmp_path):
    path = write_tiny(tmp_path / "d", "ti2v-5B", "diffusers")
    vae = path / "vae" / "diffusion_pytorch_model.safetensors"
    sd = load_file(vae)
    sd["encoder.conv_in.weights"] = sd.pop("encoder.conv_in.weight")
    save_file(sd, vae)
    message = _raises(path, vae, "'encoder.conv_in.weight'", "'encoder.conv_in.weights'")
    assert "missing" in message and "unexpected" in message


def test_task_contradiction_and_unknowns(ckpt):
    _raises(ckpt, "i2v-A14B", "t2v-A14B", task="i2v-A14B")
    _raises(ckpt, "t2v-5B", task="t2v-5B")
    _raises(ckpt, "'model'", dtypes={"model": "float16"})


def test_not_a_checkpoint(tmp_path):
    _raises(tmp_path, tmp_path)
    _raises(tmp_path / "nope", "nope")
