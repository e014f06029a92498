"""Endpoint resolution shared by the daemon, wanctl and the client library."""

from __future__ import annotations

import pytest
from conftest import run_wanctl

import wand
from wand.common import endpoint


def test_explicit_environment_wins(monkeypatch):
    monkeypatch.setenv("WAND_ENDPOINT", "ipc:///tmp/x.sock")
    assert endpoint.default_endpoint() == "ipc:///tmp/x.sock"
    assert "from WAND_ENDPOINT" in endpoint.describe("ipc:///tmp/x.sock")


def test_root_uses_the_system_socket(monkeypatch):
    monkeypatch.delenv("WAND_ENDPOINT", raising=False)
    monkeypatch.setattr(endpoint.os, "geteuid", lambda: 0)
    assert endpoint.default_endpoint() == "ipc:///run/wand/wand.sock"


def test_users_use_their_runtime_dir_and_clients_fall_back_to_the_system_daemon(
    monkeypatch, tmp_path
):
    monkeypatch.delenv("WAND_ENDPOINT", raising=False)
    monkeypatch.setattr(endpoint.os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    system = tmp_path / "system.sock"
    monkeypatch.setattr(endpoint, "SYSTEM_SOCKET", str(system))
    mine = f"ipc://{tmp_path}/run/wand/wand.sock"
    assert endpoint.default_endpoint() == mine
    assert endpoint.default_endpoint(client=True) == mine  # no system daemon either
    system.touch()
    assert endpoint.default_endpoint(client=True) == f"ipc://{system}"
    assert endpoint.default_endpoint() == mine  # a user's daemon never takes the system path
    (tmp_path / "run" / "wand").mkdir(parents=True)
    (tmp_path / "run" / "wand" / "wand.sock").touch()
    assert endpoint.default_endpoint(client=True) == mine  # the user's own daemon first


def test_clients_refuse_an_endpoint_wand_cannot_use():
    """They got as far as ZeroMQ, which raised ZMQError (a traceback from wanctl)."""
    for bad in ("/tmp/wand.sock", "tcp://localhost", "ipc://"):
        with pytest.raises(wand.ConnectError, match="ipc://PATH"):
            wand.connect(bad)
    out = run_wanctl("--endpoint", "/tmp/wand.sock", "status")
    assert out.returncode == 2 and "'/tmp/wand.sock' is not an endpoint" in out.stderr, out
    out = run_wanctl("status", env={"WAND_ENDPOINT": "localhost:5555"})
    assert out.returncode == 3 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.splitlines() == [
        "wanctl: 'localhost:5555' is not an endpoint wand can use: ipc://PATH (a Unix socket) "
        "or tcp://HOST:PORT"
    ]
