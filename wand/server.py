"""The daemon's serving loop: one ROUTER socket, one thread, requests answered in order.

Every request gets a reply, an error reply if need be; nothing a client sends can stop the
loop except an authorised ``stop``. The loop also watches client pidfds to end the leases of
processes that exit, and frees retired slabs once no lease holds them.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import zmq

from wand import __version__, protocol
from wand.client import Client
from wand.endpoint import socket_path
from wand.errors import ProtocolError, WandError
from wand.leases import LeaseTable
from wand.logs import RingBuffer
from wand.store import Checkpoint, Resident, Store

log = logging.getLogger("wand.server")
POLL_MS = 200
PRIVILEGED = {"load", "unload", "reload", "stop"}


class Control(Protocol):
    """What the server asks of the daemon for operations beyond the store."""

    def load(self, args: dict[str, Any]) -> list[str]: ...

    def reload(self) -> dict[str, Any]: ...

    def state(self) -> str: ...


class Peer:
    """Who sent a request, from the kernel's credentials of the ipc connection."""

    def __init__(self, frame: zmq.Frame, args: dict[str, Any]) -> None:
        self.uid, self.pid = _credentials(frame)
        if self.pid is None:  # not a local socket: trust what the client says
            self.pid = args.get("pid") if isinstance(args.get("pid"), int) else None
        self.name = str(args.get("client") or "")


