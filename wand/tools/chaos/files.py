"""Phase "files": broken checkpoints, each made from a copy of the tiny one and handed to
``wanctl load`` (the command's own code, run in a process forked from the pre-imported fork
server). Each must be refused with a ``checkpoint``, ``config`` or ``bad_args`` error that
names the file (and the key, where there is one), quickly, with the daemon alive, no code
from the file run and no slab left behind. Load arguments with bytes keys, which ``wanctl``
cannot send, go over a raw socket.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import msgpack
import torch
import zmq

from wand.tools.chaos import Options, forked
from wand.tools.chaos.target import Target
from wand.tools.chaos.verdict import PhaseResult

SHARD = "high_noise_model/diffusion_pytorch_model-00002-of-00006.safetensors"
SHARD_NAME = SHARD.rsplit("/", 1)[1]
T5 = "models_t5_umt5-xxl-enc-bf16.pth"
CONFIG = "high_noise_model/config.json"
TIME_BOUND = 20.0  # seconds a refusal may take
SLAB_SECONDS = 5.0  # for slabs of a refused load to be let go
REFUSAL = re.compile(r"^wanctl: (checkpoint|config|bad_args): ", re.M)
MARKER = "pickle-ran"  # the malicious pickle would create this file beside its checkpoint


@dataclass(frozen=True)
class BadFile:
    name: str
    # (a fresh copy of the tiny checkpoint) → (the path to load, words the error must hold)
    make: Callable[[Path], tuple[Path, tuple[str, ...]]]
    options: tuple[str, ...] = ()  # wanctl load's, beside the path


def run(target: Target, rng: random.Random, opts: Options) -> PhaseResult:
    result = PhaseResult("files")
    loaded = target.checkpoints()
    before = target.footprint()
    times: list[float] = []
    outcomes: dict[str, str] = {}
    pickle_ran = False
    for case in CASES:
        folder = target.work / "files" / case.name
        path, words = case.make(_copy(target.checkpoint, folder / "ckpt"))
        argv = [*case.options, str(path)]
        seconds, outcome = _load(target, argv, words, folder / "wanctl.out", result, case.name)
        _after(target, before.slabs, loaded, result, case.name)
        ran = (folder / MARKER).exists()
        result.check(not ran, f"{case.name}: a command in the checkpoint ran")
        pickle_ran |= ran
        times.append(seconds)
        outcomes[case.name] = outcome
        shutil.rmtree(folder, ignore_errors=True)
    outcomes.update(_raw_loads(target, result))
    _after(target, before.slabs, loaded, result, "bytes keys")
    result.count = len(outcomes)
    refused = sum(o.split()[0] in ("checkpoint", "config", "bad_args") for o in outcomes.values())
    result.figures.update(
        refused=f"{refused}/{len(outcomes)}",
        max_seconds=round(max(times), 2),
        slabs=[before.slabs, target.footprint().slabs],
        pickle_ran=pickle_ran,
        cases=outcomes,
    )
    return result


def _load(
    target: Target,
    args: list[str],
    words: tuple[str, ...],
    out: Path,
    result: PhaseResult,
    name: str,
) -> tuple[float, str]:
    """``wanctl load *args``: (seconds, the error code or what went wrong)."""
    argv = ["--endpoint", target.endpoint, "--timeout", str(TIME_BOUND), "load", "--name"]
    argv += ["chaos-bad", *args]
    start = time.monotonic()
    proc, conn = forked.start(wanctl, argv, str(out))
    conn.close()
    proc.join(TIME_BOUND)
    seconds = time.monotonic() - start
    if proc.exitcode is None:
        forked.kill(proc)
        result.fail(f"{name}: wanctl load {' '.join(args)} did not return in {TIME_BOUND:g} s")
        return seconds, "hung"
    text = out.read_text(errors="replace").strip()
    refusal = REFUSAL.search(text)
    missing = [w for w in words if w not in text]
    if "Traceback" in text:
        said = f"it crashed: {text.splitlines()[-1][:300]}"
    else:
        said = f"its error lacks {missing}: {text[-300:]}" if missing else text[-300:]
    result.check(
        proc.exitcode == 1 and refusal is not None and "Traceback" not in text and not missing,
        f"{name}: wanctl load {' '.join(args)} exited {proc.exitcode}; {said}",
    )
    return seconds, f"{refusal.group(1) if refusal else 'not refused'} {seconds:.2f}s"


def _after(target: Target, slabs: int, loaded: list[str], result: PhaseResult, name: str) -> None:
    """After a refusal: nothing loaded, no slab left (a loaded one is unloaded again)."""
    added = [c for c in target.checkpoints() if c not in loaded]
    for ckpt in added:
        target.client.request("unload", name=ckpt, force=True)
    result.check(not added, f"{name}: the load was not refused: {added} got loaded")
    deadline = time.monotonic() + SLAB_SECONDS
    while target.footprint().slabs != slabs and time.monotonic() < deadline:
        time.sleep(0.05)
    now = target.footprint().slabs
    result.check(now == slabs, f"{name}: the daemon holds {now} slabs, {slabs} before")


def wanctl(argv: list[str], out: str, conn: Connection) -> None:
    """``wanctl *argv`` as the command runs it, stdout and stderr into the file ``out``."""
    conn.close()
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from wanctl.cli import main

    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _raw_loads(target: Target, result: PhaseResult) -> dict[str, str]:
    """``load`` requests ``wanctl`` cannot make: the real tiny checkpoint with bytes keys
    among the arguments (bad_args), and a symlink loop as the path itself (checkpoint)."""
    path = str(target.checkpoint)
    loop = _loop(target.work / "files" / "raw")
    cases = {
        "bytes key name": ({"path": path, b"name": "chaos-bytes"}, "bad_args"),
        "bytes key path": ({b"path": path, "name": "chaos-bytes"}, "bad_args"),
        "bytes key device": (
            {"path": path, "name": "chaos-bytes", "device": {b"*": "cpu"}},
            "bad_args",
        ),
        "symlink loop, raw": ({"path": str(loop), "name": "chaos-loop"}, "checkpoint"),
    }
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(target.endpoint)
    outcomes = {}
    try:
        for i, (name, (args, expected)) in enumerate(cases.items()):
            sock.send(msgpack.packb({"v": 1, "id": i, "op": "load", "args": args}))
            reply = msgpack.unpackb(sock.recv()) if sock.poll(TIME_BOUND * 1000) else None
            code = (reply.get("error") or {}).get("code") if reply else "no reply"
            result.check(code == expected, f"{name}: load answered {reply!r:.300}")
            outcomes[name] = str(code)
    finally:
        sock.close()
    return outcomes


# --- the broken checkpoints ---------------------------------------------------------------


def _copy(tiny: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copytree(tiny, dest))


def _header(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write(path: Path, header: dict[str, Any], data: bytes) -> None:
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)


Edit = Callable[[dict[str, Any], dict[str, Any]], None]  # (first entry, second entry)


def _header_case(name: str, edit: Edit, words: str) -> BadFile:
    """A shard whose header entry for one tensor is edited (given another of its size)."""

    def make(ckpt: Path) -> tuple[Path, tuple[str, ...]]:
        shard = ckpt / SHARD
        header, data = _header(shard)
        sizes: dict[int, list[str]] = {}
        for key, entry in header.items():
            if key != "__metadata__":
                start, end = entry["data_offsets"]
                sizes.setdefault(end - start, []).append(key)
        first, second = next(v for v in sizes.values() if len(v) >= 2)[:2]
        edit(header[first], header[second])
        _write(shard, header, data)
        return ckpt, (str(shard.resolve()), repr(first), words)

    return BadFile(name, make)


def _file_case(name: str, change: Callable[[Path], None], relative: str, *words: str) -> BadFile:
    """A checkpoint with the file ``relative`` changed by ``change``; ``{file}`` in ``words``
    stands for its full path."""

    def make(ckpt: Path) -> tuple[Path, tuple[str, ...]]:
        change(ckpt / relative)
        file = str((ckpt / relative).resolve())
        return ckpt, tuple(w.replace("{file}", file) for w in words)

    return BadFile(name, make)


def _path_case(name: str, path: Callable[[Path], Path], words: str) -> BadFile:
    """A checkpoint path that is no folder one can read."""

    def make(ckpt: Path) -> tuple[Path, tuple[str, ...]]:
        return path(ckpt), (words,)

    return BadFile(name, make)


def _as_is(*words: str) -> Callable[[Path], tuple[Path, tuple[str, ...]]]:
    """The checkpoint unchanged (its options are what is wrong)."""
    return lambda ckpt: (ckpt, words)


def _set(**fields: Callable[[dict[str, Any], dict[str, Any]], Any]) -> Edit:
    def edit(first: dict[str, Any], second: dict[str, Any]) -> None:
        for field, value in fields.items():
            first[field] = value(first, second)

    return edit


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 1)


def _empty(path: Path) -> None:
    os.truncate(path, 0)


def _huge_header_length(path: Path) -> None:
    with open(path, "r+b") as f:
        f.write(struct.pack("<Q", 2**62))


def _garbled_header(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    raw[8 : 8 + n] = b"{" * n
    path.write_bytes(bytes(raw))


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _device(path: Path) -> None:
    path.unlink()
    path.symlink_to("/dev/zero")


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _missing(path: Path) -> None:
    path.unlink()


def _not_json(path: Path) -> None:
    path.write_text('{"dim": 16, ')


class _Evil:
    """Unpickled, this would run ``touch <work>/pickle-ran``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def _malicious_pickle(path: Path) -> None:
    marker = path.parent.parent / MARKER  # <case folder>/ckpt/<file>
    torch.save({"shared.weight": _Evil(marker)}, path)


