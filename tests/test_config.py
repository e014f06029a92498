"""The daemon's configuration, from the file and from flags: settings that cannot work are
refused where they are given (exit status 78, one line naming the setting), never accepted
and broken later; and what ``--check-config`` tells about what would be resident."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, Daemon, daemon_slabs

COMPONENT_NAMES = "text_encoder, vae, high_noise_model, low_noise_model, model"


def wand_daemon(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "wand.daemon", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def config(tmp_path: Path, body: str) -> str:
    path = tmp_path / "wand.toml"
    path.write_text(body)
    return str(path)


def refused(out: subprocess.CompletedProcess, *words: str) -> None:
    assert out.returncode == 78, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    for word in words:
        assert word in out.stderr, out.stderr


@pytest.mark.parametrize("where", ["flag", "file"])
def test_a_placement_for_no_component_is_refused(tiny, tmp_path, where):
    if where == "flag":
        out = wand_daemon(
            "--checkpoint", str(tiny()), "--device", "text_encodr=cpu", "--check-config"
        )
    else:
        body = f'[[checkpoint]]\npath = "{tiny()}"\ndevice = {{ text_encodr = "cpu" }}\n'
        out = wand_daemon("--config", config(tmp_path, body), "--check-config")
    refused(out, "'text_encodr'", COMPONENT_NAMES, "*")


@pytest.mark.parametrize("where", ["flag", "file"])
def test_a_dtype_for_no_component_is_refused(tiny, tmp_path, where):
    if where == "flag":
        out = wand_daemon("--checkpoint", str(tiny()), "--dtype", "vea=float32", "--check-config")
    else:
        body = f'[[checkpoint]]\npath = "{tiny()}"\ndtype = {{ vea = "float32" }}\n'
        out = wand_daemon("--config", config(tmp_path, body), "--check-config")
    refused(out, "'vea'", COMPONENT_NAMES)


def test_wanctl_load_refuses_a_placement_for_no_component(daemon, tiny):
    out = daemon.wanctl("load", str(tiny("ti2v-5B")), "--name", "typo", "--device", "vae_=cpu")
    assert out.returncode == 1 and "config" in out.stderr and "'vae_'" in out.stderr, out.stderr
    assert "typo" not in daemon.wanctl("status").stdout


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "vae=float8_e5m2", "fp8"])
def test_fp8_for_the_vae_is_refused_when_the_configuration_is_read(tiny, dtype):
    out = wand_daemon("--checkpoint", str(tiny()), "--dtype", dtype, "--check-config")
    refused(out, "vae: float8_e", "the VAE is convolutions")
    ok = wand_daemon(
        "--checkpoint", str(tiny()), "--dtype", dtype, "--dtype", "vae=float32", "--check-config"
    )
    assert ok.returncode == 0, ok.stderr  # the experts and the text encoder take it


def test_short_dtype_names_are_taken(tiny, start_daemon):
    d = start_daemon(
        tiny(), "--dtype", "fp32", "--dtype", "vae=bf16", "--dtype", "text_encoder=fp16"
    )
    d.wait_ready()
    comps = json.loads(d.wanctl("status", "--json").stdout)["components"]
    dtypes = {c["component"]: c["dtype"] for c in comps}
    assert dtypes == {
        "text_encoder": "float16",
        "vae": "bfloat16",
        "high_noise_model": "float32",
        "low_noise_model": "float32",
    }
    out = d.wanctl("load", str(tiny("ti2v-5B")), "--name", "five", "--dtype", "bf16")
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(
    "endpoint", ["/tmp/wand.sock", "ipc://", "tcp://localhost", "tcp://host:port", "inproc://x"]
)
def test_an_endpoint_wand_cannot_use_is_refused(tiny, tmp_path, endpoint):
    refused(wand_daemon("--endpoint", endpoint, "--check-config"), repr(endpoint), "ipc://PATH")
    body = f'endpoint = "{endpoint}"\n'
    refused(wand_daemon("--config", config(tmp_path, body), "--check-config"), repr(endpoint))


def test_two_checkpoints_of_one_name_are_a_configuration_error(tiny, tmp_path):
    """Both default to their task's name; the daemon exited 1 (the units restart on that)
    and left its sockets."""
    body = f'[[checkpoint]]\npath = "{tiny()}"\n\n[[checkpoint]]\npath = "{tiny()}"\n'
    cfg = config(tmp_path, body)
    refused(wand_daemon("--config", cfg, "--check-config"), "'t2v-A14B'", "name =")
    d = Daemon(None, "--config", cfg)
    try:
        assert d.proc.wait(60) == 78, d.output()
        assert "'t2v-A14B'" in d.output()
        assert not list(d.dir.glob("*.sock"))
    finally:
        d.stop()


def test_a_relative_checkpoint_path_is_served_from_anywhere(tiny, start_daemon, tmp_path):
    """The daemon kept the path as given: clients elsewhere found no tokenizer there."""
    relative = os.path.relpath(tiny(), ROOT)
    d = start_daemon(Path(relative)).wait_ready()
    (ckpt,) = json.loads(d.wanctl("status", "--json").stdout)["checkpoints"]
    assert ckpt["path"] == str(tiny()) and Path(ckpt["tokenizer"]).is_absolute(), ckpt
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = subprocess.run(
        [sys.executable, "-m", "wanctl", "--endpoint", d.endpoint, "generate", "--prompt", "a cat",
         "--size", "32*32", "--frame-num", "5", "--sample-steps", "2", "--out", "cat.mp4"],
        capture_output=True, text=True, timeout=300, cwd=elsewhere,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert (elsewhere / "cat.mp4").stat().st_size > 0


def test_check_config_gives_sizes_and_what_would_be_shared(tiny, tmp_path):
    body = (
        f'[[checkpoint]]\npath = "{tiny("t2v-A14B")}"\n\n'
        f'[[checkpoint]]\nname = "i2v"\npath = "{tiny("i2v-A14B")}"\n'
    )
    out = wand_daemon("--config", config(tmp_path, body), "--check-config")
    assert out.returncode == 0, out.stderr
    assert "0.00 GB" not in out.stdout, out.stdout
    lines = out.stdout.splitlines()
    for comp in ("text_encoder", "vae"):
        first, second = (x for x in lines if x.strip().startswith(f"{comp}:"))
        assert "shared" not in first and f"shared with t2v-A14B/{comp}" in second, out.stdout
    assert "3.7 MB as float32" in second, out.stdout
    assert any(x.startswith("resident: 6 slabs for 8 components") for x in lines), out.stdout
    d = Daemon(None, "--config", config(tmp_path, body))  # what the daemon then does
    try:
        assert len(daemon_slabs(d.wait_ready().proc.pid)) == 6
    finally:
        d.stop()
