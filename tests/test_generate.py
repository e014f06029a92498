"""``wanctl generate`` against real daemons: MP4 and PNG output, and every refused option."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import re
import shutil
import warnings

import imageio.v2 as imageio
import numpy as np
import pytest
import test_pipeline
import torch
from PIL import Image
from test_pipeline import image

from wanctl.cli import main
from wanctl.generate import quiet_libraries
from wand.client.pipeline import cover_crop, fit_area
from wand.wan.footprint import Geometry
from wand.wan.solvers import dpm_solver
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
    argv = ["--endpoint", daemon.endpoint, "generate", "--plain", *TINY, "--out", str(out)]
    argv += option
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
    (["--lora", "{tmp}/five.safetensors:abc"], "five.safetensors:abc: the scale 'abc' is not a "),
    (["--lora-low", "{tmp}/five.safetensors:inf"], "SCALE a finite number"),
    (["--base-seed", str(2**64)], f"--base-seed {2**64}: must be below 2**64"),
    (
        ["--frame-num", "100001"],
        "100001 frames are 25001 latent frames, and the model's rotary "
        "table covers 1024 (rope_max_seq_len): at most 4093 frames (estimated memory: denoising ",
    ),
    (
        ["--size", "16400*32"],
        "16400 pixels wide are 1025 patches, and the model's rotary table "
        "covers 1024 (rope_max_seq_len): at most 16384 pixels",
    ),
    (["--size", "4096*4096", "--frame-num", "4093"], "free; fewer frames or a smaller --size"),
    (["--task", "s2v-14B"], "--task s2v-14B: a Wan2.2 task wand does not serve (it serves "),
    (["--use_prompt_extend"], "--use-prompt-extend: wand holds no prompt-extension model"),
    (["--audio", "{tmp}/notes.png"], "--audio: an option of Wan2.2's s2v-14B task, which wand "),
    (["--replace_flag"], "--replace-flag: an option of Wan2.2's animate-14B task"),
    (["--ckpt_dir", "{tmp}"], "the daemon holds no checkpoint from that folder (it holds "),
    (["--lora-fuse"], "--lora-fuse: no LoRA given"),
    (["--save-frames", "{tmp}/notes.png/frames"], "notes.png is not a directory"),
    (["--save-frames", "{tmp}/frames"], "frame_00003.png exists (--overwrite replaces it)"),
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
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "frame_00003.png").write_bytes(b"an earlier run")
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


# ---- Wan2.2 generate.py compatibility ---------------------------------------------------


MOOT = ["--offload_model", "--t5_cpu", "--convert_model_dtype", "--t5_fsdp", "--dit_fsdp",
        "--ulysses_size", "--prompt_extend_method", "--prompt_extend_target_lang"]  # fmt: skip


def test_a_generate_py_command_line_runs(served, tmp_path):
    out = tmp_path / "wan.mp4"
    r = served("t2v-A14B").wanctl(
        "generate", "--task", "t2v-A14B", "--size", "32*32", "--frame_num", "5",
        "--sample_steps", "2", "--sample_shift", "8", "--sample_guide_scale", "4",
        "--base_seed", str(2**64 - 1), "--sample_solver", "unipc", "--prompt", "a cat",
        "--save_file", str(out), "--offload_model", "True", "--t5_cpu", "--convert_model_dtype",
        "--t5_fsdp", "--dit_fsdp", "--ulysses_size", "2", "--prompt_extend_method", "local_qwen",
        "--prompt_extend_target_lang", "en", "--json",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert read_mp4(out) == (5, (32, 32), 16.0)
    report = json.loads(r.stdout)
    assert (report["seed"], report["steps"], report["solver"]) == (2**64 - 1, 2, "unipc")
    notes = [line for line in r.stderr.splitlines() if line.startswith("wanctl generate: note:")]
    said = [re.match(r"wanctl generate: note: --([\w-]+) has no effect: .+", n)[1] for n in notes]
    assert said == [m.removeprefix("--").replace("_", "-") for m in MOOT]


def test_offload_model_takes_generate_pys_booleans(served, tmp_path):
    r = served("t2v-A14B").wanctl("generate", *TINY, "--offload_model", "perhaps")
    assert r.returncode == 2
    assert "--offload-model/--offload_model: Boolean value expected (True/False)" in r.stderr


def test_dpm_solver_runs_wan22s_sampling(served, tmp_path):
    d, frames = served("t2v-A14B"), {}
    for solver in ("unipc", "dpm++"):
        r = d.wanctl(
            "generate", *TINY, "--base-seed", "5", "--sample-solver", solver,
            "--save-file", str(tmp_path / f"{solver}.mp4"), "--save-frames", str(tmp_path / solver),
            "--json",
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["solver"] == solver
        frames[solver] = imageio.imread(tmp_path / solver / "frame_00004.png")
    assert not np.array_equal(frames["unipc"], frames["dpm++"])


def wan22_sampling_sigmas(sampling_steps, shift):
    """wan/utils/fm_solvers.py: get_sampling_sigmas, verbatim."""
    sigma = np.linspace(1, 0, sampling_steps + 1)[:sampling_steps]
    sigma = shift * sigma / (1 + (shift - 1) * sigma)

    return sigma


@pytest.mark.parametrize(("steps", "shift"), [(1, 5.0), (4, 12.0), (40, 12.0), (50, 5.0)])
def test_dpm_solver_is_wan22s_scheduler(steps, shift):
    """Wan2.2's FlowDPMSolverMultistepScheduler: diffusers' DPM-Solver++ (order 2, midpoint,
    lower order final, final sigma 0, flow prediction) on get_sampling_sigmas' grid."""
    s = dpm_solver(shift)
    s.set_timesteps(steps)
    sigmas = wan22_sampling_sigmas(steps, shift)
    assert torch.equal(s.sigmas, torch.from_numpy(np.append(sigmas, 0).astype(np.float32)))
    assert torch.equal(s.timesteps, torch.from_numpy(sigmas * 1000).to(torch.int64))
    assert s.timesteps[0] == 1000  # diffusers' own flow grid starts at 999
    c = s.config
    assert (c.algorithm_type, c.solver_order, c.solver_type, c.prediction_type) == (
        "dpmsolver++", 2, "midpoint", "flow_prediction",
    )  # fmt: skip
    assert c.lower_order_final and c.final_sigmas_type == "zero" and not c.euler_at_final
    again = type(s).from_config(s.config, flow_shift=shift)  # as a pipeline call re-shifts it
    again.set_timesteps(steps)
    assert torch.equal(again.timesteps, s.timesteps)


