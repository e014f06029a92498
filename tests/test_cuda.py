"""GPU residency on a real GPU: VMM slabs shared as descriptors, read-only, outliving the
daemon. Skipped without CUDA; scripts/device-check runs them on a GPU machine.

The fake driver (tests/test_vmm.py) covers the slab lifecycle in CI; these cover what needs
device memory: torch tensors over the mappings, the staging loader's copies and casts, the
on-device digests, kernels reading read-only memory, a write into it faulting.
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

import wand
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
        timeout=300,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def big(ckpt_root):
    """One expert layer of width 2048: its feed-forward weights (48 MiB in float32 on disk)
    are larger than a 32 MiB staging chunk, so they are split across chunks."""
    path = ckpt_root / "t2v-A14B-big-cuda"
    if not path.exists():
        write_tiny(path, "t2v-A14B", "original", width=2048, layers=1, t5_layers=1)
    return path


@pytest.fixture(scope="module")
def gpu_daemon(tiny):
    """One ready daemon with the tiny t2v-A14B checkpoint on cuda:0, shared by this module."""
    d = Daemon(tiny("t2v-A14B", "original"), "--device", "cuda").wait_ready(300)
    yield d
    d.stop()


SAME_AS_CPU = """
import json, sys, torch, wand
from wand.common import manifest, views
from wand.load import cpu as loader
from wand.wan import read_checkpoint
torch.empty(1, device="cuda")  # the context exists before measuring
free = torch.cuda.mem_get_info()[0]
spec = read_checkpoint(sys.argv[2])
out = {"nbytes": 0, "equal": True, "verified": True, "one_mapping": True, "devices": []}
held = []
with wand.connect(sys.argv[1]) as c:
    for name in sys.argv[3:]:
        att = c.attachment(name)
        held.append(att)
        out["nbytes"] += att.manifest["nbytes"]
        ptrs = sorted(t.data_ptr() for t in att.tensors.values())
        out["one_mapping"] &= ptrs[-1] - ptrs[0] < att.manifest["nbytes"]
        out["devices"] += sorted({str(t.device) for t in att.tensors.values()})
        out["verified"] &= att.verify()
        comp = spec.components[name]
        rows, n = manifest.layout(comp)
        cpu = torch.zeros(n, dtype=torch.uint8)
        loader.fill(cpu, comp, rows)
        ref = views.views(cpu, att.manifest)
        out["equal"] &= all(torch.equal(t.cpu(), ref[k]) for k, t in att.tensors.items())
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # whatever verify() and the comparisons cached goes back
    out["free_drop"] = free - torch.cuda.mem_get_info()[0]
    out["largest"] = max(t.nbytes for a in held for t in a.tensors.values())
print(json.dumps(out))
"""


def test_gpu_slabs_hold_the_cpu_loaders_bytes_without_a_copy(big, start_daemon):
    d = start_daemon(big, "--device", "cuda:0").wait_ready(600)
    out = client(SAME_AS_CPU, d.endpoint, str(big), *COMPONENTS)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert set(r["devices"]) == {"cuda:0"} and r["one_mapping"] and r["equal"] and r["verified"]
    assert r["largest"] > 16 << 20  # bfloat16 resident: 24 MiB, from 48 MiB on disk
    assert r["free_drop"] < 0.1 * r["nbytes"]  # mapped, not copied
    with d.connect() as c:
        status = c.status()
    (gpu,) = status["gpus"]
    assert gpu["uuid"].startswith("GPU-") and gpu["device"] == "cuda:0" and gpu["name"]
    assert gpu["held_bytes"] == sum(x["allocated"] for x in gpu["residents"])
    assert all(x["allocated"] >= x["bytes"] for x in gpu["residents"])
    assert all(x["checksum"].startswith("sum64:") for x in status["components"])


@pytest.mark.parametrize("component", COMPONENTS)
def test_gpu_modules_compute_what_from_pretrained_on_cuda_computes(tiny, gpu_daemon, component):
    with gpu_daemon.connect() as c:
        served = c.module(component)
        expected = reference(tiny("t2v-A14B", "diffusers"), component).to("cuda")
        assert all(t.device.type == "cuda" for t in served.state_dict().values())
        torch.testing.assert_close(
            forward(served, component, "cuda"), forward(expected, component, "cuda")
        )


TWICE = """
import json, sys, torch, wand
with wand.connect(sys.argv[1]) as c:
    a, b = c.attach("vae"), c.attach("vae")
    same = all(a[k].data_ptr() == b[k].data_ptr() for k in a)  # one mapping per process
    two = c.attach("high_noise_model")
    c.detach("vae"); c.detach("vae")
    del a, b
    again = c.attachment("vae")
    print(json.dumps({"same": same, "two": len(two) > 0, "again": again.verify()}))
