"""The units under a real systemd: a Debian 12 box with systemd as PID 1 (scripts/systemd-box).

One ephemeral box is booted for the module: it runs on a throw-away copy of the cached root
(/var/cache/wand-systemd-box/root), which keeps only the empty mount points of the binds. The
checkout, its venv and the Python the venv points to are bound into it read-only at the same
paths, and so is the folder of test checkpoints (written on this machine, seen by the box);
``wanctl install-units`` is run inside, so the units are exactly what a user installs, with
``ExecStart=``/``ExecReload=`` pointing at the checkout's venv. Users: ``wand``
(systemd-sysusers), ``alice`` (in group wand) and ``bob`` (not). The tests share the box and
its one ``wand.service``; each brings the service to the state it needs first.

Everything a client does runs inside the box (``systemd-box exec``, which enters the box's
namespaces): the clients are real processes of the box that the daemon sees through its own
pid namespace. A small raw-protocol probe (no torch import) reads ``status`` where speed
matters.

Needs root, systemd-nspawn and debootstrap (the box's ``setup`` installs them with apt-get),
network for the first setup (~2 min, cached afterwards) and a kernel/container that lets
systemd-nspawn boot; skipped with the reason otherwise.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT

BOX = ROOT / "scripts" / "systemd-box"
CACHE = Path("/var/cache/wand-systemd-box")
BOX_ROOT = Path(os.environ.get("SYSTEMD_BOX_ROOT", CACHE / "root"))  # as the tool has it
# checkpoints the box's daemon reads: not under /tmp, /var/tmp (PrivateTmp=), /run or a home
DATA = Path(os.environ.get("WAND_BOX_DATA", CACHE / "data"))
VENV = Path(sys.prefix)
PY = VENV / "bin" / "python"
WANCTL = VENV / "bin" / "wanctl"
SOCK = "/run/wand/wand.sock"
ENDPOINT = f"ipc://{SOCK}"
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
COMPONENTS = ("text_encoder", "vae", "high_noise_model", "low_noise_model")
EXPERTS = ("high_noise_model", "low_noise_model")
# a drop-in for a checkout under /tmp: the units' PrivateTmp= would hide it from the daemon
CHECKOUT_DROPIN = "/etc/systemd/system/{unit}.d/10-checkout.conf"
WIDTH, LAYERS = 512, 4  # ≈ 90 MB resident, 150 MB on disk: loading is seen, memory is measured

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: systemd-nspawn boots the box"),
]


# --- the box -------------------------------------------------------------------------------


class Box:
    """The booted box: run commands in it as root or as a user."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say

    def argv(self, *cmd: str, user: str | None = None, env: dict | None = None) -> list[str]:
        home = "/root" if user is None else f"/home/{user}"
        base = {"PATH": PATH, "HOME": home, "LANG": "C.UTF-8", **(env or {})}
        pre = [str(BOX), "exec", "env", "-i", *(f"{k}={v}" for k, v in base.items())]
        if user is not None:
            pre += ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups"]
        return [*pre, *cmd]

    def run(
        self, *cmd: str, user: str | None = None, check: bool = True, timeout: float = 180, **kw
    ) -> subprocess.CompletedProcess:
        env = kw.pop("env", None)
        proc = subprocess.run(
            self.argv(*cmd, user=user, env=env),
            capture_output=True,
            text=True,
            timeout=timeout,
            **kw,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"in the box: {' '.join(cmd)} exited {proc.returncode}\n"
                f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
            )
        return proc

    def sh(self, script: str, **kw) -> subprocess.CompletedProcess:
        return self.run("bash", "-c", script, **kw)

    def write(self, path: str, text: str, user: str | None = None) -> None:
        """Write a file inside the box (its folder made first)."""
        self.run("mkdir", "-p", str(Path(path).parent), user=user)
        self.run("tee", path, input=text, user=user)

    def show(self, unit: str = "wand.service", *props: str) -> dict[str, str]:
        props = props or ("ActiveState", "SubState", "MainPID", "StatusText", "NRestarts")
        out = self.run("systemctl", "show", *(f"-p{p}" for p in props), unit).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def main_pid(self, unit: str = "wand.service") -> int:
        return int(self.show(unit, "MainPID")["MainPID"])

    def status(self, endpoint: str = ENDPOINT, timeout: float = 60) -> dict[str, Any]:
        out = self.run(str(PY), "-c", PROBE, endpoint, str(timeout), timeout=timeout + 30)
        return json.loads(out.stdout)

    def wanctl(self, *args: str, user: str | None = None, **kw) -> subprocess.CompletedProcess:
        return self.run(str(WANCTL), *args, user=user, check=False, **kw)

    def journal(self, *args: str) -> list[dict[str, Any]]:
        out = self.run("journalctl", "-o", "json", "--no-pager", *args).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def messages(self, unit: str = "wand.service", since: str | None = None) -> str:
        """A unit's journal; ``~wand.service`` is a unit of a user manager (what the unit logs,
        and what its manager says about it: --user-unit= would match only root's units)."""
        name = unit.removeprefix("~")
        which = [f"_SYSTEMD_USER_UNIT={name}", "+", f"USER_UNIT={name}"]
        args = ["journalctl", *(which if unit.startswith("~") else [f"--unit={unit}"])]
        args += ["--no-pager", "-o", "cat"]
        if since:
            args += ["--since", since]
        return self.run(*args).stdout

    def logged(self, since: str, *needles: str, unit: str = "wand.service") -> str:
        """The unit's messages since ``since`` once they hold every needle (journald writes
        what it is sent a moment later)."""
        deadline = time.monotonic() + 15
        while True:
            log = self.messages(unit, since)
            missing = [n for n in needles if not re.search(n, log)]
            if not missing:
                return log
            if time.monotonic() > deadline:
                raise AssertionError(f"{unit}'s journal lacks {missing}:\n{log}")
            time.sleep(0.3)

    def now(self) -> str:
        """The box's clock, as journalctl --since takes it."""
        return self.run("date", "+%Y-%m-%d %H:%M:%S.%N").stdout.strip()[:-3]

    def rchar(self, pid: int) -> int:
        io = self.run("cat", f"/proc/{pid}/io").stdout
        return int(re.search(r"^rchar: (\d+)", io, re.M).group(1))

    def shmem(self) -> int:
        meminfo = self.run("cat", "/proc/meminfo").stdout
        return int(re.search(r"^Shmem:\s+(\d+) kB", meminfo, re.M).group(1)) * 1024

    def fdstore(self, unit: str = "wand.service") -> int:
        return int(self.show(unit, "NFileDescriptorStore")["NFileDescriptorStore"])

    # --- the service's life ---------------------------------------------------------------

    def stopped(self) -> None:
        """wand.service stopped (its fd store emptied), wand.socket listening, no failures."""
        self.run("systemctl", "stop", "wand.service")
        self.run("systemctl", "reset-failed", "wand.service", "wand.socket", check=False)
        self.run("systemctl", "start", "wand.socket")

    def started(self) -> dict[str, str]:
        """wand.service running (started if it was not): ``systemctl start`` returns once the
        daemon has said READY=1."""
        self.run("systemctl", "reset-failed", "wand.service", check=False)
        self.run("systemctl", "start", "wand.service")
        return self.show()

    def running_again(self, old_pid: int, timeout: float = 90) -> dict[str, str]:
        """Wait until systemd has restarted the service under a new main pid and it is ready."""

        def again() -> dict[str, str] | None:
            s = self.show()
            ok = s["ActiveState"] == "active" and s["SubState"] == "running"
            return s if ok and int(s["MainPID"]) not in (0, old_pid) else None

        return wait_until(f"wand.service restarted (old pid {old_pid})", again, timeout)


