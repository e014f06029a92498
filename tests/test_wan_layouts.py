"""Every layout of every task reads, binds and computes like the ecosystem's own loaders."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from safetensors.torch import save_file
from transformers import AutoTokenizer, UMT5EncoderModel

from wand.common.dtypes import name_of, torch_dtype
from wand.common.errors import CheckpointError
from wand.common.spec import ComponentSpec
from wand.wan import LAYOUTS, TASKS, load_state_dict, read_checkpoint, write_tiny
from wand.wan.modules import build

CASES = [(task, layout) for task in TASKS for layout in LAYOUTS]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(task, layout) → a tiny checkpoint folder, same seed for all (same weights per task)."""
    root = tmp_path_factory.mktemp("wan")
    return {(t, lay): write_tiny(root / f"{t}-{lay}", t, lay, seed=7) for t, lay in CASES}


@pytest.mark.parametrize("task,layout", CASES)
def test_detects_task_layout_and_extras(tiny, task, layout):
    spec = read_checkpoint(tiny[task, layout])
    assert (spec.task, spec.layout) == (task, layout)
    assert set(spec.components) == {"text_encoder", "vae", *TASKS[task].experts}
    assert spec.extras["boundary_ratio"] == TASKS[task].boundary_ratio
    assert spec.extras["expand_timesteps"] is (task == "ti2v-5B")
    assert spec.extras["scheduler"]["prediction_type"] == "flow_prediction"
    assert spec.tokenizer is not None and spec.tokenizer.is_dir()
    assert read_checkpoint(tiny[task, layout], task=task).task == task
    json.dumps([c.config for c in spec.components.values()])  # goes over the wire as is
    json.dumps(spec.extras)


@pytest.mark.parametrize("task,layout", CASES)
def test_default_dtypes(tiny, task, layout):
    spec = read_checkpoint(tiny[task, layout])
    assert {t.dtype for t in spec.components["vae"].tensors} == {"float32"}
    assert {t.dtype for t in spec.components["text_encoder"].tensors} == {"bfloat16"}
    expert = spec.components[TASKS[task].experts[0]]
    fp32 = {t.name for t in expert.tensors if t.dtype == "float32"}
    bf16 = {t.name for t in expert.tensors if t.dtype == "bfloat16"}
    assert fp32 and bf16 and len(fp32) + len(bf16) == len(expert.tensors)
    assert "scale_shift_table" in fp32 and "blocks.0.norm2.weight" in fp32
    assert "condition_embedder.time_embedder.linear_1.weight" in fp32
    assert "blocks.0.attn1.to_q.weight" in bf16 and "proj_out.weight" in bf16


def _reference(spec: ComponentSpec, folder, dtype):
    """The same component loaded by diffusers/transformers from the -Diffusers copy."""
    sub = {"high_noise_model": "transformer", "low_noise_model": "transformer_2"}
    sub = sub.get(spec.name, "transformer" if spec.name == "model" else spec.name)
    cls = {
        "diffusers:WanTransformer3DModel": WanTransformer3DModel,
        "diffusers:AutoencoderKLWan": AutoencoderKLWan,
        "transformers:UMT5EncoderModel": UMT5EncoderModel,
    }[spec.cls]
    return cls.from_pretrained(folder / sub, torch_dtype=dtype).eval()