"""


def test_attach_twice_two_components_detach_and_attach_again(gpu_daemon):
    out = client(TWICE, gpu_daemon.endpoint)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"same": True, "two": True, "again": True}


HOLDER = """
import sys, torch, wand
from test_modules import forward
c = wand.connect(sys.argv[1])
dit = c.module("high_noise_model")
first = forward(dit, "high_noise_model", "cuda")
print("holding", flush=True)
for line in sys.stdin:
    print(torch.equal(forward(dit, "high_noise_model", "cuda"), first), flush=True)
"""


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_a_client_keeps_computing_after_the_daemon_is_gone(tiny, start_daemon, how):
    d = start_daemon(tiny(), "--device", "cuda:0").wait_ready(300)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, d.endpoint],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.path.dirname(__file__),
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        d.proc.send_signal(how)
        d.proc.wait(60)
        holder.stdin.write("again\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "True"
    finally:
        holder.kill()
        holder.wait()


WRITER = """
import sys, wand
with wand.connect(sys.argv[1]) as c:
    sd = c.attach("vae")
    print("attached", flush=True)
    next(iter(sd.values())).add_(1)
    import torch; torch.cuda.synchronize()
print("wrote", flush=True)
"""


def test_a_write_into_a_gpu_slab_faults_the_writer_only(gpu_daemon):
    with gpu_daemon.connect() as c:
        if any(x.get("read_only") is False for g in c.status()["gpus"] for x in g["residents"]):
            pytest.skip("this driver refused read-only mappings (reported in status)")
    out = client(WRITER, gpu_daemon.endpoint)
    assert "attached" in out.stdout and "wrote" not in out.stdout
    assert out.returncode != 0
    check = client(
        "import sys, wand; print(wand.connect(sys.argv[1]).attachment('vae').verify())",
        gpu_daemon.endpoint,
    )
    assert check.stdout.strip() == "True", check.stderr


def test_writable_is_a_private_device_copy(gpu_daemon):
    code = """
import sys, wand
with wand.connect(sys.argv[1]) as c:
    mine = c.attachment("vae", writable=True)
    next(iter(mine.tensors.values())).add_(1)
    print(mine.verify(), c.attachment("vae").verify())
"""
    out = client(code, gpu_daemon.endpoint)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]


def test_unload_during_load_frees_what_the_loader_wrote(big, start_daemon, tiny):
    d = start_daemon(tiny(), "--device", "cuda:0").wait_ready(300)
    with d.connect() as c:
        before = c.status()["gpus"][0]["held_bytes"]
    for _ in range(3):
        assert d.wanctl("load", str(big), "--name", "big", "--no-wait").returncode == 0
        assert d.wanctl("unload", "big").returncode == 0
    deadline = time.monotonic() + 60
    while True:
        with d.connect() as c:
            status = c.status()
        if status["gpus"][0]["held_bytes"] == before and not status["retired"]:
            break
        assert time.monotonic() < deadline, status["gpus"]
        time.sleep(0.2)
    assert "Traceback" not in d.output()


def test_a_client_that_cannot_see_the_gpu_gets_a_clear_error(gpu_daemon):
    code = "import sys, wand; wand.connect(sys.argv[1]).attach('vae')"
    out = client(code, gpu_daemon.endpoint, env={"CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode != 0
    assert "cannot see" in out.stderr and "CUDA_VISIBLE_DEVICES=''" in out.stderr


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


def test_gpu_slabs_are_adopted_after_a_crash(tiny, tmp_path):
    from wand.tools.notifyhost import NotifyHost

    host = NotifyHost()
    endpoint = f"ipc://{tmp_path}/w.sock"
    cmd = [sys.executable, "-m", "wand.daemon", "--checkpoint", str(tiny()), "--device", "cuda:0"]
    cmd += ["--endpoint", endpoint]
    try:
        for _ in range(2):  # a cold start, then a restart after a crash
            proc = host.start(cmd, tmp_path / "daemon.log")
            host.collect(lambda m: any(x.startswith("READY=1") for x in m), timeout=300)
            with wand.connect(endpoint) as c:
                comps = c.status()["components"]
                ok = all(c.attachment(x["name"]).verify() for x in comps)
            host.messages.clear()
            proc.kill()
            proc.wait()
        assert ok and all(x["adopted"] for x in comps)
    finally:
        host.close()
