"""Attaching: zero copy, read-only, leases bound to processes, many clients at once."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import wand

COMPONENTS = ("text_encoder", "vae", "high_noise_model", "low_noise_model")


def run_client(
    code: str, *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_attached_tensors_are_views_of_one_slab(daemon):
    with daemon.connect() as c:
        for name in COMPONENTS:
            sd = c.attach(name)
            man = c.request("attach", name=name)["manifest"]
            ptrs = sorted(t.data_ptr() for t in sd.values())
            assert ptrs[-1] - ptrs[0] < man["nbytes"]  # all inside one mapping
            assert len(sd) == len(man["tensors"]) + len(man["aliases"])
            c.detach(name)
            c.detach(name)


def test_attached_bytes_match_the_daemon_checksum(daemon):
    with daemon.connect() as c:
        for name in COMPONENTS:
            assert c.attachment(name).verify()
            c.detach(name)


RSS_CLIENT = """
import json, sys, torch, wand
def mem():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssShmem")}
with wand.connect(sys.argv[1]) as c:
    names = sys.argv[2:]
    before = mem()
    total, held = 0, []
    for name in names:
        att = c.attachment(name)
        total += att.manifest["nbytes"]
        held.append(att)  # the mapping lives as long as tensors over it do
        for t in att.tensors.values():
            t.view(torch.uint8).max()  # touch every byte
    after = mem()
print(json.dumps({"total": total, "before": before, "after": after}))
"""


def test_attach_does_not_copy_into_the_client(big_daemon):
    out = run_client(RSS_CLIENT, big_daemon.endpoint, *COMPONENTS)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    anon = r["after"]["RssAnon"] - r["before"]["RssAnon"]
    shmem = r["after"]["RssShmem"] - r["before"]["RssShmem"]
    assert r["total"] > 50e6
    assert shmem > 0.9 * r["total"]  # the bytes are the daemon's shared pages...
    assert anon < 0.1 * r["total"]  # ...not a private copy


WRITER = """
import sys, wand
with wand.connect(sys.argv[1]) as c:
    sd = c.attach("vae")
    print("attached", flush=True)
    next(iter(sd.values())).add_(1)
print("wrote")
"""


def test_a_client_cannot_write_into_a_slab(daemon):
    out = run_client(WRITER, daemon.endpoint)
    assert "attached" in out.stdout and "wrote" not in out.stdout
    assert out.returncode == -signal.SIGSEGV
    (hint,) = [line for line in out.stderr.splitlines() if line.startswith("wand:")]
    assert "a write into the read-only slab" in hint and "-vae" in hint and "writable=True" in hint
    quiet = run_client(WRITER, daemon.endpoint, env={"WAND_SEGV_HINT": "0"})
    assert quiet.returncode == -signal.SIGSEGV and "wand:" not in quiet.stderr
    with daemon.connect() as c:
        assert c.attachment("vae").verify()
        c.detach("vae")


HOLDER = """
import sys, time, wand
c = wand.connect(sys.argv[1])
c.attach("high_noise_model")
c.attach("vae")
c.close()  # leases outlive the connection: they belong to the process
print("holding", flush=True)
time.sleep(120)
"""


def _holders(d) -> dict[int, list[str]]:
    with d.connect() as c:
        return {p["pid"]: [lease["component"] for lease in p["leases"]] for p in c.ps()}


def test_killed_client_releases_its_leases(daemon):
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, daemon.endpoint], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "holding"
        held = _holders(daemon)[proc.pid]
        assert sorted(held) == ["t2v-A14B/high_noise_model", "t2v-A14B/vae"]
        with daemon.connect() as c:
            vae = next(x for x in c.status()["components"] if x["component"] == "vae")
            assert vae["clients"] >= 1
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 5
    while proc.pid in _holders(daemon) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.pid not in _holders(daemon)


def test_normal_exit_releases_leases(daemon):
    code = "import sys, wand; c = wand.connect(sys.argv[1]); c.attach('vae'); print('ok')"
    out = run_client(code, daemon.endpoint)
    assert out.stdout.strip() == "ok"
    deadline = time.monotonic() + 5
    while _holders(daemon) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _holders(daemon)


def _attach_all(endpoint: str, barrier, results) -> None:
    barrier.wait()
    with wand.connect(endpoint, timeout=60) as c:
        results.put(sum(len(c.attach(name)) for name in COMPONENTS))


def test_sixteen_clients_attach_at_once(daemon):
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(16), ctx.Queue()
    procs = [
        ctx.Process(target=_attach_all, args=(daemon.endpoint, barrier, results)) for _ in range(16)
    ]
    for p in procs:
        p.start()
    counts = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0] * 16
    assert len(set(counts)) == 1 and counts[0] > 0
    deadline = time.monotonic() + 5
    while _holders(daemon) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _holders(daemon)


def test_attach_of_same_component_twice_shares_the_mapping(daemon):
    with daemon.connect() as c:
        a, b = c.attach("vae"), c.attach("vae")
        assert all(a[k].data_ptr() == b[k].data_ptr() for k in a)
        assert _holders(daemon)[__import__("os").getpid()] == ["t2v-A14B/vae"]
        c.detach("vae")
        c.detach("vae")
        with pytest.raises(wand.DaemonError) as e:
            c.detach("vae")
        assert e.value.code == "not_attached"


def test_modules_are_bound_to_the_slab(daemon):
    with daemon.connect() as c:
        for name in COMPONENTS:
            sd = c.attach(name)
            module = c.module(name)
            slab_ptrs = {t.data_ptr() for t in sd.values()}
            params = dict(module.named_parameters())
            assert params and all(p.data_ptr() in slab_ptrs for p in params.values())
            assert not any(p.requires_grad for p in params.values())
            assert not any(t.is_meta for t in module.state_dict().values())
        assert torch.is_tensor(next(iter(sd.values())))


DIES_MID_REQUEST = """
import os, sys, zmq
from wand.common import protocol
ctx = zmq.Context()
s = ctx.socket(zmq.DEALER)
s.connect(sys.argv[1])
for i in range(300):
    s.send(protocol.request(i, "attach", {"name": "vae"}))
s.close(linger=5000)  # flush the requests...
ctx.term()
os._exit(0)  # ...and be gone before most replies: no crash, no lease left behind
"""


def test_client_dying_mid_request_loses_nothing(daemon):
    for _ in range(3):
        assert run_client(DIES_MID_REQUEST, daemon.endpoint).returncode == 0
    time.sleep(0.5)
    assert set(_holders(daemon)) <= {os.getpid()}  # (earlier tests in this process may hold)
    with daemon.connect() as c:
        assert len(c.attach("vae")) > 0
        c.detach("vae")
    assert "Traceback" not in daemon.output()
