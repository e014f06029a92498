"""LoRAs on attached pipelines: diffusers' frames in every key style, fused without a write
into the daemon's memory, and a clear error for a LoRA that does not fit."""

from __future__ import annotations

import json
import multiprocessing as mp
import re

import numpy as np
import pytest
import torch
from conftest import Daemon
from diffusers import WanImageToVideoPipeline, WanPipeline
from peft.tuners.lora import LoraLayer
from PIL import Image
from safetensors import safe_open
from test_pipeline import SHIFT, frames, image, reference

from wanctl import generate
from wanctl.cli import build_parser
from wand.common.errors import LoraError
from wand.wan.lora_keys import check, read
from wand.wan.modules import skeleton
from wand.wan.tasks import TASKS, TRANSFORMER
from wand.wan.tiny import PRESETS, transformer_config
from wand.wan.tiny_lora import STYLES, write_tiny_lora

EXPERT_ARGS = {"high": [False], "low": [True], "both": [False, True]}  # load_into_transformer_2


@pytest.fixture(scope="module")
def served(tiny, tmp_path_factory):
    """One daemon holding the three tiny checkpoints, each named after its task."""
    cfg = tmp_path_factory.mktemp("config") / "wand.toml"
    cfg.write_text("".join(f'[[checkpoint]]\npath = "{tiny(task)}"\n' for task in TASKS))
    d = Daemon(None, "--config", str(cfg)).wait_ready()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def lora(tiny, tmp_path_factory):
    """``lora(task, style, seed=0)`` → a tiny LoRA file for that task's checkpoint."""
    folder = tmp_path_factory.mktemp("loras")

    def make(task: str, style: str, seed: int = 0) -> str:
        path = folder / f"{task}-{style}-{seed}.safetensors"
        if not path.exists():
            write_tiny_lora(path, tiny(task), style, seed=seed)
        return str(path)

    return make


def test_tiny_loras_fit_their_task_in_every_style(tmp_path):
    prefixes = {
        "diffusers": "transformer.blocks.0.attn1.to_q.lora_A.weight",
        "comfy": "diffusion_model.blocks.0.self_attn.q.lora_down.weight",
        "musubi": "lora_unet_blocks_0_self_attn_q.lora_down.weight",
        "lightx2v": "diffusion_model.head.head.diff",
    }
    for task, info in TASKS.items():
        model = skeleton(TRANSFORMER, transformer_config(info, PRESETS["tiny"]))
        for style in STYLES:
            path = write_tiny_lora(tmp_path / f"{task}-{style}.safetensors", task, style)
            with safe_open(path, "pt") as f:
                assert prefixes[style] in f.keys()
            check(read(path), model, task, style)


# task, [(style, expert)], adapter weights: every style, both experts of each A14B task
CASES = {
    "t2v diffusers+musubi": ("t2v-A14B", [("diffusers", "high"), ("musubi", "low")], None),
    "t2v comfy on both, scaled": ("t2v-A14B", [("comfy", "both")], [0.6]),
    "i2v comfy+lightx2v": ("i2v-A14B", [("comfy", "high"), ("lightx2v", "low")], None),
    "ti2v lightx2v, image path": ("ti2v-5B", [("lightx2v", "high")], [1.5]),
}


@pytest.mark.parametrize("case", CASES)
def test_frames_match_diffusers_with_the_same_loras(served, tiny, lora, case):
    task, loads, weights = CASES[case]
    img = image() if task != "t2v-A14B" else None
    files = [lora(task, style, seed) for seed, (style, _) in enumerate(loads)]
    with served.connect() as c:
        vp = c.pipeline(task)
    plain = frames(vp, task, img, flow_shift=SHIFT)
    # through the text pipeline for ti2v-5B: its image pipeline shares the modules
    names = [vp.load_lora_weights(f, expert=e) for f, (_, e) in zip(files, loads, strict=True)]
    if weights:
        vp.set_adapters(names, weights)
    got = frames(vp, task, img, flow_shift=SHIFT)

    ref = reference(
        tiny(task, "diffusers"), WanPipeline if img is None else WanImageToVideoPipeline
    )
    for name, f, (_, expert) in zip(names, files, loads, strict=True):
        for low in EXPERT_ARGS[expert]:
            ref.load_lora_weights(f, adapter_name=name, load_into_transformer_2=low)
    if weights:
        ref.set_adapters(names, weights)
    assert not np.array_equal(got, plain)  # the LoRA changes the video...
    assert np.array_equal(got, frames(ref, task, img))  # ...exactly as it does in diffusers