def _forward(name: str, module: torch.nn.Module, gen: torch.Generator) -> torch.Tensor:
    with torch.no_grad():
        if name == "text_encoder":
            ids = torch.randint(3, module.config.vocab_size, (2, 7), generator=gen)
            mask = torch.ones_like(ids)
            mask[1, 4:] = 0
            return module(input_ids=ids, attention_mask=mask).last_hidden_state
        if name == "vae":
            z = torch.randn(1, module.config.z_dim, 2, 4, 4, generator=gen)
            return module.decode(z).sample
        c = module.config
        x = torch.randn(1, c.in_channels, 2, 4, 4, generator=gen).to(module.dtype)
        text = torch.randn(1, 5, c.text_dim, generator=gen).to(module.dtype)
        return module(x, timestep=torch.tensor([700]), encoder_hidden_states=text).sample


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_binds_and_matches_from_pretrained(tiny, task, layout):
    """Both layouts of one seed give modules equal, bit for bit, to from_pretrained's."""
    spec = read_checkpoint(tiny[task, layout])
    for name, component in spec.components.items():
        dtype = torch_dtype(component.tensors[0].dtype) if name == "vae" else torch.bfloat16
        ours = build(component.cls, component.config, load_state_dict(component))
        ref = _reference(component, tiny[task, "diffusers"], dtype)
        theirs = ref.state_dict()
        mine = ours.state_dict()
        assert mine.keys() == theirs.keys(), name
        for key, t in theirs.items():
            assert mine[key].dtype == t.dtype, (name, key)
            assert torch.equal(mine[key], t), (name, key)
        out = _forward(name, ours, torch.Generator().manual_seed(1))
        expected = _forward(name, ref, torch.Generator().manual_seed(1))
        assert torch.isfinite(out).all() and out.abs().sum() > 0
        assert torch.equal(out, expected), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_dtype_overrides_match_from_pretrained(tiny, dtype):
    """keep-in-fp32 rules under other dtypes, as from_pretrained applies them."""
    folder = tiny["t2v-A14B", "diffusers"]
    dtypes = {"text_encoder": dtype, "low_noise_model": dtype, "vae": torch.bfloat16}
    spec = read_checkpoint(folder, dtypes={n: name_of(d) for n, d in dtypes.items()})
    for name, want in dtypes.items():
        component = spec.components[name]
        theirs = _reference(component, folder, want).state_dict()
        mine = {t.name: t.dtype for t in component.tensors}
        mine.update({a: t.dtype for t in component.tensors for a in t.aliases})
        assert mine == {k: name_of(t.dtype) for k, t in theirs.items()}, name
    untouched = {t.name: t.dtype for t in spec.components["high_noise_model"].tensors}
    assert untouched["patch_embedding.weight"] == "bfloat16"


def test_bench_preset_has_real_tensor_counts(tmp_path):
    path = write_tiny(tmp_path / "bench", "t2v-A14B", "original", preset="bench", width=16)
    spec = read_checkpoint(path)
    counts = {n: len(c.tensors) for n, c in spec.components.items()}
    assert counts == {
        "text_encoder": 242,  # + encoder.embed_tokens.weight as an alias = 243 names
        "vae": 194,
        "high_noise_model": 1095,
        "low_noise_model": 1095,
    }
    assert sum(len(t.aliases) for t in spec.components["text_encoder"].tensors) == 1


def test_tokenizer_loads_offline_as_t5(tiny, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for layout in LAYOUTS:
        spec = read_checkpoint(tiny["t2v-A14B", layout])
        tok = AutoTokenizer.from_pretrained(spec.tokenizer)
        assert type(tok).__name__.startswith("T5Tokenizer")
        assert (tok.pad_token_id, tok.eos_token_id) == (0, 1)
        vocab = spec.components["text_encoder"].config["vocab_size"]
        ids = tok("A cat walks on the beach", padding="max_length", max_length=16).input_ids
        assert len(ids) == 16 and max(ids) < vocab and 2 not in ids[:6]
        assert ids[ids.index(1) + 1 :] == [0] * (15 - ids.index(1))


def test_single_file_text_encoder(tmp_path):
    """-Diffusers text encoders come sharded or as one model.safetensors."""
    path = write_tiny(tmp_path / "d", "t2v-A14B", "diffusers")
    folder = path / "text_encoder"
    sharded = read_checkpoint(path).components["text_encoder"]
    state = load_state_dict(sharded)
    stored = {k: v for k, v in state.items() if k != "encoder.embed_tokens.weight"}
    save_file(stored, str(folder / "model.safetensors"))
    for f in folder.glob("model*-of-*.safetensors"):
        f.unlink()
    (folder / "model.safetensors.index.json").unlink()
    single = read_checkpoint(path).components["text_encoder"]
    assert {t.file.name for t in single.tensors} == {"model.safetensors"}
    assert [(t.name, t.aliases) for t in single.tensors] == [
        (t.name, t.aliases) for t in sharded.tensors
    ]
    shutil.rmtree(folder)
    with pytest.raises(CheckpointError, match="text_encoder"):
        read_checkpoint(path)


def test_seeds_differ(tmp_path):
    a = read_checkpoint(write_tiny(tmp_path / "a", "ti2v-5B", "diffusers", seed=1))
    b = read_checkpoint(write_tiny(tmp_path / "b", "ti2v-5B", "diffusers", seed=2))
    key = "blocks.0.attn1.to_q.weight"
    sa, sb = load_state_dict(a.components["model"]), load_state_dict(b.components["model"])
    assert not torch.equal(sa[key], sb[key])
