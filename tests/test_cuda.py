"""GPU residency on a real GPU: CUDA IPC slabs, placement, leases. Skipped without CUDA.

None of these has run yet where this file was written (no GPU there); scripts/device-check
runs them on a GPU machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import Daemon
from test_modules import forward, reference

from wand.wan import write_tiny

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
COMPONENTS = ("text_encoder", "vae", "high_noise_model", "low_noise_model")


def client(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def wide(ckpt_root):
    """≈ 90 MB resident: big enough to see a copy in the client's GPU memory figures."""
    path = ckpt_root / "t2v-A14B-wide-cuda"
    if not path.exists():
        write_tiny(path, "t2v-A14B", "original", width=512, layers=4)
    return path


@pytest.fixture(scope="module")
def gpu_daemon(tiny):
    """One ready daemon with the tiny t2v-A14B checkpoint on cuda:0, shared by this module."""
    d = Daemon(tiny("t2v-A14B", "original"), "--device", "cuda").wait_ready(300)
    yield d
    d.stop()


ATTACH_ALL = """
import json, sys, torch, wand
from wand import loader, manifest
from wand.wan import read_checkpoint
torch.cuda.init(); torch.empty(1, device="cuda")  # the context exists before measuring
allocated, (free, _) = torch.cuda.memory_allocated(), torch.cuda.mem_get_info()
spec = read_checkpoint(sys.argv[2])
out = {"nbytes": 0, "equal": True, "devices": set(), "one_mapping": True, "verified": True}
with wand.connect(sys.argv[1]) as c:
    for name in sys.argv[3:]:
        att = c.attachment(name)
        out["nbytes"] += att.manifest["nbytes"]
        ptrs = sorted(t.data_ptr() for t in att.tensors.values())
        out["one_mapping"] &= ptrs[-1] - ptrs[0] < att.manifest["nbytes"]
        out["devices"] |= {str(t.device) for t in att.tensors.values()}
        out["verified"] &= att.verify()
        comp = spec.components[name]
        rows, n = manifest.layout(comp)
        cpu = torch.zeros(n, dtype=torch.uint8)
        loader.fill(cpu, comp, rows)
        ref = manifest.views(cpu, att.manifest)
        out["equal"] &= all(torch.equal(t.cpu(), ref[k]) for k, t in att.tensors.items())
    torch.cuda.synchronize()
    out["allocated_growth"] = torch.cuda.memory_allocated() - allocated
    out["free_drop"] = free - torch.cuda.mem_get_info()[0]
out["devices"] = sorted(out["devices"])
print(json.dumps(out))
"""


def test_gpu_slabs_attach_without_copy_and_hold_the_checkpoint(wide, start_daemon):
    d = start_daemon(wide, "--device", "cuda:0").wait_ready(300)
    out = client(ATTACH_ALL, d.endpoint, str(wide), *COMPONENTS)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["devices"] == ["cuda:0"] and r["one_mapping"] and r["equal"] and r["verified"]
    assert r["nbytes"] > 50e6
    assert r["allocated_growth"] < 0.01 * r["nbytes"]  # no tensor came from the allocator
    assert r["free_drop"] < 0.1 * r["nbytes"]  # no copy anywhere on the device
    with d.connect() as c:
        status = c.status()
    (gpu,) = status["gpus"]
    assert gpu["uuid"].startswith("GPU-") and gpu["device"] == "cuda:0" and gpu["name"]
    assert gpu["held_bytes"] == sum(x["bytes"] for x in status["components"])
    assert gpu["free_bytes"] < gpu["total_bytes"]
    assert {x["device"] for x in status["components"]} == {"cuda:0"}
    assert {x["uuid"] for x in status["components"]} == {gpu["uuid"]}
    assert all(x["checksum"].startswith("sum64:") for x in status["components"])


@pytest.mark.parametrize("component", COMPONENTS)
def test_gpu_modules_compute_what_from_pretrained_on_cuda_computes(tiny, gpu_daemon, component):
    with gpu_daemon.connect() as c:
        served = c.module(component)
        expected = reference(tiny("t2v-A14B", "diffusers"), component).to("cuda")
        assert all(t.device.type == "cuda" for t in served.state_dict().values())
        out = forward(served, component, "cuda")
        torch.testing.assert_close(out, forward(expected, component, "cuda"))


HOLDER = """
import sys, time, wand
c = wand.connect(sys.argv[1])
for name in sys.argv[2:]:
    c.attach(name)
print("holding", flush=True)
time.sleep(300)
"""


VERIFY = "import sys, wand; print(wand.connect(sys.argv[1]).attachment('vae').verify())"


def test_a_killed_gpu_client_releases_and_the_slab_is_freed(tiny, start_daemon):
    d = start_daemon(tiny(), "--device", "cuda:0").wait_ready(300)
    killed = subprocess.Popen(
        [sys.executable, "-c", HOLDER, d.endpoint, *COMPONENTS], stdout=subprocess.PIPE, text=True
    )
    survivor = subprocess.Popen(
        [sys.executable, "-c", HOLDER, d.endpoint, "vae"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert killed.stdout.readline().strip() == "holding"
        assert survivor.stdout.readline().strip() == "holding"
        killed.send_signal(signal.SIGKILL)
        killed.wait(30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with d.connect() as c:
                pids = {p["pid"] for p in c.ps()}
            if killed.pid not in pids:
                break
            time.sleep(0.1)
        assert killed.pid not in pids and survivor.pid in pids
        check = client(VERIFY, d.endpoint)
        assert check.stdout.strip() == "True", check.stderr
        survivor.send_signal(signal.SIGKILL)
        survivor.wait(30)
        time.sleep(1.0)
        assert d.wanctl("unload", "t2v-A14B").returncode == 0  # no --force: nobody holds it
        with d.connect() as c:
            assert c.status()["gpus"] == []  # every GPU slab was freed
    finally:
        for p in (killed, survivor):
            p.kill()
            p.wait()
    assert "Traceback" not in d.output()


def test_per_component_placement(tiny, start_daemon):
    d = start_daemon(tiny(), "--device", "text_encoder=cpu", "--device", "cuda:0").wait_ready(300)
    with d.connect() as c:
        placed = {x["component"]: (x["device"], x["uuid"]) for x in c.status()["components"]}
        assert placed["text_encoder"] == ("cpu", None)
        assert {placed[n][0] for n in COMPONENTS[1:]} == {"cuda:0"}
        assert next(iter(c.attach("text_encoder").values())).device.type == "cpu"
        assert next(iter(c.attach("vae").values())).device.type == "cuda"


def test_a_client_that_cannot_see_the_gpu_gets_a_clear_error(gpu_daemon):
    d = gpu_daemon
    code = "import sys, wand; wand.connect(sys.argv[1]).attach('vae')"
    out = client(code, d.endpoint, env={"CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode != 0
    assert "cannot see" in out.stderr and "CUDA_VISIBLE_DEVICES=''" in out.stderr
    with d.connect() as c:
        uuid = c.status()["gpus"][0]["uuid"]
    assert uuid in out.stderr


def test_a_gpu_index_the_daemon_cannot_see_is_a_configuration_error(tiny, tmp_path):
    n = torch.cuda.device_count()
    out = subprocess.run(
        [sys.executable, "-m", "wand.daemon", "--checkpoint", str(tiny()), "--device", f"cuda:{n}"]
        + ["--endpoint", f"ipc://{tmp_path}/w.sock"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 78 and f"cuda:{n}: this process sees {n} GPU" in out.stderr
