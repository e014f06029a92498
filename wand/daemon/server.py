"""The daemon's serving loop: one ROUTER socket, the fd socket, one thread that never blocks.

Every request gets a reply, an error reply if need be; nothing a client sends can stop the
loop except an authorised ``stop``. Replies are sent without blocking: a client that does
not read them loses them (logged once), it never holds up anyone else. Operations that read
files (``load``, ``reload``) run on a worker thread and are answered when they are done. The
loop also watches client pidfds to forget processes that exit, hands slab descriptors out
over the fd socket, and lets go of retired slabs once no lease holds them.
"""

from __future__ import annotations

import logging
import os
import queue
import resource
import socket
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import zmq

from wand.common import protocol, sockdir
from wand.common.endpoint import socket_path
from wand.common.errors import ProtocolError, WandError
from wand.common.fdsocket import FdServer, fd_socket_path
from wand.common.spec import LORA_PREFIX, is_lora
from wand.common.version import __version__
from wand.daemon.logs import RingBuffer
from wand.daemon.peers import DOMAIN, Authenticator, Peer
from wand.daemon.processes import ClientTable
from wand.daemon.store import Checkpoint, Resident, Snapshot, Store

log = logging.getLogger("wand.daemon.server")
POLL_MS = 200
PRIVILEGED = {"load", "unload", "reload", "stop", "load_lora", "unload_lora"}
DEFERRED = {"load", "reload", "load_lora"}  # they read files: done on the worker thread
MAX_DEFERRED = 8
SEND_HWM = 64  # replies queued per client before further ones are dropped
RECV_HWM = 64  # requests queued per client before ZeroMQ stops reading its connection
MAX_CLIENT_NAME = 256
HANDSHAKE_MS = 5000  # a connection that has not greeted in ZMTP by then is closed
GUARD_EVERY, GUARD_HIGH, GUARD_LOW = 1.0, 0.9, 0.7  # descriptor checks: seconds, fractions


class Control(Protocol):
    """What the server asks of the daemon for operations beyond the store (these two run on
    the worker thread)."""

    def load(self, args: dict[str, Any]) -> list[str]: ...

    def reload(self) -> dict[str, Any]: ...

    def load_lora(self, args: dict[str, Any]) -> str: ...

    def unload_lora(self, checkpoint: str | None, name: str) -> None: ...

    def state(self) -> str: ...