class Server:
    def __init__(
        self, store: Store, endpoint: str, control: Control, logs: RingBuffer | None = None
    ) -> None:
        self.store = store
        self.endpoint = endpoint
        self.control = control
        self.logs = logs or RingBuffer()
        self.leases = LeaseTable()
        self.started = time.time()
        self.stopping = False
        self._inherited = False
        self._names: dict[int, str] = {}  # pid → client name from its hello
        self._revoked: dict[int, str] = {}  # pid → why its leases were taken away
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.MAXMSGSIZE, protocol.TRANSPORT_MAX_BYTES)
        self._sock.setsockopt(zmq.LINGER, 100)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._ops: dict[str, Callable[[Peer, dict], Any]] = {
            op: getattr(self, f"_{op}") for op in protocol.OPS
        }

    def bind(self, inherited_fd: int | None = None) -> None:
        """Listen on the endpoint, or on the socket systemd passed (socket activation)."""
        path = socket_path(self.endpoint)
        if inherited_fd is not None:
            self._sock.setsockopt(zmq.USE_FD, inherited_fd)
            self._inherited = True
        elif path is not None:
            _claim_socket_path(path, self.endpoint)
        self._sock.bind(self.endpoint)
        if path is not None and not self._inherited:
            os.chmod(path, 0o660)
        log.info("listening on %s%s", self.endpoint, " (socket activation)" * self._inherited)

    def serve(self, tick: Callable[[], None] = lambda: None) -> None:
        """Answer requests until stopped; ``tick`` runs at least every 200 ms."""
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        watched: set[int] = set()
        while not self.stopping:
            watched = self._watch_pidfds(poller, watched)
            for sock, _ in poller.poll(POLL_MS):
                if sock is self._sock:
                    self._serve_one()
                else:
                    self._client_exited(sock)
            self.collect()
            tick()

    def collect(self) -> None:
        """Free retired residents that no lease holds any more."""
        for resident in self.store.retired():
            if not self.leases.holders(resident.id):
                self.store.free(resident)

    def close(self) -> None:
        self.leases.close()
        self._sock.close()
        self._ctx.term()
        path = socket_path(self.endpoint)
        if path is not None and not self._inherited:  # systemd owns an inherited socket
            path.unlink(missing_ok=True)

    def _watch_pidfds(self, poller: zmq.Poller, watched: set[int]) -> set[int]:
        current = set(self.leases.pidfds())
        for fd in watched - current:
            poller.unregister(fd)
        for fd in current - watched:
            poller.register(fd, zmq.POLLIN)
        return current

    def _client_exited(self, pidfd: int) -> None:
        proc = self.leases.reap(pidfd)
        if proc:
            held = ", ".join(lease.component for lease in proc.leases.values()) or "nothing"
            log.info(
                "client %d (%s) exited; released %s",
                proc.pid,
                proc.name or "?",
                held,
                extra={"WAND_CLIENT_PID": proc.pid},
            )
            self._names.pop(proc.pid, None)
            self._revoked.pop(proc.pid, None)

    def _serve_one(self) -> None:
        frames = self._sock.recv_multipart(copy=False)
        identity, body = frames[0], frames[1:]
        reply = self._reply(body)
        try:
            self._sock.send_multipart([identity, reply])
        except zmq.ZMQError as e:  # the client vanished between request and reply
            log.debug("reply not delivered: %s", e)

    def _reply(self, body: list[zmq.Frame]) -> bytes:
        if len(body) != 1:
            return protocol.error(None, "bad_message", f"expected 1 frame, got {len(body)}")
        try:
            req = protocol.parse_request(body[0].bytes)
        except ProtocolError as e:
            return protocol.error(protocol.request_id_of(e), e.code, str(e))
        peer = Peer(body[0], req.args)
        try:
            self._admit(peer, req.op)
            return protocol.ok(req.id, self._ops[req.op](peer, req.args))
        except WandError as e:
            if req.op in PRIVILEGED:
                log.warning(
                    "%s from pid %s failed: %s",
                    req.op,
                    peer.pid,
                    e,
                    extra={"WAND_CLIENT_PID": peer.pid, "WAND_OP": req.op},
                )
            code = e.code if e.code in protocol.ERRORS else "internal"
            return protocol.error(req.id, code, str(e))
        except Exception as e:  # a bug must not take the daemon down
            log.exception("internal error in %s", req.op)
            return protocol.error(req.id, "internal", f"{type(e).__name__}: {e}")

    def _admit(self, peer: Peer, op: str) -> None:
        if peer.pid in self._revoked:
            raise WandError(self._revoked.pop(peer.pid), "revoked")
        if op in PRIVILEGED and peer.uid not in (0, os.geteuid()):
            raise WandError(
                f"{op} is allowed only to root and the daemon's user (uid {os.geteuid()})",
                "forbidden",
            )

    # --- operations -------------------------------------------------------------------

    def _hello(self, peer: Peer, args: dict) -> dict:
        versions = args.get("versions", [protocol.VERSION])
        if not isinstance(versions, list) or protocol.VERSION not in versions:
            raise WandError(
                f"client speaks protocol {versions}, this daemon speaks {protocol.VERSION}",
                "unsupported_version",
            )
        if peer.pid is not None and peer.name:
            self._names[peer.pid] = peer.name
        return {
            "protocol": protocol.VERSION,
            "version": __version__,
            "pid": os.getpid(),
            "components": list(self.store.addresses),
        }

    def _status(self, peer: Peer, args: dict) -> dict:
        with self.store.lock:
            comps = [self._component(addr, r) for addr, r in self.store.addresses.items()]
            retired = [
                {**r.summary(), "clients": len(self.leases.holders(r.id))}
                for r in self.store.retired()
            ]
            checkpoints = [_checkpoint_info(c) for c in self.store.checkpoints.values()]
            gpus = _gpus(self.store)
        return {
            "daemon": {
                "pid": os.getpid(),
                "uid": os.geteuid(),
                "version": __version__,
                "protocol": protocol.VERSION,
                "endpoint": self.endpoint,
                "uptime": time.time() - self.started,
                "state": self.control.state(),
                "clients": len(self.leases.processes()),
            },
            "checkpoints": checkpoints,
            "components": comps,
            "retired": retired,
            "gpus": gpus,
        }

    def _component(self, addr: str, resident: Resident) -> dict[str, Any]:
        shared = [a for a, r in self.store.addresses.items() if r is resident and a != addr]
        return {
            **resident.summary(),
            "name": addr,
            "checkpoint": addr.split("/", 1)[0],
            "shared_with": shared,
            "clients": len(self.leases.holders(resident.id)),
        }

    def _list(self, peer: Peer, args: dict) -> dict:
        keys = ("name", "component", "class", "device", "dtype", "bytes", "tensors", "state")
        with self.store.lock:
            comps = [self._component(a, r) for a, r in self.store.addresses.items()]
        return {"components": [{k: c[k] for k in keys} for c in comps]}

    def _attach(self, peer: Peer, args: dict) -> dict:
        addr, resident = self.store.resolve(args.get("name"))
        if resident.state == "failed":
            raise WandError(f"{addr} failed to load: {resident.error}", "failed")
        if resident.state != "ready":
            raise WandError(
                f"{addr} is {resident.state} ({resident.done_bytes / max(resident.nbytes, 1):.0%})",
                "not_ready",
            )
        if peer.pid is None:
            raise WandError("attach needs the client's pid", "bad_args")
        name = self._names.get(peer.pid, peer.name)
        self.leases.acquire(peer.pid, peer.uid, name, addr, resident.id)
        man = {**resident.manifest, "name": addr, "checkpoint": addr.split("/", 1)[0]}
        return {"name": addr, "handle": resident.slab.handle(), "manifest": man}

    def _detach(self, peer: Peer, args: dict) -> dict:
        addr, resident = self.store.resolve(args.get("name"))
        if peer.pid is None or not self.leases.release(peer.pid, addr, resident.id):
            raise WandError(f"this process holds no lease on {addr}", "not_attached")
        return {"name": addr}

    def _ps(self, peer: Peer, args: dict) -> dict:
        return {
            "clients": [
                {
                    "pid": p.pid,
                    "uid": p.uid,
                    "name": p.name,
                    "leases": [
                        {
                            "component": lease.component,
                            "resident": lease.resident,
                            "count": lease.count,
                            "since": lease.since,
                        }
                        for lease in p.leases.values()
                    ],
                }
                for p in self.leases.processes()
            ]
        }

    def _ping(self, peer: Peer, args: dict) -> dict:
        return {"pong": True, "time": time.time()}

    def _stop(self, peer: Peer, args: dict) -> dict:
        log.info("stop requested by pid %s", peer.pid)
        self.stopping = True
        return {"stopping": True}

    def _load(self, peer: Peer, args: dict) -> dict:
        return {"components": self.control.load(args)}

    def _reload(self, peer: Peer, args: dict) -> dict:
        return self.control.reload()

    def _unload(self, peer: Peer, args: dict) -> dict:
        name = args.get("name")
        if not isinstance(name, str) or name not in self.store.checkpoints:
            loaded = ", ".join(self.store.checkpoints) or "none"
            raise WandError(f"no checkpoint {name!r}; loaded: {loaded}", "unknown_component")
        ckpt = self.store.checkpoints[name]
        residents = {r.id for a, r in self.store.addresses.items() if a.startswith(name + "/")}
        holders = {p.pid: p for rid in residents for p in self.leases.holders(rid)}
        if holders and not args.get("force"):
            who = ", ".join(f"pid {p.pid} ({p.name or '?'})" for p in holders.values())
            raise WandError(f"{name} is in use by {who}; unload --force revokes", "in_use")
        dropped = {r.id for r in self.store.remove(name)}
        for proc in self.leases.revoke(dropped):
            self._revoked[proc.pid] = (
                f"checkpoint {name} was unloaded with --force; its tensors are no longer "
                "backed by the daemon"
            )
            log.warning(
                "revoked leases of pid %d (%s) on %s",
                proc.pid,
                proc.name,
                name,
                extra={"WAND_CLIENT_PID": proc.pid, "WAND_CHECKPOINT": name},
            )
        log.info("unloaded %s (%s)", name, ckpt.spec.path, extra={"WAND_CHECKPOINT": name})
        self.collect()
        return {"name": name, "revoked": sorted(holders)}

    def _logs(self, peer: Peer, args: dict) -> dict:
        since, limit = args.get("since", 0), args.get("limit", 200)
        if not isinstance(since, int) or not isinstance(limit, int) or limit < 1:
            raise WandError("logs takes integer 'since' and positive 'limit'", "bad_args")
        return {"records": self.logs.since(since, min(limit, 2000))}


