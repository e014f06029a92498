"""``wand``: the daemon. Loads the configured checkpoints into shared slabs and serves them.

Exit status: 0 after a requested stop, 78 (EX_CONFIG) when the configuration, a checkpoint
in it or the socket directory cannot be used (systemd units say
``RestartPreventExitStatus=78``, so a broken configuration does not restart in a loop),
1 for anything else (out of memory, a GPU that fails).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import resource
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from wand.common import placement
from wand.common.endpoint import resolve
from wand.common.errors import CheckpointError, DeviceError, WandError
from wand.common.fdsocket import SUFFIX
from wand.common.sizes import size
from wand.common.spec import CheckpointSpec, ComponentSpec, from_record
from wand.common.version import __version__
from wand.daemon import cachedir, config, fdstore, identity, logs, systemd
from wand.daemon.server import Server
from wand.daemon.store import Checkpoint, Store
from wand.load.files import is_dir

log = logging.getLogger("wand")
EX_CONFIG = 78
STATUS_EVERY = 1.0  # seconds between STATUS= updates while loading
EXTEND_BY = 30.0  # seconds of start/reload timeout asked for at each extension
STOP_WAIT = 10.0  # seconds a stop waits for a load in progress to notice


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
    for name in config.COMPONENT_FILES:
        p.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            metavar="FILE",
            help=f"or one file per component: the {name} (a single-file checkpoint)",
        )
    p.add_argument(
        "--tokenizer", metavar="FOLDER", help="tokenizer of a single-file checkpoint (optional)"
    )
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
        help="resident dtype, for all components or one (repeatable), e.g. float32, "
        "vae=bfloat16, or high_noise_model=float8_e4m3fn (fp8 Linear weights with per-tensor "
        "scales: experts and text encoder)",
    )
    p.add_argument("--endpoint", help="ZeroMQ endpoint (default: WAND_ENDPOINT or runtime dir)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--version", action="version", version=f"wand {__version__}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _raise_descriptor_limit()
    ring = logs.setup(args.log_level)
    notifier = systemd.Notifier()
    try:
        cfg = _configuration(args)
        if args.check_config:
            print(explain(cfg))
            return 0
        return Daemon(cfg, args, notifier, ring).run()
    except WandError as e:
        log.error("%s", e)
        if e.code in ("config", "checkpoint"):
            notifier.failed(f"configuration error: {e}", errno.EINVAL)
            return EX_CONFIG
        notifier.failed(str(e), errno.EIO)
        return 1


def _raise_descriptor_limit() -> None:
    """Every client connection and tracked process costs a descriptor: use all we may."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _configuration(args: argparse.Namespace) -> config.Config:
    return config.with_overrides(
        config.load(args.config),
        checkpoint=args.checkpoint,
        **{k: getattr(args, k) for k in config.FILE_FLAGS},
        name=args.name,
        task=args.task,
        device=config.parse_assignments(args.device),
        dtype=config.parse_assignments(args.dtype),
        endpoint=args.endpoint,
    )


def read(entry: config.CheckpointConfig, known: dict[str, Any] | None = None) -> Checkpoint:
    """The checkpoint an entry names, read and checked (raises CheckpointError, ConfigError).

    ``known`` holds specs from systemd's fd store by fingerprint: one whose folder has not
    changed is taken as it is, without reading the folder or importing the model libraries.
    """
    check_devices(entry.device)
    fingerprint = _fingerprint(entry)
    spec = _known_spec(known or {}, fingerprint)
    if spec is None:
        spec = _read_entry(entry)
    ckpt = Checkpoint(entry.name or spec.task, spec, entry, "config")
    ckpt.fingerprint = fingerprint
    return ckpt


def _read_entry(entry: config.CheckpointConfig) -> CheckpointSpec:
    from wand.wan import read_checkpoint, read_files, read_lora  # heavy imports once args are fine

    try:
        if entry.path is not None:
            spec = read_checkpoint(entry.path, task=entry.task, dtypes=entry.dtypes())
        else:
            spec = read_files(
                entry.files,
                task=entry.task,
                dtypes=entry.dtypes(),
                tokenizer=entry.tokenizer,
                tokenizer_cache=cachedir.tokenizers(),
            )
        for lora in entry.loras:
            comp = read_lora(lora, spec)
            spec.components[comp.name] = comp
    except (OSError, ValueError, RecursionError) as e:  # a file problem no check foresaw
        raise CheckpointError(f"{entry.source}: {type(e).__name__}: {str(e)[:300]}") from None
    return spec


