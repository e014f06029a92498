"""``wand``: the daemon. Loads the configured checkpoints into shared slabs and serves them.

Exit status: 0 after a requested stop, 78 (EX_CONFIG) when the configuration or a
checkpoint in it cannot be used (systemd units say ``RestartPreventExitStatus=78``, so a
broken configuration does not restart in a loop), 1 for anything else.
"""

from __future__ import annotations

import argparse
import errno
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from wand import __version__, config, logs, placement, slab, systemd, traps
from wand.endpoint import resolve
from wand.errors import CheckpointError, DeviceError, WandError
from wand.server import Server
from wand.store import Checkpoint, Resident, Store

log = logging.getLogger("wand")
EX_CONFIG = 78
STATUS_EVERY = 1.0  # seconds between STATUS= updates while loading
EXTEND_BY = 30.0  # seconds of start/reload timeout asked for at each extension


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="wand",
        description="Keep Wan2.2 checkpoints resident and serve them to clients.",
        epilog=f"Configuration: --config, else {config.SYSTEM_CONFIG} (root) or "
        "$XDG_CONFIG_HOME/wand/wand.toml. Flags override the file. Exit status 78: "
        "configuration error.",
    )
    p.add_argument("--config", type=Path, help="TOML configuration file")
    p.add_argument("--check-config", action="store_true", help="validate, explain and exit")
    p.add_argument("--checkpoint", help="serve this checkpoint folder instead of the file's")
    p.add_argument("--name", help="checkpoint name in component addresses (default: the task)")
    p.add_argument("--task", choices=config.TASKS, help="override task detection")
    p.add_argument(
        "--device",
        action="append",
        default=[],
        metavar="[COMPONENT=]DEVICE",
        help="placement, for all components or one (repeatable): cpu, cuda or cuda:N",
    )
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ring = logs.setup(args.log_level)
    notifier = systemd.Notifier()
    try:
        cfg = _configuration(args)
        if args.check_config:
            print(explain(cfg))
            return 0
        return Daemon(cfg, args, notifier, ring).run()
    except (config.ConfigError, CheckpointError) as e:
        log.error("%s", e)
        notifier.failed(f"configuration error: {e}", errno.EINVAL)
        return EX_CONFIG
    except WandError as e:
        log.error("%s", e)
        notifier.failed(str(e), errno.EIO)
        return 1


def _configuration(args: argparse.Namespace) -> config.Config:
    return config.with_overrides(
        config.load(args.config),
        checkpoint=args.checkpoint,
        name=args.name,
        task=args.task,
        device=config.parse_assignments(args.device),
        dtype=config.parse_assignments(args.dtype),
        endpoint=args.endpoint,
    )


def read(entry: config.CheckpointConfig) -> Checkpoint:
    """The checkpoint an entry names, read and checked (raises CheckpointError)."""
    from wand.wan import read_checkpoint  # heavy imports only once arguments are fine

    check_devices(entry.device)
    spec = read_checkpoint(entry.path, task=entry.task, dtypes=entry.dtypes())
    return Checkpoint(entry.name or spec.task, spec, entry, "config")


def check_devices(devices: dict[str, str]) -> None:
    """Every placement names a GPU this process sees, on a platform that can share it."""
    try:
        gpus = [d for d in map(placement.resolve, devices.values()) if d.uuid is not None]
    except DeviceError as e:
        raise config.ConfigError(str(e)) from None
    if not gpus:
        return
    found = traps.check([d.uuid for d in gpus])
    if "error" in found:
        raise config.ConfigError(found["error"])
    if "warning" in found:
        log.warning("%s", found["warning"])


def explain(cfg: config.Config) -> str:
    """What --check-config prints: where things come from and what would be loaded."""
    lines = [
        f"configuration: {cfg.source or 'none (flags only)'}",
        f"endpoint: {resolve(cfg.endpoint)}",
    ]
    if not cfg.checkpoints:
        lines.append("no checkpoints: the daemon would start empty (add some with wanctl load)")
    for entry in cfg.checkpoints:
        ckpt = read(entry)
        spec = ckpt.spec
        lines.append(f"checkpoint {ckpt.name}: {spec.task}, {spec.layout} layout, {spec.path}")
        for comp in spec.components.values():
            device = entry.device_for(comp.name)
            dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in comp.tensors})
            lines.append(
                f"  {comp.name}: {comp.cls.split(':')[1]}, {len(comp.tensors)} tensors, "
                f"{comp.nbytes / 1e9:.2f} GB as {'+'.join(dtypes)} on {device}"
            )
    lines.append("OK")
    return "\n".join(lines)


