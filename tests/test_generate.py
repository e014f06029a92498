"""``wanctl generate`` against real daemons: MP4 and PNG output, and every refused option."""

from __future__ import annotations

import contextlib
import io
import json
import os

import imageio.v2 as imageio
import pytest
import test_pipeline
from test_pipeline import image

from wanctl.cli import main
from wand.wan.tiny_lora import write_tiny_lora

served = test_pipeline.served  # the fixture: one daemon per task, shared by this module
TINY = ["--prompt", "a cat", "--size", "32*32", "--frame-num", "5", "--sample-steps", "2"]


def read_mp4(path) -> tuple[int, tuple[int, int], float]:
    """(frame count, (width, height), fps) as a reader sees the file."""
    with imageio.get_reader(path) as r:
        meta = r.get_meta_data()
        return r.count_frames(), meta["size"], meta["fps"]


def refused(daemon, tmp_path, *option: str) -> str:
    """Run ``wanctl generate`` in this process, expecting exit 2, no output file and nothing
    attached; the message it printed."""
    out = tmp_path / "refused.mp4"
    argv = ["--endpoint", daemon.endpoint, "generate", *TINY, "--out", str(out), *option]
    with contextlib.redirect_stderr(io.StringIO()) as err:
        assert main(argv) == 2
    assert not out.exists()
    with daemon.connect() as c:
        assert not [p for p in c.ps() if p["pid"] == os.getpid() and p["leases"]]
    return err.getvalue().removeprefix("wanctl generate: ").strip()


