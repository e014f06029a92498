"""wanctl against a real daemon: output, --json, exit codes; and the daemon's lifecycle."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
from conftest import daemon_slabs, run_wanctl

COMPONENTS = {"text_encoder", "vae", "high_noise_model", "low_noise_model"}


def test_status_shows_every_component(daemon):
    out = daemon.wanctl("status")
    assert out.returncode == 0, out.stderr
    for comp in COMPONENTS:
        assert f"t2v-A14B/{comp}" in out.stdout
    assert "ready" in out.stdout and "cpu" in out.stdout and "bfloat16" in out.stdout


def test_status_json_has_the_fields(daemon):
    out = daemon.wanctl("status", "--json")
    reply = json.loads(out.stdout)
    assert reply["daemon"]["state"] == "ready"
    assert reply["checkpoints"][0]["task"] == "t2v-A14B"
    comps = {c["component"]: c for c in reply["components"]}
    assert set(comps) == COMPONENTS
    for c in comps.values():
        assert c["device"] == "cpu" and c["bytes"] > 0 and c["tensors"] > 0
        assert c["state"] == "ready" and c["checksum"].startswith("crc32:")
        assert isinstance(c["clients"], int)
    assert comps["vae"]["dtype"] == "float32"
    assert comps["high_noise_model"]["dtype"] == "bfloat16"


def test_ls_and_ping(daemon):
    out = daemon.wanctl("ls")
    assert out.returncode == 0
    assert "WanTransformer3DModel" in out.stdout and "UMT5EncoderModel" in out.stdout
    assert daemon.wanctl("ping").stdout.strip() == "pong"
    assert json.loads(daemon.wanctl("ls", "--json").stdout)["components"]


def test_ps_lists_attached_processes(daemon):
    with daemon.connect() as c:
        c.attach("vae")
        clients = json.loads(daemon.wanctl("ps", "--json").stdout)["clients"]
        mine = [p for p in clients if p["pid"] == os.getpid()]
        assert mine and mine[0]["leases"][0]["component"] == "t2v-A14B/vae"
        assert str(os.getpid()) in daemon.wanctl("ps").stdout
        c.detach("vae")
    clients = json.loads(daemon.wanctl("ps", "--json").stdout)["clients"]
    assert all(p["pid"] != os.getpid() for p in clients)


def test_no_daemon_exits_3_and_says_where_it_looked(tmp_path):
    endpoint = f"ipc://{tmp_path}/none.sock"
    out = run_wanctl("--endpoint", endpoint, "status")
    assert out.returncode == 3
    assert endpoint in out.stderr
    out = run_wanctl("ping", env={"WAND_ENDPOINT": endpoint})
    assert out.returncode == 3 and "WAND_ENDPOINT" in out.stderr


def test_usage_errors_exit_2():
    assert run_wanctl("frobnicate").returncode == 2
    assert run_wanctl().returncode == 2
    assert run_wanctl("status", "--timeout", "soon").returncode == 2


def test_help_lists_the_commands():
    out = run_wanctl("--help")
    for cmd in ("status", "ls", "ps", "ping", "stop", "make-tiny"):
        assert cmd in out.stdout


def test_stop_ends_the_daemon_and_cleans_up(tiny, start_daemon):
    d = start_daemon(tiny()).wait_ready()
    assert len(daemon_slabs(d.proc.pid)) == 4
    out = d.wanctl("stop")
    assert out.returncode == 0 and "stopping" in out.stdout
    assert d.proc.wait(20) == 0
    assert not (d.dir / "wand.sock").exists() and not (d.dir / "wand.fds.sock").exists()


def test_sigterm_stops_cleanly(tiny, start_daemon):
    d = start_daemon(tiny()).wait_ready()
    assert len(daemon_slabs(d.proc.pid)) == 4
    assert d.stop() == 0


def test_second_daemon_on_same_endpoint_refuses(tiny, start_daemon, daemon):
    d = start_daemon(tiny(), "--endpoint", daemon.endpoint)
    assert d.proc.wait(60) == 1
    assert "already serving" in d.output()
    assert daemon.wanctl("ping").returncode == 0


def test_truncated_shard_is_a_clear_load_error(tiny, start_daemon, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny(), broken)
    shard = sorted((broken / "low_noise_model").glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    d = start_daemon(broken)
    assert d.proc.wait(60) == 78
    out = d.output()
    assert shard.name in out and "truncated" in out
    assert "'" in out  # the key is quoted in the message


def test_dtype_flags_set_resident_dtypes(tiny, start_daemon):
    d = start_daemon(tiny(), "--dtype", "float32", "--dtype", "vae=bfloat16").wait_ready()
    comps = {
        c["component"]: c for c in json.loads(d.wanctl("status", "--json").stdout)["components"]
    }
    assert comps["vae"]["dtype"] == "bfloat16"
    assert comps["high_noise_model"]["dtype"] == "float32"
    assert comps["text_encoder"]["dtypes"] == {"float32": comps["text_encoder"]["bytes"]}


def test_bad_dtype_flag_is_a_clear_error(tiny, start_daemon):
    d = start_daemon(tiny(), "--dtype", "t5=float32")
    assert d.proc.wait(60) == 78
    assert "no component 't5'" in d.output()


def test_verify_checks_every_component(tiny, start_daemon):
    d = start_daemon(tiny()).wait_ready()
    out = d.wanctl("verify", "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert {r["name"].split("/")[1] for r in rows} == COMPONENTS
    assert all(r["checksum_ok"] for r in rows)
    assert {r["class"] for r in rows} == {
        "UMT5EncoderModel",
        "AutoencoderKLWan",
        "WanTransformer3DModel",
    }


def test_verify_finds_changed_bytes_in_a_writable_attachment(daemon):
    with daemon.connect() as c:
        private = c.attachment("vae", writable=True)
        first = next(iter(private.tensors.values()))
        first.view(-1)[0] += 1  # its own copy-on-write page
        assert not private.verify()
        assert c.attachment("vae").verify()  # what everyone else maps never changed
        c.detach("vae")
        c.detach("vae")
    from wanctl.render import verify

    row = {"name": "x", "class": "C", "tensors": 1, "bytes": 1, "attach_ms": 1, "module_ms": 1}
    assert "MISMATCH" in verify([{**row, "checksum_ok": False}])


def test_make_tiny_writes_the_preset_asked_for(tmp_path):
    from wand.wan import read_checkpoint

    out = run_wanctl(
        "make-tiny",
        str(tmp_path / "b"),
        "--preset",
        "bench",
        "--width",
        "16",
        "--task",
        "t2v-A14B",
        "--layout",
        "diffusers",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    spec = read_checkpoint(json.loads(out.stdout)["path"])
    assert spec.layout == "diffusers"
    assert len(spec.components["high_noise_model"].tensors) == 1095  # 40 real-size layers
    assert (
        spec.components["high_noise_model"].config["num_attention_heads"]
        * spec.components["high_noise_model"].config["attention_head_dim"]
        == 16
    )


def test_make_tiny_lora_writes_what_write_tiny_lora_writes(tiny, tmp_path):
    from wand.wan.tiny_lora import write_tiny_lora

    dest = tmp_path / "low.safetensors"
    args = ("make-tiny-lora", str(dest), "--checkpoint", str(tiny()), "--style", "musubi")
    out = run_wanctl(*args, "--expert", "low_noise_model", "--rank", "2", "--seed", "3", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["path"] == str(dest)
    expected = write_tiny_lora(
        tmp_path / "expected.safetensors",
        tiny(),
        "musubi",
        expert="low_noise_model",
        rank=2,
        seed=3,
    )
    assert dest.read_bytes() == expected.read_bytes()
    again = run_wanctl(*args)
    assert again.returncode == 2 and f"{dest} exists" in again.stderr
    wrong = run_wanctl("make-tiny-lora", str(tmp_path / "x"), "--expert", "model")
    assert wrong.returncode == 2 and "t2v-A14B has no expert 'model'" in wrong.stderr
    assert not (tmp_path / "x").exists()


def test_status_and_verify_agree_on_sizes(daemon):
    """SIZE is the tensors' bytes in both (verify showed the slab's, alignment included)."""
    d = daemon
    status = {
        c["name"]: c["bytes"] for c in json.loads(d.wanctl("status", "--json").stdout)["components"]
    }
    verify = {r["name"]: r for r in json.loads(d.wanctl("verify", "--json").stdout)}
    assert {n: r["bytes"] for n, r in verify.items()} == status
    assert all(r["slab_bytes"] >= r["bytes"] for r in verify.values())
    table = {line.split()[0]: line for line in d.wanctl("status").stdout.splitlines()[3:]}
    for line in d.wanctl("verify").stdout.splitlines()[1:]:
        name, size = line.split()[0], " ".join(line.split()[3:5])
        assert size in table[name], (line, table[name])


def test_make_tiny_refuses_a_folder_that_exists(tmp_path):
    there = tmp_path / "there"
    there.mkdir()
    out = run_wanctl("make-tiny", str(there))
    assert out.returncode == 2, out
    assert out.stderr.splitlines() == [
        f"wanctl make-tiny: {there} exists; give a folder that does not exist yet"
    ]
    out = run_wanctl("make-tiny", str(tmp_path / "w"), "--width", "12")
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1, out.stderr


@pytest.mark.parametrize(
    "command",
    [
        ["make-tiny", "c", "--layout", "diffusers"],
        ["make-tiny", "c", "--layout", "comfy", "--quant", "fp8_scaled"],
        ["make-tiny", "c", "--layout", "kijai"],
        ["make-tiny-lora", "c/style.safetensors", "--checkpoint", "t2v-A14B"],
    ],
    ids=["folder", "comfy", "kijai", "lora"],
)
def test_make_tiny_files_follow_the_umask(tmp_path, command):
    """The service user must be able to read them: safetensors wrote its files 0600."""
    if command[0] == "make-tiny-lora":
        (tmp_path / "c").mkdir()
    out = subprocess.run(
        [sys.executable, "-m", "wanctl", *command],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, umask=0o022,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    modes = {
        (p.is_dir(), p.suffix, stat.S_IMODE(p.stat().st_mode)) for p in (tmp_path / "c").rglob("*")
    }
    assert {(d, m) for d, _, m in modes} <= {(True, 0o755), (False, 0o644)}, modes
    assert (False, ".safetensors", 0o644) in modes