class Server:
    def __init__(
        self, store: Store, endpoint: str, control: Control, logs: RingBuffer | None = None
    ) -> None:
        self.store = store
        self.endpoint = endpoint
        self.control = control
        self.logs = logs or RingBuffer()
        self.clients = ClientTable()
        self.started = time.time()
        self.stopping = False
        self.fds: FdServer | None = None
        self._inherited = False
        self._inherited_fd: int | None = None
        self._listening = False
        self._next_guard = 0.0
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        for option, value in (
            (zmq.MAXMSGSIZE, protocol.TRANSPORT_MAX_BYTES),
            (zmq.LINGER, 0),
            (zmq.ROUTER_MANDATORY, 1),
            (zmq.SNDHWM, SEND_HWM),
            (zmq.RCVHWM, RECV_HWM),
            (zmq.HANDSHAKE_IVL, HANDSHAKE_MS),
            (zmq.ZAP_DOMAIN, DOMAIN),  # each connection's opener is taken when it greets
        ):
            self._sock.setsockopt(option, value)
        self._zap = Authenticator(self._ctx)
        self._ops: dict[str, Callable[[Peer, dict], Any]] = {
            op: getattr(self, f"_{op}") for op in protocol.OPS
        }
        self._dropped: OrderedDict[bytes, None] = OrderedDict()  # clients told about, bounded
        self._jobs: queue.Queue[tuple[bytes | None, Any, str, Callable[[], Any]]] = queue.Queue(
            MAX_DEFERRED
        )
        self._done: queue.SimpleQueue[tuple[bytes, bytes]] = queue.SimpleQueue()
        self._wake_r, self.wake_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        threading.Thread(target=self._worker, name="requests", daemon=True).start()

    def bind(self, inherited: int | None = None, inherited_fds: int | None = None) -> None:
        """Listen on the endpoint and its fd socket, or on the sockets systemd passed."""
        path = socket_path(self.endpoint)
        self._inherited_fd = inherited
        self._inherited = inherited is not None
        if path is not None and not self._inherited:
            _claim(path, self.endpoint)
        self._listen()
        if inherited_fds is not None:
            sock = socket.socket(fileno=inherited_fds)
            self.fds = FdServer(sock, self._redeem)
        elif path is not None:
            fds_path = fd_socket_path(path)
            _claim(fds_path, f"ipc://{fds_path}")
            self.fds = FdServer.bind(fds_path, self._redeem)
        log.info("listening on %s%s", self.endpoint, " (socket activation)" * self._inherited)

    def _listen(self) -> None:
        if self._inherited_fd is not None:  # a copy: unbinding closes what libzmq was given
            self._sock.setsockopt(zmq.USE_FD, os.dup(self._inherited_fd))
        old = os.umask(0o117)  # the socket file is created 0660: no window with another mode
        try:
            self._sock.bind(self.endpoint)
        finally:
            os.umask(old)
        self._listening = True

    def _guard_descriptors(self) -> None:
        """libzmq aborts the process when accepting a connection finds no descriptor left
        (EMFILE in its ipc listener). So: near the limit, stop accepting connections until
        enough of them have closed; the daemon and the clients connected already go on."""
        now = time.monotonic()
        if now < self._next_guard:
            return
        self._next_guard = now + GUARD_EVERY
        used, limit = (
            len(os.listdir("/proc/self/fd")),
            resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        )
        if self._listening and used > GUARD_HIGH * limit:
            log.error(
                "%d of %d descriptors in use: not accepting new connections until some close",
                used,
                limit,
            )
            self._sock.unbind(self.endpoint)
            self._listening = False
        elif not self._listening and used < GUARD_LOW * limit:
            log.warning("%d of %d descriptors in use: accepting connections again", used, limit)
            self._listen()

    def serve(self, tick: Callable[[], None] = lambda: None) -> None:
        """Answer requests until stopped; ``tick`` runs first (a daemon with every slab
        adopted is ready at once) and then at least every 200 ms."""
        tick()
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._zap.sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        watched: set[int] = set()
        while not self.stopping:
            watched = self._watch(poller, watched)
            for sock, _ in poller.poll(POLL_MS):
                self._ready(sock)
            self._send_done()
            self.clients.expire()
            if self.fds is not None:
                self.fds.expire()
            self.collect()
            self._guard_descriptors()
            tick()

    def submit(
        self, op: str, job: Callable[[], Any], reply_to: tuple[bytes, Any] | None = None
    ) -> None:
        """Run ``job`` (operation ``op``) on the worker thread; its result or error answers
        ``reply_to`` (identity, request id), if given."""
        identity, req_id = reply_to or (None, None)
        try:
            self._jobs.put_nowait((identity, req_id, op, job))
        except queue.Full:
            raise WandError("too many loads and reloads are waiting; try again", "busy") from None

    def collect(self) -> None:
        """Let go of retired residents that no lease holds any more."""
        for resident in self.store.retired():
            if not self.clients.holders(resident.id):
                self.store.free(resident)

    def close(self) -> None:
        self.clients.close()
        if self.fds is not None:
            self.fds.close()
        self._sock.close(linger=0)
        self._zap.close()
        self._ctx.term()
        path = socket_path(self.endpoint)
        if path is not None and not self._inherited:  # systemd owns inherited sockets
            path.unlink(missing_ok=True)
            fd_socket_path(path).unlink(missing_ok=True)

    # --- the loop's parts -----------------------------------------------------------------

    def _watch(self, poller: zmq.Poller, watched: set[int]) -> set[int]:
        current = set(self.clients.pidfds()) | set(self.fds.fds() if self.fds else ())
        for fd in watched - current:
            poller.unregister(fd)
        for fd in current - watched:
            poller.register(fd, zmq.POLLIN)
        return current

    def _ready(self, sock: Any) -> None:
        if sock is self._sock:
            self._serve_some()
        elif sock is self._zap.sock:
            self._zap.serve_some()
        elif sock == self._wake_r:
            while True:
                try:
                    if not os.read(self._wake_r, 4096):
                        break
                except BlockingIOError:
                    break
        elif self.fds is not None and sock in self.fds.fds():
            self.fds.ready(sock)
        else:
            self._client_exited(sock)

    def _serve_some(self) -> None:
        """Requests waiting now, a bounded number per wake-up so the loop keeps ticking."""
        for _ in range(256):
            if self.stopping:
                return
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            identity, body = frames[0].bytes, frames[1:]
            reply = self._reply(identity, body)
            if reply is not None:
                self._send(identity, reply)

    def _send(self, identity: bytes, reply: bytes) -> None:
        try:
            self._sock.send_multipart([identity, reply], zmq.NOBLOCK)
        except zmq.ZMQError as e:  # gone (EHOSTUNREACH), or not reading (EAGAIN)
            if identity not in self._dropped:
                log.info("reply to a client not delivered (%s); dropping its replies", e.strerror)
            self._dropped[identity] = None
            self._dropped.move_to_end(identity)
            while len(self._dropped) > 1024:
                self._dropped.popitem(last=False)

    def _send_done(self) -> None:
        while True:
            try:
                identity, reply = self._done.get_nowait()
            except queue.Empty:
                return
            self._send(identity, reply)

    def _worker(self) -> None:
        while True:
            identity, req_id, op, job = self._jobs.get()
            reply = self._run(req_id, op, job)
            if identity is not None:
                self._done.put((identity, reply))
                self.wake()

    def wake(self) -> None:
        """Make the serving loop go round now (from another thread): a reply is waiting, or
        a load is done (readiness is told from the loop's tick)."""
        try:
            os.write(self.wake_fd, b"x")
        except BlockingIOError:
            pass  # the loop is awake already

    def _client_exited(self, pidfd: int) -> None:
        proc = self.clients.reap(pidfd)
        if proc is None:
            return
        held = ", ".join(lease.component for lease in proc.leases.values())
        log.log(
            logging.INFO if held else logging.DEBUG,
            "client %d (%s) exited; released %s",
            proc.pid,
            proc.name or "?",
            held or "nothing",
            extra={"WAND_CLIENT_PID": proc.pid},
        )

    def _reply(self, identity: bytes, body: list[zmq.Frame]) -> bytes | None:
        """The reply to one request (None when it is answered later, by the worker); every
        step, the peer's identity included, is inside the error boundary."""
        if len(body) != 1:
            return protocol.error(None, "bad_message", f"expected 1 frame, got {len(body)}")
        try:
            req = protocol.parse_request(body[0].bytes)
        except ProtocolError as e:
            return protocol.error(protocol.request_id_of(e), e.code, str(e))
        args = dict(req.args)
        start = args.pop("start", None)  # who it is, not what it asks

        def handle() -> Any:
            peer = Peer(body[0], start, self.clients)
            self._logged(peer, req.op, partial(self._admit, peer, req.op))
            run = partial(self._logged, peer, req.op, partial(self._ops[req.op], peer, args))
            if req.op in DEFERRED:  # reads files: answered by the worker when done
                self.submit(req.op, run, (identity, req.id))
                return _LATER
            return run()

        return self._run(req.id, req.op, handle)

    def _logged(self, peer: Peer, op: str, job: Callable[[], Any]) -> Any:
        """Run ``job``; a privileged operation that fails is logged with who asked."""
        try:
            return job()
        except WandError as e:
            if op in PRIVILEGED:
                log.warning(
                    "%s from pid %s failed: %s",
                    op,
                    peer.pid,
                    str(e)[:500],
                    extra={"WAND_CLIENT_PID": peer.pid, "WAND_OP": op},
                )
            raise

    def _run(self, req_id: Any, op: str, job: Callable[[], Any]) -> bytes | None:
        try:
            result = job()
            return None if result is _LATER else protocol.ok(req_id, result)
        except WandError as e:
            return protocol.error(req_id, e.code, str(e))
        except Exception as e:  # a bug must not take the daemon down
            log.exception("internal error in %s", op)
            return protocol.error(req_id, "internal", f"{type(e).__name__}: {str(e)[:500]}")

    def _admit(self, peer: Peer, op: str) -> None:
        if peer.proc is not None and peer.proc.revoked:
            why, peer.proc.revoked = peer.proc.revoked, None
            raise WandError(why, "revoked")
        if op in PRIVILEGED and peer.uid not in (0, os.geteuid()):
            raise WandError(
                f"{op} is allowed only to root and the daemon's user (uid {os.geteuid()})",
                "forbidden",
            )

    def _redeem(self, pid: int, uid: int, ticket: str) -> tuple[int | None, dict[str, Any]]:
        """The fd socket's question: may process ``pid`` have the slab of ``ticket``?"""
        found = self.clients.redeem(pid, uid, ticket)
        resident = self.store.resident(found.resident)
        if resident is None or resident.slab is None:
            raise WandError("that slab is gone", "not_attached")
        return resident.slab.export(), {"ok": True, "nbytes": resident.slab.nbytes}

    # --- operations -------------------------------------------------------------------

    def _hello(self, peer: Peer, args: dict) -> dict:
        versions = args.get("versions", [protocol.VERSION])
        if not isinstance(versions, list) or protocol.VERSION not in versions:
            raise WandError(
                f"client speaks protocol {protocol.short(versions)}, this daemon speaks "
                f"{protocol.VERSION}",
                "unsupported_version",
            )
        name = protocol.text(args, "client", required=False, limit=MAX_CLIENT_NAME)
        if peer.proc is not None and name:
            peer.proc.name = name
        return {
            "protocol": protocol.VERSION,
            "version": __version__,
            "pid": os.getpid(),
            "components": list(self.store.snapshot().addresses),
        }

    def _status(self, peer: Peer, args: dict) -> dict:
        snap = self.store.snapshot()
        comps = [self._component(snap, addr, r) for addr, r in snap.addresses.items()]
        retired = [
            {**r.summary(), "clients": len(self.clients.holders(r.id))} for r in snap.retired
        ]
        return {
            "daemon": {
                "pid": os.getpid(),
                "uid": os.geteuid(),
                "version": __version__,
                "protocol": protocol.VERSION,
                "endpoint": self.endpoint,
                "uptime": time.time() - self.started,
                "state": self.control.state(),
                "clients": len(self.clients.leaseholders()),
                "tracked": len(self.clients),
                "fdstore": self.store.keeps_slabs,
                "adopted": sum(r.adopted for r in snap.residents),
            },
            "checkpoints": [_checkpoint_info(c) for c in snap.checkpoints.values()],
            "components": comps,
            "retired": retired,
            "gpus": _gpus(snap),
        }

    def _component(self, snap: Snapshot, addr: str, resident: Resident) -> dict[str, Any]:
        shared = [a for a in snap.names_of(resident) if a != addr]
        return {
            **resident.summary(),
            "name": addr,
            "checkpoint": addr.split("/", 1)[0],
            "shared_with": shared,
            "clients": len(self.clients.holders(resident.id)),
        }

    def _list(self, peer: Peer, args: dict) -> dict:
        keys = ("name", "component", "class", "device", "dtype", "bytes", "tensors", "state")
        snap = self.store.snapshot()
        comps = [self._component(snap, a, r) for a, r in snap.addresses.items()]
        return {"components": [{k: c[k] for k in keys} for c in comps]}

    def _attach(self, peer: Peer, args: dict) -> dict:
        name = protocol.text(args, "name")
        peer.needs_start()
        writable = protocol.flag(args, "writable")
        addr, resident = self.store.resolve(name)
        if resident.state == "failed":
            raise WandError(f"{addr} failed to load: {resident.error}", "failed")
        if resident.state != "ready" or resident.slab is None:
            raise WandError(
                f"{addr} is {resident.state} ({resident.done_bytes / max(resident.nbytes, 1):.0%})",
                "not_ready",
            )
        if peer.proc is None:
            raise WandError(
                "attach needs a local ipc:// connection: the daemon must know the client "
                "process from the kernel",
                "forbidden",
            )
        self.clients.acquire(peer.proc, addr, resident.id)
        handle = {
            **resident.slab.handle(),
            "ticket": self.clients.issue(peer.proc, resident.id, writable),
            "fds": os.path.basename(self.fds.sock.getsockname()) if self.fds else None,
        }
        return {"name": addr, "handle": handle, "manifest": _wire_manifest(addr, resident)}

    def _detach(self, peer: Peer, args: dict) -> dict:
        peer.needs_start()
        addr, resident = self.store.resolve(protocol.text(args, "name"))
        if peer.proc is None or not self.clients.release(peer.proc, addr, resident.id):
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
                for p in self.clients.leaseholders()
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
        name, force = protocol.text(args, "name"), protocol.flag(args, "force")
        ckpt = self.store.checkpoint(name)
        addresses = self.store.addresses_of(name)
        revoked = self._take_away(name, addresses, force, lambda: self.store.remove(name))
        log.info("unloaded %s (%s)", name, ckpt.spec.path, extra={"WAND_CHECKPOINT": name})
        return {"name": name, "revoked": revoked}

    def _load_lora(self, peer: Peer, args: dict) -> dict:
        return {"name": self.control.load_lora(args)}

    def _unload_lora(self, peer: Peer, args: dict) -> dict:
        name, force = protocol.text(args, "name"), protocol.flag(args, "force")
        checkpoint = protocol.text(args, "checkpoint", required=False)
        if "/" in name:  # an address, as wanctl ls prints it: t2v-A14B/lora:style
            checkpoint, name = name.split("/", 1)
            name = name.removeprefix(LORA_PREFIX)
        ckpt = self._holder(checkpoint, name)
        component = LORA_PREFIX + name
        if component not in ckpt.spec.components:
            held = [c.removeprefix(LORA_PREFIX) for c in ckpt.spec.components if is_lora(c)]
            raise WandError(
                f"{ckpt.name} holds no LoRA {protocol.short(name)}; it holds: "
                f"{', '.join(held) or 'none'}",
                "unknown_component",
            )

        def drop() -> list[Resident]:
            self.control.unload_lora(ckpt.name, name)
            return self.store.remove_component(ckpt.name, component)

        address = f"{ckpt.name}/{component}"
        revoked = self._take_away(address, [address], force, drop)
        log.info("unloaded LoRA %s", address, extra={"WAND_CHECKPOINT": ckpt.name})
        return {"name": address, "revoked": revoked}

    def _holder(self, checkpoint: str | None, lora: str) -> Checkpoint:
        """The checkpoint named, else the one that holds a LoRA ``lora`` (or the only one)."""
        if checkpoint is not None:
            return self.store.checkpoint(checkpoint)
        held = self.store.snapshot().checkpoints.values()
        holders = [c for c in held if LORA_PREFIX + lora in c.spec.components]
        if len(holders) > 1:
            where = ", ".join(f"{c.name}/{LORA_PREFIX}{lora}" for c in holders)
            raise WandError(
                f"several checkpoints hold a LoRA {protocol.short(lora)}: {where}; say which "
                "(the address, or wanctl: --checkpoint NAME)",
                "ambiguous_component",
            )
        if holders or len(held) < 2:
            return holders[0] if holders else self.store.checkpoint(None)
        loras = ", ".join(f"{c.name}/{x}" for c in held for x in c.spec.components if is_lora(x))
        raise WandError(
            f"no checkpoint holds a LoRA {protocol.short(lora)}; held: {loras or 'none'}",
            "unknown_component",
        )

    def _take_away(
        self, what: str, addresses: list[str], force: bool, drop: Callable[[], list[Resident]]
    ) -> list[int]:
        """Stop serving ``addresses`` (``drop`` does it and returns the residents retired):
        refused while clients hold them, unless ``force``, which revokes their leases."""
        residents = {self.store.resolve(a)[1].id for a in addresses}
        holders = {p.pid: p for rid in residents for p in self.clients.holders(rid)}
        if holders and not force:
            who = ", ".join(f"pid {p.pid} ({p.name or '?'})" for p in holders.values())
            raise WandError(f"{what} is in use by {who}; --force revokes", "in_use")
        dropped = {r.id for r in drop()}
        why = (
            f"{what} was unloaded with --force; tensors already mapped stay valid, "
            "but the daemon no longer serves them"
        )
        for proc in self.clients.revoke(dropped, why):
            log.warning(
                "revoked leases of pid %d (%s) on %s",
                proc.pid,
                proc.name,
                what,
                extra={"WAND_CLIENT_PID": proc.pid},
            )
        self.collect()
        return sorted(holders)

    def _logs(self, peer: Peer, args: dict) -> dict:
        since = protocol.number(args, "since", 0, 0, 2**63 - 1)
        limit = protocol.number(args, "limit", 200, 1, 2000)
        return {"records": self.logs.since(since, limit)}