def _loop(beside: Path) -> Path:
    """A symlink to itself, beside ``beside``."""
    loop = beside.parent / "loop"
    loop.parent.mkdir(parents=True, exist_ok=True)
    loop.symlink_to(loop)
    return loop


def _long(ckpt: Path) -> Path:
    return ckpt.parent / ("x" * 300)


CASES = (
    _header_case(
        "negative offset",
        _set(data_offsets=lambda a, b: [-8, a["data_offsets"][1] - 8]),
        "data_offsets",
    ),
    _header_case("overlap", _set(data_offsets=lambda a, b: b["data_offsets"]), "overlap"),
    _header_case(
        "int for float",
        _set(dtype=lambda a, b: "I32" if a["dtype"] == "F32" else "I16"),
        "stored as",
    ),
    _header_case(
        "negative dim", _set(shape=lambda a, b: [-1, *a["shape"][1:]]), "negative dimension"
    ),
    _header_case(
        "wrong size", _set(shape=lambda a, b: [*a["shape"][:-1], a["shape"][-1] * 2]), "spans"
    ),
    _header_case("unknown dtype", _set(dtype=lambda a, b: "F128"), "unknown dtype"),
    _header_case("shape not a list", _set(shape=lambda a, b: "big"), "shape"),
    _file_case("truncated shard", _truncate, SHARD, "{file}", "truncated"),
    _file_case("empty shard", _empty, SHARD, "{file}", "truncated"),
    _file_case("huge header length", _huge_header_length, SHARD, "{file}", "corrupt"),
    _file_case("garbled header", _garbled_header, SHARD, "{file}", "corrupt"),
    # a shard the index names must be a regular file; what it is instead is not said
    _file_case("missing shard", _missing, SHARD, SHARD_NAME, "missing"),
    _file_case("shard is a directory", _directory, SHARD, SHARD_NAME),
    _file_case("shard is /dev/zero", _device, SHARD, SHARD_NAME),
    _file_case("T5 is /dev/zero", _device, T5, "{file}", "a character device"),
    _file_case("config.json is a FIFO", _fifo, CONFIG, "{file}", "a FIFO"),
    _file_case("config.json not JSON", _not_json, CONFIG, "{file}", "invalid JSON"),
    _file_case("malicious pickle", _malicious_pickle, T5, "{file}", "cannot read torch"),
    _path_case("symlink loop", _loop, "too many levels of symbolic links"),
    _path_case("over-long path", _long, "File name too long"),
    _path_case("a file, not a folder", lambda ckpt: ckpt / T5, "not a folder"),
    # the tiny checkpoint itself, unbroken, with arguments that do not fit it
    BadFile("wrong task", _as_is("asked for task"), ("--task", "ti2v-5B")),
    BadFile("no such GPU", _as_is("cuda:99"), ("--device", "cuda:99")),
    BadFile("integer dtype", _as_is("not a floating-point dtype"), ("--dtype", "vae=int8")),
    BadFile("dtype of no component", _as_is("no component"), ("--dtype", "nope=float32")),
)
