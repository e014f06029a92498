"""Protocol v1: msgpack maps over ZeroMQ ROUTER (daemon) / DEALER (clients).

Request: ``{"v": 1, "id": <int|str>, "op": <str>, "args": {...}}``, one frame.
Reply:   ``{"v": 1, "id": <echoed>, "ok": true, "result": {...}}`` or
         ``{"v": 1, "id": <echoed>, "ok": false, "error": {"code": <str>, "message": <str>}}``.
No pickle anywhere: only maps, lists, strings, numbers, booleans and None travel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack

from wand.errors import ProtocolError

VERSION = 1
SUPPORTED_VERSIONS = (1,)
MAX_REQUEST_BYTES = 1 << 20  # larger requests get a "too_large" error reply
TRANSPORT_MAX_BYTES = 64 << 20  # larger ones are dropped by ZeroMQ before we see them
MAX_ID_LENGTH = 128

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
    "forbidden": "the caller may not do that",
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


def ok(req_id: int | str | None, result: Any) -> bytes:
    return pack({"v": VERSION, "id": req_id, "ok": True, "result": result})


def error(req_id: int | str | None, code: str, message: str) -> bytes:
    assert code in ERRORS, code
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
    msg = _unpack_map(body)
    req_id = msg.get("id")
    if not _valid_id(req_id):
        raise ProtocolError("request needs an 'id' (integer or string up to 128 characters)")
    err = _check_fields(msg)
    if err:
        raise _WithId(req_id, *err)
    return Request(req_id, msg["op"], msg.get("args") or {})


def parse_reply(body: bytes) -> dict[str, Any]:
    msg = _unpack_map(body)
    if msg.get("v") != VERSION or "id" not in msg or not isinstance(msg.get("ok"), bool):
        raise ProtocolError("reply is not a protocol v1 message")
    return msg


def request_id_of(exc: ProtocolError) -> int | str | None:
    return exc.req_id if isinstance(exc, _WithId) else None


class _WithId(ProtocolError):
    def __init__(self, req_id: int | str, message: str, code: str) -> None:
        super().__init__(message, code)
        self.req_id = req_id


def _unpack_map(body: bytes) -> dict[str, Any]:
    try:
        msg = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises many types for garbage
        raise ProtocolError(f"not msgpack: {type(e).__name__}: {e}") from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"expected a msgpack map, got {type(msg).__name__}")
    return msg


def _valid_id(req_id: Any) -> bool:
    if isinstance(req_id, bool):
        return False
    return isinstance(req_id, int) or (isinstance(req_id, str) and len(req_id) <= MAX_ID_LENGTH)


def _check_fields(msg: dict[str, Any]) -> tuple[str, str] | None:
    version = msg.get("v")
    if version not in SUPPORTED_VERSIONS:
        return (
            f"protocol version {version!r} is not supported; this daemon speaks "
            f"{list(SUPPORTED_VERSIONS)}",
            "unsupported_version",
        )
    op = msg.get("op")
    if not isinstance(op, str):
        return "request needs an 'op' string", "bad_message"
    if op not in OPS:
        return f"unknown operation {op!r}; known: {', '.join(OPS)}", "unknown_op"
    if not isinstance(msg.get("args", {}), dict | None):
        return "'args' must be a map", "bad_message"
    return None
