"""``wanctl run``: a script in the warm client; ``wanctl warm``: that process; and
``wanctl generate`` run through it."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import msgpack

from wanctl import exits

RUN_OPTIONS = {"--plain": 0, "--endpoint": 1}  # run's own options, before the script: values
PRELOAD = ("wanctl.cli",)  # a warm client wanctl starts imports wanctl too: generate runs there


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    run = sub.add_parser(
        "run",
        parents=[common],
        help="run a Python script with the libraries imported and the modules built",
        usage="wanctl run [--plain] [--endpoint E] (SCRIPT | -m MODULE | -c CODE) [ARGS ...]",
        description="Run a script as `python` would, in a process forked from this user's "
        "warm client (started on first use), where torch, diffusers and transformers are "
        "imported and every resident component's module is built: wand.connect(), "
        "c.module() and c.pipeline() return at once. Everything after the script is its own.",
    )
    run.add_argument("--plain", action="store_true", help="run it the ordinary way instead")
    warm = sub.add_parser(
        "warm",
        parents=[common],
        help="this user's warm client: its state, or stop it",
        description="The warm client starts on the first `wanctl run` (or `wanctl "
        "generate`) and stops after WAND_WARM_IDLE seconds (default 900) without a script.",
    )
    warm.add_argument("action", nargs="?", choices=["status", "stop"], default="status")


def split(argv: list[str]) -> tuple[list[str], list[str]]:
    """``wanctl`` arguments and, for ``run``, the script's own (they are not wanctl's to
    parse: ``wanctl run -m tool --verbose`` gives ``--verbose`` to the tool)."""
    for i, word in enumerate(argv):
        if word == "run" and (i == 0 or argv[i - 1] not in ("--endpoint", "--timeout")):
            j = i + 1
            while j < len(argv) and argv[j] in RUN_OPTIONS:
                j += 1 + RUN_OPTIONS[argv[j]]
            return argv[:j], argv[j:]
        if not word.startswith("-") and (i == 0 or argv[i - 1] not in ("--endpoint", "--timeout")):
            break  # another command
    return argv, []


def run(args: argparse.Namespace) -> int:
    from wand.client import launch

    script = args.script
    if not script or script[0] in ("-m", "-c") and len(script) < 2:
        print("wanctl run: give SCRIPT [ARGS...], -m MODULE or -c CODE", file=sys.stderr)
        return exits.USAGE
    if args.plain:
        os.execv(sys.executable, [sys.executable, *script])
    return launch.main(script, args.endpoint, _timings(args), PRELOAD)


def through_warm(args: argparse.Namespace) -> int | None:
    """``wanctl generate`` in the warm client, when it can be (None: run it here)."""
    from wand.client import launch, prebuilt

    if prebuilt.launched or args.plain or os.environ.get("WAND_WARM") == "0":
        return None  # in the warm client already, or asked not to
    try:
        with launch.connect(args.endpoint, preload=PRELOAD) as sock:
            return launch.run(sock, ["-m", "wanctl", *args.argv], _timings(args))
    except (launch.Unavailable, OSError) as e:  # (before it started: it runs once)
        print(f"wand: {e}; running without the warm client", file=sys.stderr)
        return None


def warm(args: argparse.Namespace) -> int:
    """Show or stop this user's warm client for the endpoint."""
    import json

    from wand.client import launch

    try:
        sock = launch.connect(args.endpoint, start=False)
    except launch.Unavailable as e:
        print(f"wanctl warm: {e}", file=sys.stderr)
        return exits.UNREACHABLE
    with sock:
        sock.sendall(msgpack.packb({"v": launch.PROTOCOL, "op": args.action}))
        reply, _ = launch.receive(sock)
    if args.json:
        print(json.dumps(reply, indent=2))
    elif args.action == "stop":
        print("stopping")
    else:
        up = time.time() - reply["since"]
        modules = ", ".join(reply["modules"]) or "none"
        print(f"warm client pid {reply['pid']}  up {up:.0f}s  scripts {reply['scripts']}")
        print(f"endpoint {reply['endpoint']}; modules built: {modules}")
    return exits.OK


def _timings(args: argparse.Namespace) -> dict[str, float]:
    return {"started": args.started, "main": args.main}
