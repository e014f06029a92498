"""The client library: talk to the daemon, attach components, build modules over them."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from itertools import count
from typing import TYPE_CHECKING, Any

import torch
import zmq

from wand import manifest as manifests
from wand import modules, protocol
from wand.endpoint import describe, resolve, socket_path
from wand.errors import ConnectError, DaemonError, ProtocolError
from wand.slab import map_readonly

if TYPE_CHECKING:
    from wand.pipeline import VideoPipeline

DEFAULT_TIMEOUT = 10.0
_mapped: dict[str, torch.Tensor] = {}  # slab path → this process's read-only mapping


class Client:
    """A connection to the wand daemon. Use :func:`connect`, ideally as a context manager.

    Tensors and modules obtained here stay valid after :meth:`close`: leases belong to the
    process and end when it exits or calls :meth:`detach`.
    """

    def __init__(
        self, endpoint: str | None = None, timeout: float = DEFAULT_TIMEOUT, name: str | None = None
    ) -> None:
        self.endpoint = resolve(endpoint, client=True)
        self.timeout = timeout
        path = socket_path(self.endpoint)
        if path is not None and not path.exists():
            raise ConnectError(f"no daemon at {describe(self.endpoint)}: {path} does not exist")
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(self.endpoint)
        self._ids = count(1)
        name = name or os.path.basename(sys.argv[0] or "python")
        self.daemon = self.request(
            "hello", client=name, pid=os.getpid(), versions=list(protocol.SUPPORTED_VERSIONS)
        )

    def request(self, op: str, timeout: float | None = None, **args: Any) -> Any:
        """Send one request and wait for its reply; a daemon error raises :class:`DaemonError`."""
        req_id = next(self._ids)
        self._sock.send(protocol.request(req_id, op, args))
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
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
        raise ConnectError(
            f"no reply to {op!r} from {describe(self.endpoint)} within "
            f"{self.timeout if timeout is None else timeout:g} s"
        )

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

    def attachment(self, name: str) -> Attachment:
        """Lease ``name`` and map its slab: the manifest, the mapping and the views."""
        reply = self._attach_request(name)
        handle, man = reply["handle"], reply["manifest"]
        flat = _map(handle)
        return Attachment(man["name"], man, flat, manifests.views(flat, man))

    def attach(self, name: str) -> dict[str, torch.Tensor]:
        """``{state-dict name: tensor}``: read-only views of the daemon's memory, no copy."""
        return self.attachment(name).tensors

    def module(self, name: str) -> torch.nn.Module:
        """The component's diffusers/transformers module, every weight bound to the slab."""
        return self.attachment(name).module()

    def pipeline(self, checkpoint: str | None = None, **overrides: Any) -> VideoPipeline:
        """The diffusers pipeline of a loaded checkpoint (``checkpoint`` names it when several
        are), every module bound to the daemon's memory; see :mod:`wand.pipeline`."""
        from wand.pipeline import build

        return build(self, checkpoint, **overrides)

    def detach(self, name: str) -> None:
        """End this process's lease; tensors already obtained must no longer be used."""
        self.request("detach", name=name)

    def close(self) -> None:
        self._sock.close(linger=0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _attach_request(self, name: str) -> dict[str, Any]:
        """Ask for ``name``, waiting while it is still loading (up to the timeout)."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return self.request("attach", name=name)
            except DaemonError as e:
                if e.code != "not_ready" or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def _map(handle: dict[str, Any]) -> torch.Tensor:
    """The slab behind ``handle``, mapped once per process: shared memory read-only, or a
    GPU allocation through CUDA IPC (closed once no tensor over it is left)."""
    kind = handle.get("kind")
    if kind == "cuda_ipc":
        from wand.gpuslab import map_ipc

        return map_ipc(handle)
    if kind != "shm":
        raise ProtocolError(f"unsupported handle kind {kind!r}")
    flat = _mapped.get(handle["path"])
    if flat is None:
        flat = _mapped[handle["path"]] = map_readonly(handle)
    return flat


@dataclass
class Attachment:
    """One leased component in this process."""

    name: str
    manifest: dict[str, Any]
    flat: torch.Tensor  # the whole slab (read-only on CPU; on its GPU for cuda_ipc)
    tensors: dict[str, torch.Tensor]

    def module(self) -> torch.nn.Module:
        return modules.build(self.manifest["cls"], self.manifest["config"], self.tensors)

    def verify(self) -> bool:
        """Do the mapped bytes still match the checksum the daemon computed at load?
        (blake2b for CPU slabs, the on-device sum64 digest for GPU slabs)"""
        return manifests.verify(self.flat, self.manifest)


def connect(
    endpoint: str | None = None, timeout: float = DEFAULT_TIMEOUT, name: str | None = None
) -> Client:
    """Connect to the daemon at ``endpoint`` (default: ``WAND_ENDPOINT`` or the runtime path)."""
    return Client(endpoint, timeout=timeout, name=name)
