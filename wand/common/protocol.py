"""Protocol v1: msgpack maps over ZeroMQ ROUTER (daemon) / DEALER (clients).

Request: ``{"v": 1, "id": <int|str>, "op": <str>, "args": {...}}``, one frame.
Reply:   ``{"v": 1, "id": <echoed>, "ok": true, "result": {...}}`` or
         ``{"v": 1, "id": <echoed>, "ok": false, "error": {"code": <str>, "message": <str>}}``.
No pickle anywhere: only maps with string keys, lists, strings, numbers, booleans and None
travel in requests. Decoding is bounded before anything looks at a request: its size, the
length of every string and container, the nesting depth and the number of items.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack

from wand.common.errors import ProtocolError

VERSION = 1
SUPPORTED_VERSIONS = (1,)
MAX_REQUEST_BYTES = 1 << 20  # larger requests get a "too_large" error reply
TRANSPORT_MAX_BYTES = 4 << 20  # larger ones are dropped by ZeroMQ before we see them
MAX_ID_LENGTH = 128
MAX_DEPTH = 8  # request map → args → a table → ... (the deepest real request has 5)
MAX_ITEMS = 4096  # containers and scalars in one request
MAX_CONTAINER = 1024  # entries in one list or map
_LIMITS = {
    "max_str_len": MAX_REQUEST_BYTES,
    "max_bin_len": MAX_REQUEST_BYTES,
    "max_array_len": MAX_CONTAINER,
    "max_map_len": MAX_CONTAINER,
    "max_ext_len": 0,
}

OPS = (
    "hello",
    "status",
    "list",
    "attach",
    "detach",
    "ps",
    "ping",
    "stop",
    "load",
    "unload",
    "reload",
    "logs",
    "load_lora",
    "unload_lora",
)

# Stable error codes: clients and scripts may match on these strings.
ERRORS: dict[str, str] = {
    "bad_message": "the request is not a well-formed protocol message",
    "too_large": "the request exceeds the size limit",
    "unsupported_version": "the request's protocol version is not spoken here",
    "unknown_op": "no such operation",
    "bad_args": "the operation's arguments are missing or of the wrong type",
    "unknown_component": "no component by that name",
    "ambiguous_component": "a bare component name matches several checkpoints",
    "not_ready": "the component is still loading",
    "failed": "the component failed to load",
    "not_attached": "the caller holds no lease on that component",
    "in_use": "clients hold leases on what the request would take away",
    "revoked": "this process's leases were revoked by a forced unload",
    "config": "the configuration or a checkpoint in it is not usable",
    "checkpoint": "a checkpoint cannot be loaded as it is",
    "device": "the device asked for is not usable here",
    "memory": "there is not enough memory for what was asked",
    "forbidden": "the caller may not do that",
    "busy": "the daemon is at a limit of what it keeps for clients; try again",
    "internal": "the daemon hit an unexpected error",
}


@dataclass
class Request:
    id: int | str
    op: str
    args: dict[str, Any] = field(default_factory=dict)


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def request(req_id: int | str, op: str, args: dict[str, Any] | None = None) -> bytes:
    return pack({"v": VERSION, "id": req_id, "op": op, "args": args or {}})


@dataclass(frozen=True)
class Packed:
    """A value already in msgpack form, spliced into a reply as it is: a component's
    manifest (thousands of rows) is packed once, not at every attach."""

    data: bytes


def ok(req_id: int | str | None, result: Any) -> bytes:
    if not (isinstance(result, dict) and any(isinstance(v, Packed) for v in result.values())):
        return pack({"v": VERSION, "id": req_id, "ok": True, "result": result})
    p = msgpack.Packer(use_bin_type=True)
    head = [p.pack_map_header(4), *map(p.pack, ("v", VERSION, "id", req_id, "ok", True))]
    body = [p.pack("result"), p.pack_map_header(len(result))]
    for key, value in result.items():
        body += [p.pack(key), value.data if isinstance(value, Packed) else p.pack(value)]
    return b"".join(head + body)


def error(req_id: int | str | None, code: str, message: str) -> bytes:
    if code not in ERRORS:
        code = "internal"
    return pack(
        {"v": VERSION, "id": req_id, "ok": False, "error": {"code": code, "message": message}}
    )


def parse_request(body: bytes) -> Request:
    """Decode and validate one request; a :class:`ProtocolError` carries the reply's code.

    The request id is recovered whenever the body is a map with a usable id, so even a
    rejected request gets a reply its sender can match.
    """
    if len(body) > MAX_REQUEST_BYTES:
        raise ProtocolError(
            f"request of {len(body)} bytes exceeds {MAX_REQUEST_BYTES}", "too_large"
        )
    msg = _unpack_map(body, strict=True)
    req_id = msg.get("id")
    if not _valid_id(req_id):
        raise ProtocolError("request needs an 'id' (integer or string up to 128 characters)")
    problem = _bounds(msg) or _check_fields(msg)
    if problem:
        raise _WithId(req_id, *problem)
    return Request(req_id, msg["op"], msg.get("args") or {})


def parse_reply(body: bytes) -> dict[str, Any]:
    msg = _unpack_map(body, strict=False)
    if msg.get("v") != VERSION or "id" not in msg or not isinstance(msg.get("ok"), bool):
        raise ProtocolError("reply is not a protocol v1 message")
    return msg


def request_id_of(exc: ProtocolError) -> int | str | None:
    return exc.req_id if isinstance(exc, _WithId) else None


def short(value: Any, limit: int = 60) -> str:
    """A bounded description of a value a client sent, for messages and logs."""
    if isinstance(value, str | bytes):
        text = repr(value[:limit])
        return text + ("…" if len(value) > limit else "")
    if isinstance(value, bool | int | float) or value is None:
        return repr(value)[:limit]
    return f"a {type(value).__name__}"


class _WithId(ProtocolError):
    def __init__(self, req_id: int | str, message: str, code: str) -> None:
        super().__init__(message, code)
        self.req_id = req_id


def _refuse_ext(code: int, data: bytes) -> None:
    raise ValueError(f"extension type {code} is not accepted")


def _unpack_map(body: bytes, strict: bool) -> dict[str, Any]:
    limits = _LIMITS if strict else {}
    try:
        msg = msgpack.unpackb(body, raw=False, strict_map_key=True, ext_hook=_refuse_ext, **limits)
    except Exception as e:  # msgpack raises many types for garbage
        raise ProtocolError(f"not msgpack: {type(e).__name__}: {str(e)[:120]}") from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"expected a msgpack map, got {type(msg).__name__}")
    return msg


def _bounds(msg: dict[str, Any]) -> tuple[str, str] | None:
    """Depth and item count (iteratively: a deep message must not cost a deep recursion),
    then only string keys and plain scalars: ``bad_message`` around the arguments,
    ``bad_args`` inside them."""
    stack: list[tuple[Any, int]] = [(msg, 1)]
    items = 0
    while stack:
        value, depth = stack.pop()
        items += 1
        if items > MAX_ITEMS:
            return f"request holds more than {MAX_ITEMS} items", "bad_message"
        if isinstance(value, dict | list):
            if depth > MAX_DEPTH:
                return f"request is nested deeper than {MAX_DEPTH} levels", "bad_message"
            stack.extend(
                (v, depth + 1) for v in (value.values() if isinstance(value, dict) else value)
            )
    outer = {k: v for k, v in msg.items() if k != "args"}
    for part, code in ((outer, "bad_message"), (msg.get("args"), "bad_args")):
        problem = _plain(part)
        if problem:
            return problem, code
    return None


def _plain(value: Any) -> str | None:
    """What is wrong, if anything, with the types in ``value`` (already bounded)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            if not all(isinstance(k, str) for k in v):
                return "map keys must be strings"
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
        elif not (isinstance(v, str | int | float | bool) or v is None):
            return f"values of type {type(v).__name__} are not accepted"
    return None