def test_lora_that_does_not_fit_is_an_error_and_loads_nothing(served, lora, tmp_path):
    with served.connect() as c:
        vp = c.pipeline("t2v-A14B")
        five = c.pipeline("ti2v-5B")
    down, up = torch.ones(4, 32), torch.ones(32, 4)

    def pair(module: str) -> dict[str, torch.Tensor]:
        return {f"{module}.lora_A.weight": down, f"{module}.lora_B.weight": up}

    (tmp_path / "notes.safetensors").write_text("not a LoRA")
    high = "match no layer of the t2v-A14B high-noise expert"
    cases = [  # source, expert, what the error says
        (pair("transformer.blocks.7.attn1.to_q"), "both",
         f"2 of 2 keys {high}: transformer.blocks.7.attn1.to_q.lora_A.weight"),
        ({**pair("transformer.blocks.0.attn1.to_q"), **pair("transformer.blocks.9.ffn.x")},
         "high", f"2 of 4 keys {high}: transformer.blocks.9.ffn.x.lora_A.weight"),
        (pair("transformer.blocks.0.attn1"), "high", "transformer.blocks.0.attn1.lora_A.weight"),
        (pair("blocks.0.attn1.to_q"), "high", f"{high}: blocks.0.attn1.to_q.lora_A"),
        (lora("ti2v-5B", "lightx2v"), "low", "does not fit the t2v-A14B low-noise expert: "
         "transformer.proj_out.lora_B.bias (192,) (weight (64, 32))"),
        (str(tmp_path / "absent.safetensors"), "both", "absent.safetensors: no such file"),
        (str(tmp_path / "notes.safetensors"), "both", "cannot read it as a Wan LoRA"),
    ]  # fmt: skip
    for source, expert, message in cases:
        with pytest.raises(LoraError, match=re.escape(message)):
            vp.load_lora_weights(source, expert=expert)
    assert vp.get_list_adapters() == {}
    with pytest.raises(LoraError, match="ti2v-5B has one model: expert must be 'high'"):
        five.load_lora_weights(lora("ti2v-5B", "comfy"), expert="both")
    with pytest.raises(ValueError, match="expert must be 'high', 'low' or 'both'"):
        vp.load_lora_weights(lora("t2v-A14B", "comfy"), expert="middle")
    assert vp.load_lora_weights(lora("t2v-A14B", "comfy"), "style", expert="both") == "style"
    assert vp.get_list_adapters() == {"transformer": ["style"], "transformer_2": ["style"]}
    assert vp.get_active_adapters() == ["style"]
    with pytest.raises(LoraError, match="an adapter named 'style' is already loaded"):
        vp.load_lora_weights(lora("t2v-A14B", "diffusers"), "style", expert="low")
    vp.load_lora_weights(lora("t2v-A14B", "comfy", 1), "style", expert="both", hotswap=True)


def _base_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The model's own parameters under their names before peft wrapped any layer."""
    return {
        name.replace(".base_layer", ""): p
        for name, p in model.named_parameters()
        if ".lora_" not in name
    }


def _not_attached(model: torch.nn.Module, attached: dict[str, torch.nn.Parameter]) -> list[str]:
    """The parameters of ``model`` that are not the ``attached`` tensors (by object and
    by address)."""
    return sorted(
        name
        for name, p in _base_params(model).items()
        if p is not attached[name] or p.data_ptr() != attached[name].data_ptr()
    )


def _fuse_in_child(endpoint: str, high: str, low: str, conn) -> None:
    """A client process that fuses, reports, waits for the parent's check, then unfuses."""
    import wand

    with wand.connect(endpoint) as c:
        vp = c.pipeline("t2v-A14B")
    experts = [vp.pipe.transformer, vp.pipe.transformer_2]
    shared = [_base_params(m) for m in experts]

    def private() -> list[list[str]]:
        """Per expert, the parameters that are no longer the attached tensor itself."""
        return [_not_attached(m, s) for m, s in zip(experts, shared, strict=True)]

    def run() -> np.ndarray:
        return frames(vp, "t2v-A14B", None, flow_shift=SHIFT)

    plain = run()
    names = [vp.load_lora_weights(high), vp.load_lora_weights(low, expert="low")]
    vp.set_adapters(names, [0.8, 1.0])
    unfused = run()
    vp.fuse_lora()
    adapted = [sorted(n for n, m in e.named_modules() if isinstance(m, LoraLayer)) for e in experts]
    conn.send(
        {
            "plain": plain,
            "unfused": unfused,
            "fused": run(),
            "private": private(),
            "adapted": adapted,
            "fused_loras": sorted(vp.fused_loras),
            "total": len(shared[0]),
        }
    )
    conn.recv()  # another process has checked the daemon's bytes
    vp.unfuse_lora()
    after = {"unfused": (private(), run(), vp.fused_loras)}
    vp.fuse_lora()
    try:
        vp.delete_adapters("default_0")
    except LoraError as e:
        after["delete"] = str(e)
    vp.disable_lora()  # unfuses first
    after["disabled"] = (private(), run(), vp.fused_loras)
    vp.enable_lora()
    after["enabled"] = (private(), run(), vp.fused_loras)
    vp.fuse_lora()
    vp.unload_lora_weights()
    after["unloaded"] = (private(), run(), vp.get_list_adapters())
    conn.send(after)


