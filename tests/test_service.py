"""The daemon as a service: notify messages, socket activation, configuration, access control."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import ROOT, Daemon, Raw, as_nobody, daemon_slabs, run_wanctl

import wand
from wand.common import protocol
from wand.tools.notifyhost import NotifyHost


@pytest.fixture
def notify():
    h = NotifyHost()
    yield h
    h.close()


def _has(prefix: str):
    return lambda msgs: any(m.startswith(prefix) for m in msgs)


def test_notify_start_watchdog_reload_stop(tiny, start_daemon, notify):
    env = {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "400000"}
    d = start_daemon(tiny(), env=env)
    notify.collect(_has("READY=1"))
    start = notify.without_watchdog()
    assert start[0].startswith("STATUS=loading 4 components: 0 B of ")
    assert start[1] == "EXTEND_TIMEOUT_USEC=30000000"
    assert all(m.startswith(("STATUS=loading", "EXTEND_TIMEOUT_USEC=")) for m in start[2:-1])
    assert start[-1].startswith("READY=1\nSTATUS=ready: 4 components, ")

    notify.messages.clear()
    assert notify.gather(1.5).count("WATCHDOG=1") >= 3  # every 0.2 s, from the serving loop

    notify.messages.clear()
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    d.proc.send_signal(signal.SIGHUP)
    notify.collect(_has("READY=1"))
    reload = notify.without_watchdog()
    assert reload[0].startswith("RELOADING=1\nMONOTONIC_USEC=")
    usec = int(reload[0].split("MONOTONIC_USEC=")[1])
    assert before <= usec <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert reload[-1].startswith("READY=1\nSTATUS=ready: 4 components")

    notify.messages.clear()
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(30) == 0
    notify.collect(_has("STOPPING=1"), timeout=5)
    assert notify.without_watchdog() == ["STOPPING=1\nSTATUS=stopping"]


def test_notify_failed_load(tiny, start_daemon, notify, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny(), broken)
    (broken / "Wan2.1_VAE.pth").write_bytes(b"not a checkpoint")
    d = start_daemon(broken, env={"NOTIFY_SOCKET": notify.path})
    assert d.proc.wait(60) == 78  # EX_CONFIG: the units do not restart on it
    notify.collect(_has("STATUS="), timeout=5)
    assert len(notify.messages) == 1
    status, errno_line = notify.messages[0].split("\n")
    assert status.startswith("STATUS=configuration error: ") and "Wan2.1_VAE.pth" in status
    assert errno_line == "ERRNO=22"


def test_watchdog_is_not_ours_when_watchdog_pid_differs(tiny, start_daemon, notify):
    env = {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}
    start_daemon(tiny(), env=env)
    notify.collect(_has("READY=1"))
    assert "WATCHDOG=1" not in notify.gather(0.6)


def test_socket_activation_answers_clients_that_came_early(tiny, tmp_path):
    sock = Path(tempfile.mkdtemp(prefix="sa-")) / "wand.sock"
    proc = subprocess.Popen(
        [
            "systemd-socket-activate",
            "-l",
            str(sock),
            sys.executable,
            "-m",
            "wand.daemon",
            "--checkpoint",
            str(tiny()),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        # the daemon is not even started yet: this first request starts it and waits for it
        with wand.connect(f"ipc://{sock}", timeout=60) as c:
            status = c.status()
            assert status["daemon"]["endpoint"] == f"ipc://{sock}"
            assert len(c.attach("vae")) > 0  # waits through "not_ready" while loading
            c.stop()
        assert proc.wait(30) == 0
        assert sock.exists()  # the socket belongs to the activator, not to the daemon
    finally:
        proc.kill()
        proc.wait()


def test_second_daemon_without_activation_refuses(daemon, tiny, start_daemon):
    d = start_daemon(tiny(), "--endpoint", daemon.endpoint)
    assert d.proc.wait(60) == 1
    assert "already serving" in d.output()


def write_config(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


def test_config_file_with_two_checkpoints_shares_identical_components(tiny, start_daemon, tmp_path):
    cfg = write_config(
        tmp_path / "wand.toml",
        f'[[checkpoint]]\npath = "{tiny("t2v-A14B")}"\n\n'
        f'[[checkpoint]]\nname = "i2v"\npath = "{tiny("i2v-A14B")}"\n'
        'dtype = { vae = "float32" }\n',
    )
    d = Daemon(None, "--config", str(cfg)).wait_ready()
    try:
        status = json.loads(d.wanctl("status", "--json").stdout)
        comps = {c["name"]: c for c in status["components"]}
        assert len(comps) == 8
        assert comps["t2v-A14B/text_encoder"]["shared_with"] == ["i2v/text_encoder"]
        assert comps["i2v/vae"]["resident"] == comps["t2v-A14B/vae"]["resident"]
        assert (
            comps["i2v/high_noise_model"]["resident"]
            != comps["t2v-A14B/high_noise_model"]["resident"]
        )
        assert len(daemon_slabs(d.proc.pid)) == 6  # 8 components, 2 of them shared
        with d.connect() as c:
            with pytest.raises(wand.DaemonError) as e:
                c.attach("vae")
            assert e.value.code == "ambiguous_component"
            a, b = c.attach("t2v-A14B/vae"), c.attach("i2v/vae")
            assert all(a[k].data_ptr() == b[k].data_ptr() for k in a)
    finally:
        d.stop()


def test_check_config_explains_and_rejects(tiny, tmp_path):
    good = write_config(tmp_path / "good.toml", f'[[checkpoint]]\npath = "{tiny()}"\n')
    out = subprocess.run(
        [sys.executable, "-m", "wand.daemon", "--config", str(good), "--check-config"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert "checkpoint t2v-A14B: t2v-A14B, original layout" in out.stdout
    assert "high_noise_model: WanTransformer3DModel, 69 tensors" in out.stdout
    assert out.stdout.rstrip().endswith("OK")
    cases = {
        "bad.toml": ("[[checkpoint]\npath = 1", "bad.toml"),
        "unknown.toml": (f'[[checkpoint]]\npath = "{tiny()}"\ncolour = "red"\n', "'colour'"),
        "nopath.toml": ('[[checkpoint]]\nname = "x"\n', "'path'"),
        "missing.toml": ('[[checkpoint]]\npath = "/nonexistent"\n', "/nonexistent"),
        "device.toml": (f'[[checkpoint]]\npath = "{tiny()}"\ndevice = "tpu"\n', "'tpu'"),
    }
    for name, (body, expected) in cases.items():
        cfg = write_config(tmp_path / name, body)
        out = subprocess.run(
            [sys.executable, "-m", "wand.daemon", "--config", str(cfg), "--check-config"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert out.returncode == 78, (name, out.stdout, out.stderr)
        assert expected in out.stderr, (name, out.stderr)


HOLDER = """
import sys, time, wand
c = wand.connect(sys.argv[1])
sd = c.attach(sys.argv[2])
first = next(iter(sorted(sd)))
print(float(sd[first].float().sum()), flush=True)
for line in sys.stdin:  # one command per line: "sum", "attach", "detach"
    cmd = line.strip()
    try:
        if cmd == "sum":
            print(float(sd[first].float().sum()), flush=True)
        elif cmd == "attach":
            print(float(c.attach(sys.argv[2])[first].float().sum()), flush=True)
        elif cmd == "detach":
            c.detach(sys.argv[2]); print("detached", flush=True)
    except wand.DaemonError as e:
        print("error", e.code, flush=True)
