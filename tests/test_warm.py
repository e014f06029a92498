"""The warm client: ``wanctl run`` against a real daemon and a real warm process."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, Daemon

COMPONENTS = ("text_encoder", "vae", "high_noise_model", "low_noise_model")


class Warm:
    """``wanctl run`` with its own runtime folder, so its warm process is this test's."""

    def __init__(self, endpoint: str, runtime: Path) -> None:
        self.endpoint, self.runtime = endpoint, runtime
        runtime.mkdir(mode=0o700, exist_ok=True)

    def env(self, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "XDG_RUNTIME_DIR": str(self.runtime),
            "WAND_ENDPOINT": self.endpoint,
            **extra,
        }

    def cmd(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "wanctl", "run", *args]

    def run(self, *args: str, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("timeout", 120)
        env = self.env(**kw.pop("env", {}))
        return subprocess.run(self.cmd(*args), env=env, capture_output=True, text=True, **kw)

    def popen(self, *args: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.cmd(*args), env=self.env(), text=True, **kw)

    def state(self) -> dict:
        out = subprocess.run(
            [sys.executable, "-m", "wanctl", "warm", "--json"],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
        return json.loads(out.stdout) if out.returncode == 0 else {}

    def stop(self) -> None:
        subprocess.run(
            [sys.executable, "-m", "wanctl", "warm", "stop"], env=self.env(), capture_output=True
        )


def script(tmp_path: Path, body: str, name: str = "script.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


@pytest.fixture
def warm(daemon, tmp_path):
    w = Warm(daemon.endpoint, tmp_path / "run")
    yield w
    w.stop()


def test_the_script_gets_argv_cwd_environment_umask_stdio_and_gives_its_status(warm, tmp_path):
    s = script(
        tmp_path,
        """
        import json, os, sys
        mask = os.umask(0)
        print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "foo": os.environ.get("FOO"),
                          "umask": mask, "stdin": sys.stdin.read(), "path0": sys.path[0]}))
        print("to stderr", file=sys.stderr)
        sys.exit(7)
        """,
    )
    work = tmp_path / "work"
    work.mkdir()
    r = warm.run(
        str(s),
        "a",
        "--flag",
        "-m",
        input="hello\n",
        cwd=work,
        env={"FOO": "bar"},
        preexec_fn=lambda: os.umask(0o027),
    )
    assert r.returncode == 7, r.stderr
    got = json.loads(r.stdout)
    assert got == {
        "argv": [str(s), "a", "--flag", "-m"],
        "cwd": str(work),
        "foo": "bar",
        "umask": 0o027,
        "stdin": "hello\n",
        "path0": str(tmp_path),
    }
    assert "to stderr" in r.stderr
    assert "without the warm client" not in r.stderr
    again = warm.run(str(s), input="", cwd=tmp_path, preexec_fn=lambda: os.umask(0o077))
    assert json.loads(again.stdout)["umask"] == 0o077  # each caller's, not the first one's


def test_modules_and_pipeline_are_ready_in_the_script(warm, tmp_path):
    """The modules the warm process built are the script's: taken, not built again, bound to
    the same memory a fresh attach maps, and working."""
    s = script(
        tmp_path,
        f"""
        import json, os, torch, wand
        from wand.client import prebuilt
        with wand.connect() as c:
            before = len(prebuilt.tokens())
            mods = {{n: c.module(n) for n in {COMPONENTS!r}}}
            taken = before - len(prebuilt.tokens())
            att = c.attachment("vae")
            same = all(
                p.data_ptr() == att.tensors[k].data_ptr()
                for k, p in mods["vae"].state_dict().items()
            )
            pipe = c.pipeline()
            held = {{p["pid"]: [l["component"] for l in p["leases"]] for p in c.ps()}}
        print(json.dumps({{"taken": taken, "same": same, "pid": os.getpid(),
                           "leases": held.get(os.getpid(), []),
                           "pipe": type(pipe.pipe).__name__}}))
        """,
    )
    r = warm.run(str(s))
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["taken"] == 4 and got["same"] and got["pipe"] == "WanPipeline"
    assert set(got["leases"]) >= {f"t2v-A14B/{n}" for n in COMPONENTS}  # the script's own
    assert warm.state()["modules"] == sorted(f"t2v-A14B/{n}" for n in COMPONENTS)


def test_module_and_code_forms(warm, tmp_path):
    (tmp_path / "mytool.py").write_text("import sys\nprint('tool', sys.argv[1:])\n")
    r = warm.run("-m", "mytool", "--verbose", "x", cwd=tmp_path)
    assert (r.returncode, r.stdout) == (0, "tool ['--verbose', 'x']\n"), r.stderr
    r = warm.run("-c", "import sys; print(sys.argv)", "y")
    assert (r.returncode, r.stdout) == (0, "['-c', 'y']\n"), r.stderr


def test_an_error_shows_the_script_s_traceback_only(warm, tmp_path):
    s = script(tmp_path, "def f():\n    raise ValueError('boom')\nf()\n")
    r = warm.run(str(s))
    plain = subprocess.run([sys.executable, str(s)], capture_output=True, text=True)
    assert r.returncode == plain.returncode == 1
    assert r.stderr == plain.stderr


def test_ctrl_c_reaches_the_script(warm, tmp_path):
    s = script(
        tmp_path,
        """
        import sys, time
        try:
            print("ready", flush=True)
            time.sleep(60)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(5)
        """,
    )
    proc = warm.popen(str(s), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert (proc.returncode, out) == (5, "interrupted\n"), err
    # uncaught, it ends the command the way it ends python: killed by SIGINT
    s = script(tmp_path, "import time\nprint('ready', flush=True)\ntime.sleep(60)\n", "b.py")
    proc = warm.popen(str(s), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGINT and "KeyboardInterrupt" in err


def test_the_script_writes_to_the_caller_s_terminal(warm, tmp_path):
    s = script(
        tmp_path,
        "import os, sys\nprint([os.isatty(f) for f in (0, 1, 2)], sys.stdout.line_buffering)\n",
    )
    leader, follower = pty.openpty()
    try:
        proc = warm.popen(str(s), stdin=follower, stdout=follower, stderr=follower)
        assert proc.wait(60) == 0
        out = os.read(leader, 4096).decode()
    finally:
        os.close(leader)
        os.close(follower)
    assert "[True, True, True] True" in out


def test_torch_threads_work_in_the_script(warm, tmp_path):
    fresh = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    s = script(
        tmp_path,
        """
        import torch
        a = torch.randn(1000, 1000)
        for _ in range(3):
            (a @ a).sum().item()
            torch.randn(4_000_000).mul(2).sum().item()
        print(torch.get_num_threads())
        """,
    )
    r = warm.run(str(s), timeout=60)  # an OpenMP pool inherited from the warm process hangs
    assert (r.returncode, r.stdout.strip()) == (0, fresh), r.stderr


def test_a_crashing_script_leaves_the_warm_process_serving(warm, tmp_path):
    r = warm.run("-c", "import ctypes; ctypes.string_at(0)")
    assert r.returncode == -signal.SIGSEGV
    pid = warm.state()["pid"]
    r = warm.run("-c", "import os; print(os.getppid())")
    assert (r.returncode, r.stdout.strip()) == (0, str(pid)), r.stderr


def test_a_warm_process_killed_mid_run_leaves_the_result_intact(warm, tmp_path):
    go = tmp_path / "go"
    s = script(
        tmp_path,
        f"""
        import os, sys, time
        print("started", flush=True)
        while not os.path.exists({str(go)!r}):
            time.sleep(0.02)
        print("finished", flush=True)
        sys.exit(4)
        """,
    )
    proc = warm.popen(str(s), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline() == "started\n"
    dead = warm.state()["pid"]
    os.kill(dead, signal.SIGKILL)
    time.sleep(0.2)
    go.touch()
    out, err = proc.communicate(timeout=30)
    assert (proc.returncode, out) == (4, "finished\n"), err
    r = warm.run("-c", "import os; print(os.getppid())")  # the dead one is replaced
    assert r.returncode == 0 and r.stdout.strip() not in ("", str(dead)), r.stderr
    assert "without the warm client" not in r.stderr


def test_without_a_usable_runtime_folder_it_runs_plainly_and_says_so(warm, tmp_path):
    (warm.runtime / "wand").mkdir(mode=0o755)  # not private: no warm process in it
    r = warm.run("-c", "import sys; print('plain'); sys.exit(3)")
    assert (r.returncode, r.stdout) == (3, "plain\n")
    assert r.stderr.count("running without the warm client") == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_two_users_never_share_a_warm_process(daemon):
    """Another user's launcher refuses this user's runtime folder, and the warm process
    refuses a connection from another uid whatever its socket's mode."""
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="wand-warm-"))
    base.chmod(0o711)  # another user may pass through, as through /run/user
    warm = Warm(daemon.endpoint, base / "run")
    try:
        _refused_to_others(warm)
    finally:
        warm.stop()
        shutil.rmtree(base)


def _refused_to_others(warm: Warm) -> None:
    assert warm.run("-c", "pass").returncode == 0
    warm.runtime.chmod(0o711)
    sock = next((warm.runtime / "wand").glob("warm-*.sock"))
    folder_check = f"""
import os
os.environ["XDG_RUNTIME_DIR"] = {str(warm.runtime)!r}
from wand.client import launch
try:
    launch.connect({warm.endpoint!r}, start=False)
    print("connected")
except launch.Unavailable as e:
    print(e)
"""
    assert "not this user's private folder" in _as_nobody(folder_check)
    sock.chmod(0o666)
    (warm.runtime / "wand").chmod(0o711)
    peer_check = f"""
import socket, msgpack
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect({str(sock)!r})
s.sendall(msgpack.packb({{"v": 1, "op": "status"}}))
print(msgpack.unpackb(s.recv(65536)))
"""
    try:
        assert "serves uid 0 only" in _as_nobody(peer_check)
    finally:
        (warm.runtime / "wand").chmod(0o700)


def _as_nobody(code: str) -> str:
    """What ``code`` prints, run in a forked child as uid 65534 (no exec: another user may
    not be able to run this Python)."""
    from conftest import as_nobody

    def job() -> bytes:
        import contextlib
        import io

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(code, {})
        return out.getvalue().encode()

    return as_nobody(job).decode()


def test_a_warm_process_whose_daemon_is_gone_for_good_stops(tiny, tmp_path):
    """Its socket folder removed (a restart keeps it), the daemon is not coming back: the
    warm process stops rather than hold the libraries until its idle timeout."""
    d = Daemon(tiny()).wait_ready()
    w = Warm(d.endpoint, tmp_path / "run")
    try:
        assert w.run("-c", "pass").returncode == 0
        pid = w.state()["pid"]
        d.stop()
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not Path(f"/proc/{pid}").exists() or _zombie(pid)
    finally:
        w.stop()


def _zombie(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_a_reload_between_two_runs_gives_the_second_run_the_new_bytes(tiny, tmp_path):
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny("t2v-A14B", "original"), folder)
    d = Daemon(folder).wait_ready()
    w = Warm(d.endpoint, tmp_path / "run")
    s = script(
        tmp_path,
        """
        import wand
        from wand.client import prebuilt
        with wand.connect() as c:
            ahead = len(prebuilt.tokens())
            vae = c.module("vae")
        print(float(vae.decoder.conv_in.weight.double().sum()), ahead - len(prebuilt.tokens()))
        """,
    )
    try:
        before = w.run(str(s))
        assert before.returncode == 0, before.stderr
        vae = folder / "Wan2.1_VAE.pth"
        state = torch.load(vae, weights_only=True)
        state["decoder.conv1.weight"] = state["decoder.conv1.weight"] + 1
        torch.save(state, vae)
        expected = float(state["decoder.conv1.weight"].double().sum())
        assert d.wanctl("reload").returncode == 0
        after = w.run(str(s))
        assert after.returncode == 0, after.stderr
        (old, taken_before), (new, taken_after) = (r.stdout.split() for r in (before, after))
        assert float(old) != float(new) and float(new) == pytest.approx(expected)
        assert taken_before == taken_after == "1"  # the new VAE was built ahead too
    finally:
        w.stop()
        d.stop()


def test_the_launcher_imports_no_model_library():
    """``wanctl run`` starts in a blink: its side loads neither torch nor the libraries."""
    code = "import sys, wanctl.cli, wand.client.launch; print(sorted(sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    assert "'torch'" not in out and "'diffusers'" not in out


def test_locks_are_new_in_a_forked_child():
    """A lock another thread held at the fork would be held forever in the child: the client,
    slab and driver layers make new ones there."""
    code = """
import os, threading
from wand.client import connection
from wand.slabs import cuda, vmm
held, release = threading.Event(), threading.Event()
def hold():
    with connection._mapping, vmm._lock, cuda._lock:
        held.set()
        release.wait()
threading.Thread(target=hold, daemon=True).start()
held.wait()
pid = os.fork()
if pid == 0:
    locks = (connection._mapping, vmm._lock, cuda._lock)
    os._exit(0 if all(lock.acquire(timeout=2) for lock in locks) else 1)
_, status = os.waitpid(pid, 0)
release.set()
print(os.waitstatus_to_exitcode(status))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "0", out.stderr


def test_a_killed_command_takes_its_script_along(warm, tmp_path):
    """SIGKILL cannot be forwarded: the warm client sees the command's end close and ends
    the script, as it would have died with a command of its own."""
    s = script(tmp_path, "import os, time\nprint(os.getpid(), flush=True)\ntime.sleep(60)\n")
    proc = warm.popen(str(s), stdout=subprocess.PIPE)
    pid = int(proc.stdout.readline())
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
    assert warm.run("-c", "print('next')").stdout == "next\n"  # and it serves the next one


def test_a_skeleton_made_ahead_is_bound_in_the_script(daemon):
    """What the warm client holds for a GPU component (it must not map one: CUDA cannot be
    initialised before a fork): its skeleton, which module() binds to the script's own
    mapping. Shown here with a CPU slab."""
    from wand.client import prebuilt
    from wand.wan.modules import skeleton

    with daemon.connect() as c:
        att = c.attachment("vae")
        skel = skeleton(att.manifest["cls"], att.manifest["config"])
        prebuilt.put_skeleton(att.slab, skel)
        module = c.module("vae")
        assert module is skel and prebuilt.take_skeleton(att.slab) is None
        bound = dict(module.named_parameters())
        assert all(
            bound[k].data_ptr() == t.data_ptr() for k, t in att.tensors.items() if k in bound
        )
        c.detach("vae")
        c.detach("vae")
