"""Who could have put the socket there: the daemon's and the clients' checks of the socket
folder and of every folder above it (``wand/common/sockdir.py``)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import ROOT, as_nobody, run_wanctl

import wand
from wand.client.connection import connect

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, setuid)")


def _start(endpoint: str, tiny, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "wand.daemon", "--checkpoint", str(tiny()), "--endpoint", endpoint],
        capture_output=True,
        text=True,
        timeout=60,  # a daemon that accepts the folder serves until killed
        cwd=ROOT,
        **kw,
    )


def _folder(path: Path, mode: int, owner: int | None = None) -> Path:
    path.mkdir()
    if owner is not None:
        os.chown(path, owner, owner)
    os.chmod(path, mode)
    return path


@root_only
def test_the_daemon_refuses_a_socket_folder_whose_parent_another_user_owns(tiny, tmp_path):
    theirs = _folder(tmp_path / "theirs", 0o755, owner=65534)
    run = _folder(theirs / "run", 0o755)
    out = _start(f"ipc://{run}/wand.sock", tiny)
    assert out.returncode == 78, out.stderr
    assert f"{theirs} belongs to uid 65534" in out.stderr, out.stderr
    assert not (run / "wand.sock").exists()


def test_the_daemon_refuses_a_socket_folder_below_one_anyone_may_write(tiny, tmp_path):
    shared = _folder(tmp_path / "shared", 0o777)
    out = _start(f"ipc://{shared}/run/wand/wand.sock", tiny)  # the daemon would create run/wand
    assert out.returncode == 78, out.stderr
    assert f"{shared} is writable by others (mode 0777)" in out.stderr, out.stderr
    assert not (shared / "run").exists()  # nothing created below it


def test_the_daemon_listens_below_a_sticky_folder(tiny, tmp_path, start_daemon):
    sticky = _folder(tmp_path / "sticky", 0o1777)
    endpoint = f"ipc://{sticky}/wand/wand.sock"
    d = start_daemon(tiny(), "--endpoint", endpoint)
    d.endpoint = endpoint
    d.wait_ready()
    assert os.stat(sticky / "wand").st_mode & 0o777 == 0o755


@pytest.fixture
def nobodys_daemon():
    """A daemon of uid 65534 serving nothing from a folder of its own under /tmp, as another
    user may leave at ``/tmp/wand-$UID`` (the default path without XDG_RUNTIME_DIR). Forked,
    not executed: uid 65534 may not be allowed to run this interpreter."""
    folder = Path(tempfile.mkdtemp(prefix="wand-theirs-"))
    os.chown(folder, 65534, 65534)
    endpoint = f"ipc://{folder}/wand/wand.sock"
    pid = os.fork()
    if pid == 0:
        try:
            from wand.daemon.main import main  # before setuid: uid 65534 may not read it

            os.setgid(65534)
            os.setuid(65534)
            quiet = os.open(os.devnull, os.O_WRONLY)
            os.dup2(quiet, 1)
            os.dup2(quiet, 2)
            os._exit(main(["--endpoint", endpoint]))
        finally:
            os._exit(1)
    try:
        deadline = time.monotonic() + 60
        while not (folder / "wand" / "wand.sock").exists():
            assert os.waitpid(pid, os.WNOHANG) == (0, 0), "the daemon exited"
            assert time.monotonic() < deadline, "the daemon did not start"
            time.sleep(0.1)
        yield endpoint
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        shutil.rmtree(folder, ignore_errors=True)


@root_only
def test_clients_refuse_a_socket_folder_another_user_made(nobodys_daemon):
    out = run_wanctl("--endpoint", nobodys_daemon, "status")
    assert out.returncode == 3, out
    assert "belongs to uid 65534" in out.stderr and "WAND_TRUST" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    with pytest.raises(wand.ConnectError, match="belongs to uid 65534"):
        wand.connect(nobodys_daemon)


@root_only
def test_clients_trust_the_users_wand_trust_names(nobodys_daemon, monkeypatch):
    monkeypatch.setenv("WAND_TRUST", "nobody")
    out = run_wanctl("--endpoint", nobodys_daemon, "status")
    assert out.returncode == 0, out.stderr
    monkeypatch.setenv("WAND_TRUST", "65534")
    with wand.connect(nobodys_daemon) as c:
        assert c.status()["daemon"]["uid"] == 65534
    monkeypatch.setenv("WAND_TRUST", "no-such-user-here")
    out = run_wanctl("--endpoint", nobodys_daemon, "status")
    assert out.returncode == 3 and "no-such-user-here" in out.stderr, out.stderr


@root_only
def test_clients_refuse_a_socket_below_a_folder_others_may_write(daemon, tmp_path):
    """The socket and its folder are root's, but a folder above may be written by anyone."""
    shared = _folder(tmp_path / "shared", 0o777)
    link = shared / "wand"
    link.symlink_to(daemon.dir)
    out = run_wanctl("--endpoint", f"ipc://{link}/wand.sock", "ping")
    assert out.returncode == 3, out
    assert f"{shared} is writable by others (mode 0777)" in out.stderr, out.stderr
    assert daemon.wanctl("ping").returncode == 0


@root_only
def test_a_user_refused_by_the_sockets_mode_is_told_something_true(daemon):
    """The tests' daemon runs as root: its sockets are group root, which nobody should join."""
    os.chmod(daemon.dir, 0o755)

    def attempt() -> bytes:
        try:
            connect(daemon.endpoint).close()
            return b"connected"
        except wand.ConnectError as e:
            return str(e).encode()

    try:
        said = as_nobody(attempt).decode()
    finally:
        os.chmod(daemon.dir, 0o700)
    assert said.startswith(f"permission denied on {daemon.dir}/wand.sock: "), said
    assert "usermod" not in said and "only root may open it" in said, said
