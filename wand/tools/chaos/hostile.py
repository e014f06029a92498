"""Hostile requests, seeded: garbage, broken msgpack and every operation with arguments
chosen to hurt. Each :class:`Case` says which replies are acceptable.

Nothing here asks for a real ``stop``, unloads a loaded checkpoint or loads a real one:
``stop`` is only sent in forms that must be refused before it runs (if one is not, the
daemon stops and the suite reports it dead), ``unload`` only names checkpoints that are not
loaded, ``load`` only paths that are no checkpoint.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from dataclasses import dataclass
from itertools import count
from typing import Any

import msgpack

from wand.common import protocol

REFUSED = frozenset(protocol.ERRORS) - {"internal"}
ANSWERED = REFUSED | {"ok"}
BAD_MESSAGE = frozenset({"bad_message"})
BAD_ARGS = frozenset({"bad_args"})
# a few sizes just over the request limit and just under the transport limit: few enough
# that the warm-up sees each and the daemon's allocator has grown for them all
TOO_LARGE = (
    protocol.MAX_REQUEST_BYTES + 1,
    2 * protocol.MAX_REQUEST_BYTES,
    protocol.TRANSPORT_MAX_BYTES - 4096,
)
LOG_RECORDS = 2000  # the daemon keeps its last 2000 log records (wand.daemon.logs.RingBuffer)
MISSING = object()  # a field left out of a request


@dataclass(frozen=True)
class Case:
    family: str
    frames: tuple[bytes, ...]
    id: Any  # the id a reply may echo (a reply may always say null)
    codes: frozenset[str]  # acceptable outcomes: error codes, and "ok" for a result

    def describe(self) -> str:
        head = self.frames[0][:80] if self.frames else b""
        more = f" (+{len(self.frames) - 1} frames)" if len(self.frames) > 1 else ""
        return f"{self.family} #{self.id}: {head!r}{more} ({sum(map(len, self.frames))} bytes)"


@dataclass(frozen=True)
class Daemon:
    """What the generator must know of the daemon: names to use and names to spare."""

    components: tuple[str, ...]  # addresses, e.g. t2v-A14B/vae
    checkpoints: tuple[str, ...]  # loaded: never unloaded
    start: int  # this process's start time, for requests that should pass that check


BAD_PATHS = (
    "/",
    "/nonexistent/checkpoint",
    "/dev/null",
    "/dev/zero",
    "/proc/self",
    "/proc/self/fd/0",
    "relative/nope",
    "../../../../etc",
    "/" * 4097,
    "x" * 5000,
    "/tmp/\u202ereversed",
    "/tmp/ünï\u0301côdé\U0001f984",
)
ODD_TEXT = (
    "",
    " ",
    "\u202evae",  # right-to-left override
    "v\u200bae",  # zero width space
    "vae\u0301",  # combining accent
    "\ufeffvae",
    "\U0010ffff",
    "\ufffe\uffff",
    "\U0001f984" * 300,
    "x" * 129,
    "x" * 5000,
    "a/b/c",
    "../vae",
    "vae\0",
    "%s%n%x",
    "'; DROP TABLE clients; --",
)
HUGE_INTS = (2**64 - 1, 2**63, 2**63 - 1, -(2**63), -1, 0)
FLOATS = (float("nan"), float("inf"), float("-inf"), -0.0, 1e308, 1.0)
# ops and the argument keys they read ("start", read for every op, is added separately)
ARG_KEYS: dict[str, tuple[str, ...]] = {
    "hello": ("client", "versions"),
    "status": (),
    "list": (),
    "ps": (),
    "ping": (),
    "attach": ("name", "writable"),
    "detach": ("name",),
    "load": ("path", "name", "task", "device", "dtype"),
    "unload": ("name", "force"),
    "reload": (),
    "logs": ("since", "limit"),
}
# how often each op's turn comes among the op-argument cases: reload reads every file
OP_WEIGHTS = {op: 1.0 for op in ARG_KEYS} | {"reload": 0.1, "load": 0.5}
CANNOT_SUCCEED = {"load", "unload"}  # by construction of their arguments
SAFE_OPS = ("ping", "status", "list", "ps", "logs", "hello")  # for envelope mutations
ENVELOPE_MUTATIONS: tuple[tuple[str, Any, frozenset[str]], ...] = (
    *(("v", v, frozenset({"unsupported_version"})) for v in ("1", 2, 0, -1, True, 1.5, [1])),
    ("v", MISSING, frozenset({"unsupported_version"})),
    *(("id", v, BAD_MESSAGE) for v in (1.5, True, None, [1], {"a": 1}, b"id", "x" * 129)),
    ("id", MISSING, BAD_MESSAGE),
    *(("op", v, BAD_MESSAGE) for v in (5, None, [], b"ping", True, {"op": "ping"})),
    *(("op", v, frozenset({"unknown_op"})) for v in ("PING", "", "ping\0", "x" * 1000)),
    ("op", MISSING, BAD_MESSAGE),
    *(("args", v, BAD_MESSAGE) for v in ([], "x", 5, True, 1.5)),
    ("args", b"args", BAD_ARGS),  # the type check inside the arguments comes first
)


class Hostile:
    """An endless, seeded supply of hostile cases (:meth:`next`)."""

    def __init__(self, rng: random.Random, daemon: Daemon) -> None:
        self.rng = rng
        self.daemon = daemon
        self._ids = count(1)
        self._ops = list(OP_WEIGHTS)
        self._families: dict[str, tuple[float, Callable[[int], Case]]] = {
            "random_bytes": (8, self.random_bytes),
            "truncated": (8, self.truncated),
            "trailing_garbage": (3, self.trailing_garbage),
            "not_a_map": (3, self.not_a_map),
            "wrong_types": (12, self.wrong_types),
            "depth_bomb": (5, self.depth_bomb),
            "item_bomb": (3, self.item_bomb),
            "huge_ints": (4, self.huge_ints),
            "bad_utf8": (5, self.bad_utf8),
            "ext_types": (4, self.ext_types),
            "bin_values": (3, self.bin_values),
            "bytes_keys": (4, self.bytes_keys),
            "multipart": (5, self.multipart),
            "op_args": (30, self.op_args),
            "stop_refused": (3, self.stop_refused),
            "too_large": (0.5, self.too_large),
        }

    def next(self) -> Case:
        names = list(self._families)
        weights = [self._families[n][0] for n in names]
        family = self.rng.choices(names, weights)[0]
        return self._families[family][1](next(self._ids))

    # --- garbage -----------------------------------------------------------------------

    def random_bytes(self, i: int) -> Case:
        return Case("random_bytes", (self.rng.randbytes(self.rng.randint(0, 300)),), None, REFUSED)

    def truncated(self, i: int) -> Case:
        body = self._request(i, self.rng.choice(SAFE_OPS), self._args("ping"))
        return Case("truncated", (body[: self.rng.randrange(len(body))],), None, BAD_MESSAGE)

    def trailing_garbage(self, i: int) -> Case:
        body = self._request(i, "ping", {})
        return Case("trailing_garbage", (body + self.rng.randbytes(8),), None, BAD_MESSAGE)

    def not_a_map(self, i: int) -> Case:
        value = self.rng.choice([[1, "ping", {}], "ping", 5, None, True, 1.5, b"\x00" * 10])
        return Case("not_a_map", (protocol.pack(value),), None, BAD_MESSAGE)

    def multipart(self, i: int) -> Case:
        parts = [
            self.rng.choice([b"", self._request(i, "ping", {}), self.rng.randbytes(20)])
            for _ in range(self.rng.randint(2, 5))
        ]
        return Case("multipart", tuple(parts), None, BAD_MESSAGE)

    def too_large(self, i: int, size: int | None = None) -> Case:
        pad = "x" * (size or self.rng.choice(TOO_LARGE))
        body = self._request(i, "ping", {"pad": pad})
        return Case("too_large", (body,), None, frozenset({"too_large"}))

    def priming(self) -> list[Case]:
        """What the daemon keeps a bounded amount of, filled before its memory is compared:
        a too-large request of each size, and failed loads to fill its log ring (each is
        logged)."""
        large = [self.too_large(next(self._ids), size) for size in TOO_LARGE * 3]
        logged = [
            Case("priming", (self._request(i, "load", {"path": BAD_PATHS[1]}),), i, REFUSED)
            for i in (next(self._ids) for _ in range(LOG_RECORDS))
        ]
        return large + logged

    # --- well-formed msgpack, wrong protocol -------------------------------------------

    def wrong_types(self, i: int) -> Case:
        key, value, codes = self.rng.choice(ENVELOPE_MUTATIONS)
        msg: dict[Any, Any] = {"v": 1, "id": i, "op": self.rng.choice(SAFE_OPS), "args": {}}
        if value is MISSING:
            del msg[key]
        else:
            msg[key] = value
        echoed = msg.get("id") if key != "id" else None
        return Case(f"wrong_types:{key}", (protocol.pack(msg),), echoed, codes)

    def depth_bomb(self, i: int) -> Case:
        depth = self.rng.choice([protocol.MAX_DEPTH + 1, 50, 1000, 100_000])
        leaf = self.rng.choice([b"\x91", b"\x81\xa1k"]) * depth + b"\xc0"  # [[[...]]] / {k:{k:..}}
        where = self.rng.choice(["v", "id", "op", "args", "arg"])
        fields = {"v": _p(1), "id": _p(i), "op": _p("ping"), "args": _p({})}
        if where == "arg":
            fields["args"] = b"\x81" + _p("name") + leaf
        else:
            fields[where] = leaf
        return Case(f"depth_bomb:{where}", (_raw_map(fields),), i, BAD_MESSAGE)

    def item_bomb(self, i: int) -> Case:
        args = self.rng.choice(
            [
                {"k": [0] * (protocol.MAX_CONTAINER + 1)},
                {f"k{j}": [0] * 1000 for j in range(5)},
                {f"k{j}": j for j in range(protocol.MAX_CONTAINER + 1)},
            ]
        )
        return Case("item_bomb", (self._request(i, "ping", args),), i, BAD_MESSAGE)

    def huge_ints(self, i: int) -> Case:
        value = self.rng.choice(HUGE_INTS)
        where = self.rng.choice(["id", "v", "since", "limit", "start"])
        if where == "id":
            return Case("huge_ints:id", (self._request(value, "ping", {}),), value, ANSWERED)
        if where == "v":
            msg = {"v": value, "id": i, "op": "ping"}
            unsupported = frozenset({"unsupported_version"})
            return Case("huge_ints:v", (protocol.pack(msg),), i, unsupported)
        op = "logs" if where in ("since", "limit") else self.rng.choice(SAFE_OPS)
        return Case(f"huge_ints:{where}", (self._request(i, op, {where: value}),), i, ANSWERED)

    def bad_utf8(self, i: int) -> Case:
        junk = self.rng.choice([b"\xed\xa0\x80", b"\xff\xfe", b"\xc0\x80", b"va\xe9", b"\x80"])
        text = _raw_str(junk)
        where = self.rng.choice(["op", "key", "arg", "argkey", "id"])
        fields = {"v": _p(1), "id": _p(i), "op": _p("hello"), "args": _p({})}
        if where == "key":
            fields[junk] = _p(1)
        elif where == "arg":
            fields["args"] = b"\x81" + _p("client") + text
        elif where == "argkey":
            fields["args"] = b"\x81" + text + _p("x")
        else:
            fields[where] = text
        return Case(f"bad_utf8:{where}", (_raw_map(fields),), None, BAD_MESSAGE)

    def ext_types(self, i: int) -> Case:
        ext = self.rng.choice([msgpack.ExtType(1, b"x"), msgpack.Timestamp(0, 0)])
        where = self.rng.choice(["id", "op", "args"])
        msg: dict[str, Any] = {"v": 1, "id": i, "op": "ping", "args": {"name": ext}}
        if where != "args":
            msg[where] = ext
        return Case(f"ext_types:{where}", (protocol.pack(msg),), None, BAD_MESSAGE)

    def bin_values(self, i: int) -> Case:
        where = self.rng.choice(["id", "op", "arg", "v"])
        msg: dict[str, Any] = {"v": 1, "id": i, "op": "attach", "args": {}}
        if where == "arg":
            msg["args"] = {"name": b"vae", "start": self.daemon.start}
            return Case("bin_values:arg", (protocol.pack(msg),), i, BAD_ARGS)
        msg[where] = b"\x01"
        echoed = None if where == "id" else i
        return Case(f"bin_values:{where}", (protocol.pack(msg),), echoed, BAD_MESSAGE)

    def bytes_keys(self, i: int) -> Case:
        if self.rng.random() < 0.5:
            msg: dict[Any, Any] = {"v": 1, "id": i, "op": "ping", b"args": {}}
            return Case("bytes_keys:outer", (protocol.pack(msg),), i, BAD_MESSAGE)
        args = {b"name": "vae", "name": "vae", "start": self.daemon.start}
        body = protocol.pack({"v": 1, "id": i, "op": "attach", "args": args})
        return Case("bytes_keys:args", (body,), i, BAD_ARGS)

    # --- every operation, with hostile arguments -----------------------------------------

    def op_args(self, i: int) -> Case:
        op = self.rng.choices(self._ops, [OP_WEIGHTS[o] for o in self._ops])[0]
        args = self._args(op)
        codes = REFUSED if op in CANNOT_SUCCEED else ANSWERED
        return Case(f"op_args:{op}", (self._request(i, op, args),), i, codes)

    def stop_refused(self, i: int) -> Case:
        """``stop`` in forms every one of which must be refused before it runs."""
        start = self.daemon.start
        variant = self.rng.randrange(5)
        args: Any = [
            {b"k": 1},
            {"start": "yesterday"},
            {"start": start + 1 + self.rng.randrange(10**6)},  # another process's start time
            {"start": True},
            {"deep": _nested(protocol.MAX_DEPTH + 2)},
        ][variant]
        codes = BAD_MESSAGE if variant == 4 else BAD_ARGS
        return Case("stop_refused", (self._request(i, "stop", args),), i, codes)

    def _args(self, op: str) -> dict[str, Any]:
        rng = self.rng
        args = {k: self._value(op, k) for k in ARG_KEYS[op] if rng.random() < 0.8}
        if rng.random() < 0.7:
            args["start"] = self.daemon.start if rng.random() < 0.6 else self._any()
        if rng.random() < 0.2:
            args[rng.choice(ODD_TEXT)[:100]] = self._any()
        return args

    def _value(self, op: str, key: str) -> Any:
        rng = self.rng
        if key == "path":
            return rng.choice(BAD_PATHS) if rng.random() < 0.7 else self._non_text()
        if key == "name" and op in ("attach", "detach") and rng.random() < 0.5:
            name = rng.choice(self.daemon.components)
            return name.split("/", 1)[1] if rng.random() < 0.5 else name
        if key == "name" and op == "unload":
            name = self._any()
            return name + "-not-loaded" if name in self.daemon.checkpoints else name
        if key == "versions" and rng.random() < 0.3:
            return [protocol.VERSION]
        return self._any()

    def _any(self) -> Any:
        """A hostile value of any type."""
        rng = self.rng
        kind = rng.randrange(6)
        if kind == 0:
            return rng.choice(ODD_TEXT)
        if kind == 1:
            return rng.choice(HUGE_INTS + (rng.randint(-(2**31), 2**31),))
        if kind == 2:
            return rng.choice(FLOATS)
        if kind == 3:
            return rng.choice([None, True, False])
        if kind == 4:
            return rng.choice([[], [1] * rng.randint(1, 100), [[["x"]]], ["cpu", None]])
        return rng.choice([{}, {"*": 3}, {"": ""}, {"*": "cuda:99"}, {"vae": "int8"}])

    def _non_text(self) -> Any:
        value = self._any()
        return value if not isinstance(value, str) else [value]

    def _request(self, req_id: Any, op: str, args: Any) -> bytes:
        return protocol.pack({"v": protocol.VERSION, "id": req_id, "op": op, "args": args})


def _p(value: Any) -> bytes:
    return protocol.pack(value)


def _raw_str(data: bytes) -> bytes:
    """A msgpack str whose bytes are ``data`` as they are (invalid UTF-8 included)."""
    return (
        bytes([0xA0 | len(data)]) if len(data) < 32 else b"\xda" + struct.pack(">H", len(data))
    ) + data


def _raw_map(fields: dict[Any, bytes]) -> bytes:
    """A msgpack map of already packed values; keys are packed here (bytes keys raw, as str)."""
    out = bytes([0x80 | len(fields)])
    for key, value in fields.items():
        out += (_raw_str(key) if isinstance(key, bytes) else _p(key)) + value
    return out


def _nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value