def _valid_id(req_id: Any) -> bool:
    if isinstance(req_id, bool):
        return False
    return isinstance(req_id, int) or (isinstance(req_id, str) and len(req_id) <= MAX_ID_LENGTH)


def _check_fields(msg: dict[str, Any]) -> tuple[str, str] | None:
    version = msg.get("v")
    if version not in SUPPORTED_VERSIONS or isinstance(version, bool):
        return (
            f"protocol version {short(version)} is not supported; this daemon speaks "
            f"{list(SUPPORTED_VERSIONS)}",
            "unsupported_version",
        )
    op = msg.get("op")
    if not isinstance(op, str):
        return "request needs an 'op' string", "bad_message"
    if op not in OPS:
        return f"unknown operation {short(op)}; known: {', '.join(OPS)}", "unknown_op"
    if not isinstance(msg.get("args", {}), dict | None):
        return "'args' must be a map", "bad_message"
    return None


# --- reading a request's arguments ----------------------------------------------------------

MAX_NAME = 512  # component, checkpoint and client names
MAX_PATH = 4096


def text(args: dict[str, Any], key: str, *, required: bool = True, limit: int = MAX_NAME):
    """``args[key]`` as a non-empty string of at most ``limit`` characters (None if absent
    and not required); anything else is a ``bad_args`` error."""
    value = args.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value or len(value) > limit or "\0" in value:
        raise ProtocolError(
            f"'{key}' must be a non-empty string of at most {limit} characters "
            f"without NUL, got {short(value)}",
            "bad_args",
        )
    return value


def flag(args: dict[str, Any], key: str) -> bool:
    value = args.get(key, False)
    if not isinstance(value, bool):
        raise ProtocolError(f"'{key}' must be true or false, got {short(value)}", "bad_args")
    return value


def number(args: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = args.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ProtocolError(
            f"'{key}' must be an integer from {low} to {high}, got {short(value)}", "bad_args"
        )
    return value
