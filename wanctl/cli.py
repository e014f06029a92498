"""``wanctl``: ask the wand daemon what it holds, and look after it.

Exit codes: 0 ok, 1 the daemon answered with an error (or the command failed), 2 usage,
3 no daemon reachable.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from wanctl import exits, generate, manage, run, units
from wand.common import endpoint
from wand.common.errors import ConnectError, WandError
from wand.common.process import started_at
from wand.common.spec import LORA_CLASS
from wand.common.version import __version__
from wand.daemon.config import TASKS
from wand.tools.chaos import PHASES, positive, seconds

TINY_FILE_LAYOUTS = ("comfy", "kijai")  # wand.wan.tiny_files' (not imported: it needs torch)
TINY_QUANTS = ("none", "fp8", "fp8_e5m2", "fp8_scaled", "comfy_quant")


def _common_options(defaults: bool) -> argparse.ArgumentParser:
    """Options valid before and after the command; only the top level sets their defaults,
    so that ``wanctl --json status`` and ``wanctl status --json`` both work."""
    d = (lambda v: v) if defaults else (lambda v: argparse.SUPPRESS)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--endpoint",
        type=_endpoint,
        default=d(None),
        help="daemon endpoint: ipc://PATH or tcp://HOST:PORT (default: WAND_ENDPOINT or "
        "runtime dir)",
    )
    common.add_argument(
        "--json", action="store_true", default=d(False), help="print the reply as JSON"
    )
    common.add_argument(
        "--timeout", type=float, default=d(5.0), help="seconds to wait for the daemon (default 5)"
    )
    return common


def _endpoint(value: str) -> str:
    try:
        return endpoint.check(value)
    except WandError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    common = _common_options(defaults=False)
    p = argparse.ArgumentParser(
        prog="wanctl",
        description="Control and inspect the wand daemon.",
        epilog="Exit codes: 0 ok, 1 error reply, 2 usage, 3 no daemon reachable.",
        parents=[_common_options(defaults=True)],
    )
    p.add_argument("--version", action="version", version=f"wanctl {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("status", parents=[common], help="daemon state and each component")
    sub.add_parser("ls", parents=[common], help="list resident components")
    sub.add_parser("ps", parents=[common], help="client processes and the leases they hold")
    sub.add_parser("ping", parents=[common], help="check the daemon answers")
    sub.add_parser("stop", parents=[common], help="stop the daemon")
    verify = sub.add_parser(
        "verify",
        parents=[common],
        help="attach components, check their bytes against the checksums, build the modules",
    )
    verify.add_argument("names", nargs="*", help="components (default: all)")
    bench = sub.add_parser(
        "bench",
        parents=[common],
        help="measure load, attach and from_pretrained on one checkpoint",
        description="Without --checkpoint, writes a t2v-A14B checkpoint with the real tensor "
        "counts at reduced width (both layouts) and measures on it.",
    )
    bench.add_argument("--checkpoint", type=Path, help="measure this checkpoint instead")
    bench.add_argument(
        "--width", type=int, default=512, help="width of the generated checkpoint (default 512)"
    )
    bench.add_argument("--repeat", type=int, default=5, help="fresh client processes per figure")
    bench.add_argument(
        "--generate",
        action="store_true",
        help="also time process start to first denoising step: wanctl generate against "
        "from_pretrained, on a tiny and a real-tensor-count checkpoint",
    )
    chaos = sub.add_parser(
        "chaos",
        parents=[common],
        help="reliability suite: hostile messages, killed clients, many attaches, broken files",
        description="Starts a daemon on a tiny checkpoint (or uses --endpoint's), torments it "
        "and counts; exit status 1 if any check fails.",
    )
    chaos.add_argument("--seed", type=int, default=0)
    chaos.add_argument("--messages", type=positive, default=10_000, help="hostile messages")
    chaos.add_argument("--kills", type=positive, default=1000, help="client processes killed")
    chaos.add_argument("--clients", type=positive, default=64, help="processes attaching at once")
    chaos.add_argument("--seconds", type=seconds, default=60.0, help="how long they attach")
    chaos.add_argument("--only", action="append", choices=PHASES, help="this phase (repeatable)")
    generate.add_parser(sub, common)
    tiny = sub.add_parser(
        "make-tiny",
        parents=[common],
        help="write a tiny synthetic checkpoint in a real Wan2.2 layout",
        description="Write a Wan2.2 checkpoint with the real file names, key names and formats "
        "and random weights, for tests, demos and benchmarks.",
    )
    tiny.add_argument("dest", help="folder to create")
    tiny.add_argument("--task", default="t2v-A14B", choices=TASKS)
    tiny.add_argument(
        "--layout",
        default="original",
        choices=["original", "diffusers", *TINY_FILE_LAYOUTS],
        help="a release folder, or one file per component as ComfyUI's (comfy) or Kijai's "
        "(kijai) in ComfyUI's models/ folders",
    )
    tiny.add_argument(
        "--quant",
        default="none",
        choices=TINY_QUANTS,
        help="fp8 encoding of the single files' weights (default none: 16-bit)",
    )
    tiny.add_argument(
        "--preset",
        default="tiny",
        choices=["tiny", "bench"],
        help="tiny: a few MB; bench: the real A14B tensor counts at reduced width",
    )
    tiny.add_argument("--layers", type=int, help="transformer layers (40 = the real tensor count)")
    tiny.add_argument("--width", type=int, help="transformer width and T5 d_model (multiple of 8)")
    tiny.add_argument("--seed", type=int, default=0)
    tiny_lora = sub.add_parser(
        "make-tiny-lora",
        parents=[common],
        help="write a tiny LoRA for a tiny checkpoint, in one of the key styles found in the wild",
        description="Write a LoRA with random weights shaped for one expert of a checkpoint, "
        "in a key style diffusers reads: diffusers (peft names), comfy (ComfyUI/Kijai), "
        "musubi (musubi-tuner), lightx2v (the distilled few-step releases).",
    )
    tiny_lora.add_argument("dest", type=Path, help="the .safetensors file to create")
    tiny_lora.add_argument(
        "--checkpoint",
        default="t2v-A14B",
        help="a checkpoint folder, or a task for make-tiny's shapes (default t2v-A14B)",
    )
    tiny_lora.add_argument("--style", default="diffusers", help="(default diffusers)")
    tiny_lora.add_argument("--expert", help="the component it is for (default: the first expert)")
    tiny_lora.add_argument("--rank", type=int, default=4)
    tiny_lora.add_argument("--seed", type=int, default=0)
    units.add_parser(sub, common)
    manage.add_parsers(sub, common)
    run.add_parsers(sub, common)
    return p


def main(argv: list[str] | None = None) -> int:
    entered = time.time()
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, script = run.split(argv)
    args = build_parser().parse_args(ours)
    args.argv, args.script, args.started, args.main = argv, script, started_at(), entered
    try:
        if args.command == "generate" and (code := run.through_warm(args)) is not None:
            return code
        return COMMANDS[args.command](args)
    except ConnectError as e:
        print(f"wanctl: {e}", file=sys.stderr)
        return exits.UNREACHABLE
    except WandError as e:
        print(f"wanctl: {e.code}: {e}", file=sys.stderr)
        return exits.ERROR
    except KeyboardInterrupt:
        return exits.interrupted()
    except BrokenPipeError:  # `wanctl status | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 128 + signal.SIGPIPE


def _daemon(op: str, render: Callable[[Any], str]) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        from wand.client.connection import Client

        with Client(args.endpoint, timeout=args.timeout, name="wanctl") as c:
            reply = c.request(op)
        print(json.dumps(reply, indent=2) if args.json else render(reply))
        return exits.OK

    return command


def _render(name: str) -> Callable[[Any], str]:
    def render(reply: Any) -> str:
        from wanctl import render as r

        return getattr(r, name)(reply)

    return render


def _verify(args: argparse.Namespace) -> int:

    from wand.client.connection import Client
    from wand.common.manifest import tensor_bytes
    from wand.wan.modules import resolve_class

    rows = []
    with Client(args.endpoint, timeout=args.timeout, name="wanctl") as c:
        listed = c.list()
        for cls in {comp["class"] for comp in listed} - {LORA_CLASS}:
            resolve_class(cls)  # import the libraries first: their import is not attach time
        for name in args.names or [comp["name"] for comp in listed]:
            start = time.perf_counter()
            att = c.attachment(name)
            attached = time.perf_counter()
            module = att.module() if att.manifest["cls"] != LORA_CLASS else None
            built = time.perf_counter()
            rows.append(
                {
                    "name": att.name,
                    "class": type(module).__name__ if module is not None else "LoRA",
                    "tensors": len(att.manifest["tensors"]),
                    "bytes": tensor_bytes(att.manifest["tensors"]),  # as status counts them
                    "slab_bytes": att.manifest["nbytes"],  # with the alignment between them
                    "attach_ms": (attached - start) * 1e3,
                    "module_ms": (built - attached) * 1e3,
                    "checksum_ok": att.verify(),
                }
            )
            c.detach(name)
    print(json.dumps(rows, indent=2) if args.json else _render("verify")(rows))
    return exits.OK if all(r["checksum_ok"] for r in rows) else exits.ERROR


def _bench(args: argparse.Namespace) -> int:
    from wand.tools import bench

    result = bench.run(
        args.checkpoint, repeat=args.repeat, width=args.width, generate=args.generate
    )
    print(json.dumps(result, indent=2) if args.json else bench.render(result))
    return exits.OK


def _chaos(args: argparse.Namespace) -> int:
    from wand.tools import chaos

    result = chaos.run(chaos.Options.of(args))
    print(json.dumps(result, indent=2) if args.json else chaos.render(result))
    return exits.OK if result["passed"] else exits.ERROR


def _make_tiny(args: argparse.Namespace) -> int:
    if os.path.lexists(args.dest):
        return _refuse("make-tiny", f"{args.dest} exists; give a folder that does not exist yet")
    from wand.wan import write_tiny
    from wand.wan.tiny_files import file_names

    if args.quant != "none" and args.layout not in TINY_FILE_LAYOUTS:
        return _refuse("make-tiny", f"--quant is for --layout {'/'.join(TINY_FILE_LAYOUTS)}")
    try:
        path = write_tiny(
            args.dest,
            args.task,
            args.layout,
            quant=args.quant,
            preset=args.preset,
            layers=args.layers,
            width=args.width,
            seed=args.seed,
        )
    except ValueError as e:
        return _refuse("make-tiny", str(e))
    except OSError as e:
        print(f"wanctl make-tiny: cannot write {args.dest}: {e.strerror}", file=sys.stderr)
        return exits.ERROR
    if args.layout not in TINY_FILE_LAYOUTS:
        print(
            json.dumps({"path": str(path)})
            if args.json
            else f"wrote {args.task} ({args.layout} layout) to {path}"
        )
        return exits.OK
    files = {k: str(path / v) for k, v in file_names(args.task, args.layout, args.quant).items()}
    if args.json:
        print(json.dumps({"path": str(path), "files": files}))
    else:
        lines = [f"wrote {args.task} ({args.layout} files, {args.quant}) to {path}:"]
        lines += ["[[checkpoint]]", *(f'{k} = "{v}"' for k, v in files.items())]
        print("\n".join(lines))
    return exits.OK


def _make_tiny_lora(args: argparse.Namespace) -> int:
    from wand.wan.tiny_lora import write_tiny_lora

    if args.dest.exists():
        return _refuse("make-tiny-lora", f"{args.dest} exists")
    try:
        path = write_tiny_lora(
            args.dest,
            args.checkpoint,
            args.style,
            expert=args.expert,
            rank=args.rank,
            seed=args.seed,
        )
    except ValueError as e:  # an unknown style, an expert the checkpoint does not have
        return _refuse("make-tiny-lora", str(e))
    print(
        json.dumps({"path": str(path)})
        if args.json
        else f"wrote a {args.style} LoRA for {args.checkpoint} to {path}"
    )
    return exits.OK


def _refuse(command: str, why: str) -> int:
    print(f"wanctl {command}: {why}", file=sys.stderr)
    return exits.USAGE


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "status": _daemon("status", _render("status")),
    "ls": _daemon("list", lambda r: _render("components")(r["components"])),
    "ps": _daemon("ps", lambda r: _render("clients")(r["clients"])),
    "ping": _daemon("ping", lambda r: "pong"),
    "stop": _daemon("stop", lambda r: "stopping"),
    "verify": _verify,
    "bench": _bench,
    "chaos": _chaos,
    "generate": generate.run,
    "make-tiny": _make_tiny,
    "make-tiny-lora": _make_tiny_lora,
    "install-units": units.run,
    "load": manage.load,
    "unload": manage.unload,
    "reload": manage.reload,
    "load-lora": manage.load_lora,
    "unload-lora": manage.unload_lora,
    "logs": manage.logs,
    "run": run.run,
    "warm": run.warm,
}
