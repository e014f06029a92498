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


def test_binding_sets_every_entry_and_refuses_a_wrong_one(tiny):
    """The fast bind: every parameter is the given tensor, nothing is left on meta or in
    training mode, the rotary tables are real; a missing entry, an extra one or a wrong shape
    is a BindError naming it."""
    from wand.common.errors import BindError
    from wand.wan import load_state_dict, read_checkpoint
    from wand.wan.modules import bind, skeleton

    spec = read_checkpoint(tiny()).components["high_noise_model"]
    state = load_state_dict(spec)
    module = bind(skeleton(spec.cls, spec.config), state)
    for name, p in module.named_parameters():
        assert p.data_ptr() == state[name].data_ptr() and not p.requires_grad, name
    assert not any(m.training for m in module.modules())
    assert not module.rope.freqs_cos.is_meta and module.rope.freqs_cos.abs().sum() > 0
    for broken, word in (
        ({k: v for k, v in state.items() if k != "proj_out.weight"}, "missing proj_out.weight"),
        ({**state, "nonsense": state["proj_out.weight"]}, "unexpected nonsense"),
        ({**state, "proj_out.bias": torch.zeros(3)}, r"proj_out.bias \[3\]"),
    ):
        with pytest.raises(BindError, match=word):
            bind(skeleton(spec.cls, spec.config), broken)


def test_a_module_that_customises_loading_is_bound_the_general_way():
    """A module with its own ``_load_from_state_dict`` gets it called (load_state_dict), not
    the attribute walk, which would bypass it."""
    from wand.wan.modules import bind

    class Renaming(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.empty(2, device="meta"))
            self.calls = 0

        def _load_from_state_dict(self, state_dict, prefix, *args, **kw):
            self.calls += 1
            super()._load_from_state_dict(state_dict, prefix, *args, **kw)

    m = bind(Renaming(), {"weight": torch.ones(2)})
    assert m.calls == 1 and torch.equal(m.weight, torch.ones(2)) and not m.training
