"""Modules served by a real daemon compute exactly what from_pretrained's modules compute."""

from __future__ import annotations

import pytest
import torch
from conftest import LAYOUT_CASES
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from transformers import UMT5EncoderModel

from wand.wan import TASKS

DIFFUSERS_DIRS = {
    "high_noise_model": "transformer",
    "low_noise_model": "transformer_2",
    "model": "transformer",
}


def reference(folder, component: str) -> torch.nn.Module:
    """The same weights loaded the usual way, from the diffusers-layout copy."""
    if component == "text_encoder":
        return UMT5EncoderModel.from_pretrained(
            folder, subfolder="text_encoder", dtype=torch.bfloat16
        )
    if component == "vae":
        return AutoencoderKLWan.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32)
    return WanTransformer3DModel.from_pretrained(
        folder, subfolder=DIFFUSERS_DIRS[component], torch_dtype=torch.bfloat16
    )


def forward(module: torch.nn.Module, component: str, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    cfg = module.config
    with torch.no_grad():
        if component == "text_encoder":
            ids = torch.randint(2, cfg.vocab_size, (1, 12), generator=g).to(device)
            return module(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        if component == "vae":
            z = torch.randn(1, cfg.z_dim, 2, 4, 4, generator=g).to(device)
            return module.decode(z).sample
        x = torch.randn(1, cfg.in_channels, 2, 4, 4, generator=g).to(device, torch.bfloat16)
        text = torch.randn(1, 8, cfg.text_dim, generator=g).to(device, torch.bfloat16)
        t = torch.tensor([500], device=device)
        return module(x, timestep=t, encoder_hidden_states=text).sample


@pytest.mark.parametrize(("task", "layout"), LAYOUT_CASES)
def test_module_outputs_match_from_pretrained(tiny, start_daemon, task, layout):
    d = start_daemon(tiny(task, layout)).wait_ready()
    ref_dir = tiny(task, "diffusers")
    components = ["text_encoder", "vae", *TASKS[task].experts]
    with d.connect() as c:
        assert sorted(x["component"] for x in c.list()) == sorted(components)
        for comp in components:
            served, ref = c.module(comp), reference(ref_dir, comp)
            assert type(served) is type(ref)
            for name, p in ref.state_dict().items():
                assert served.state_dict()[name].dtype == p.dtype, name
            out, expected = forward(served, comp), forward(ref, comp)
            assert out.shape == expected.shape
            assert torch.equal(out, expected), f"{task} {layout} {comp}"
