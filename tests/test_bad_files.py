"""Broken and hostile checkpoint files: a clear error naming the file and the key, never a
SIGBUS, a hang, code from the file running, or weights that are silently wrong."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, Raw, daemon_slabs

from wand.common.errors import CheckpointError
from wand.wan import read_checkpoint, write_tiny

SHARD = "diffusion_pytorch_model-00002-of-00006.safetensors"


@pytest.fixture
def ckpt(tmp_path):
    return write_tiny(tmp_path / "ckpt", "t2v-A14B", "original")


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write(path: Path, header: dict, data: bytes) -> None:
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)


def _edit(path: Path, edit) -> tuple[str, str]:
    """Change the header of ``path`` with ``edit(header, first, second)`` (two tensor keys
    of the same size); returns those keys."""
    header, data = _header(path)
    keys = [k for k in header if k != "__metadata__"]
    sizes: dict[int, list[str]] = {}
    for k in keys:
        start, end = header[k]["data_offsets"]
        sizes.setdefault(end - start, []).append(k)
    first, second = next(v for v in sizes.values() if len(v) >= 2)[:2]
    edit(header, first, second)
    _write(path, header, data)
    return first, second


def _refused(ckpt: Path, shard: Path, key: str, *words: str) -> None:
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(ckpt)
    message = str(e.value)
    for part in (str(shard), repr(key), *words):
        assert part in message, message


def _set(field, value):
    def edit(header, first, second):
        header[first][field] = value(header[first], header[second])

    return edit


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (_set("data_offsets", lambda a, b: [-8, a["data_offsets"][1] - 8]), ["data_offsets"]),
        (_set("data_offsets", lambda a, b: b["data_offsets"]), ["overlap"]),
        (_set("dtype", lambda a, b: "I32" if a["dtype"] == "F32" else "I16"), ["stored as"]),
        (_set("shape", lambda a, b: [-1, *a["shape"][1:]]), ["negative dimension"]),
        (_set("shape", lambda a, b: [*a["shape"][:-1], a["shape"][-1] * 2]), ["spans"]),
        (_set("dtype", lambda a, b: "F128"), ["unknown dtype"]),
        (_set("shape", lambda a, b: "big"), ["shape"]),
        (_set("data_offsets", lambda a, b: [0, True]), ["data_offsets"]),
    ],
    ids=["negative", "overlap", "int-for-float", "negative-dim", "size", "dtype", "type", "bool"],
)
def test_bad_safetensors_headers_are_refused_naming_file_and_key(ckpt, edit, words):
    shard = ckpt / "high_noise_model" / SHARD
    first, _ = _edit(shard, edit)
    _refused(ckpt, shard, first, *words)


def test_offsets_past_the_data_are_truncation(ckpt):
    shard = ckpt / "high_noise_model" / SHARD
    header, data = _header(shard)
    key = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    _write(shard, header, data[:-1])
    _refused(ckpt, shard, key, "truncated")


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path(tempfile.gettempdir()) / f"wand-evil-{os.getpid()}"


def test_a_malicious_pickle_runs_no_code(ckpt, start_daemon):
    t5 = ckpt / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save({"shared.weight": Evil()}, t5)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(ckpt)
    assert str(t5) in str(e.value) and "cannot read torch checkpoint" in str(e.value)
    d = start_daemon(ckpt)
    assert d.proc.wait(60) == 78
    assert not MARKER.exists()
    assert "Traceback" not in d.output() and str(t5) in d.output()


def test_truncating_a_shard_during_the_load_is_a_clear_error(tmp_path, start_daemon):
    ckpt = write_tiny(tmp_path / "wide", "t2v-A14B", "original", width=384, layers=4)
    last = sorted((ckpt / "low_noise_model").glob("*.safetensors"))[-1]
    d = start_daemon(ckpt)
    deadline = time.monotonic() + 60
    while "text_encoder ready" not in d.output():  # the experts are read after it
        assert time.monotonic() < deadline and d.proc.poll() is None, d.output()
        time.sleep(0.01)
    os.truncate(last, last.stat().st_size // 2)
    assert d.proc.wait(120) == 78, d.output()  # never -SIGBUS
    assert str(last) in d.output() and "truncated" in d.output()
    assert "Traceback" not in d.output()


def test_truncation_through_wanctl_load_leaves_the_daemon_serving(daemon, tmp_path):
    ckpt = write_tiny(tmp_path / "cut", "ti2v-5B", "original", width=256)
    shard = sorted(ckpt.glob("*.safetensors"))[-1]
    header, data = _header(shard)
    out = daemon.wanctl("load", str(ckpt), "--name", "cut", "--no-wait")
    assert out.returncode == 0, out.stderr
    _write(shard, header, data[: len(data) // 2])  # cut while (or before) it is read
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        comps = json.loads(daemon.wanctl("status", "--json").stdout)["components"]
        state = {c["name"]: c for c in comps}.get("cut/model")
        if state and state["state"] in ("ready", "failed"):
            break
        time.sleep(0.1)
    assert daemon.wanctl("ping").returncode == 0
    if state["state"] == "failed":
        assert shard.name in state["error"] and "truncated" in state["error"]
    assert daemon.wanctl("unload", "cut").returncode == 0


def _sparse_diffusers_checkpoint(root: Path, nbytes: int) -> Path:
    """A -Diffusers ti2v-5B folder whose transformer claims more than ``nbytes`` resident:
    the headers of a deep model over a sparse file (no disk space, zeros if read)."""
    from diffusers import WanTransformer3DModel

    ckpt = write_tiny(root / "huge", "ti2v-5B", "diffusers")
    config_path = ckpt / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config.update(num_attention_heads=32, attention_head_dim=128, num_layers=2)
    while True:
        with torch.device("meta"):
            model = WanTransformer3DModel.from_config(config)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if sum(2 * _numel(s) for s in shapes.values()) > nbytes:  # bfloat16 resident
            break
        config["num_layers"] *= 2
    config_path.write_text(json.dumps(config))
    header, offset = {}, 0
    for key, shape in shapes.items():
        header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset]}
        offset += 4 * _numel(shape)
        header[key]["data_offsets"][1] = offset
    weights = ckpt / "transformer" / "diffusion_pytorch_model.safetensors"
    for old in (ckpt / "transformer").glob("diffusion_pytorch_model*"):
        old.unlink()
    _write(weights, header, b"")
    os.truncate(weights, weights.stat().st_size + offset)
    return ckpt


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def test_a_slab_larger_than_memory_is_refused_before_anything_is_written(daemon, tmp_path):
    from wand.slabs import room

    ckpt = _sparse_diffusers_checkpoint(tmp_path, 2 * room.available())
    before = daemon_slabs(daemon.proc.pid)
    out = daemon.wanctl("load", str(ckpt), "--name", "huge")
    assert out.returncode == 1
    assert "not enough memory" in out.stderr and "huge/model" in out.stderr
    assert daemon.wanctl("ping").returncode == 0
    assert not any(s.endswith("-model") for s in daemon_slabs(daemon.proc.pid))
    assert daemon.wanctl("unload", "huge").returncode == 0
    deadline = time.monotonic() + 10
    while daemon_slabs(daemon.proc.pid) != before:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_a_fifo_is_refused_without_holding_anyone_up(daemon, tmp_path):
    ckpt = write_tiny(tmp_path / "fifo", "t2v-A14B", "original")
    config = ckpt / "high_noise_model" / "config.json"
    config.unlink()
    os.mkfifo(config)
    out = daemon.wanctl("load", str(ckpt), "--name", "fifo")
    assert out.returncode == 1
    assert str(config) in out.stderr and "not a regular file (a FIFO)" in out.stderr
    assert daemon.wanctl("ping").returncode == 0
    fifo_config = tmp_path / "wand.toml"
    os.mkfifo(fifo_config)
    check = subprocess.run(
        [sys.executable, "-m", "wand.daemon", "--config", str(fifo_config), "--check-config"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert check.returncode == 78 and "FIFO" in check.stderr


def _start_error(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "wand.daemon", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        **kw,
    )


def test_unusable_paths_are_exit_78_with_a_message(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    long = tmp_path / ("x" * 300)
    cases = {
        str(loop): "too many levels of symbolic links",
        str(long): "File name too long",
        str(tmp_path / "nope"): "No such file or directory",
        str(Path(__file__)): "not a folder",
    }
    for path, words in cases.items():
        out = _start_error("--checkpoint", path, "--endpoint", f"ipc://{tmp_path}/w.sock")
        assert out.returncode == 78, (path, out.stderr)
        assert words in out.stderr and "Traceback" not in out.stderr, out.stderr


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv"),
    reason="needs root and setpriv (a root daemon without the capability to read anything)",
)
def test_an_unreadable_file_is_exit_78_naming_it(tiny, tmp_path):
    ckpt = shutil.copytree(tiny(), tmp_path / "ckpt")
    shard = ckpt / "high_noise_model" / SHARD
    os.chmod(shard, 0o000)
    no_override = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    out = subprocess.run(
        [*no_override, sys.executable, "-m", "wand.daemon", "--checkpoint", str(ckpt)]
        + ["--endpoint", f"ipc://{tmp_path}/w.sock"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 78, out.stderr
    assert str(shard) in out.stderr and "Permission denied" in out.stderr
    assert "Traceback" not in out.stderr


def test_load_arguments_of_the_wrong_shape_are_bad_args(daemon):
    raw = Raw(daemon.endpoint)
    try:
        bad = [
            {"path": "/x", b"name": "y"},
            {"path": "/x" * 5000},
            {"path": "/x", "device": {"*": 3}},
            {"path": "/x", "name": ["a"]},
            {"path": "/x\0y"},
        ]
        for i, args in enumerate(bad):
            reply = raw.ask({"v": 1, "id": i, "op": "load", "args": args})
            assert reply["error"]["code"] in ("bad_args", "config"), (args, reply)
    finally:
        raw.close()


def test_unload_and_reload_while_loading_neither_leak_nor_crash(daemon, tmp_path):
    ckpt = write_tiny(tmp_path / "busy", "t2v-A14B", "original", width=256, layers=4)
    before = daemon_slabs(daemon.proc.pid)
    for _ in range(3):
        assert daemon.wanctl("load", str(ckpt), "--name", "busy", "--no-wait").returncode == 0
        out = daemon.wanctl("unload", "busy")
        assert out.returncode == 0, out.stderr
    deadline = time.monotonic() + 30
    while daemon_slabs(daemon.proc.pid) != before:
        assert time.monotonic() < deadline, (daemon_slabs(daemon.proc.pid), before)
        time.sleep(0.1)
    status = json.loads(daemon.wanctl("status", "--json").stdout)
    assert not status["retired"] and daemon.proc.poll() is None
    assert "Traceback" not in daemon.output() and "internal" not in daemon.output()
    os.kill(daemon.proc.pid, signal.SIGHUP)  # a reload while nothing is loading: no change
    assert daemon.wanctl("ping").returncode == 0