def _checkpoint_info(ckpt: Checkpoint) -> dict[str, Any]:
    """What a client needs to assemble a pipeline around the components."""
    spec = ckpt.spec
    return {
        "name": ckpt.name,
        "path": str(spec.path),
        "task": spec.task,
        "layout": spec.layout,
        "origin": ckpt.origin,
        "components": {c: f"{ckpt.name}/{c}" for c in spec.components},
        "tokenizer": str(spec.tokenizer) if spec.tokenizer else None,
        "extras": spec.extras,
    }


def _gpus(store: Store) -> list[dict[str, Any]]:
    """Per GPU with residents: identity, the bytes each resident's slab holds there, and the
    device's free/total memory as the driver reports it (all processes included)."""
    gpus: dict[str, dict[str, Any]] = {}
    for r in store.residents.values():
        d = r.device
        if d.uuid is None:
            continue
        g = gpus.setdefault(d.uuid, {"uuid": d.uuid, "index": d.index, "device": d.name})
        g.setdefault("name", d.model)
        names = [a for a, held in store.addresses.items() if held is r]
        g.setdefault("residents", []).append(
            {
                "resident": r.id,
                "component": r.spec.name,
                "names": names,
                "bytes": r.slab.nbytes if r.slab else 0,
                "state": r.state,
            }
        )
    for g in gpus.values():
        g["held_bytes"] = sum(x["bytes"] for x in g["residents"])
        g["free_bytes"], g["total_bytes"] = _memory(g["index"])
    return list(gpus.values())


def _memory(index: int) -> tuple[int | None, int | None]:
    import torch

    try:
        return torch.cuda.mem_get_info(index)
    except RuntimeError:
        return None, None


def _credentials(frame: zmq.Frame) -> tuple[int, int | None]:
    """(uid, pid) of the sender of an ipc message; (-1, None) when the transport has none."""
    try:
        addr = frame.get("Peer-Address")
    except zmq.ZMQError:
        return -1, None
    parts = addr.split(":") if isinstance(addr, str) else []
    if len(parts) == 4 and parts[0] == "localhost":
        return int(parts[1]), int(parts[3])
    return -1, None


def _claim_socket_path(path: Path, endpoint: str) -> None:
    """Refuse to take over a live daemon's socket; remove one a dead daemon left behind."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        return
    try:
        Client(endpoint, timeout=1.0, name="wand-probe").close()
    except WandError:
        log.info("removing stale socket %s", path)
        path.unlink(missing_ok=True)
        return
    raise WandError(f"another wand daemon is already serving at {endpoint}", "forbidden")
