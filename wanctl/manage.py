"""wanctl commands that change what the daemon holds (load, unload, reload) and read its log."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from wanctl import exits
from wand.client.connection import Client
from wand.common.errors import WandError
from wand.daemon.config import (
    COMPONENT_FILES,
    FILE_FLAGS,
    LORA_EXPERTS,
    TASKS,
    parse_assignments,
)
from wand.daemon.logs import render

FOLLOW_EVERY = 0.5


def add_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    load = sub.add_parser(
        "load", parents=[common], help="load a checkpoint into the running daemon"
    )
    load.add_argument(
        "path", type=Path, nargs="?", help="checkpoint folder (either layout); or the files:"
    )
    for name in COMPONENT_FILES:
        load.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=Path,
            metavar="FILE",
            help=f"{name} file of a single-file checkpoint",
        )
    load.add_argument(
        "--tokenizer",
        type=Path,
        metavar="FOLDER",
        help="its tokenizer folder (default: the one its text encoder embeds)",
    )
    load.add_argument("--name", help="checkpoint name (default: the task)")
    load.add_argument("--task", choices=TASKS)
    load.add_argument("--device", action="append", default=[], metavar="[COMPONENT=]DEVICE")
    load.add_argument(
        "--dtype",
        action="append",
        default=[],
        metavar="[COMPONENT=]DTYPE",
        help="resident dtype (repeatable), e.g. vae=bfloat16 or high_noise_model=float8_e4m3fn",
    )
    load.add_argument("--no-wait", action="store_true", help="return once loading has started")
    unload = sub.add_parser("unload", parents=[common], help="unload a checkpoint")
    unload.add_argument("name", help="checkpoint name (see wanctl status)")
    unload.add_argument("--force", action="store_true", help="revoke the leases of clients")
    reload = sub.add_parser(
        "reload",
        parents=[common],
        help="re-read the configuration and checkpoints, load changes",
        description="Ask the daemon to re-read its configuration file and every checkpoint, "
        "then wait until every added or changed component is resident (the daemon serves the "
        "old ones until then), however long loading takes: once this returns, a new attach "
        "gets the new weights. systemctl reload runs this. --timeout bounds each request "
        "(the reload request itself reads every checkpoint's headers), not the wait.",
    )
    reload.add_argument(
        "--no-wait", action="store_true", help="return once the daemon has read the files"
    )
    lora = sub.add_parser(
        "load-lora", parents=[common], help="hold a LoRA file in the daemon for a checkpoint"
    )
    lora.add_argument("path", type=Path, help="the LoRA (.safetensors, any key style)")
    lora.add_argument("--name", help="how clients ask for it (default: the file's stem)")
    lora.add_argument("--checkpoint", help="the checkpoint it is for (default: the only one)")
    lora.add_argument(
        "--expert",
        choices=LORA_EXPERTS,
        default="high",
        help="where it goes unless a client says otherwise (default high)",
    )
    drop = sub.add_parser("unload-lora", parents=[common], help="stop holding a LoRA")
    drop.add_argument(
        "name", help="the LoRA's name, or its address as wanctl ls shows it (t2v-A14B/lora:style)"
    )
    drop.add_argument("--checkpoint", help="its checkpoint (default: the only one)")
    drop.add_argument("--force", action="store_true", help="revoke the leases of clients")
    logs = sub.add_parser("logs", parents=[common], help="show the daemon's log")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.add_argument("-n", "--lines", type=int, default=50, help="how many lines (default 50)")


def load(args: argparse.Namespace) -> int:
    given = {k: getattr(args, k) for k in ("path", *FILE_FLAGS) if getattr(args, k)}
    if not given:
        print(
            "wanctl load: give a checkpoint folder, or its files (--high-noise-model ...)",
            file=sys.stderr,
        )
        return exits.USAGE
    request = {k: os.path.abspath(v) for k, v in given.items()}  # the daemon resolves links
    request.update({k: v for k, v in (("name", args.name), ("task", args.task)) if v})
    for key in ("device", "dtype"):
        if getattr(args, key):
            request[key] = parse_assignments(getattr(args, key))
    with Client(args.endpoint, timeout=args.timeout, name="wanctl") as c:
        names = c.request("load", **request)["components"]
        try:
            states = c.wait_loaded(names) if not args.no_wait else {n: "queued" for n in names}
        except KeyboardInterrupt:
            name = names[0].split("/", 1)[0]
            print(
                f"wanctl: interrupted; the daemon goes on loading {name} "
                f"(wanctl unload {name} stops it)",
                file=sys.stderr,
            )
            return exits.INTERRUPTED
    if args.json:
        print(json.dumps(states, indent=2))
    else:
        print("\n".join(f"{n}: {s}" for n, s in states.items()))
    return exits.OK if all(s in ("ready", "queued") for s in states.values()) else exits.ERROR


def unload(args: argparse.Namespace) -> int:
    with Client(args.endpoint, timeout=args.timeout, name="wanctl") as c:
        _print_unloaded(c.request("unload", name=args.name, force=args.force), args.json)
    return exits.OK


def load_lora(args: argparse.Namespace) -> int:
    request = {
        "path": os.path.abspath(args.path),
        "name": args.name or args.path.name.removesuffix(".safetensors"),
        "expert": args.expert,
    }
    if args.checkpoint:
        request["checkpoint"] = args.checkpoint
    with Client(args.endpoint, timeout=args.timeout, name="wanctl") as c:
        name = c.request("load_lora", **request)["name"]
        states = c.wait_loaded([name])
    print(json.dumps(states) if args.json else f"{name}: {states[name]}")
    return exits.OK


def unload_lora(args: argparse.Namespace) -> int:
    request = {"name": args.name, "force": args.force}
    if args.checkpoint:
        request["checkpoint"] = args.checkpoint
    with Client(args.endpoint, timeout=args.timeout, name="wanctl") as c:
        _print_unloaded(c.request("unload_lora", **request), args.json)
    return exits.OK


def _print_unloaded(reply: dict[str, Any], as_json: bool) -> None:
    revoked = f" (revoked leases of pids {', '.join(map(str, reply['revoked']))})"
    print(
        json.dumps(reply)
        if as_json
        else f"unloaded {reply['name']}" + revoked * bool(reply["revoked"])
    )


def reload(args: argparse.Namespace) -> int:
    with Client(args.endpoint, timeout=args.timeout, name="wanctl") as c:
        report = c.request("reload")
        if not args.no_wait:
            _settled(c)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        lines = [f"{k}: {', '.join(v)}" for k, v in report.items() if v]
        print("\n".join(lines) or "no change")
    return exits.ERROR if report["errors"] else exits.OK


def logs(args: argparse.Namespace) -> int:
    with Client(args.endpoint, timeout=args.timeout, name="wanctl") as c:
        records = c.request("logs", since=0, limit=max(args.lines, 1))["records"]
        _print(records, args.json)
        while args.follow:
            time.sleep(FOLLOW_EVERY)
            since = records[-1]["seq"] if records else 0
            new = c.request("logs", since=since, limit=2000)["records"]
            _print(new, args.json)
            records = new or records
    return exits.OK


def _print(records: list[dict[str, Any]], as_json: bool) -> None:
    for r in records:
        print(json.dumps(r) if as_json else render(r))
    sys.stdout.flush()


def _settled(c: Client) -> None:
    """Poll until the daemon is done reloading: it says ``reloading`` from the moment it takes
    the request until nothing it queued is still loading (then it sends READY=1 to systemd);
    the new residents take over their components' addresses as each becomes ready."""
    while True:
        state = c.status()["daemon"]["state"]
        if state == "failed":
            raise WandError("the daemon failed while reloading (see wanctl logs)", "failed")
        if state != "reloading":
            return
        time.sleep(0.1)