def wait_until(what: str, check: Callable[[], Any], timeout: float = 60, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


# status over the raw protocol: a fast probe (no torch import); the real client is tested
# by everything else
PROBE = r"""
import json, sys, zmq, msgpack
s = zmq.Context().socket(zmq.DEALER)
s.setsockopt(zmq.LINGER, 0)
s.connect(sys.argv[1])
s.send(msgpack.packb({"v": 1, "id": 1, "op": "status", "args": {}}))
if not s.poll(int(float(sys.argv[2]) * 1000)):
    sys.exit("no reply to status from " + sys.argv[1])
reply = msgpack.unpackb(s.recv())
if not reply["ok"]:
    sys.exit(str(reply["error"]))
print(json.dumps(reply["result"]))
"""

# a client process in the box that holds attachments and answers one JSON line per command:
# "attach NAME...": sha256 of each slab's bytes; "verify": each held attachment re-hashed and
# checked against its manifest's checksums; "status": the daemon's pid and state through the
# same connection; "release": detach all and drop the mappings
AGENT = r"""
import gc, hashlib, json, os, sys
import wand
c = wand.connect(None if sys.argv[1] == "-" else sys.argv[1], timeout=60)
held = {}
def digest(att):
    return hashlib.sha256(memoryview(att.flat.numpy())).hexdigest()
print(json.dumps({"pid": os.getpid(), "daemon": c.daemon["pid"]}), flush=True)
for line in sys.stdin:
    cmd, *names = line.split()
    try:
        if cmd == "attach":
            out = {}
            for n in names:
                held[n] = c.attachment(n)
                out[n] = digest(held[n])
        elif cmd == "verify":
            out = {n: a.verify() and digest(a) for n, a in held.items()}
        elif cmd == "status":
            out = c.status()["daemon"]
        elif cmd == "release":
            for n in held:
                c.detach(n)
            held.clear()
            gc.collect()
            out = "released"
    except Exception as e:
        out = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(out), flush=True)
"""


class Agent:
    """A client process inside the box (see AGENT)."""

    def __init__(self, box: Box, user: str | None = None, endpoint: str = ENDPOINT) -> None:
        self.proc = subprocess.Popen(
            box.argv(str(PY), "-c", AGENT, endpoint, user=user),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        hello = self._line(120)
        self.pid, self.daemon = hello["pid"], hello["daemon"]

    def ask(self, *cmd: str, timeout: float = 120) -> Any:
        self.proc.stdin.write(" ".join(cmd) + "\n")
        self.proc.stdin.flush()
        return self._line(timeout)

    def _line(self, timeout: float) -> Any:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.proc.kill()
            raise AssertionError(f"the client in the box said nothing: {self.proc.stderr.read()}")
        return json.loads(line)

    def close(self) -> None:
        """End it: its stdin closes, so it leaves its loop and exits (inside the box)."""
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def say(request) -> Callable[[str], None]:
    """Print a line in pytest's output, even under -q and output capture."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")

    def write(text: str) -> None:
        if reporter is None or capture is None:
            print(f"[systemd box] {text}", file=sys.stderr)
            return
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"[systemd box] {text}")

    return write


def _tool(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BOX), *args], capture_output=True, text=True, timeout=timeout, env=_host_env()
    )


def _host_env() -> dict[str, str]:
    return {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}


def _tail(text: str, n: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def _code_paths() -> list[Path]:
    """The checkout, its venv and the Python the venv runs on, unless one holds another."""
    paths: list[Path] = []
    for p in (ROOT, VENV, Path(sys.base_prefix)):
        p = p.resolve()
        if not any(p == q or q in p.parents for q in paths):
            paths.append(p)
    if Path("/usr") in paths:
        pytest.skip(
            "the venv runs on the system Python in /usr, which cannot be bound over the box's "
            "own /usr: create .venv with a Python installed elsewhere (pyenv, /opt)"
        )
    return paths


def _binds() -> list[str]:
    return [a for p in [*_code_paths(), DATA] for a in ("--bind", str(p))]


def _hidden_by_private_tmp() -> list[Path]:
    """The code paths that the units' PrivateTmp= would hide from the daemon (a checkout
    cloned under /tmp, as CI may)."""
    tmp = (Path("/tmp"), Path("/var/tmp"))
    return [p for p in _code_paths() if any(t in p.parents for t in tmp)]


def _write_checkpoints() -> None:
    """Into DATA, which is bound into the booted box already (it sees them as they come)."""
    from wand.wan import write_tiny

    write_tiny(DATA / "seed0", "t2v-A14B", "original", width=WIDTH, layers=LAYERS)
    write_tiny(DATA / "seed7", "t2v-A14B", "original", width=WIDTH, layers=LAYERS, seed=7)
    shutil.copytree(DATA / "seed0", DATA / "ckpt")  # the one served
    write_tiny(DATA / "small", "t2v-A14B", "original")
    # pytest's folders are private to root (0700): user wand must be let in to read them
    subprocess.run(["chmod", "-R", "a+rX", str(DATA)], check=True)


@pytest.fixture(scope="module")
def box(say) -> Iterator[Box]:
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "test.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pytest.skip(f"another test run is using the box ({CACHE / 'test.lock'} is locked)")
        missing = [t for t in ("nsenter", "unshare", "setsid", "pgrep") if not shutil.which(t)]
        if missing:  # the tool drives the box with them (util-linux, procps)
            pytest.skip(f"scripts/systemd-box needs {', '.join(missing)} on this machine")
        start = time.monotonic()
        setup = _tool("setup", timeout=1800)
        if setup.returncode != 0:
            pytest.skip(f"cannot set the box up (network? apt-get?):\n{_tail(setup.stderr)}")
        say(f"setup: {time.monotonic() - start:.0f} s ({setup.stdout.strip()})")
        _tool("stop", timeout=60)  # a box a killed earlier run left behind (we hold the lock)
        shutil.rmtree(DATA, ignore_errors=True)
        DATA.mkdir(parents=True)
        start = time.monotonic()
        boot = _tool("boot", "--ephemeral", *_binds(), timeout=120)
        if boot.returncode != 0:
            console = Path(f"{BOX_ROOT}.state") / "console.log"
            log = console.read_text(errors="replace") if console.exists() else ""
            _tool("stop", timeout=60)
            pytest.skip(
                "systemd-nspawn cannot boot the box here (nested containers refused?):\n"
                f"{_tail(boot.stderr)}\n{_tail(log)}"
            )
        say(f"booted in {time.monotonic() - start:.1f} s")
        b = Box(say)
        try:
            start = time.monotonic()
            _write_checkpoints()
            say(f"checkpoints written in {time.monotonic() - start:.0f} s")
            say(f"{_provision(b)} in the box: units installed, users made")
            yield b
        finally:
            with contextlib.suppress(Exception):
                journal = b.run("journalctl", "-u", "wand*", "--no-pager", "-n", "60").stdout
                print(f"--- the box's journal for wand*, last lines:\n{journal}")
            _tool("stop", timeout=120)
            shutil.rmtree(DATA, ignore_errors=True)


def _provision(b: Box) -> str:
    """Install the units the way a user does, create the users, write the configuration."""
    version = b.run("systemctl", "--version").stdout.splitlines()[0]
    report = json.loads(b.run(str(WANCTL), "install-units", "--json").stdout)
    # user wand can run the venv's wand; a checkout under /tmp is said to be hidden
    hidden = _hidden_by_private_tmp()
    assert bool(report["warnings"]) == bool(hidden), report["warnings"]
    assert all("PrivateTmp=" in w for w in report["warnings"]), report["warnings"]
    assert report["wand"] == str(VENV / "bin" / "wand")
    assert report["wanctl"] == str(WANCTL)
    for unit in ("wand.service", "wand@.service") if hidden else ():
        # what install-units tells a user with wand under /tmp to do
        binds = " ".join(str(p) for p in hidden)
        b.write(CHECKOUT_DROPIN.format(unit=unit), f"[Service]\nBindReadOnlyPaths={binds}\n")
    b.run("systemd-sysusers", "/etc/sysusers.d/wand.conf")
    b.run("useradd", "--create-home", "--groups", "wand", "alice")
    b.run("useradd", "--create-home", "bob")
    b.write("/etc/wand/wand.toml", f'[[checkpoint]]\npath = "{DATA / "ckpt"}"\ndevice = "cpu"\n')
    # the instance wand@second serves the small checkpoint on /run/wand/second.sock
    b.write("/etc/wand/second.toml", f'[[checkpoint]]\npath = "{DATA / "small"}"\n')
    check = b.run(
        "setpriv",
        "--reuid=wand",
        "--regid=wand",
        "--init-groups",
        str(VENV / "bin/wand"),
        "--config",
        "/etc/wand/wand.toml",
        "--check-config",
    )
    assert check.stdout.rstrip().endswith("OK"), check.stdout
    b.run("systemctl", "daemon-reload")
    b.run("systemctl", "enable", "--now", "wand.socket")  # only the socket: activation
    return version


def _installed_units_match_the_checkout(b: Box) -> None:
    from wanctl import units

    for p in units.plan(False, None, VENV / "bin" / "wand", WANCTL):
        if p.target.suffix in (".service", ".socket"):
            assert b.run("cat", str(p.target)).stdout == p.text, p.target


# --- the tests -----------------------------------------------------------------------------


def test_the_box_runs_the_units_install_units_wrote(box):
    _installed_units_match_the_checkout(box)
    assert box.run("systemctl", "is-enabled", "wand.socket").stdout.strip() == "enabled"
    assert box.run("systemctl", "is-enabled", "wand.service", check=False).stdout.strip() == (
        "disabled"
    )
    dropins = box.run("systemctl", "show", "-pDropInPaths", "wand.service").stdout.strip()
    # nothing overrides them, but for a checkout under /tmp made visible to the daemon
    bound = CHECKOUT_DROPIN.format(unit="wand.service") if _hidden_by_private_tmp() else ""
    assert dropins == f"DropInPaths={bound}", dropins


def test_the_first_request_starts_the_service_by_socket_activation(box):
    box.stopped()
    assert box.show()["ActiveState"] == "inactive"
    listen = box.run("systemctl", "show", "-pListen", "wand.socket").stdout
    assert f"{SOCK} (Stream)" in listen and "/run/wand/wand.fds.sock (Stream)" in listen
    mode = box.run("stat", "-c", "%a %U %G", SOCK, "/run/wand/wand.fds.sock").stdout.split("\n")
    assert mode[:2] == ["660 root wand", "660 root wand"]
    since = box.now()
    out = box.wanctl("--timeout", "120", "status", "--json")  # nothing runs yet: this starts it
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    svc = box.show()
    assert svc["ActiveState"] in ("activating", "active")
    assert status["daemon"]["pid"] == int(svc["MainPID"])
    assert status["daemon"]["endpoint"] == ENDPOINT
    assert status["daemon"]["fdstore"] is True
    box.logged(since, re.escape(f"listening on {ENDPOINT} (socket activation)"))


def test_ready_only_once_resident_with_load_progress_in_status(box):
    box.stopped()
    # watch systemd's view while it starts: one sample every ~20 ms, from inside the box
    samples = box.sh(
        "systemctl start --no-block wand.service\n"
        "end=$((SECONDS + 120))\n"
        "while ((SECONDS < end)); do\n"
        "  s=$(systemctl show -pActiveState -pSubState -pStatusText wand.service | paste -sd'|')\n"
        '  echo "$s"\n'
        "  case $s in *ActiveState=active\\|*|*ActiveState=failed*) break;; esac\n"
        "  sleep 0.02\n"
        "done"
    ).stdout.splitlines()
    seen = [dict(f.split("=", 1) for f in line.split("|")) for line in samples]
    loading = [s for s in seen if s["ActiveState"] == "activating"]
    assert any(s["StatusText"].startswith("loading 4 components: ") for s in loading), samples
    assert not any(s["StatusText"].startswith("ready") for s in loading), samples
    assert seen[-1]["ActiveState"] == "active", samples
    assert re.match(r"ready: 4 components, \d+\.\d MB resident", seen[-1]["StatusText"]), samples

    # systemctl start returns on READY=1: by then every component is resident
    box.stopped()
    box.started()
    comps = box.status()["components"]
    assert [c["state"] for c in comps] == ["ready"] * 4, comps


def test_the_journal_has_the_structured_fields(box):
    box.started()
    pid = box.main_pid()
    records = [r for r in box.journal("-u", "wand.service") if r.get("_PID") == str(pid)]
    ready = {r["WAND_COMPONENT"]: r for r in records if "WAND_COMPONENT" in r}
    assert set(ready) == set(COMPONENTS), [r.get("MESSAGE") for r in records]
    for r in ready.values():
        assert r["_SYSTEMD_UNIT"] == "wand.service"
        assert r["SYSLOG_IDENTIFIER"] == "wand"
        assert r["WAND_DEVICE"] == "cpu" and r["WAND_RESIDENT"].isdigit()
        assert r["PRIORITY"] == "6" and r["LOGGER"].startswith("wand.")
        assert r["CODE_FILE"].endswith(".py") and r["CODE_FUNC"]
        assert r["_UID"] == box.run("id", "-u", "wand").stdout.strip()
    # and journalctl's own filter on a field works
    vae = box.journal("-u", "wand.service", "WAND_COMPONENT=vae")
    assert vae and all(r["WAND_COMPONENT"] == "vae" for r in vae)


def _experts_from(source: str) -> None:
    """Replace the served checkpoint's two experts with those of another one (the host writes
    into the folder the box sees)."""
    for name in EXPERTS:
        target = DATA / "ckpt" / name
        shutil.rmtree(target)
        shutil.copytree(DATA / source / name, target)


RELOAD = r"""
t0=$EPOCHREALTIME
systemctl reload wand.service
rc=$?
echo "$rc $(( (${EPOCHREALTIME/./} - ${t0/./}) / 1000 ))"
"""
PAUSE = 3  # seconds the daemon is stopped while systemctl reload asks it


def test_systemctl_reload_returns_once_the_new_files_are_resident(box):
    """Right after ``systemctl reload`` returns, a client that attaches gets the new bytes; and
    that holds even when the daemon is slow to take the reload (stopped for a few seconds):
    an ExecReload= that only signals would return before the daemon even began."""
    box.started()
    agent = Agent(box)
    try:
        seed0 = agent.ask("attach", *EXPERTS)
        assert agent.ask("release") == "released"

        _experts_from("seed7")
        since = box.now()
        rc, took = box.sh(RELOAD).stdout.split()
        seed7 = agent.ask("attach", *EXPERTS)  # the moment systemctl reload returned
        assert rc == "0" and "error" not in seed7, seed7
        assert all(seed7[n] != seed0[n] for n in EXPERTS), (seed0, seed7)
        assert all(agent.ask("verify").values())
        assert agent.ask("release") == "released"
        # the unit's journal: the daemon's report, the new experts resident, then systemd's word
        # that the reload is over
        log = box.logged(since, r"reload: changed \[.t2v-A14B.\]", "Reloaded wand").splitlines()
        loaded = [i for i, m in enumerate(log) if re.match(r"\w+_noise_model ready \(resident", m)]
        assert len(loaded) == 2 and loaded[-1] < log.index(next(m for m in log if "Reloaded" in m))
        box.say(f"systemctl reload (two experts changed) took {int(took) / 1000:.1f} s")

        _experts_from("seed0")  # back to the first files, with a daemon slow to react
        pid = box.main_pid()
        rc, took = box.sh(
            f"kill -STOP {pid}\n(sleep {PAUSE}; kill -CONT {pid}) >/dev/null 2>&1 &\n{RELOAD}"
        ).stdout.split()
        again = agent.ask("attach", *EXPERTS)
        assert rc == "0"
        assert again == seed0  # byte for byte what the first start read from these files
        assert int(took) >= PAUSE * 1000, took  # it waited for the daemon to be done
        assert all(agent.ask("verify").values())
        box.say(
            f"systemctl reload with the daemon stopped for {PAUSE} s took {int(took) / 1000:.1f} s"
        )
    finally:
        agent.close()
    # ExecReload='s wanctl printed its report only once the new experts were resident (with
    # --no-wait it would print it as soon as the daemon has read the files)
    printed = [i for i, m in enumerate(log) if m == "changed: t2v-A14B"]
    assert printed and printed[0] > loaded[-1], log


def test_a_hung_daemon_is_killed_by_the_watchdog_and_restarted(box):
    dropin = Path("/run/systemd/system/wand.service.d/50-test-watchdog.conf")
    box.write(str(dropin), "[Service]\nWatchdogSec=2s\nRestartSec=1s\n")
    try:
        box.run("systemctl", "daemon-reload")
        box.run("systemctl", "restart", "wand.service")  # WATCHDOG_USEC is set at start
        assert box.show("wand.service", "WatchdogUSec")["WatchdogUSec"] == "2s"
        before = box.show()
        pid = int(before["MainPID"])
        since = box.now()
        box.run("kill", "-STOP", str(pid))
        after = box.running_again(pid, timeout=60)
        assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1
        box.logged(
            since,
            re.escape("wand.service: Watchdog timeout (limit 2s)!"),
            rf"Killing process {pid} \(\S+\) with signal SIGABRT",
            r"Main process exited, code=(dumped|killed), status=6/ABRT",
            "Failed with result 'watchdog'",
        )
        comps = box.status()["components"]
        assert all(c["state"] == "ready" and c["adopted"] for c in comps), comps
    finally:
        box.run("rm", "-f", str(dropin))
        box.run("systemctl", "daemon-reload")
        box.run("systemctl", "restart", "wand.service")
    assert box.show("wand.service", "WatchdogUSec")["WatchdogUSec"] == "1min"


def test_clients_keep_their_tensors_across_a_restart_and_reconnect(box):
    box.started()
    agent = Agent(box, user="alice", endpoint="-")  # a member of group wand, default endpoint
    try:
        held = agent.ask("attach", *COMPONENTS)
        old = agent.ask("status")["pid"]
        box.run("systemctl", "restart", "wand.service")
        assert box.main_pid() != old
        assert agent.ask("verify") == held  # every byte still right, mapped by the client
        again = agent.ask("status")  # the same connection, answered by the new daemon
        assert again["pid"] == box.main_pid() and again["state"] == "ready"
        assert agent.ask("attach", *COMPONENTS) == held  # and new attaches work
    finally:
        agent.close()


@pytest.fixture(scope="module")
def cold(box) -> dict[str, Any]:
    """A cold start (stop empties the fd store): what the daemon read, what it serves."""
    box.stopped()
    assert box.fdstore() == 0
    box.started()
    status = box.status()
    assert not any(c["adopted"] for c in status["components"])
    disk = sum(f.stat().st_size for f in (DATA / "ckpt").rglob("*") if f.is_file())
    return {"rchar": box.rchar(box.main_pid()), "status": status, "disk": disk}


@pytest.mark.parametrize("how", ["restart", "SIGSEGV", "SIGKILL"])
def test_a_restarted_daemon_adopts_every_slab_and_reads_no_checkpoint(box, cold, how):
    svc = box.started()
    pid, restarts = int(svc["MainPID"]), int(svc["NRestarts"])
    # each slab and its record, and the checkpoint's spec
    assert box.fdstore() == 2 * len(COMPONENTS) + 1
    since = box.now()
    if how == "restart":
        box.run("systemctl", "restart", "wand.service")
        svc = box.show()
    else:
        box.run("kill", f"-{how.removeprefix('SIG')}", str(pid))
        svc = box.running_again(pid)  # Restart=on-failure, after RestartSec=5s
        assert int(svc["NRestarts"]) == restarts + 1
        number = {"SIGSEGV": 11, "SIGKILL": 9}[how]
        box.logged(since, rf"code=(dumped|killed), status={number}/{how[3:]}")
    new = int(svc["MainPID"])
    assert new != pid
    rchar = box.rchar(new)
    status = box.status()
    comps = {c["component"]: c for c in status["components"]}
    assert all(c["adopted"] and c["state"] == "ready" for c in comps.values()), comps
    assert status["daemon"]["adopted"] == len(COMPONENTS)
    was = {c["component"]: c["checksum"] for c in cold["status"]["components"]}
    assert {k: c["checksum"] for k, c in comps.items()} == was
    # the cold start read the checkpoint's bytes; this one read only their headers
    assert cold["rchar"] - rchar > 0.8 * cold["disk"], (cold["rchar"], rchar, cold["disk"])
    box.logged(since, "adopted from the fd store", "spec from the fd store")
    box.say(
        f"{how}: new daemon read {rchar / 1e6:.0f} MB (cold start: {cold['rchar'] / 1e6:.0f} MB, "
        f"checkpoint {cold['disk'] / 1e6:.0f} MB on disk), adopted {len(comps)} slabs"
    )


# which processes in the box hold a wand memfd (slab "wand:…", record "wand-record-…" or spec
# "wand-spec-…"), as a descriptor or a mapping: one "PID fd|map NAME" line each; PID 1 is
# systemd (fd store)
HOLDERS = r"""
for p in /proc/[0-9]*; do
  pid=${p#/proc/}
  for f in "$p"/fd/*; do
    l=$(readlink "$f" 2>/dev/null) || continue
    case $l in /memfd:wand*) echo "$pid fd ${l% (deleted)}";; esac
  done
  sed -n 's|.* \(/memfd:wand[^ ]*\).*|\1|p' "$p/maps" 2>/dev/null | sort -u | sed "s|^|$pid map |"
done
"""

# Shmem (kB) every ~20 ms from just before killing process $1 until it has dropped by $2 kB
# (or 20 s passed): the kernel frees a slab's pages the moment its last holder lets go
FREE = r"""
shmem() {
  while read -r k v _; do [[ $k == Shmem: ]] && { echo "$v"; return; }; done </proc/meminfo
}
t0=$EPOCHREALTIME
before=$(shmem)
echo "$before"
kill -KILL "$1"
for _ in $(seq 1000); do
  now=$(shmem)
  echo "$now"
  ((before - now > $2)) && break
  sleep 0.02
done
echo "$(( (${EPOCHREALTIME/./} - ${t0/./}) / 1000 ))ms"
"""


def _holders(box: Box) -> dict[int, set[str]]:
    held: dict[int, set[str]] = {}
    for line in box.sh(HOLDERS).stdout.splitlines():
        pid, how, name = line.split(" ", 2)
        held.setdefault(int(pid), set()).add(f"{how} {name.removeprefix('/memfd:')}")
    return held


def test_stop_leaves_no_slab_memory_once_the_clients_are_gone(box):
    box.stopped()
    empty = box.shmem()
    box.started()
    daemon = box.main_pid()
    resident = sum(c["bytes"] for c in box.status()["components"])
    agent = Agent(box)
    try:
        held = agent.ask("attach", *COMPONENTS)
        running = _holders(box)
        stored = {h for h in running[1] if h.startswith("fd ")}  # systemd's fd store
        assert len([h for h in stored if h.startswith("fd wand:")]) == len(COMPONENTS), running
        assert len([h for h in stored if h.startswith("fd wand-record-")]) == len(COMPONENTS)
        assert len([h for h in stored if h.startswith("fd wand-spec-")]) == 1  # the checkpoint
        assert len([h for h in running[agent.pid] if h.startswith("map wand:")]) == 4, running
        assert daemon in running

        box.run("systemctl", "stop", "wand.service")
        assert box.show()["ActiveState"] == "inactive"
        assert box.fdstore() == 0
        # systemd let go of every stored descriptor; the client alone holds the slabs now
        assert set(_holders(box)) == {agent.pid}, _holders(box)
        assert agent.ask("verify") == held  # and its bytes are still right
        holding = box.shmem()
        # the client goes: the slabs' pages go with it, all at once
        out = box.sh(f"set -- {agent.pid} {int(0.8 * resident) // 1024}\n{FREE}").stdout.split()
    finally:
        agent.close()
    samples, took = [int(x) * 1024 for x in out[:-1]], out[-1]
    assert _holders(box) == {}
    drop = samples[0] - samples[-1]
    assert drop > 0.8 * resident, (samples, resident)
    box.say(
        f"Shmem: service stopped {empty / 1e6:.0f} MB; stopped again, a client holding the slabs "
        f"{holding / 1e6:.0f} MB, {drop / 1e6:.0f} MB freed within {took} of the client's "
        f"end ({resident / 1e6:.0f} MB "
        "resident; the kernel's counter is the whole machine's)"
    )


def test_group_members_attach_others_are_refused_privileged_ops_are_not_for_members(box):
    box.started()
    # alice (group wand) finds the system socket by default, attaches and verifies
    out = box.wanctl("verify", "--json", user="alice")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["checksum_ok"] for r in rows] == [True] * len(COMPONENTS), rows
    for args in (
        ["reload"],
        ["stop"],
        ["unload", "t2v-A14B"],
        ["load", str(DATA / "small"), "--name", "x"],
        ["unload-lora", "nope"],
    ):
        out = box.wanctl(*args, user="alice")
        assert out.returncode == 1 and "wanctl: forbidden: " in out.stderr, (args, out.stderr)
    assert box.show()["ActiveState"] == "active"
    # bob is told why he cannot connect, and cannot reach the fd socket either
    out = box.wanctl("status", user="bob")
    assert out.returncode == 3, out
    assert f"permission denied on {SOCK}: the socket is for group wand" in out.stderr, out.stderr
    connect = box.run(
        str(PY),
        "-c",
        "import socket; s = socket.socket(socket.AF_UNIX); s.connect('/run/wand/wand.fds.sock')",
        user="bob",
        check=False,
    )
    assert "PermissionError" in connect.stderr, connect.stderr


def test_the_hardening_holds_and_the_score_is_the_expected_one(box):
    from test_units import EXPOSURE

    box.started()
    pid = box.main_pid()
    proc = dict(
        line.split(":\t", 1) for line in box.run("cat", f"/proc/{pid}/status").stdout.splitlines()
    )
    wand_uid = box.run("id", "-u", "wand").stdout.strip()
    assert proc["Uid"].split()[:2] == [wand_uid, wand_uid]
    assert int(proc["CapEff"], 16) == int(proc["CapBnd"], 16) == 0
    assert proc["NoNewPrivs"].strip() == "1" and proc["Seccomp"].strip() == "2"
    mounts = box.run("cat", f"/proc/{pid}/mountinfo").stdout.splitlines()
    by_point = {m.split()[4]: m.split()[5] for m in mounts}  # mount point → its options
    assert by_point["/"].startswith("ro"), by_point["/"]  # ProtectSystem=strict
    assert by_point["/var/lib/wand"].startswith("rw")  # StateDirectory=
    assert by_point["/tmp"].startswith("rw")  # its own (PrivateTmp=)
    out = box.run("systemd-analyze", "security", "--no-pager", "wand.service", check=False)
    score = re.search(r"Overall exposure level for wand.service: (\d+\.\d+) (\S+)", out.stdout)
    assert score, out.stdout
    box.say(f"systemd-analyze security wand.service: {score.group(0)}")
    assert float(score.group(1)) == EXPOSURE


def test_an_instance_of_the_template_starts_reloads_and_stops(box):
    box.run("systemctl", "start", "wand@second.socket")
    try:
        out = box.wanctl("--endpoint", "ipc:///run/wand/second.sock", "--timeout", "120", "ls")
        assert out.returncode == 0, out.stderr
        assert "t2v-A14B/high_noise_model" in out.stdout  # (answered while it still loads)

        def active() -> dict[str, str] | None:
            s = box.show("wand@second.service")
            return s if s["ActiveState"] == "active" else None

        svc = wait_until("wand@second.service active", active, 30)
        since = box.now()
        box.run("systemctl", "reload", "wand@second.service")
        wanctl_ran = "(?m)^no change$"  # ExecReload='s report (the daemon's says "reload: …")
        box.logged(since, wanctl_ran, "Reloaded wand@second.service", unit="wand@second.service")
        status = box.status("ipc:///run/wand/second.sock")
        assert status["daemon"]["pid"] == int(svc["MainPID"])
        assert box.status()["daemon"]["pid"] != status["daemon"]["pid"]  # two daemons
    finally:
        box.run("systemctl", "stop", "wand@second.service", "wand@second.socket")


# The box has no pam_systemd (Debian's libpam-systemd), which sets XDG_RUNTIME_DIR for a user
# manager; saying it in a drop-in for user@.service does the same.
USER_MANAGER = "[Service]\nEnvironment=XDG_RUNTIME_DIR=/run/user/%i\n"


def test_user_units_start_on_demand_reload_and_keep_slabs_across_a_restart(box):
    from wanctl import units

    uid = box.run("id", "-u", "alice").stdout.strip()
    runtime = f"/run/user/{uid}"
    dropin = "/run/systemd/system/user@.service.d/runtime-dir.conf"
    box.write(dropin, USER_MANAGER)
    box.run("systemctl", "daemon-reload")
    box.run("systemctl", "start", f"user@{uid}.service")
    env = {"XDG_RUNTIME_DIR": runtime}

    def alice(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return box.run(*cmd, user="alice", env=env, check=check)

    def show() -> dict[str, str]:
        out = alice("systemctl", "--user", "show", "-pMainPID", "-pActiveState", "wand.service")
        return dict(line.split("=", 1) for line in out.stdout.splitlines())

    try:
        report = json.loads(alice(str(WANCTL), "install-units", "--user", "--json").stdout)
        assert report["warnings"] == []
        installed = {Path(f["target"]).name: f["target"] for f in report["files"]}
        for name in ("wand.service", "wand.socket"):
            text = (units.source_dir() / "user" / name).read_text()
            if name.endswith(".service"):
                text = units.render(text, VENV / "bin" / "wand", WANCTL)
            assert alice("cat", installed[name]).stdout == text, name
        config = f'[[checkpoint]]\npath = "{DATA / "small"}"\n'
        box.write("/home/alice/.config/wand/wand.toml", config, user="alice")
        alice("systemctl", "--user", "daemon-reload")
        alice("systemctl", "--user", "enable", "--now", "wand.socket")
        assert show()["ActiveState"] == "inactive"
        sock = f"{runtime}/wand/wand.sock"
        assert alice("stat", "-c", "%a %U", sock).stdout.strip() == "600 alice"
        # alice's own socket is her default endpoint; the first request starts the daemon
        out = alice(str(WANCTL), "--timeout", "120", "status", "--json", check=False)
        assert out.returncode == 0, out.stderr
        status = json.loads(out.stdout)
        assert status["daemon"]["endpoint"] == f"ipc://{sock}"
        assert status["daemon"]["pid"] == int(show()["MainPID"])

        # status is answered while it still loads; a reload sent while the unit was still
        # activating ran no ExecReload= (twice on CI): reload once it is active
        wait_until("alice's wand.service active", lambda: show()["ActiveState"] == "active", 30)
        since = box.now()
        alice("systemctl", "--user", "reload", "wand.service")
        box.logged(since, "(?m)^no change$", "Reloaded wand.service", unit="~wand.service")

        pid = int(show()["MainPID"])
        alice("systemctl", "--user", "restart", "wand.service")
        assert int(show()["MainPID"]) != pid
        comps = box.status(f"ipc://{sock}")["components"]
        assert all(c["adopted"] for c in comps), comps
    finally:
        alice("systemctl", "--user", "disable", "--now", "wand.socket", "wand.service", check=False)
        box.run("systemctl", "stop", f"user@{uid}.service", check=False)
        box.run("rm", "-f", dropin)
        box.run("systemctl", "daemon-reload")