def test_t2v_writes_mp4_and_pngs(served, tmp_path):
    out, frames_dir = tmp_path / "cat.mp4", tmp_path / "frames"
    style = write_tiny_lora(tmp_path / "style.safetensors", "t2v-A14B", "comfy")
    r = served("t2v-A14B").wanctl(
        "generate", *TINY, "--out", str(out), "--save-frames", str(frames_dir),
        "--lora", f"{style}:0.7", "--lora-fuse",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert read_mp4(out) == (5, (32, 32), 16.0)
    pngs = sorted(frames_dir.glob("*.png"))
    assert [p.name for p in pngs] == [f"frame_0000{i}.png" for i in range(5)]
    assert imageio.imread(pngs[0]).shape == (32, 32, 3)
    (line,) = r.stdout.splitlines()
    for word in (str(out), "attach", "1 LoRA fused", "denoise", "5 frames 32x32 at 16 fps"):
        assert word in line
    assert "denoising" in r.stderr and "2/2" in r.stderr  # the progress bar


def test_i2v_follows_the_image(served, tmp_path):
    picture, out = tmp_path / "first.png", tmp_path / "i2v.mp4"
    image().save(picture)  # 40 x 48: 32*32 pixels at that aspect ratio, in multiples of 16
    d = served("i2v-A14B")
    r = d.wanctl("generate", *TINY, "--image", str(picture), "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["task"] == "i2v-A14B" and report["frames"] == 5
    assert (report["width"], report["height"]) == (16, 32)
    assert read_mp4(out) == (5, (16, 32), 16.0)
    assert refused(d, tmp_path) == "i2v-A14B needs --image"


def test_ti2v_from_text_and_from_image(served, tmp_path):
    picture = tmp_path / "first.png"
    image().resize((32, 32)).save(picture)
    d = served("ti2v-5B")
    for name, extra in (("text", []), ("image", ["--image", str(picture)])):
        out = tmp_path / f"{name}.mp4"
        r = d.wanctl("generate", *TINY, "--task", "ti2v-5B", "--out", str(out), *extra)
        assert r.returncode == 0, r.stderr
        assert read_mp4(out) == (5, (32, 32), 24.0)
    for option, message in (
        (["--size", "48*48"], "multiples of 32"),
        (["--sample-guide-scale", "5,4"], "ti2v-5B takes one value: it has one model"),
        (["--lora-low", "low.safetensors"], "ti2v-5B has one model; use --lora"),
    ):
        assert message in refused(d, tmp_path, *option)


BAD = [
    (["--size", "30*32"], "width and height must be positive multiples of 16"),
    (["--size", "0*0"], "width and height must be positive multiples of 16"),
    (["--size", "large"], "expected WIDTH*HEIGHT"),
    (["--frame-num", "6"], "must be 4k+1"),
    (["--sample-steps", "0"], "must be at least 1"),
    (["--sample-shift", "-1"], "must be positive"),
    (["--sample-guide-scale", "high"], "expected a number or HIGH,LOW"),
    (["--sample-guide-scale", "1,2,3"], "t2v-A14B takes one value or HIGH,LOW"),
    (["--task", "t2v-14B"], "unknown task; known: t2v-A14B, i2v-A14B, ti2v-5B"),
    (["--task", "i2v-A14B"], "the daemon holds t2v-A14B (t2v-A14B)"),
    (["--image", "{tmp}/first.png"], "t2v-A14B takes no --image"),
    (["--image", "{tmp}/notes.png"], "cannot read it as an image"),
    (["--image", "{tmp}/absent.png"], "cannot read it as an image"),
    (["--out", "{tmp}/absent/out.mp4"], "does not exist"),
    (["--out", "{tmp}/out.avi"], "must be an .mp4 file"),
    (["--out", "{tmp}/folder.mp4"], "is a directory"),
    (["--save-frames", "{tmp}/notes.png"], "not a directory"),
    (["--lora", "{tmp}/absent.safetensors:0.5"], "absent.safetensors:0.5: no such file"),
    (["--lora", "anime"], "anime: no such file, and the daemon holds no LoRA named 'anime'"),
    (["--lora", "{tmp}/folder.mp4"], "folder.mp4 is not a file"),
    (["--lora-low", "{tmp}/notes.png"], "notes.png: diffusers cannot read it as a Wan LoRA"),
    (["--lora-high", "{tmp}/five.safetensors"], "does not fit the t2v-A14B high-noise expert"),
    (["--lora", "{tmp}/five.safetensors:2"], "five.safetensors:2: does not fit the t2v-A14B"),
    (["--lora-fuse"], "--lora-fuse: no LoRA given"),
    (["--save-frames", "{tmp}/notes.png/frames"], "notes.png is not a directory"),
    pytest.param(
        ["--save-frames", "{tmp}/readonly/frames"],
        "is not writable",
        marks=pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere"),
    ),
]


@pytest.mark.parametrize(
    ("option", "message"), BAD, ids=lambda v: " ".join(v) if isinstance(v, list) else ""
)
def test_bad_option_exits_2_before_writing(served, tmp_path, option, message):
    image().save(tmp_path / "first.png")
    (tmp_path / "notes.png").write_text("not an image")
    write_tiny_lora(tmp_path / "five.safetensors", "ti2v-5B", "lightx2v")  # its head is wider
    (tmp_path / "readonly").mkdir(mode=0o500)
    (tmp_path / "folder.mp4").mkdir()
    args = [a.format(tmp=tmp_path) for a in option]
    assert message in refused(served("t2v-A14B"), tmp_path, *args)
    assert not (tmp_path / "readonly" / "frames").exists()


def test_checkpoint_chooses_among_several_of_one_task(tiny, start_daemon, tmp_path):
    cfg = tmp_path / "wand.toml"
    cfg.write_text(
        f'[[checkpoint]]\npath = "{tiny("t2v-A14B")}"\n'
        f'[[checkpoint]]\nname = "t2v-b"\npath = "{tiny("t2v-A14B", "diffusers")}"\n'
    )
    d = start_daemon(None, "--config", str(cfg)).wait_ready()
    held = "the daemon holds t2v-A14B (t2v-A14B), t2v-b (t2v-A14B)"
    assert refused(d, tmp_path) == f"{held}; choose one with --checkpoint NAME"
    assert refused(d, tmp_path, "--task", "t2v-A14B").endswith("with --checkpoint NAME")
    assert refused(d, tmp_path, "--checkpoint", "t2v-c") == f"--checkpoint t2v-c: {held}"
    out = tmp_path / "b.mp4"
    r = d.wanctl("generate", *TINY, "--checkpoint", "t2v-b", "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["checkpoint"] == "t2v-b" and out.exists()
    for name in ("t2v-A14B", "t2v-b"):
        assert d.wanctl("unload", name).returncode == 0
    message = "the daemon holds no checkpoint (load one with wanctl load PATH)"
    assert refused(d, tmp_path) == message


def test_missing_prompt_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--size", "32*32"])
    assert e.value.code == 2 and "--prompt" in capsys.readouterr().err