def test_ckpt_dir_picks_the_checkpoint_loaded_from_it(served, tiny, tmp_path):
    out = tmp_path / "by-dir.mp4"
    r = served("t2v-A14B").wanctl("generate", *TINY, "--ckpt_dir", str(tiny()), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert out.exists()


def test_out_is_never_replaced_without_overwrite(served, tmp_path):
    d, out = served("t2v-A14B"), tmp_path / "taken.mp4"
    out.write_bytes(b"an earlier video")
    r = d.wanctl("generate", *TINY, "--out", str(out))
    assert r.returncode == 2
    assert (
        r.stderr.strip() == f"wanctl generate: --out {out}: {out} exists (--overwrite replaces it)"
    )
    assert out.read_bytes() == b"an earlier video"
    r = d.wanctl("generate", *TINY, "--out", str(out), "--overwrite")
    assert r.returncode == 0, r.stderr
    assert read_mp4(out) == (5, (32, 32), 16.0)


# ---- ti2v-5B sizes as Wan2.2 makes them -------------------------------------------------


def wan22_best_output_size(w, h, dw, dh, expected_area):
    """wan/utils/utils.py: best_output_size, verbatim."""
    # float output size
    ratio = w / h
    ow = (expected_area * ratio) ** 0.5
    oh = expected_area / ow

    # process width first
    ow1 = int(ow // dw * dw)
    oh1 = int(expected_area / ow1 // dh * dh)
    assert ow1 % dw == 0 and oh1 % dh == 0 and ow1 * oh1 <= expected_area
    ratio1 = ow1 / oh1

    # process height first
    oh2 = int(oh // dh * dh)
    ow2 = int(expected_area / oh2 // dw * dw)
    assert oh2 % dh == 0 and ow2 % dw == 0 and ow2 * oh2 <= expected_area
    ratio2 = ow2 / oh2

    # compare ratios
    if max(ratio / ratio1, ratio1 / ratio) < max(ratio / ratio2, ratio2 / ratio):
        return ow1, oh1
    else:
        return ow2, oh2


def wan22_ti2v_image(img, ow, oh):
    """wan/textimage2video.py (WanTI2V.i2v): the input image resized and centre-cropped."""
    ih, iw = img.height, img.width
    scale = max(ow / iw, oh / ih)
    img = img.resize((round(iw * scale), round(ih * scale)), Image.LANCZOS)

    # center-crop
    x1 = (img.width - ow) // 2
    y1 = (img.height - oh) // 2
    img = img.crop((x1, y1, x1 + ow, y1 + oh))
    assert img.width == ow and img.height == oh
    return img


def wan22_i2v_size(w, h, max_area, vae_stride=8, patch_size=2):
    """wan/image2video.py (WanI2V.generate): the output size for an image of w x h."""
    aspect_ratio = h / w
    lat_h = round(np.sqrt(max_area * aspect_ratio) // vae_stride // patch_size * patch_size)
    lat_w = round(np.sqrt(max_area / aspect_ratio) // vae_stride // patch_size * patch_size)
    return lat_w * vae_stride, lat_h * vae_stride


AREAS = [64 * 64, 32 * 32, 1280 * 704, 704 * 1280, 480 * 832, 1280 * 720]


def image_sizes() -> list[tuple[int, int]]:
    rng = np.random.default_rng(0)
    picked = [(160, 90), (1024, 1024), (1920, 1080), (1080, 1920), (48, 40), (1280, 704)]
    return picked + [tuple(int(v) for v in rng.integers(16, 4096, 2)) for _ in range(300)]


def test_ti2v_output_size_is_wan22s():
    assert fit_area((160, 90), 64 * 64, 32, centre_crop=True) == (64, 64)
    assert fit_area((1024, 1024), 1280 * 704, 32, centre_crop=True) == (960, 928)
    for area in AREAS:
        for w, h in image_sizes():
            try:
                expected = wan22_best_output_size(w, h, 32, 32, area)
            except ZeroDivisionError:  # a ratio beyond area / 32²: one multiple on the short side
                got = fit_area((w, h), area, 32, centre_crop=True)
                assert min(got) == 32 and got[0] * got[1] <= max(area, 32 * 32), (w, h, area)
                continue
            assert fit_area((w, h), area, 32, centre_crop=True) == expected, (w, h, area)


def test_i2v_output_size_is_wan22s():
    for area in AREAS:
        for w, h in image_sizes():
            expected = wan22_i2v_size(w, h, area)
            if min(expected) > 0:  # Wan2.2 would go on with a side of 0
                assert fit_area((w, h), area, 16) == expected, (w, h, area)


@pytest.mark.parametrize("size", [(160, 90), (90, 160), (1024, 1024), (33, 700)])
def test_ti2v_image_is_cropped_as_wan22_crops_it(size):
    pixels = np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(pixels)
    for area in (64 * 64, 1280 * 704):
        ow, oh = fit_area(img.size, area, 32, centre_crop=True)
        assert np.array_equal(
            np.asarray(cover_crop(img, (ow, oh))), np.asarray(wan22_ti2v_image(img, ow, oh))
        )


def test_ti2v_image_video_has_wan22s_size(served, tmp_path):
    picture, out = tmp_path / "wide.png", tmp_path / "wide.mp4"
    image().resize((160, 90)).save(picture)
    r = served("ti2v-5B").wanctl(
        "generate", "--prompt", "a cat", "--size", "64*64", "--frame-num", "5",
        "--sample-steps", "1", "--image", str(picture), "--out", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert read_mp4(out) == (5, (64, 64), 24.0)  # rounded down each side: 64 x 32


def test_pipeline_crops_ti2v_images_when_it_picks_the_size(served):
    with served("ti2v-5B").connect() as c:
        vp = c.pipeline()
        kw = {}
        got = vp._fill_defaults(vp.image_pipe, kw, image().resize((160, 90)))
        assert (kw["width"], kw["height"]) == wan22_best_output_size(160, 90, 32, 32, 1280 * 704)
        assert got.size == (kw["width"], kw["height"])
        kw = {"width": 64, "height": 32}  # given: diffusers' own resizing, as from_pretrained's
        assert vp._fill_defaults(vp.image_pipe, kw, image()).size == image().size


# ---- the model's limits, memory --------------------------------------------------------

A14B = {"num_attention_heads": 40, "attention_head_dim": 128, "ffn_dim": 13824,
        "patch_size": [1, 2, 2], "rope_max_seq_len": 1024}  # fmt: skip
WAN21_VAE = {"z_dim": 16, "base_dim": 96, "scale_factor_temporal": 4, "scale_factor_spatial": 8}


def test_token_counts_are_wan22s_seq_len():
    """wan/text2video.py: seq_len = ceil(h/8 * w/8 / (2*2) * ((F-1)/4 + 1))."""
    g = Geometry.of(A14B, WAN21_VAE, expand_timesteps=False)
    for width, height, frames in ((1280, 720, 81), (832, 480, 81), (720, 1280, 121), (64, 64, 1)):
        seq_len = math.ceil(height // 8 * (width // 8) / 4 * ((frames - 1) // 4 + 1))
        assert g.tokens(frames, width, height) == seq_len
    assert g.tokens(81, 1280, 720) == 75600


def test_limits_and_loras_are_checked_where_the_files_cannot_be_read(tiny, start_daemon, tmp_path):
    """The rotary table, the memory and a LoRA's fit are checked on the configs the daemon
    reports, before anything is attached, though this process cannot read the experts' files
    (as with single-file checkpoints, or files only the service user may read)."""
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny(), folder)
    d = start_daemon(folder).wait_ready()
    for expert in ("high_noise_model", "low_noise_model"):
        shutil.rmtree(folder / expert)  # the daemon has read them
    five = write_tiny_lora(tmp_path / "five.safetensors", "ti2v-5B", "lightx2v")
    message = refused(d, tmp_path, "--frame-num", "100001")
    assert "at most 4093 frames (estimated memory: denoising" in message
    message = refused(d, tmp_path, "--lora-high", str(five))
    assert "does not fit the t2v-A14B high-noise expert" in message


# ---- LoRAs by name, as files ------------------------------------------------------------


def test_held_lora_goes_where_a_file_would(served, tmp_path):
    d = served("t2v-A14B")
    style = write_tiny_lora(tmp_path / "style.safetensors", "t2v-A14B", "comfy")
    assert d.wanctl("load-lora", str(style), "--name", "style").returncode == 0  # expert high
    try:
        seen = {}
        for option in ("--lora", "--lora-low"):
            for kind, lora in (("name", "style:0.7"), ("file", f"{style}:0.7")):
                folder = tmp_path / f"{option}-{kind}"
                r = d.wanctl(
                    "generate", *TINY, "--base-seed", "3", option, lora, "--out",
                    f"{folder}.mp4", "--save-frames", str(folder), "--json",
                )  # fmt: skip
                assert r.returncode == 0, r.stderr
                assert json.loads(r.stdout)["loras"][0]["expert"] == (
                    "both" if option == "--lora" else "low"
                )
                seen[option, kind] = imageio.imread(folder / "frame_00004.png")
    finally:
        assert d.wanctl("unload-lora", "style").returncode == 0
    for option in ("--lora", "--lora-low"):
        assert np.array_equal(seen[option, "name"], seen[option, "file"]), option
    assert not np.array_equal(seen["--lora", "name"], seen["--lora-low", "name"])


# ---- what stderr shows -------------------------------------------------------------------


def test_stderr_has_the_progress_bar_and_nothing_else(served, tmp_path):
    picture, out = tmp_path / "first.png", tmp_path / "quiet.mp4"
    image().save(picture)
    loras = [
        write_tiny_lora(tmp_path / f"{s}.safetensors", "i2v-A14B", s) for s in ("comfy", "musubi")
    ]
    r = served("i2v-A14B").wanctl(
        "generate", *TINY, "--image", str(picture), "--out", str(out),
        "--lora", str(loras[0]), "--lora-high", str(loras[1]),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    shown = [line for line in re.split(r"[\r\n]", r.stderr) if line.strip()]
    assert shown and all(line.startswith("denoising:") for line in shown), shown


def test_quiet_libraries_drops_only_what_wanctl_expects():
    logger = logging.getLogger("transformers.utils.import_utils")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    notice = "`CLIPImageProcessor` requires torchvision (not installed); falling back"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with quiet_libraries():
                logger.warning(notice)
                logger.warning("something else")
                for module in ("peft.tuners.tuners_utils", "elsewhere"):
                    warnings.warn_explicit(
                        "Already found a `peft_config` attribute in the model.",
                        UserWarning, f"{module}.py", 1, module,
                    )  # fmt: skip
        logger.warning(notice)
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["something else", notice]
    assert [w.filename for w in caught] == ["elsewhere.py"]