def _fingerprint(entry: config.CheckpointConfig) -> str | None:
    try:
        return identity.entry_fingerprint(entry)
    except (OSError, ValueError):
        return None  # unreadable: the full read says what is wrong


def _known_spec(known: dict[str, Any], fingerprint: str | None) -> CheckpointSpec | None:
    record = known.pop(fingerprint, None) if fingerprint else None
    if record is None:
        return None
    try:
        spec = from_record(record)
    except (KeyError, TypeError, ValueError) as e:
        log.warning("stored spec %s is unusable (%s): reading the folder", fingerprint, e)
        return None
    if spec.tokenizer is not None and not is_dir(spec.tokenizer):  # a cache emptied since
        log.info("%s: tokenizer %s is gone: reading the checkpoint", spec.path, spec.tokenizer)
        return None
    log.info("%s: unchanged since it was read, spec from the fd store", spec.path)
    return spec


def check_devices(devices: dict[str, str]) -> None:
    """Every placement names a GPU this process sees, whose driver can share its memory."""
    try:
        gpus = [d for d in map(placement.resolve, devices.values()) if d.uuid is not None]
        if gpus:
            from wand.slabs import cuda

            for d in gpus:
                cuda.require_vmm(d.index)
    except DeviceError as e:
        raise config.ConfigError(str(e)) from None


def unique_names(checkpoints: list[Checkpoint]) -> None:
    """No two checkpoints may answer to one name (it defaults to the task's)."""
    seen: dict[str, Checkpoint] = {}
    for ckpt in checkpoints:
        first = seen.setdefault(ckpt.name, ckpt)
        if first is not ckpt:
            raise config.ConfigError(
                f"two checkpoints are named {ckpt.name!r} ({first.spec.path} and "
                f"{ckpt.spec.path}; a name defaults to the task): give one a "
                'name = "..." in its [[checkpoint]] table'
            )