def _receive(conn, proc) -> dict:
    """The child's next report, or a failure saying how it died."""
    try:
        if conn.poll(180):
            return conn.recv()
    except EOFError:
        proc.join(10)
    pytest.fail(f"the fusing client died: exit status {proc.exitcode}")


def test_fusing_writes_private_copies_and_unfusing_restores_the_shared_views(served, lora):
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    high, low = lora("t2v-A14B", "lightx2v", 1), lora("t2v-A14B", "comfy", 2)
    proc = ctx.Process(target=_fuse_in_child, args=(served.endpoint, high, low, child))
    proc.start()
    child.close()  # the child's death is then the end of the pipe
    try:
        fused = _receive(parent, proc)
        assert proc.is_alive()
        with served.connect() as c:  # another client: the daemon's bytes are untouched
            for expert in ("high_noise_model", "low_noise_model"):
                assert c.attachment(f"t2v-A14B/{expert}").verify()
        parent.send("checked")
        later = _receive(parent, proc)
        proc.join(30)
    finally:
        proc.kill()
    assert proc.exitcode == 0
    assert fused["fused_loras"] == ["default_0", "default_1"]
    # private copies: the weight of every fused layer, its bias where the LoRA has one
    # (lightx2v's .diff_b, on the high-noise expert), nothing else
    kinds = (("weight", "bias"), ("weight",))
    for private, adapted, written in zip(fused["private"], fused["adapted"], kinds, strict=True):
        assert private == sorted(f"{layer}.{k}" for layer in adapted for k in written)
        assert 0 < len(private) < fused["total"]
    assert np.abs(fused["fused"] - fused["unfused"]).max() < 0.05  # bfloat16 rounding
    assert np.abs(fused["unfused"] - fused["plain"]).max() > 0.1
    assert "['default_0'] are fused: unfuse first" in later["delete"]
    unfused = fused["unfused"]
    for step, want, adapters in (
        ("unfused", unfused, set()),  # the shared views again, so exactly the unfused frames
        ("disabled", fused["plain"], set()),
        ("enabled", unfused, set()),
        ("unloaded", fused["plain"], {}),
    ):
        private, got, left = later[step]
        assert private == [[], []], step
        assert np.array_equal(got, want), step
        assert left == adapters, step


def test_wanctl_generate_applies_each_lora_to_its_experts(served, lora, tmp_path):
    """``--lora`` on both experts, ``--lora-high`` / ``--lora-low`` on one, each at its scale:
    the frames of the pipeline with the same LoRAs set by hand."""
    comfy, high, low = (lora("t2v-A14B", s, 3) for s in ("comfy", "lightx2v", "musubi"))
    argv = ["generate", "--checkpoint", "t2v-A14B", "--prompt", "a cat", "--size", "32*32",
            "--frame-num", "5", "--sample-steps", "3", "--base-seed", "5",
            "--out", str(tmp_path / "cat.mp4"), "--save-frames", str(tmp_path / "frames"),
            "--lora", f"{comfy}:0.6", "--lora-high", f"{high}:1.2", "--lora-low", low]  # fmt: skip
    r = served.wanctl(*argv, "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    loras = [(x["expert"], x["scale"]) for x in report["loras"]]
    assert loras == [("both", 0.6), ("high", 1.2), ("low", 1.0)]
    assert report["lora_fused"] is False
    pngs = sorted((tmp_path / "frames").glob("*.png"))
    written = np.stack([np.asarray(Image.open(p)) for p in pngs])

    args = build_parser().parse_args([*argv, "--overwrite"])
    with served.connect() as c:
        job = generate.check(args, c)
        vp = c.pipeline("t2v-A14B")
    names = [
        vp.load_lora_weights(comfy, expert="both"),
        vp.load_lora_weights(high, expert="high"),
        vp.load_lora_weights(low, expert="low"),
    ]
    vp.set_adapters(names, [0.6, 1.2, 1.0])
    g = torch.Generator().manual_seed(5)
    expected = vp(job.prompt, generator=g, **job.call).frames[0]
    assert np.array_equal(written, (expected * 255).astype(np.uint8))