_LATER = object()  # what a deferred operation returns on the serving thread


def _wire_manifest(addr: str, resident: Resident) -> protocol.Packed:
    """The manifest an attach of ``addr`` gets, packed at its first attach: packing a
    component's thousands of rows took most of the daemon's time per attach."""
    packed = resident.wire.get(addr)
    if packed is None:
        man = {**resident.manifest, "name": addr, "checkpoint": addr.split("/", 1)[0]}
        packed = resident.wire[addr] = protocol.Packed(protocol.pack(man))
    return packed


def _checkpoint_info(ckpt: Checkpoint) -> dict[str, Any]:
    """What a client needs to assemble a pipeline around the components."""
    spec = ckpt.spec
    return {
        "name": ckpt.name,
        "path": str(spec.path),
        "task": spec.task,
        "layout": spec.layout,
        "origin": ckpt.origin,
        "components": {c: f"{ckpt.name}/{c}" for c in spec.components if not is_lora(c)},
        "modules": {  # what each module is built from: a client checks options on it
            c: {"class": comp.cls, "config": comp.config}
            for c, comp in spec.components.items()
            if not is_lora(c)
        },
        "loras": {
            c.removeprefix(LORA_PREFIX): {
                "address": f"{ckpt.name}/{c}",
                "expert": comp.config["expert"],
                "file": comp.config["file"],
            }
            for c, comp in spec.components.items()
            if is_lora(c)
        },
        "tokenizer": str(spec.tokenizer) if spec.tokenizer else None,
        "extras": spec.extras,
    }


