"""Protocol v1 against a real daemon: every bad message gets an error reply, the daemon stays up."""

from __future__ import annotations

import msgpack
import pytest
import zmq
from conftest import Raw

from wand.common import protocol
from wand.common.process import own_start

START = own_start()


@pytest.fixture
def raw(daemon):
    """A bare DEALER socket on the daemon's endpoint, for sending anything at all."""
    r = Raw(daemon.endpoint, timeout_ms=5000)
    yield r.sock
    r.close()


def exchange(sock, *frames: bytes) -> dict:
    sock.send_multipart(list(frames))
    return msgpack.unpackb(sock.recv())


def assert_error(reply: dict, code: str, req_id=None) -> None:
    assert reply["v"] == 1 and reply["ok"] is False, reply
    assert reply["error"]["code"] == code, reply
    assert reply["error"]["message"]
    assert reply["id"] == req_id


def assert_alive(daemon) -> None:
    with daemon.connect() as c:
        assert c.ping() < 5


@pytest.mark.parametrize(
    "body",
    [
        b"\xc1garbage",  # 0xc1 is never valid msgpack
        b"",
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"v": 1, "op": "ping"}),  # no id
        msgpack.packb({"v": 1, "id": True, "op": "ping"}),
        msgpack.packb({1: 2}),  # int keys are refused by strict_map_key
        b"\xdd\xff\xff\xff\xff",  # array32 claiming 4 G elements
    ],
)
def test_garbage_gets_bad_message(daemon, raw, body):
    assert_error(exchange(raw, body), "bad_message")
    assert_alive(daemon)


def test_multipart_gets_bad_message(daemon, raw):
    assert_error(exchange(raw, protocol.request(1, "ping"), b"extra"), "bad_message")


@pytest.mark.parametrize(
    ("msg", "code"),
    [
        ({"v": 2, "id": 7, "op": "ping"}, "unsupported_version"),
        ({"id": 7, "op": "ping"}, "unsupported_version"),
        ({"v": 1, "id": 7, "op": "format_disk"}, "unknown_op"),
        ({"v": 1, "id": 7, "op": 5}, "bad_message"),
        ({"v": 1, "id": 7, "op": "ping", "args": [1]}, "bad_message"),
        ({"v": 1, "id": 7, "op": "attach", "args": {"name": 12}}, "bad_args"),
        ({"v": 1, "id": 7, "op": "attach", "args": {}}, "bad_args"),
        (
            {"v": 1, "id": 7, "op": "attach", "args": {"name": "nope", "start": START}},
            "unknown_component",
        ),
        (
            {"v": 1, "id": 7, "op": "detach", "args": {"name": "vae", "start": START}},
            "not_attached",
        ),
        ({"v": 1, "id": 7, "op": "hello", "args": {"versions": [9]}}, "unsupported_version"),
    ],
)
def test_bad_requests_keep_their_id(daemon, raw, msg, code):
    assert_error(exchange(raw, msgpack.packb(msg)), code, req_id=7)
    assert_alive(daemon)


def test_string_ids_are_echoed(raw):
    reply = exchange(raw, protocol.request("req-42", "ping"))
    assert reply["ok"] and reply["id"] == "req-42"


def test_oversized_request_gets_too_large(daemon, raw):
    body = msgpack.packb({"v": 1, "id": 3, "op": "ping", "args": {"pad": "x" * (2 << 20)}})
    assert_error(exchange(raw, body), "too_large")
    assert_alive(daemon)


def test_request_over_transport_limit_is_dropped_and_daemon_stays_up(daemon, raw):
    raw.send(b"\x00" * (protocol.TRANSPORT_MAX_BYTES + 1024))
    with pytest.raises(zmq.Again):
        raw.recv()  # ZeroMQ drops the peer without delivering the message
    assert_alive(daemon)


def test_unknown_component_message_lists_what_is_loaded(daemon):
    from wand.common.errors import DaemonError

    with daemon.connect() as c, pytest.raises(DaemonError) as e:
        c.attach("t5")
    assert e.value.code == "unknown_component"
    assert "t2v-A14B/high_noise_model" in str(e.value)


def test_a_packed_value_in_a_reply_reads_like_the_value_itself():
    """The daemon splices each manifest into attach replies already packed."""
    man = {"tensors": [["w", "bfloat16", [2, 3], [3, 1], 0]], "config": {"a": None}}
    result = {"name": "c/x", "handle": {"ticket": "t"}, "manifest": man}
    spliced = {**result, "manifest": protocol.Packed(protocol.pack(man))}
    for req_id in (7, "s" * 100):
        want = protocol.parse_reply(protocol.ok(req_id, result))
        assert protocol.parse_reply(protocol.ok(req_id, spliced)) == want
        assert want["result"] == result and want["id"] == req_id