"""


class Holder:
    """A client process that attaches a component and answers commands on stdin."""

    def __init__(self, endpoint: str, name: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, endpoint, name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.first = self.proc.stdout.readline().strip()

    def ask(self, cmd: str) -> str:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def test_load_unload_with_clients_attached(daemon, tiny):
    out = daemon.wanctl("load", str(tiny("ti2v-5B")), "--name", "five")
    assert out.returncode == 0, out.stderr
    assert "five/model: ready" in out.stdout
    holder = Holder(daemon.endpoint, "five/model")
    try:
        out = daemon.wanctl("unload", "five")
        assert out.returncode == 1
        assert f"pid {holder.proc.pid}" in out.stderr and "--force" in out.stderr
        out = daemon.wanctl("unload", "five", "--force")
        assert out.returncode == 0 and str(holder.proc.pid) in out.stdout
        assert holder.ask("sum") == holder.first  # its mapping stays valid...
        assert holder.ask("attach") == "error revoked"  # ...but the daemon says so, once
        assert holder.ask("attach") == "error unknown_component"
    finally:
        holder.close()
    assert "five" not in daemon.wanctl("status").stdout
    assert daemon.wanctl("unload", "five").returncode == 1


def test_reload_swaps_changed_checkpoint_after_clients_let_go(tiny, start_daemon, tmp_path):
    from wand.wan import write_tiny

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny(), ckpt)
    d = start_daemon(ckpt).wait_ready()
    holder = Holder(d.endpoint, "high_noise_model")
    try:
        other = write_tiny(tmp_path / "other", "t2v-A14B", "original", seed=7)
        shutil.rmtree(ckpt / "high_noise_model")
        shutil.copytree(other / "high_noise_model", ckpt / "high_noise_model")
        out = d.wanctl("reload", "--json")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["changed"] == ["t2v-A14B"]
        d.wait_ready()
        status = json.loads(d.wanctl("status", "--json").stdout)
        assert [r["component"] for r in status["retired"]] == ["high_noise_model"]
        assert status["retired"][0]["clients"] == 1
        assert "retired high_noise_model" in d.wanctl("status").stdout
        assert holder.ask("sum") == holder.first  # the old bytes, still served
        fresh = holder.ask("attach")
        assert fresh != holder.first  # a new attach maps the reloaded weights
        assert holder.ask("detach") == "detached"
        assert holder.ask("detach") == "detached"
        deadline = time.monotonic() + 5
        while json.loads(d.wanctl("status", "--json").stdout)["retired"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert len(daemon_slabs(d.proc.pid)) == 4
    finally:
        holder.close()


def test_reload_follows_the_configuration_file(tiny, tmp_path):
    cfg = write_config(tmp_path / "wand.toml", f'[[checkpoint]]\npath = "{tiny()}"\n')
    d = Daemon(None, "--config", str(cfg)).wait_ready()
    try:
        write_config(cfg, f'[[checkpoint]]\nname = "five"\npath = "{tiny("ti2v-5B")}"\n')
        report = json.loads(d.wanctl("reload", "--json").stdout)
        assert report["added"] == ["five"] and report["removed"] == ["t2v-A14B"]
        d.wait_ready()
        assert {c["name"].split("/")[0] for c in d.connect().list()} == {"five"}
        write_config(cfg, "[[checkpoint]\n")
        out = d.wanctl("reload")
        assert out.returncode == 1 and "wand.toml" in out.stderr
        assert d.wanctl("ping").returncode == 0
    finally:
        d.stop()


def _as_nobody(endpoint: str, op: str) -> dict:
    """Send one request from a forked child running as uid 65534."""

    def ask() -> bytes:
        raw = Raw(endpoint)
        raw.sock.send(protocol.request(1, op))
        return raw.sock.recv()

    return protocol.parse_reply(as_nobody(ask))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_only_root_and_the_daemon_user_may_change_what_it_holds(daemon):
    path = Path(daemon.endpoint.removeprefix("ipc://"))
    os.chmod(path.parent, 0o755)
    os.chmod(path, 0o666)
    try:
        assert _as_nobody(daemon.endpoint, "status")["ok"]
        for op in ("stop", "reload", "unload", "load"):
            reply = _as_nobody(daemon.endpoint, op)
            assert reply["error"]["code"] == "forbidden", reply
        assert daemon.wanctl("ping").returncode == 0
    finally:
        os.chmod(path, 0o660)
        os.chmod(path.parent, 0o700)


def test_logs_shows_and_follows_the_daemon_log(daemon):
    out = daemon.wanctl("logs", "-n", "5")
    assert out.returncode == 0
    lines = out.stdout.strip().splitlines()
    assert 1 <= len(lines) <= 5 and all(" wand" in line for line in lines)
    records = [json.loads(line) for line in daemon.wanctl("logs", "--json").stdout.splitlines()]
    assert any("listening on" in r["message"] for r in records)
    follow = subprocess.Popen(
        [sys.executable, "-m", "wanctl", "--endpoint", daemon.endpoint, "logs", "-f", "-n", "1"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert follow.stdout.readline().strip()
        run_wanctl("--endpoint", daemon.endpoint, "unload", "nope")
        ready, _, _ = select.select([follow.stdout], [], [], 10)
        assert ready, "logs -f printed nothing new"
        assert "unload from pid" in follow.stdout.readline()
    finally:
        follow.kill()
        follow.wait()


def test_the_config_knows_the_same_tasks_as_the_checkpoint_reader():
    from wand.daemon import config
    from wand.wan import TASKS

    assert config.TASKS == tuple(TASKS)  # config keeps a copy: it must not import wand.wan
    names = {"text_encoder", "vae"} | {e for task in TASKS.values() for e in task.experts}
    assert set(config.COMPONENTS) == names


def test_reload_of_unchanged_shared_checkpoints_reports_no_change(tiny, tmp_path):
    cfg = write_config(
        tmp_path / "wand.toml",
        f'[[checkpoint]]\npath = "{tiny("t2v-A14B")}"\n\n'
        f'[[checkpoint]]\nname = "i2v"\npath = "{tiny("i2v-A14B")}"\n',
    )
    d = Daemon(None, "--config", str(cfg)).wait_ready()
    try:
        report = json.loads(d.wanctl("reload", "--json").stdout)
        assert report == {"added": [], "changed": [], "removed": [], "errors": []}
    finally:
        d.stop()


def test_a_daemon_with_nothing_to_serve_says_so(start_daemon, tmp_path):
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    d = start_daemon(None, "--config", str(empty))
    deadline = time.monotonic() + 60
    while "no checkpoint configured" not in d.output():
        assert time.monotonic() < deadline and d.proc.poll() is None, d.output()
        time.sleep(0.1)
    assert "wanctl load PATH" in d.output()


PS_NAME = """
import os, sys, wand
with wand.connect(sys.argv[1]) as c:
    c.attach("vae")
    print([p["name"] for p in c.ps() if p["pid"] == os.getpid()][0])
"""


def test_ps_names_python_clients_by_what_they_run(daemon):
    out = subprocess.run(
        [sys.executable, "-c", PS_NAME, daemon.endpoint], capture_output=True, text=True
    )
    assert out.stdout.strip() == f"{os.path.basename(sys.executable)} -c", out.stderr