def _gpus(snap: Snapshot) -> list[dict[str, Any]]:
    """Per GPU with residents: identity, the bytes each resident's slab holds there, and the
    device's free/total memory as the driver reports it (all processes included)."""
    gpus: dict[str, dict[str, Any]] = {}
    for r in snap.residents:
        d = r.device
        if d.uuid is None:
            continue
        g = gpus.setdefault(d.uuid, {"uuid": d.uuid, "index": d.index, "device": d.name})
        g.setdefault("name", d.model)
        names = snap.names_of(r)
        slab = r.slab
        g.setdefault("residents", []).append(
            {
                "resident": r.id,
                "component": r.spec.name,
                "names": names,
                "bytes": slab.nbytes if slab else 0,
                "allocated": slab.size if slab else 0,  # whole granules of the allocation
                "state": r.state,
                "read_only": slab.read_only if slab else None,
            }
        )
    for g in gpus.values():
        g["held_bytes"] = sum(x["allocated"] for x in g["residents"])
        g["free_bytes"], g["total_bytes"] = _memory(g["index"])
    return list(gpus.values())


def _memory(index: int) -> tuple[int | None, int | None]:
    from wand.slabs import cuda

    try:
        return cuda.memory_info(index)
    except WandError:
        return None, None


def _claim(path: Path, endpoint: str) -> None:
    """Make ``path``'s directory safe to listen in, and the path free: refuse a directory
    another user owns or may write to, refuse a live socket, remove a stale one."""
    _safe_directory(path.parent)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise WandError(f"{path} exists and is not a socket; refusing to replace it", "config")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        log.info("removing stale socket %s", path)
        path.unlink(missing_ok=True)
        return
    except OSError as e:
        raise WandError(f"cannot check {path}: {e.strerror}", "config") from None
    finally:
        probe.close()
    raise WandError(f"another wand daemon is already serving at {endpoint}", "forbidden")


def _safe_directory(folder: Path) -> None:
    """The socket directory: every folder above it owned by root or this user and writable by
    no one else unless sticky (checked before anything is created in them); the directory
    itself created 0755 if missing (whatever the umask), else required to be writable by no
    one else (``wand/common/sockdir.py``)."""
    trust = sockdir.daemon_trust()
    _refuse(folder, sockdir.folder_problem(folder, trust))
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    for p in reversed(missing):
        os.mkdir(p, 0o755)
        os.chmod(p, 0o755)
    _refuse(folder, sockdir.folder_problem(folder, trust, strict=True))


def _refuse(folder: Path, problem: str | None) -> None:
    if problem:
        raise WandError(f"socket directory {folder}: {problem}; refusing to listen there", "config")
