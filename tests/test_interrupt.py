"""Ctrl-C in wanctl, whenever it comes: one line and exit status 130, never a traceback; and
a load it interrupts says that the daemon goes on loading."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import run_wanctl

HOOK = Path(__file__).parent / "interrupt"  # its sitecustomize sends SIGINT on cue


def interrupted(when: str, *args: str):
    path = os.pathsep.join(filter(None, [str(HOOK), os.environ.get("PYTHONPATH")]))
    return run_wanctl(*args, env={"PYTHONPATH": path, "WAND_TEST_INTERRUPT": when})


@pytest.mark.parametrize(
    "when, command",
    [
        ("wanctl.cli", ["status"]),  # the first of wanctl's own modules
        ("wand.tools.chaos", ["ls"]),  # imported with the command table
        ("wand.client.connection", ["ps"]),
        ("torch", ["verify"]),  # imported by the command itself
    ],
)
def test_ctrl_c_while_importing_is_one_line(daemon, when, command):
    out = interrupted(when, "--endpoint", daemon.endpoint, *command)
    assert out.returncode == 130, out
    assert out.stderr.splitlines() == ["wanctl: interrupted"], out.stderr


def test_ctrl_c_while_waiting_for_a_load_says_it_goes_on(daemon, tiny):
    when = "wand.client.connection:Client.wait_loaded"
    out = interrupted(
        when, "--endpoint", daemon.endpoint, "load", str(tiny("ti2v-5B")), "--name", "bg"
    )
    assert out.returncode == 130, out
    assert out.stderr.splitlines() == [
        "wanctl: interrupted; the daemon goes on loading bg (wanctl unload bg stops it)"
    ], out.stderr
    with daemon.connect() as c:
        assert set(c.wait_loaded(["bg/model", "bg/vae", "bg/text_encoder"]).values()) == {"ready"}
    assert daemon.wanctl("unload", "bg").returncode == 0