class Daemon:
    """Lifecycle around the server: loading, readiness, reload, systemd notifications."""

    def __init__(
        self,
        cfg: config.Config,
        args: argparse.Namespace,
        notifier: systemd.Notifier,
        ring: logs.RingBuffer,
    ) -> None:
        self.config = cfg
        self.args = args
        self.notify = notifier
        self.ring = ring
        self.store = Store()
        self.phase = "starting"  # starting → ready ⇄ reloading
        self.fatal: Exception | None = None
        self._reload_asked = False
        self._last_status = self._last_extend = 0.0

    def run(self) -> int:
        for path in slab.remove_stale():
            log.info("removed stale slab %s", path)
        checkpoints = [read(entry) for entry in self.config.checkpoints]  # errors: before bind
        fd = systemd.listen_fd()
        endpoint = systemd.socket_endpoint(fd) if fd is not None else resolve(self.config.endpoint)
        self.server = Server(self.store, endpoint, self, self.ring)
        self.server.bind(fd)
        for ckpt in checkpoints:
            self.store.add(ckpt)
        self.notify.status(self._progress())
        self.notify.extend_timeout(EXTEND_BY)
        self._last_status = self._last_extend = time.monotonic()
        threading.Thread(target=self._loader, name="loader", daemon=True).start()
        self._signals()
        try:
            self.server.serve(tick=self._tick)
        finally:
            self.notify.stopping()
            self.server.close()
            self.store.free_all()
        if self.fatal is not None:
            raise self.fatal
        log.info("stopped")
        return 0

    # --- Control (what the server delegates) ----------------------------------------------

    def state(self) -> str:
        return "failed" if self.fatal else self.phase

    def load(self, args: dict[str, Any]) -> list[str]:
        entry = config.checkpoint(dict(args), "load")
        ckpt = read(entry)
        ckpt.origin = "runtime"
        self.store.add(ckpt)
        log.info(
            "loading %s from %s", ckpt.name, ckpt.spec.path, extra={"WAND_CHECKPOINT": ckpt.name}
        )
        return [f"{ckpt.name}/{c}" for c in ckpt.spec.components]

    def reload(self) -> dict[str, Any]:
        """Re-read the configuration and every checkpoint; load what changed.

        Checkpoints that fail to read keep their loaded version; checkpoints gone from the
        configuration are unloaded (their slabs live on while clients hold them).
        """
        self.notify.reloading()
        self.phase = "reloading"
        log.info("reloading")
        try:
            self.config = _configuration(self.args)
        except WandError as e:
            log.error("reload failed, keeping what is loaded: %s", e)
            raise
        report: dict[str, list[str]] = {"added": [], "changed": [], "removed": [], "errors": []}
        wanted: dict[str, Checkpoint] = {}
        for entry in self.config.checkpoints:
            ckpt = self._read_for_reload(entry, entry.name or str(entry.path), report)
            if ckpt is not None:
                wanted[ckpt.name] = ckpt
        for name, loaded in list(self.store.checkpoints.items()):
            if loaded.origin == "runtime":
                again = self._read_for_reload(loaded.config, name, report)
                if again is not None:
                    again.name, again.origin = name, "runtime"
                    wanted.setdefault(name, again)
            elif name not in wanted and not report["errors"]:
                self.store.remove(name)
                report["removed"].append(name)
        for name, ckpt in wanted.items():
            if name not in self.store.checkpoints:
                self.store.add(ckpt)
                report["added"].append(name)
            elif self.store.replace(ckpt):
                report["changed"].append(name)
        log.info("reload: %s", "; ".join(f"{k} {v}" for k, v in report.items() if v) or "no change")
        return report

    def _read_for_reload(
        self, entry: config.CheckpointConfig, label: str, report: dict[str, list[str]]
    ) -> Checkpoint | None:
        try:
            return read(entry)
        except WandError as e:
            log.error("reload of %s failed, keeping the loaded one: %s", label, e)
            report["errors"].append(f"{label}: {e}")
            return None

    # --- loop -----------------------------------------------------------------------------

    def _loader(self) -> None:
        while True:
            resident: Resident = self.store.queue.get()
            try:
                self.store.load(resident)
            except Exception as e:
                log.error("loading %s failed: %s", resident.spec.name, e)
                if self.phase == "starting":
                    self.fatal = e if isinstance(e, WandError) else WandError(str(e))

    def _tick(self) -> None:
        """Runs on the serving thread at least every 200 ms."""
        now = time.monotonic()
        if self.fatal is not None:  # main() reports it to systemd once the server is down
            self.server.stopping = True
            return
        self.notify.watchdog()
        if self._reload_asked:
            self._reload_asked = False
            try:
                self.reload()
            except WandError:
                pass  # logged; the loaded checkpoints stay
        busy = self.store.busy()
        if self.phase != "ready" and busy:
            if now - self._last_extend >= EXTEND_BY / 3:
                self.notify.extend_timeout(EXTEND_BY)
                self._last_extend = now
            if now - self._last_status >= STATUS_EVERY:
                self.notify.status(self._progress())
                self._last_status = now
        elif self.phase != "ready":
            self.phase = "ready"
            self.notify.ready(self._summary())
            log.info("%s", self._summary())

    def _progress(self) -> str:
        with self.store.lock:
            residents = list(self.store.residents.values())
        total = sum(r.nbytes for r in residents)
        done = sum(r.done_bytes if r.state != "ready" else r.nbytes for r in residents)
        now = "".join(f", now {r.spec.name}" for r in residents if r.state == "loading")
        return f"loading {len(residents)} components: {done / 1e9:.2f} of {total / 1e9:.2f} GB{now}"

    def _summary(self) -> str:
        with self.store.lock:
            n = len(self.store.addresses)
            size = sum(r.nbytes for r in self.store.residents.values() if r.state == "ready")
        return f"ready: {n} components, {size / 1e9:.2f} GB resident"

    def _signals(self) -> None:
        def stop(signum: int, _frame: object) -> None:
            log.info("%s: stopping", signal.Signals(signum).name)
            self.server.stopping = True

        def hup(_signum: int, _frame: object) -> None:
            self._reload_asked = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, hup)


if __name__ == "__main__":
    sys.exit(main())
