"""``wand``: the daemon. Loads a checkpoint into shared slabs and serves it until stopped."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

import torch

from wand import __version__, slab
from wand.endpoint import resolve
from wand.errors import WandError
from wand.server import Server
from wand.store import Store

log = logging.getLogger("wand")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="wand", description="Keep a Wan2.2 checkpoint resident and serve it to clients."
    )
    p.add_argument("--checkpoint", required=True, help="Wan2.2 checkpoint folder (either layout)")
    p.add_argument("--name", help="checkpoint name in component addresses (default: the task)")
    p.add_argument("--task", choices=["t2v-A14B", "i2v-A14B", "ti2v-5B"], help="override detection")
    p.add_argument("--device", default="cpu", help="where slabs live (default: cpu)")
    p.add_argument(
        "--dtype",
        action="append",
        default=[],
        metavar="[COMPONENT=]DTYPE",
        help="resident dtype, for all components or one (repeatable), e.g. float32 or vae=bfloat16",
    )
    p.add_argument("--endpoint", help="ZeroMQ endpoint (default: WAND_ENDPOINT or runtime dir)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--version", action="version", version=f"wand {__version__}")
    return p.parse_args(argv)


def parse_dtypes(items: list[str]) -> dict[str, torch.dtype]:
    """``["bfloat16", "vae=float32"]`` → ``{"*": bfloat16, "vae": float32}``."""
    out: dict[str, torch.dtype] = {}
    for item in items:
        target, _, name = item.rpartition("=")
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise WandError(f"--dtype {item}: {name!r} is not a floating-point dtype")
        out[target or "*"] = dtype
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    try:
        return run(args)
    except WandError as e:
        log.error("%s", e)
        return 1


def run(args: argparse.Namespace) -> int:
    from wand.wan import read_checkpoint  # heavy imports only once arguments are fine

    if args.device != "cpu":
        raise WandError(f"--device {args.device}: only 'cpu' is supported in this version")
    for path in slab.remove_stale():
        log.info("removed stale slab %s", path)
    spec = read_checkpoint(args.checkpoint, task=args.task, dtypes=parse_dtypes(args.dtype))
    store = Store()
    comps = store.add(args.name or spec.task, spec)
    server = Server(store, resolve(args.endpoint))
    server.bind()
    failure: list[BaseException] = []
    threading.Thread(target=_load, args=(store, comps, failure), daemon=True).start()
    _on_signals(server)
    try:
        server.serve(until=lambda: bool(failure))
    finally:
        server.close()
        store.free_all()
    if failure:
        raise WandError(f"load failed: {failure[0]}")
    log.info("stopped")
    return 0


def _load(store: Store, comps: list, failure: list[BaseException]) -> None:
    log.info("loading %d components", len(comps))
    try:
        for comp in comps:
            store.load(comp)
    except Exception as e:  # reported by the serving thread, which then exits
        failure.append(e)
        return
    log.info("ready: %s", ", ".join(c.addr for c in comps))


def _on_signals(server: Server) -> None:
    def stop(signum: int, _frame: object) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        server.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


if __name__ == "__main__":
    sys.exit(main())
