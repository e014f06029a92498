"""The client library: talk to the daemon, attach components, build modules over them."""

from __future__ import annotations

import errno
import grp
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from functools import partial
from itertools import count
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

from wand import slabs
from wand.client import prebuilt, readonly
from wand.common import fdsocket, heap, protocol, sockdir
from wand.common.endpoint import check, describe, resolve, socket_path
from wand.common.errors import ConnectError, DaemonError, WandError
from wand.common.process import own_start
from wand.common.spec import LORA_CLASS, LORA_PREFIX

if TYPE_CHECKING:
    import torch

    from wand.client.lora import ResidentLora
    from wand.client.pipeline import VideoPipeline

DEFAULT_TIMEOUT = 10.0
MAX_NAME = 64
_mapping = threading.Lock()  # one fetch-and-map of a slab at a time per process


def _after_fork() -> None:
    """A forked child (a script of the warm client) must not wait for a lock a thread of its
    parent held when it forked."""
    global _mapping
    _mapping = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


class Client:
    """A connection to the wand daemon. Use :func:`connect`, ideally as a context manager.

    Tensors and modules obtained here stay valid after :meth:`close`, and after the daemon
    stops or is killed (``wand/slabs/LIFETIME.md``). Leases belong to the process and end
    when it exits or calls :meth:`detach`.
    """

    def __init__(
        self, endpoint: str | None = None, timeout: float = DEFAULT_TIMEOUT, name: str | None = None
    ) -> None:
        self.endpoint = check(resolve(endpoint, client=True))
        self.timeout = timeout
        self._path = socket_path(self.endpoint)
        if self._path is not None:
            _probe(self._path, self.endpoint)
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(self.endpoint)
        self._ids = count(1)
        self.daemon = self.request(
            "hello",
            client=(name or default_name())[:MAX_NAME],
            versions=list(protocol.SUPPORTED_VERSIONS),
        )

    def request(self, op: str, timeout: float | None = None, **args: Any) -> Any:
        """Send one request and wait for its reply; a daemon error raises :class:`DaemonError`."""
        req_id = next(self._ids)
        self._sock.send(protocol.request(req_id, op, {**args, "start": own_start()}))
        wait = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            if not self._sock.poll(int(left * 1000) + 1):
                break
            reply = protocol.parse_reply(self._sock.recv())
            if reply["id"] != req_id:
                continue  # a late reply to an earlier request that timed out
            if reply["ok"]:
                return reply["result"]
            err = reply["error"]
            raise DaemonError(err["message"], err["code"])
        if self._path is not None:
            _probe(self._path, self.endpoint)  # a daemon that died meanwhile says so
        raise ConnectError(f"no reply to {op!r} from {describe(self.endpoint)} within {wait:g} s")

    def status(self) -> dict[str, Any]:
        return self.request("status")

    def list(self) -> list[dict[str, Any]]:
        return self.request("list")["components"]

    def checkpoints(self) -> list[dict[str, Any]]:
        """Loaded checkpoints: name, path, task, layout, components, tokenizer folder, extras
        (boundary ratio, scheduler config, pipeline class...)."""
        return self.status()["checkpoints"]

    def ps(self) -> list[dict[str, Any]]:
        return self.request("ps")["clients"]

    def ping(self) -> float:
        """Round-trip time in seconds."""
        start = time.perf_counter()
        self.request("ping")
        return time.perf_counter() - start

    def stop(self) -> None:
        self.request("stop")

    def attachment(self, name: str, writable: bool = False) -> Attachment:
        """Lease ``name`` and map its slab: the manifest, the mapping and the views.

        The mapping is shared and read-only (one per slab per process); with ``writable``
        it is this attachment's own copy-on-write mapping: writes go to private pages (on a
        GPU, a private device copy), never to the bytes other clients see.
        """
        return self._attachment(self._attach_request(name, writable), writable)

    def _attachment(self, reply: dict[str, Any], writable: bool) -> Attachment:
        handle, man = reply["handle"], reply["manifest"]
        flat = self._map(handle, writable)
        from wand.common import views  # torch: with the first attach, not with the import

        tensors = views.views(flat, man)
        return Attachment(man["name"], man, flat, tensors, writable, str(handle["token"]))

    def attach(self, name: str, writable: bool = False) -> dict[str, torch.Tensor]:
        """``{state-dict name: tensor}``: views of the daemon's memory, no copy (read-only
        unless ``writable``)."""
        return self.attachment(name, writable).tensors

    def module(self, name: str, writable: bool = False) -> torch.nn.Module:
        """The component's diffusers/transformers module, every weight bound to the slab
        (built ahead when this process was started by ``wanctl run``)."""
        reply = self._attach_request(name, writable)
        built = None if writable else prebuilt.take(str(reply["handle"]["token"]))
        return built if built is not None else self._attachment(reply, writable).module()

    def lora(self, name: str) -> ResidentLora:
        """A LoRA the daemon holds (``wanctl load-lora``, or ``lora = [...]`` in the
        configuration), attached privately writable (pages copied only where written): no
        file is read. ``name`` is the LoRA's name, or its
        address ``<checkpoint>/lora:<name>``; pass the result to a pipeline's
        ``load_lora_weights``."""
        from wand.client.lora import LoraError, ResidentLora

        # copy-on-write: diffusers' converters scale some LoRA tensors in place
        att = self.attachment(name if "/" in name else LORA_PREFIX + name, writable=True)
        if att.manifest["cls"] != LORA_CLASS:
            raise LoraError(f"{att.name} is a model, not a LoRA")
        config = att.manifest["config"]
        short = att.name.split("/", 1)[1].removeprefix(LORA_PREFIX)
        release = partial(self.detach, att.name)
        return ResidentLora(short, config["expert"], config["metadata"], att.tensors, release)

    def pipeline(self, checkpoint: str | None = None, **overrides: Any) -> VideoPipeline:
        """The diffusers pipeline of a loaded checkpoint (``checkpoint`` names it when several
        are), every module bound to the daemon's memory; see :mod:`wand.client.pipeline`."""
        from wand.client.pipeline import build

        return build(self, checkpoint, **overrides)

    def wait_loaded(self, names: list[str]) -> dict[str, str]:
        """Poll until every component in ``names`` is ready or failed (loading a real
        checkpoint takes minutes: this waits as long as it takes); their states, ``unloaded``
        for one that is gone. A failed one raises :class:`WandError` with its error."""
        while True:
            comps = {x["name"]: x for x in self.status()["components"] if x["name"] in names}
            states = {n: comps[n]["state"] if n in comps else "unloaded" for n in names}
            if all(s not in ("queued", "loading") for s in states.values()):
                failed = [f"{n}: {comps[n]['error']}" for n in names if states[n] == "failed"]
                if failed:
                    raise WandError("; ".join(failed), "failed")
                return states
            time.sleep(0.1)

    def detach(self, name: str) -> None:
        """End this process's lease. Tensors already obtained stay readable (this process's
        mapping keeps the memory), but the daemon no longer counts them as in use."""
        self.request("detach", name=name)

    def close(self) -> None:
        self._sock.close(linger=0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _attach_request(self, name: str, writable: bool) -> dict[str, Any]:
        """Ask for ``name``, waiting while it is still loading (up to the timeout)."""
        _before_tensors()
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return self.request("attach", name=name, writable=writable)
            except DaemonError as e:
                if e.code != "not_ready" or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _map(self, handle: dict[str, Any], writable: bool) -> torch.Tensor:
        """The slab behind ``handle``: this process's mapping if it has one (read-only),
        else its descriptor fetched from the fd socket with the attach's ticket, mapped."""
        with _mapping:
            flat = None if writable else slabs.mapped(handle)
            if flat is not None:
                return flat
            if self._path is None or not handle.get("fds"):
                raise ConnectError(
                    f"{self.endpoint}: slabs are handed over a Unix socket beside an ipc:// "
                    "endpoint; this endpoint has none"
                )
            fds = self._path.parent / Path(str(handle["fds"])).name
            fd = fdsocket.fetch(fds, str(handle["ticket"]), self.timeout)
            if not writable:
                readonly.install()  # a write into it will say why it kills the process
            return slabs.map_fd(handle, fd, writable)


def _before_tensors() -> None:
    """Import torch (the views need it) and freeze the heap its import left before an
    attach reply is decoded: its thousands of manifest rows would trigger the collector's
    walk of everything torch made (:mod:`wand.common.heap`)."""
    import torch  # noqa: F401

    heap.freeze_imports()


@dataclass
class Attachment:
    """One leased component in this process."""

    name: str
    manifest: dict[str, Any]
    flat: torch.Tensor  # the whole slab, on its device
    tensors: dict[str, torch.Tensor]
    writable: bool = False
    slab: str = ""  # the slab's token: names it across daemons and restarts

    def module(self) -> torch.nn.Module:
        from wand.client import fp8
        from wand.wan import modules

        ahead = prebuilt.take_skeleton(self.slab) if not self.writable else None
        if ahead is not None:  # a GPU slab's skeleton, made by the warm client
            module = modules.bind(ahead, self.tensors)
        else:
            module = modules.build(self.manifest["cls"], self.manifest["config"], self.tensors)
        return fp8.apply(module, self.manifest)

    def verify(self) -> bool:
        """Do the mapped bytes still match the checksum the daemon computed at load?
        (CRC-32s for CPU slabs, the on-device sum64 digest for GPU slabs)"""
        from wand.common import views  # torch: with the first attach, not with the import

        return views.verify(self.flat, self.manifest)


def connect(
    endpoint: str | None = None, timeout: float = DEFAULT_TIMEOUT, name: str | None = None
) -> Client:
    """Connect to the daemon at ``endpoint`` (default: ``WAND_ENDPOINT`` or the runtime path)."""
    return Client(endpoint, timeout=timeout, name=name)


def default_name() -> str:
    """How ``wanctl ps`` shows this process: ``python3 -m mytool``, ``python3 -c``,
    ``train.py``, ``python3`` (interactive)."""
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    interpreter, rest = os.path.basename(argv[0] or "python"), argv[1:]
    if rest[:1] == ["-m"] and len(rest) > 1:
        return f"{interpreter} -m {rest[1]}"
    if rest[:1] == ["-c"]:
        return f"{interpreter} -c"
    return os.path.basename(rest[0]) if rest else interpreter


def _probe(path: Path, endpoint: str) -> None:
    """Fail at once, saying why, when ``path`` is not to be trusted (a user not trusted could
    have put it there: ``wand/common/sockdir.py``) or nobody can answer there: no file, a
    stale file (nobody listening), or a socket this user may not open."""
    try:
        problem = sockdir.socket_problem(path, sockdir.client_trust())
    except ValueError as e:
        raise ConnectError(str(e)) from None
    if problem:
        raise ConnectError(f"refusing to connect to {path}: {problem}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(str(path))
    except FileNotFoundError:
        raise ConnectError(f"no daemon at {describe(endpoint)}: {path} does not exist") from None
    except ConnectionRefusedError:
        raise ConnectError(
            f"no daemon is listening at {describe(endpoint)}; the socket file {path} is stale "
            "(the daemon exited without removing it)"
        ) from None
    except PermissionError:
        raise ConnectError(f"permission denied on {path}: {_who_may(path)}") from None
    except OSError as e:
        if e.errno == errno.EAGAIN:  # backlog full: the daemon is there, just busy
            return
        raise ConnectError(f"cannot connect to {path}: {e.strerror}") from None
    finally:
        sock.close()


def _who_may(path: Path) -> str:
    try:
        st = path.stat()
        group = grp.getgrgid(st.st_gid).gr_name
    except (OSError, KeyError):
        return "this user may not open it"
    if st.st_gid == 0:  # joining group root would give far more than this socket
        return (
            f"only root may open it (mode {st.st_mode & 0o777:04o}, group root); for other "
            "users the daemon needs a group of its own, as the wand units give it (group wand)"
        )
    return f"the socket is for group {group} (ask to be added: usermod -aG {group} $USER)"
