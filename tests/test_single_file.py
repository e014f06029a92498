"""Single-file checkpoints (ComfyUI's and Kijai's, plain and fp8) in a real daemon, checked
against a reading of the same files that does not use wand's reader: safetensors, prefix
stripped, ``weight × scale`` as ComfyUI documents it, the renames of diffusers' converters.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
from conftest import Daemon, Service, check_config, run_wanctl, t2v_pipeline
from diffusers.loaders.single_file_utils import (
    convert_wan_transformer_to_diffusers,
    convert_wan_vae_to_diffusers,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from wand.common.errors import CheckpointError
from wand.common.spec import from_record, to_record
from wand.daemon import config
from wand.wan import TASKS, load_state_dict, original_names, read_checkpoint, read_files
from wand.wan.single_file import COMPONENTS
from wand.wan.tiny_files import LAYOUTS, QUANTS, file_names

FORMS = [(layout, quant, task) for layout in LAYOUTS for quant in QUANTS for task in TASKS]
SCALED = ("fp8_scaled", "comfy_quant")
NOT_WEIGHTS = (".scale_weight", ".weight_scale", ".comfy_quant", ".scale_input", ".input_scale")


def name_of(layout: str, quant: str, task: str) -> str:
    return f"{layout}-{quant}-{task}"


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """(layout, quant, task) → {component: file} of a tiny checkpoint, seed 0 (the seed of
    conftest's ``tiny`` folders: the same weights)."""
    from wand.wan import write_tiny

    root = tmp_path_factory.mktemp("single")
    made = {}
    for form in FORMS:
        folder = write_tiny(root / name_of(*form), form[2], form[0], quant=form[1])
        made[form] = {role: folder / p for role, p in file_names(form[2], *form[:2]).items()}
    return made


def toml_entry(name: str, files: dict[str, Path], **more: str) -> str:
    lines = ["[[checkpoint]]", f'name = "{name}"']
    lines += [f'{k} = "{v}"' for k, v in {**files, **more}.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def served(written, tiny, tmp_path_factory):
    """One daemon holding every form, configured in one TOML file; Kijai's, which embed no
    tokenizer, name the tiny release folder's."""
    work = tmp_path_factory.mktemp("served")
    cfg = work / "wand.toml"
    folder = tiny("t2v-A14B", "original") / "google" / "umt5-xxl"
    cfg.write_text(
        "".join(
            toml_entry(
                name_of(*f), files, **({"tokenizer": str(folder)} if f[0] == "kijai" else {})
            )
            for f, files in written.items()
        )
    )
    d = Daemon(None, "--config", str(cfg), env={"CACHE_DIRECTORY": str(work / "cache")})
    yield d.wait_ready(120)
    d.stop()


# ---- the independent reading ----------------------------------------------------------------


def reference(path: Path, role: str, names: set[str]) -> dict[str, torch.Tensor]:
    """``path`` as float32 tensors under the class's state-dict ``names``: read with
    safetensors, prefix stripped (ComfyUI's and Kijai's rules), markers and scales left
    out, every weight with a scale multiplied by it (ComfyUI: ``weight.to(dtype) *
    scale``), renamed by diffusers' converters (Wan's own names elsewhere)."""
    sd = load_file(str(path))
    named = [k for k in sd if k not in ("scaled_fp8", "spiece_model")]
    if any(k.startswith("model.diffusion_model.") for k in named):
        sd = {k.removeprefix("model.diffusion_model."): v for k, v in sd.items()}
    elif all(k.startswith("model.") for k in named):
        sd = {k.removeprefix("model."): v for k, v in sd.items()}
    weights = {}
    for key, value in sd.items():
        if key.endswith(NOT_WEIGHTS) or key in ("scaled_fp8", "spiece_model"):
            continue
        if key.startswith("model_type.") or key == "encoder.embed_tokens.weight":
            continue
        layer = key.removesuffix(".weight")
        scale = sd.get(layer + ".scale_weight", sd.get(layer + ".weight_scale"))
        value = value.to(torch.float32)
        weights[key] = value * scale.to(torch.float32) if scale is not None else value
    if role in TASKS["t2v-A14B"].experts + TASKS["ti2v-5B"].experts:
        return convert_wan_transformer_to_diffusers(weights)
    if role == "vae" and "decoder.upsamples.0.upsamples.0.residual.2.weight" not in weights:
        return convert_wan_vae_to_diffusers(weights)
    if role == "text_encoder" and "shared.weight" in weights:
        return {**weights, "encoder.embed_tokens.weight": weights["shared.weight"]}
    rename = original_names.t5 if role == "text_encoder" else vae22
    by_key = {rename(n): n for n in names if n != "encoder.embed_tokens.weight"}
    state = {by_key[k]: v for k, v in weights.items()}
    if role == "text_encoder":
        state["encoder.embed_tokens.weight"] = state["shared.weight"]
    return state


def vae22(name: str) -> str:
    return original_names.vae22(name, num_res_blocks=2)  # the tiny VAE's


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.to(torch.float32), b.to(torch.float32)
    return float((a - b).norm() / max(float(b.norm()), 1e-12))


@pytest.mark.parametrize(("layout", "quant", "task"), FORMS)
def test_every_form_attaches_as_an_independent_reading_of_its_files(
    served, written, tiny, layout, quant, task
):
    """Bit for bit: every attached tensor is the file's weight × scale, in the dtype the
    release folder of the same task gets; and close to the release's weights (the same
    seed), so that the scales were applied, not just read the same way twice."""
    name = name_of(layout, quant, task)
    release = read_checkpoint(tiny(task, "original"))
    with served.connect() as c:
        (info,) = [x for x in c.checkpoints() if x["name"] == name]
        assert (info["task"], info["layout"]) == (task, "single-file")
        for role, path in written[layout, quant, task].items():
            att = c.attachment(f"{name}/{role}")
            got = att.tensors
            ref = reference(path, role, set(got))
            assert set(ref) == set(got), role
            want = load_state_dict(release.components[role])
            for key, tensor in got.items():
                assert tensor.dtype == want[key].dtype, (role, key)
                assert torch.equal(tensor, ref[key].to(tensor.dtype)), (role, key)
                assert relative_error(tensor, want[key]) < 0.15, (role, key)
            att.module()  # binds to the class
            c.detach(f"{name}/{role}")


def test_scaled_weights_differ_from_their_stored_values(written):
    """The tiny fp8_scaled files are a test of scaling: their stored values alone are far
    from the weights (so an unscaled read would fail the comparison above)."""
    files = written["comfy", "fp8_scaled", "t2v-A14B"]
    sd = load_file(str(files["high_noise_model"]))
    q, s = sd["blocks.0.self_attn.q.weight"], sd["blocks.0.self_attn.q.scale_weight"]
    assert q.dtype == torch.float8_e4m3fn and s.shape == () and s.dtype == torch.float32
    assert relative_error(q, q.to(torch.float32) * s) > 10
    kj = load_file(str(written["kijai", "comfy_quant", "t2v-A14B"]["low_noise_model"]))
    conf = kj["model.diffusion_model.blocks.1.ffn.2.comfy_quant"]
    assert json.loads(bytes(conf.numpy())) == {"format": "float8_e4m3fn"}
    assert "model.diffusion_model.text_embedding.0.weight_scale" not in kj  # blocks only


def test_tensor_counts_follow_the_real_files(written):
    """Per expert: every WanModel tensor, a scale per quantized Linear weight (all of them
    in Comfy's files, the blocks' in Kijai's), one marker; nothing resident but weights."""
    blocks = 2  # the tiny preset: 69 tensors per expert, as 1095 in 40 blocks
    counts = {}
    for layout in LAYOUTS:
        path = written[layout, "fp8_scaled", "t2v-A14B"]["high_noise_model"]
        with safe_open(str(path), "pt") as f:
            counts[layout] = len(list(f.keys()))
    assert counts == {"comfy": 69 + blocks * 10 + 6 + 1, "kijai": 69 + blocks * 10 + 1}
    spec = read_files(written["comfy", "fp8_scaled", "t2v-A14B"])
    assert len(spec.components["high_noise_model"].tensors) == 69


# ---- the tokenizer the text encoder embeds --------------------------------------------------


def test_the_embedded_tokenizer_encodes_as_sentencepiece(served, written, tiny):
    from sentencepiece import SentencePieceProcessor
    from transformers import AutoTokenizer

    proto = load_file(str(written["comfy", "none", "t2v-A14B"]["text_encoder"]))["spiece_model"]
    sp = SentencePieceProcessor(model_proto=bytes(proto.numpy()))
    with served.connect() as c:
        infos = {x["name"]: x for x in c.checkpoints()}
    folder = Path(infos[name_of("comfy", "none", "t2v-A14B")]["tokenizer"])
    assert infos[name_of("comfy", "fp8_scaled", "ti2v-5B")]["tokenizer"] == str(folder)  # once
    given = infos[name_of("kijai", "none", "t2v-A14B")]["tokenizer"]  # it embeds none
    assert given == str(tiny("t2v-A14B", "original") / "google" / "umt5-xxl")
    assert folder.stat().st_mode & 0o777 == 0o755
    tok = AutoTokenizer.from_pretrained(folder)
    for text in ["a cat walks on the beach", "  A  Dog,   in the city! ", "ｃａｔ 42 ½", ""]:
        assert tok(text).input_ids == sp.encode(text) + [sp.eos_id()], text
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 1)


def test_a_pipeline_runs_on_single_files_with_the_embedded_tokenizer(served):

    name = name_of("comfy", "fp8_scaled", "t2v-A14B")
    options = dict(
        negative_prompt="the dog",
        height=32,
        width=32,
        num_frames=5,
        num_inference_steps=3,
        guidance_scale=4.0,
        guidance_scale_2=3.0,
    )
    with served.connect() as c:
        pipe = c.pipeline(name)
        got = pipe("a cat walks", generator=torch.Generator().manual_seed(3), **options).frames
        info = next(x for x in c.checkpoints() if x["name"] == name)
        parts = {n: c.module(a) for n, a in info["components"].items()}
    ref = t2v_pipeline(parts, info["tokenizer"], pipe.pipe.scheduler)
    expected = ref("a cat walks", generator=torch.Generator().manual_seed(3), **options).frames
    assert got.shape == (1, 5, 32, 32, 3) and np.isfinite(got).all()
    assert np.array_equal(got, expected)


def test_wanctl_generate_runs_on_single_files(served, tmp_path):
    out = tmp_path / "clip.mp4"
    r = served.wanctl(
        "generate", "--checkpoint", name_of("kijai", "comfy_quant", "ti2v-5B"),
        "--prompt", "a cat", "--size", "32*32", "--frame-num", "5", "--sample-steps", "2",
        "--out", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > 0


# ---- variants the generator does not write -------------------------------------------------


def rewrite(path: Path, change: Callable[[dict], dict | None]) -> Path:
    """``path`` with its tensors changed in place by ``change``, and the header metadata it
    returns (if any) added."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    sd = load_file(str(path))
    more = change(sd) or {}
    save_file(sd, str(path), metadata={**meta, **more})
    return path


def copied(files: dict[str, Path], dest: Path) -> dict[str, Path]:
    dest.mkdir()
    return {r: Path(shutil.copy(p, dest / p.name)) for r, p in files.items()}


def _metadata_form(sd: dict) -> dict:
    """comfy_quant tensors moved into ``_quantization_metadata``, named without the prefix."""
    layers = {}
    for key in [k for k in sd if k.endswith(".comfy_quant")]:
        layer = key.removesuffix(".comfy_quant").removeprefix("model.diffusion_model.")
        layers[layer] = json.loads(bytes(sd.pop(key).numpy()))
    return {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}


VARIANTS = {
    "bare Kijai diffusion model": lambda sd: _strip(sd, "model.diffusion_model."),
    "Kijai VAE without model.": lambda sd: _strip(sd, "model."),
    "Comfy diffusion model under model.diffusion_model.": lambda sd: _prefix(sd),
    "activation scales and Kijai markers": lambda sd: sd.update(
        {
            "blocks.0.self_attn.q.scale_input": torch.tensor(1.0),
            "model_type.Wan2_2-T2V-A14B": torch.zeros(0),
        }
    ),
    "a stored copy of the tied embedding": lambda sd: sd.update(
        {"encoder.embed_tokens.weight": sd["shared.weight"].clone()}
    ),
}
WHERE = {  # variant → (layout, quant, role)
    "bare Kijai diffusion model": ("kijai", "fp8_scaled", "high_noise_model"),
    "Kijai VAE without model.": ("kijai", "none", "vae"),
    "Comfy diffusion model under model.diffusion_model.": (
        "comfy",
        "fp8_scaled",
        "low_noise_model",
    ),
    "activation scales and Kijai markers": ("comfy", "fp8_scaled", "high_noise_model"),
    "a stored copy of the tied embedding": ("comfy", "fp8_scaled", "text_encoder"),
}


def _strip(sd: dict, prefix: str) -> None:
    for k in list(sd):
        sd[k.removeprefix(prefix)] = sd.pop(k)


def _prefix(sd: dict) -> None:
    for k in list(sd):
        sd["model.diffusion_model." + k] = sd.pop(k)  # the marker too, as ComfyUI saves it


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_read_as_the_files_they_came_from(written, tmp_path, variant):
    layout, quant, role = WHERE[variant]
    files = written[layout, quant, "t2v-A14B"]
    mine = copied(files, tmp_path / "v")
    rewrite(mine[role], VARIANTS[variant])
    original = read_files(files).components[role]
    before = load_state_dict(original)
    after = read_files(mine).components[role]
    assert after.tensors[0].file == mine[role]
    assert [(t.name, t.aliases) for t in after.tensors] == [
        (t.name, t.aliases) for t in original.tensors
    ]  # a stored copy of a tied weight is not a second tensor
    state = load_state_dict(after)
    assert state.keys() == before.keys()
    assert all(torch.equal(state[k], before[k]) for k in state), variant


def test_quantization_metadata_in_the_header_reads_as_comfy_quant_tensors(written, tmp_path):
    files = written["kijai", "comfy_quant", "i2v-A14B"]
    mine = copied(files, tmp_path / "m")
    rewrite(mine["high_noise_model"], _metadata_form)
    assert not any(k.endswith(".comfy_quant") for k in load_file(str(mine["high_noise_model"])))
    want = load_state_dict(read_files(files).components["high_noise_model"])
    got = load_state_dict(read_files(mine).components["high_noise_model"])
    assert all(torch.equal(got[k], want[k]) for k in want)


# ---- bad files ----------------------------------------------------------------------------


def refused(files: dict[str, Path], **kw) -> str:
    with pytest.raises(CheckpointError) as e:
        read_files(files, **kw)
    return str(e.value)


def _set(key: str, value: torch.Tensor) -> Callable[[dict], None]:
    return lambda sd: sd.__setitem__(key, value)


def _drop(key: str) -> Callable[[dict], None]:
    return lambda sd: sd.__delitem__(key)


def _config(key: str, conf: dict) -> Callable[[dict], None]:
    data = torch.frombuffer(bytearray(json.dumps(conf).encode()), dtype=torch.uint8)
    return _set(key, data)


BAD = {  # case → (layout, quant, role, change, the message's words)
    "a scale with the wrong shape": (
        "comfy",
        "fp8_scaled",
        "high_noise_model",
        _set("blocks.1.cross_attn.k.scale_weight", torch.ones(32)),
        ["scale 'blocks.1.cross_attn.k.scale_weight' has shape [32]", "per-tensor"],
    ),
    "a scale that is not finite": (
        "kijai",
        "fp8_scaled",
        "low_noise_model",
        _set("model.diffusion_model.blocks.0.ffn.0.scale_weight", torch.tensor([math.inf])),
        ["scale 'model.diffusion_model.blocks.0.ffn.0.scale_weight' is inf"],
    ),
    "an fp8 weight without its scale": (
        "comfy",
        "fp8_scaled",
        "high_noise_model",
        _drop("blocks.0.ffn.2.scale_weight"),
        [
            "'blocks.0.ffn.2.weight' is float8_e4m3fn without its scale",
            "'blocks.0.ffn.2.scale_weight' in a scaled file",
        ],
    ),
    "an fp8 text-encoder weight without its scale": (
        "comfy",
        "comfy_quant",
        "text_encoder",
        _drop("encoder.block.1.layer.1.DenseReluDense.wo.weight_scale"),
        [
            "layer 'encoder.block.1.layer.1.DenseReluDense.wo' is float8",
            "has no encoder.block.1.layer.1.DenseReluDense.wo.weight_scale",
        ],
    ),
    "a block-scaled format": (
        "comfy",
        "comfy_quant",
        "low_noise_model",
        _config("blocks.0.self_attn.v.comfy_quant", {"format": "nvfp4"}),
        ["'blocks.0.self_attn.v.comfy_quant'", "quantization format 'nvfp4'", "blocks of 16"],
    ),
    "an unknown format": (
        "kijai",
        "comfy_quant",
        "high_noise_model",
        _config("model.diffusion_model.blocks.1.self_attn.o.comfy_quant", {"format": "fp3"}),
        ["quantization format 'fp3' is not one wand reads"],
    ),
    "a format that is not the stored dtype": (
        "comfy",
        "comfy_quant",
        "high_noise_model",
        _config("blocks.0.self_attn.q.comfy_quant", {"format": "float8_e5m2"}),
        ["'blocks.0.self_attn.q.weight' is stored as float8_e4m3fn", "says float8_e5m2"],
    ),
    "a comfy_quant that is not JSON": (
        "comfy",
        "comfy_quant",
        "high_noise_model",
        _set("blocks.0.self_attn.q.comfy_quant", torch.tensor([1, 2, 3], dtype=torch.uint8)),
        ["'blocks.0.self_attn.q.comfy_quant' is not JSON"],
    ),
    "a Wan2.1 image-to-video model": (
        "comfy",
        "none",
        "high_noise_model",
        _set("img_emb.proj.0.weight", torch.ones(4)),
        ["is a Wan2.1 image-to-video or first-last-frame model (it has img_emb)"],
    ),
    "Wan2.1 image keys in a block": (
        "comfy",
        "none",
        "low_noise_model",
        _set("blocks.1.cross_attn.k_img.weight", torch.ones(4, 4)),
        ["is a Wan2.1 image-to-video model ('blocks.1.cross_attn.k_img.weight')"],
    ),
    "a VACE model": (
        "kijai",
        "none",
        "high_noise_model",
        _set("model.diffusion_model.vace_blocks.0.after_proj.bias", torch.ones(4)),
        ["is a Wan VACE model, not a Wan2.2 diffusion model"],
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_files_are_refused_naming_file_and_key(written, tmp_path, case):
    layout, quant, role, change, words = BAD[case]
    mine = copied(written[layout, quant, "t2v-A14B"], tmp_path / "bad")
    rewrite(mine[role], change)
    message = refused(mine)
    assert str(mine[role]) in message
    for w in words:
        assert w in message, (case, message)


def test_a_file_of_another_kind_is_refused_by_what_it_is(written, tmp_path):
    files = written["comfy", "none", "t2v-A14B"]
    other = written["kijai", "none", "ti2v-5B"]
    lora = tmp_path / "style.safetensors"
    save_file({"diffusion_model.blocks.0.attn.to_q.lora_A.weight": torch.ones(2, 2)}, str(lora))
    cases = {
        "text_encoder": (files["vae"], "is a Wan VAE, not a UMT5 text encoder"),
        "vae": (files["text_encoder"], "is a UMT5 text encoder, not a Wan VAE"),
        "high_noise_model": (lora, "is not a Wan2.2 diffusion model: a LoRA"),
        "low_noise_model": (other["model"], "holds a ti2v-5B model, whose files are model"),
    }
    for role, (path, words) in cases.items():
        message = refused({**files, role: path})
        assert str(path) in message and words in message, message
    message = refused({**files, "vae": other["vae"]})
    assert "is a Wan2.2 VAE; t2v-A14B uses the Wan2.1 one" in message
    message = refused({**other, "model": files["high_noise_model"]})
    assert "holds a t2v-A14B model, whose files are high_noise_model and low_noise_model" in message
    message = refused(files, task="i2v-A14B")
    assert "asked for task i2v-A14B, but its diffusion model holds t2v-A14B" in message
    without = {k: v for k, v in files.items() if k != "vae"}
    assert "single-file checkpoint without 'vae'" in refused(without)
    assert "model (ti2v-5B) and high/low_noise_model (A14B)" in refused({**files, **other})


@pytest.mark.parametrize("layout", LAYOUTS)
def test_experts_given_the_wrong_way_round_are_refused_by_their_names(written, layout):
    files = written[layout, "fp8_scaled", "i2v-A14B"]
    swapped = {
        **files,
        "high_noise_model": files["low_noise_model"],
        "low_noise_model": files["high_noise_model"],
    }
    message = refused(swapped)
    said = f"high_noise_model: {files['low_noise_model']} is the low-noise expert by its name"
    assert said in message and "swap the two files" in message
    same = {**files, "low_noise_model": files["high_noise_model"]}
    assert "given as both experts" in refused(same)


# ---- the daemon, its configuration and its restarts ----------------------------------------


def test_a_bad_single_file_stops_the_daemon_with_its_error(written, tmp_path):
    files = copied(written["comfy", "fp8_scaled", "ti2v-5B"], tmp_path / "b")
    rewrite(files["model"], _drop("blocks.1.self_attn.k.scale_weight"))
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in files.items()]
    r = check_config(tmp_path, *flags)
    assert r.returncode == 78
    assert "'blocks.1.self_attn.k.weight' is float8_e4m3fn without its scale" in r.stderr
    assert str(files["model"]) in r.stderr and "Traceback" not in r.stderr


def test_wanctl_loads_single_files_and_explains_what_is_wrong(
    start_daemon, tiny, written, tmp_path
):
    cache = {"CACHE_DIRECTORY": str(tmp_path / "cache")}
    d = start_daemon(tiny("ti2v-5B"), env=cache).wait_ready()
    files = written["kijai", "fp8_scaled", "i2v-A14B"]
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in files.items()]
    r = d.wanctl("load", *flags, "--name", "kj")
    assert r.returncode == 0, r.stderr
    assert "kj/high_noise_model: ready" in r.stdout
    swapped = [f"--high-noise-model={files['low_noise_model']}"]
    swapped += [f"--low-noise-model={files['high_noise_model']}"]
    swapped += [f"--{k.replace('_', '-')}={files[k]}" for k in ("text_encoder", "vae")]
    r = d.wanctl("load", *swapped, "--name", "kj2")
    assert r.returncode == 1
    assert r.stderr.startswith("wanctl: checkpoint: high_noise_model: ") and "swap" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = d.wanctl("load", f"--vae={files['vae']}")
    assert r.returncode == 1 and "single-file checkpoint without 'text_encoder'" in r.stderr
    assert d.wanctl("load").returncode == 2


def test_the_configuration_takes_files_or_a_folder(tmp_path):
    files = {k: f"/m/{k}.safetensors" for k in ("high_noise_model", "low_noise_model")}
    files.update(text_encoder="/m/te.safetensors", vae="/m/vae.safetensors")
    entry = config.checkpoint({**files, "tokenizer": "/m/tok", "name": "x"}, "c 1")
    assert entry.path is None and entry.files == {k: Path(v) for k, v in files.items()}
    assert entry.tokenizer == Path("/m/tok") and entry.source == "/m/high_noise_model.safetensors"
    problems = {
        "'path' (a folder) or one file per component, not both": {**files, "path": "/f"},
        "tokenizer goes with one file per component": {"path": "/f", "tokenizer": "/t"},
        "'path' (the checkpoint folder), or one file per component": {"name": "x"},
        "vae must be a file's path": {**files, "vae": 3},
    }
    for words, entry in problems.items():
        with pytest.raises(config.ConfigError, match=re.escape(words)):
            config.checkpoint(entry, "c 1")
    flags = config.with_overrides(config.Config(), **files, tokenizer="/t", name="cli")
    assert flags.checkpoints[0].files == entry_files(files) and flags.checkpoints[0].name == "cli"


def entry_files(files: dict[str, str]) -> dict[str, Path]:
    return {k: Path(v) for k, v in files.items()}


def test_names_the_sides_repeat_agree():
    from wanctl import cli

    assert set(config.COMPONENT_FILES) == set(COMPONENTS)
    assert (cli.TINY_FILE_LAYOUTS, cli.TINY_QUANTS) == (LAYOUTS, QUANTS)


def test_a_spec_with_scales_survives_its_stored_record(written):
    spec = read_files(written["kijai", "fp8_scaled", "t2v-A14B"])
    assert sum(t.scale is not None for t in spec.components["low_noise_model"].tensors) == 20
    assert from_record(msgpack.unpackb(msgpack.packb(to_record(spec)))) == spec


def test_what_older_daemons_stored_still_matches(tiny):
    """An upgrade adopts what the daemon before it stored: spec rows without scales read,
    and an unscaled component keeps its slab's key."""
    from wand.daemon import identity

    spec = read_checkpoint(tiny("t2v-A14B", "original"))
    record = to_record(spec)
    for c in record["components"]:
        c["tensors"] = [row[:6] for row in c["tensors"]]
    assert from_record(msgpack.unpackb(msgpack.packb(record))) == spec
    vae = spec.components["vae"]
    rows = tuple((t.name, t.key, t.shape, t.dtype, t.aliases) for t in vae.tensors)
    assert identity.shape_key(vae, "cpu")[2] == rows


def test_the_gpu_staging_path_dequantizes_as_the_cpu_loader(written):
    """The GPU fill path run on CPU tensors: chunks split mid-tensor, scaled pieces."""
    from wand.common import manifest
    from wand.load import cpu, gpu

    spec = read_files(written["comfy", "fp8_scaled", "t2v-A14B"])
    for comp in spec.components.values():
        rows, nbytes = manifest.layout(comp)
        expected = torch.zeros(nbytes, dtype=torch.uint8)
        cpu.fill(expected, comp, rows)
        for capacity in (7, 1000, 1 << 20):
            got = torch.zeros(nbytes, dtype=torch.uint8)
            gpu.fill(got, comp, rows, capacity=capacity, depth=3)
            assert torch.equal(got, expected), (comp.name, capacity)
        views = dict(zip([r[0] for r in rows], rows, strict=True))
        state = load_state_dict(comp)
        for t in comp.tensors:
            _, dtype, shape, stride, offset = views[t.name]
            dt = state[t.name].dtype
            got = expected.view(dt).as_strided(shape, stride, offset // dt.itemsize)
            assert torch.equal(got, state[t.name]), t.name


def test_a_restarted_daemon_adopts_single_file_slabs_and_reads_no_file(written, tmp_path):
    files = copied(written["comfy", "fp8_scaled", "ti2v-5B"], tmp_path / "files")
    cfg = tmp_path / "wand.toml"
    cfg.write_text(toml_entry("five", files))
    workdir = tmp_path / "run"
    workdir.mkdir(mode=0o700)
    cache = tmp_path / "cache"
    service = Service(workdir, "--config", str(cfg), env={"CACHE_DIRECTORY": str(cache)})
    try:
        cold = service.start()
        service.crash()
        adopted = service.start()
        comps = {c["component"]: c for c in adopted["components"]}
        assert all(c["adopted"] for c in comps.values()) and len(comps) == 3
        assert "unchanged since it was read, spec from the fd store" in service.log.read_text()
        disk = sum(p.stat().st_size for p in files.values())
        assert cold["rchar"] - adopted["rchar"] > 0.8 * disk
        (tokenizer,) = cache.glob("tokenizers/*")
        service.crash()
        shutil.rmtree(tokenizer)  # a cleaned cache: the spec is read again, the slabs adopted
        again = service.start()
        assert all(c["adopted"] for c in again["components"])
        assert f"tokenizer {tokenizer} is gone: reading the checkpoint" in service.log.read_text()
        assert tokenizer.is_dir()
        service.crash()
        rewrite(files["vae"], lambda sd: None)  # a new version of one file: read again
        changed = {c["component"]: c["adopted"] for c in service.start()["components"]}
        assert changed == {"text_encoder": True, "vae": False, "model": True}
    finally:
        service.close()


def test_run_wanctl_make_tiny_prints_the_entry(tmp_path):
    r = run_wanctl("make-tiny", str(tmp_path / "t"), "--layout", "kijai", "--quant", "fp8")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[1] == "[[checkpoint]]" and lines[2].startswith("high_noise_model = ")
    path = Path(lines[2].split(" = ")[1].strip('"'))
    assert path.name == "Wan2_2-T2V-A14B-HIGH_fp8_e4m3fn.safetensors" and path.is_file()
    assert run_wanctl("make-tiny", str(tmp_path / "u"), "--quant", "fp8").returncode == 2
