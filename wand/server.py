"""The daemon's serving loop: one ROUTER socket, one thread, requests answered in order.

Every request gets a reply, an error reply if need be; nothing a client sends can stop the
loop except an authorised ``stop``. The loop also watches client pidfds to end the leases of
processes that exit.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import zmq

from wand import __version__, protocol
from wand.client import Client
from wand.endpoint import socket_path
from wand.errors import ProtocolError, WandError
from wand.leases import LeaseTable
from wand.spec import CheckpointSpec
from wand.store import Store

log = logging.getLogger("wand.server")
POLL_MS = 200


class Peer:
    """Who sent a request, from the kernel's credentials of the ipc connection."""

    def __init__(self, frame: zmq.Frame, args: dict[str, Any]) -> None:
        self.uid, self.pid = _credentials(frame)
        if self.pid is None:  # not a local socket: trust what the client says
            self.pid = args.get("pid") if isinstance(args.get("pid"), int) else None
        self.name = str(args.get("client") or "")


class Server:
    def __init__(self, store: Store, endpoint: str) -> None:
        self.store = store
        self.endpoint = endpoint
        self.leases = LeaseTable()
        self.started = time.time()
        self.stopping = False
        self._names: dict[int, str] = {}  # pid → client name from its hello
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.MAXMSGSIZE, protocol.TRANSPORT_MAX_BYTES)
        self._sock.setsockopt(zmq.LINGER, 100)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._ops: dict[str, Callable[[Peer, dict], Any]] = {
            "hello": self._hello,
            "status": self._status,
            "list": self._list,
            "attach": self._attach,
            "detach": self._detach,
            "ps": self._ps,
            "ping": self._ping,
            "stop": self._stop,
        }

    def bind(self) -> None:
        path = socket_path(self.endpoint)
        if path is not None:
            _claim_socket_path(path, self.endpoint)
        self._sock.bind(self.endpoint)
        if path is not None:
            os.chmod(path, 0o660)
        log.info("listening on %s", self.endpoint)

    def serve(self, until: Callable[[], bool] = lambda: False) -> None:
        """Answer requests until ``stop`` is asked for or ``until()`` is true."""
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        watched: set[int] = set()
        while not self.stopping and not until():
            watched = self._watch_pidfds(poller, watched)
            for sock, _ in poller.poll(POLL_MS):
                if sock is self._sock:
                    self._serve_one()
                else:
                    self._client_exited(sock)

    def close(self) -> None:
        self.leases.close()
        self._sock.close()
        self._ctx.term()
        path = socket_path(self.endpoint)
        if path is not None:
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
            log.info(
                "client %d (%s) exited; released %s",
                proc.pid,
                proc.name or "?",
                ", ".join(proc.leases) or "nothing",
            )
            self._names.pop(proc.pid, None)

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
        if not isinstance(req.args, dict):
            return protocol.error(req.id, "bad_message", "'args' must be a map")
        peer = Peer(body[0], req.args)
        try:
            return protocol.ok(req.id, self._ops[req.op](peer, req.args))
        except WandError as e:
            code = e.code if e.code in protocol.ERRORS else "internal"
            return protocol.error(req.id, code, str(e))
        except Exception as e:  # a bug must not take the daemon down
            log.exception("internal error in %s", req.op)
            return protocol.error(req.id, "internal", f"{type(e).__name__}: {e}")

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
            "components": list(self.store.components),
        }

    def _status(self, peer: Peer, args: dict) -> dict:
        comps = []
        for comp in self.store.components.values():
            summary = comp.summary()
            summary["clients"] = len(self.leases.holders(comp.addr))
            comps.append(summary)
        states = {c["state"] for c in comps}
        return {
            "daemon": {
                "pid": os.getpid(),
                "version": __version__,
                "protocol": protocol.VERSION,
                "endpoint": self.endpoint,
                "uptime": time.time() - self.started,
                "state": "ready" if states <= {"ready"} else "loading",
                "clients": len(self.leases.processes()),
            },
            "checkpoints": [_checkpoint_info(n, s) for n, s in self.store.checkpoints.items()],
            "components": comps,
        }

    def _list(self, peer: Peer, args: dict) -> dict:
        keys = ("name", "component", "class", "device", "dtype", "bytes", "tensors", "state")
        return {
            "components": [
                {k: c.summary()[k] for k in keys} for c in self.store.components.values()
            ]
        }

    def _attach(self, peer: Peer, args: dict) -> dict:
        comp = self.store.resolve(args.get("name"))
        if comp.state == "failed":
            raise WandError(f"{comp.addr} failed to load: {comp.error}", "failed")
        if comp.state != "ready":
            raise WandError(
                f"{comp.addr} is {comp.state} ({comp.done_bytes / max(comp.nbytes, 1):.0%})",
                "not_ready",
            )
        if peer.pid is None:
            raise WandError("attach needs the client's pid", "bad_args")
        self.leases.acquire(peer.pid, peer.uid, self._names.get(peer.pid, peer.name), comp.addr)
        return {"name": comp.addr, "handle": comp.slab.handle(), "manifest": comp.manifest}

    def _detach(self, peer: Peer, args: dict) -> dict:
        comp = self.store.resolve(args.get("name"))
        if peer.pid is None or not self.leases.release(peer.pid, comp.addr):
            raise WandError(f"this process holds no lease on {comp.addr}", "not_attached")
        return {"name": comp.addr}

    def _ps(self, peer: Peer, args: dict) -> dict:
        return {
            "clients": [
                {
                    "pid": p.pid,
                    "uid": p.uid,
                    "name": p.name,
                    "leases": [
                        {"component": lease.component, "count": lease.count, "since": lease.since}
                        for lease in p.leases.values()
                    ],
                }
                for p in self.leases.processes()
            ]
        }

    def _ping(self, peer: Peer, args: dict) -> dict:
        return {"pong": True, "time": time.time()}

    def _stop(self, peer: Peer, args: dict) -> dict:
        if peer.uid not in (0, os.geteuid()):
            raise WandError("only root or the daemon's own user may stop it", "forbidden")
        log.info("stop requested by pid %s", peer.pid)
        self.stopping = True
        return {"stopping": True}


def _checkpoint_info(name: str, spec: CheckpointSpec) -> dict[str, Any]:
    """What a client needs to assemble a pipeline around the components."""
    return {
        "name": name,
        "path": str(spec.path),
        "task": spec.task,
        "layout": spec.layout,
        "components": {c: f"{name}/{c}" for c in spec.components},
        "tokenizer": str(spec.tokenizer) if spec.tokenizer else None,
        "extras": spec.extras,
    }


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


def _claim_socket_path(path, endpoint: str) -> None:
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
