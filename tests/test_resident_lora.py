"""LoRAs the daemon holds: listed with the components, attached without reading the file,
giving the frames the file gives, added and removed at run time."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import Daemon
from safetensors import safe_open
from test_pipeline import SHIFT, frames

from wand.wan import write_tiny
from wand.wan.tiny_lora import write_tiny_lora


@pytest.fixture(scope="module")
def held(tiny, tmp_path_factory):
    """A daemon on the tiny t2v-A14B checkpoint whose configuration lists one LoRA, plus a
    copy of that LoRA's file that stays (the daemon's own file is removed once loaded)."""
    root = tmp_path_factory.mktemp("held")
    style = write_tiny_lora(root / "style.safetensors", tiny(), "comfy", seed=3)
    kept = shutil.copy(style, root / "style-copy.safetensors")
    cfg = root / "wand.toml"
    cfg.write_text(
        f'[[checkpoint]]\npath = "{tiny()}"\n'
        f'lora = [{{ name = "style", path = "{style}", expert = "both" }}]\n'
    )
    d = Daemon(None, "--config", str(cfg)).wait_ready()
    style.unlink()  # clients must not need it
    yield d, kept, root
    d.stop()


def test_a_configured_lora_is_listed_and_attaches(held):
    d, kept, _ = held
    listed = {c["name"]: c for c in json.loads(d.wanctl("ls", "--json").stdout)["components"]}
    assert listed["t2v-A14B/lora:style"]["class"] == "wand:lora"
    assert "lora" in d.wanctl("ls").stdout
    with d.connect() as c:
        (info,) = c.checkpoints()
        assert info["loras"]["style"]["expert"] == "both"
        assert "lora:style" not in info["components"]
        lora = c.lora("style")
        assert lora.expert == "both"
        with safe_open(kept, "pt") as f:  # the file's tensors under the file's own keys
            assert set(lora.tensors) == set(f.keys())
            key = next(iter(f.keys()))
            assert lora.tensors[key].equal(f.get_tensor(key))
    verify = json.loads(d.wanctl("verify", "--json").stdout)
    assert {r["class"] for r in verify if r["name"].endswith("lora:style")} == {"LoRA"}
    assert all(r["checksum_ok"] for r in verify)


def test_a_held_lora_gives_the_frames_of_its_file(held):
    d, kept, _ = held
    with d.connect() as c:
        by_name = c.pipeline()
        by_file = c.pipeline()
        plain = frames(by_name, "t2v-A14B", None, flow_shift=SHIFT)
        assert by_name.load_lora_weights("style")  # the daemon's, without its file
        by_file.load_lora_weights(str(kept), expert="both")
        got = frames(by_name, "t2v-A14B", None, flow_shift=SHIFT)
        assert not np.array_equal(got, plain)
        assert np.array_equal(got, frames(by_file, "t2v-A14B", None, flow_shift=SHIFT))
        by_name.fuse_lora()  # private copies of the experts' layers, not of the LoRA
        assert c.attachment("t2v-A14B/lora:style").verify()


def test_load_lora_and_unload_lora_at_run_time(held, tiny):
    d, _, root = held
    pair = write_tiny_lora(root / "fast-high.safetensors", tiny(), "diffusers", seed=5)
    out = d.wanctl("load-lora", str(pair), "--name", "fast", "--expert", "high")
    assert out.returncode == 0 and "t2v-A14B/lora:fast: ready" in out.stdout, out.stderr
    with d.connect() as c:
        vp, ref = c.pipeline(), c.pipeline()
        vp.load_lora_weights("fast")  # diffusers-style: its rank and alpha are in the metadata
        ref.load_lora_weights(str(pair))
        assert np.array_equal(
            frames(vp, "t2v-A14B", None, flow_shift=SHIFT),
            frames(ref, "t2v-A14B", None, flow_shift=SHIFT),
        )
    again = d.wanctl("load-lora", str(pair), "--name", "fast")
    assert again.returncode == 1 and "already" in again.stderr
    wider = write_tiny(root / "wider", "t2v-A14B", "original", width=48)
    wrong = write_tiny_lora(root / "wide.safetensors", wider, "comfy")  # another model's
    out = d.wanctl("load-lora", str(wrong), "--name", "wide")
    assert out.returncode == 1 and "wide.safetensors" in out.stderr and "fit" in out.stderr
    assert d.wanctl("unload-lora", "fast").returncode == 0
    assert "lora:fast" not in d.wanctl("ls").stdout
    out = d.wanctl("unload-lora", "fast")
    assert out.returncode == 1 and "holds no LoRA 'fast'" in out.stderr


def test_wanctl_generate_takes_a_held_lora_by_name(held, tmp_path):
    d, _, _ = held
    common = ["--prompt", "a cat", "--size", "32*32", "--frame-num", "5", "--sample-steps", "2"]
    out = d.wanctl("generate", *common, "--lora", "style:0.5", "--out", str(tmp_path / "a.mp4"))
    assert out.returncode == 0, out.stderr
    out = d.wanctl("generate", *common, "--lora", "nosuch", "--out", str(tmp_path / "b.mp4"))
    assert out.returncode == 2 and "holds no LoRA named 'nosuch' (it holds style)" in out.stderr
    assert not (tmp_path / "b.mp4").exists()


def test_lora_commands_with_several_checkpoints(tiny, tmp_path):
    """A LoRA's unique name or its address (as wanctl ls prints it) is enough; otherwise the
    error names --checkpoint. They refused both and never said how to choose."""
    for_t2v = write_tiny_lora(tmp_path / "t2v.safetensors", tiny(), "comfy")
    for_5b = write_tiny_lora(tmp_path / "5b.safetensors", tiny("ti2v-5B"), "comfy")
    cfg = tmp_path / "wand.toml"
    cfg.write_text(
        f'[[checkpoint]]\npath = "{tiny()}"\n'
        f'lora = [{{ name = "style", path = "{for_t2v}" }}]\n'
        f'[[checkpoint]]\nname = "five"\npath = "{tiny("ti2v-5B")}"\n'
    )
    d = Daemon(None, "--config", str(cfg)).wait_ready()
    try:
        out = d.wanctl("load-lora", str(for_5b), "--name", "dup")
        assert out.returncode == 1, out
        assert "--checkpoint" in out.stderr and "t2v-A14B, five" in out.stderr, out.stderr
        for ckpt, path in (("five", for_5b), ("t2v-A14B", for_t2v)):
            out = d.wanctl("load-lora", str(path), "--name", "dup", "--checkpoint", ckpt)
            assert out.returncode == 0, out.stderr
        out = d.wanctl("unload-lora", "dup")  # both hold one
        assert out.returncode == 1 and "--checkpoint" in out.stderr, out.stderr
        assert "t2v-A14B/lora:dup, five/lora:dup" in out.stderr, out.stderr
        assert d.wanctl("unload-lora", "dup", "--checkpoint", "five").returncode == 0
        out = d.wanctl("unload-lora", "dup")  # unique now
        assert out.returncode == 0 and "t2v-A14B/lora:dup" in out.stdout, out.stderr
        out = d.wanctl("unload-lora", "t2v-A14B/lora:style")
        assert out.returncode == 0, out.stderr
        out = d.wanctl("unload-lora", "style")
        assert out.returncode == 1 and "holds a LoRA 'style'; held: none" in out.stderr, out
    finally:
        d.stop()