def explain(cfg: config.Config) -> str:
    """What --check-config prints: where things come from, what would be loaded, how big it
    is and which components would share one slab (as the store decides it)."""
    lines = [
        f"configuration: {cfg.source or 'none (flags only)'}",
        f"endpoint: {resolve(cfg.endpoint)}",
    ]
    checkpoints = [read(entry) for entry in cfg.checkpoints]
    unique_names(checkpoints)
    if not checkpoints:
        lines.append("no checkpoints: the daemon would start empty (add some with wanctl load)")
    slabs: list[tuple[str, ComponentSpec, tuple]] = []  # address, spec, shape key of each
    for ckpt in checkpoints:
        spec = ckpt.spec
        lines.append(f"checkpoint {ckpt.name}: {spec.task}, {spec.layout} layout, {spec.path}")
        for comp in spec.components.values():
            key = identity.component_key(ckpt.config, comp)
            twin = next((a for a, c, k in slabs if identity.same_component(c, k, comp, key)), None)
            if twin is None:
                slabs.append((f"{ckpt.name}/{comp.name}", comp, key))
            dtypes = "+".join(sorted({t.dtype for t in comp.tensors}))
            lines.append(
                f"  {comp.name}: {comp.cls.split(':')[1]}, {len(comp.tensors)} tensors, "
                f"{size(comp.nbytes)} as {dtypes} on {ckpt.config.device_for(comp.name)}"
                + (f", shared with {twin}" if twin else "")
            )
    if checkpoints:
        components = sum(len(c.spec.components) for c in checkpoints)
        total = sum(c.nbytes for _, c, _ in slabs)
        lines.append(f"resident: {len(slabs)} slabs for {components} components, {size(total)}")
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
        self.phase = "starting"  # starting → ready ⇄ reloading
        self.fatal: Exception | None = None
        self._reload_asked = False
        self._reloads = 0  # reloads in progress on the worker thread
        self._last_status = self._last_extend = 0.0

    def run(self) -> int:
        kept = fdstore.inherited(systemd.listen_fds())
        try:
            known = dict(kept.specs)
            checkpoints = [read(entry, known) for entry in self.config.checkpoints]  # before bind
            unique_names(checkpoints)
        except BaseException:
            for s in kept.slabs.values():
                s.close()
            raise
        if not checkpoints:
            log.warning(
                "no checkpoint configured (%s): serving nothing until one is added with "
                "wanctl load PATH",
                self.config.source or "no configuration file, no --checkpoint",
            )
        self.store = Store(fdstore.FdStore(self.notify), kept.slabs, set(kept.specs))
        zmq_fd, fds_fd, endpoint = _sockets(kept.sockets)
        self.server = Server(self.store, endpoint or resolve(self.config.endpoint), self, self.ring)
        self.server.bind(zmq_fd, fds_fd)
        loader = threading.Thread(target=self._loader, name="loader", daemon=True)
        try:  # from here on, whatever ends the daemon removes its sockets
            for ckpt in checkpoints:
                self.store.add(ckpt)
            self.store.discard_stored(set(kept.specs) - {c.fingerprint for c in checkpoints})
            self.notify.status(self._progress())
            self.notify.extend_timeout(EXTEND_BY)
            self._last_status = self._last_extend = time.monotonic()
            loader.start()
            self._signals()
            self.server.serve(tick=self._tick)
        finally:
            self.notify.stopping()
            self.store.close()
            if loader.ident is not None:
                loader.join(STOP_WAIT)  # a load in progress stops at its next tensor
            self.server.close()
        if self.fatal is not None:
            raise self.fatal
        log.info("stopped")
        return 0

    # --- Control (what the server delegates; load and reload run on its worker thread) ----

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

    def load_lora(self, args: dict[str, Any]) -> str:
        """Add a LoRA to a loaded checkpoint; it lasts until the checkpoint is unloaded (a
        reload keeps it)."""
        from wand.wan import read_lora

        args = dict(args)
        name = args.pop("checkpoint", None)
        ckpt = self.store.checkpoint(name)
        entry = config.lora(args, "load_lora")
        if any(x.name == entry.name for x in ckpt.config.loras):
            raise WandError(f"{ckpt.name} holds a LoRA named {entry.name!r} already", "bad_args")
        comp = read_lora(entry, ckpt.spec)
        ckpt.config = replace(ckpt.config, loras=(*ckpt.config.loras, entry))
        ckpt.extra_loras.append(entry)
        self.store.add_component(ckpt.name, comp)
        log.info("loading LoRA %s for %s from %s", entry.name, ckpt.name, entry.path)
        return f"{ckpt.name}/{comp.name}"

    def unload_lora(self, checkpoint: str | None, name: str) -> None:
        """Forget a LoRA in the configuration of its checkpoint (the store retires it)."""
        ckpt = self.store.checkpoint(checkpoint)
        ckpt.config = replace(
            ckpt.config, loras=tuple(x for x in ckpt.config.loras if x.name != name)
        )
        ckpt.extra_loras = [x for x in ckpt.extra_loras if x.name != name]

    def reload(self) -> dict[str, Any]:
        """Re-read the configuration and every checkpoint; load what changed.

        Checkpoints that fail to read keep their loaded version; checkpoints gone from the
        configuration are unloaded (their slabs live on while clients hold them).
        """
        self._reloads += 1
        self.phase = "reloading"
        self.notify.reloading()
        log.info("reloading")
        try:
            return self._reload()
        finally:
            self._reloads -= 1

    def _reload(self) -> dict[str, Any]:
        try:
            self.config = _configuration(self.args)
        except WandError as e:
            log.error("reload failed, keeping what is loaded: %s", e)
            raise
        report: dict[str, list[str]] = {"added": [], "changed": [], "removed": [], "errors": []}
        wanted: dict[str, Checkpoint] = {}
        for entry in self.config.checkpoints:
            extra = self._extra_loras(entry)
            entry = replace(entry, loras=(*entry.loras, *extra))
            ckpt = self._read_for_reload(entry, entry.name or entry.source, report)
            if ckpt is not None:
                ckpt.extra_loras = list(extra)
                unique_names([*wanted.values(), ckpt])
                wanted[ckpt.name] = ckpt
        for name, loaded in self.store.snapshot().checkpoints.items():
            if loaded.origin == "runtime":
                again = self._read_for_reload(loaded.config, name, report)
                if again is not None:
                    again.name, again.origin = name, "runtime"
                    again.extra_loras = loaded.extra_loras
                    wanted.setdefault(name, again)
            elif name not in wanted and not report["errors"]:
                self.store.remove(name)
                report["removed"].append(name)
        for name, ckpt in wanted.items():
            if name not in self.store:
                self.store.add(ckpt)
                report["added"].append(name)
            elif self.store.replace(ckpt):
                report["changed"].append(name)
        log.info("reload: %s", "; ".join(f"{k} {v}" for k, v in report.items() if v) or "no change")
        return report

    def _extra_loras(self, entry: config.CheckpointConfig) -> tuple[config.LoraConfig, ...]:
        """The LoRAs ``wanctl load-lora`` gave the loaded checkpoint of a configured entry."""
        loaded = next(
            (c for c in self.store.snapshot().checkpoints.values() if c.config.reads_same(entry)),
            None,
        )
        if loaded is None or (entry.name and entry.name != loaded.name):
            return ()
        names = {x.name for x in entry.loras}
        return tuple(x for x in loaded.extra_loras if x.name not in names)

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
        while (resident := self.store.next_to_load()) is not None:
            try:
                self.store.load(resident)
            except Exception as e:
                log.error("loading %s failed: %s", resident.spec.name, e)
                if self.phase == "starting":
                    self.fatal = e if isinstance(e, WandError) else WandError(str(e))
            self.server.wake()  # READY (or the failure) is told at once, not at the next tick

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
                self.server.submit("reload", self.reload)
            except WandError as e:
                log.warning("SIGHUP: %s", e)
        busy = self.store.busy() or self._reloads > 0
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
        residents = self.store.snapshot().residents
        total = sum(r.nbytes for r in residents)
        done = sum(r.done_bytes if r.state != "ready" else r.nbytes for r in residents)
        now = "".join(f", now {r.spec.name}" for r in residents if r.state == "loading")
        return f"loading {len(residents)} components: {size(done)} of {size(total)}{now}"

    def _summary(self) -> str:
        snap = self.store.snapshot()
        n = len(snap.addresses)
        ready = [r for r in snap.residents if r.state == "ready"]
        adopted = sum(r.adopted for r in ready)
        kept = f", {adopted} adopted from the fd store" if adopted else ""
        return f"ready: {n} components, {size(sum(r.nbytes for r in ready))} resident{kept}"

    def _signals(self) -> None:
        def stop(signum: int, _frame: object) -> None:
            log.info("%s: stopping", signal.Signals(signum).name)
            self.server.stopping = True

        def hup(_signum: int, _frame: object) -> None:
            self._reload_asked = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, hup)
        signal.set_wakeup_fd(self.server.wake_fd)  # a signal wakes the serving loop at once


def _sockets(fds: list[int]) -> tuple[int | None, int | None, str | None]:
    """The inherited control socket, fd socket and the control socket's endpoint."""
    zmq_fd = fds_fd = endpoint = None
    for fd in fds:
        address = systemd.socket_address(fd)
        if address is None:
            log.warning("systemd passed descriptor %d, which is not a socket: closed", fd)
            os.close(fd)
        elif address.endswith(SUFFIX):
            fds_fd = fd
        elif zmq_fd is None:
            zmq_fd, endpoint = fd, address
        else:
            log.warning("systemd passed a second control socket (%s): ignored", address)
    return zmq_fd, fds_fd, endpoint


def run() -> None:
    """The ``wand`` command: exit without tearing the interpreter down module by module
    (torch's and diffusers' teardown takes about a second, and a stop should not); every
    socket and slab was closed already and the logs are flushed here."""
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
