"""Shared fixtures: tiny checkpoints on disk and real daemon processes on real sockets."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import pytest
import zmq

import wand
from wand.common import process
from wand.common.errors import WandError

ROOT = Path(__file__).resolve().parent.parent
LAYOUT_CASES = [
    ("t2v-A14B", "original"),
    ("i2v-A14B", "original"),
    ("ti2v-5B", "original"),
    ("t2v-A14B", "diffusers"),
    ("i2v-A14B", "diffusers"),
]


@pytest.fixture(scope="session")
def ckpt_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="wand-ckpt-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny(ckpt_root: Path):
    """``tiny(task, layout)`` → path of a tiny checkpoint, written once per session."""
    from wand.wan import write_tiny

    made: dict[tuple[str, str], Path] = {}

    def make(task: str = "t2v-A14B", layout: str = "original") -> Path:
        if (task, layout) not in made:
            made[task, layout] = write_tiny(ckpt_root / f"{task}-{layout}", task, layout)
        return made[task, layout]

    return make


class Daemon:
    """A ``wand`` process on its own short ipc endpoint."""

    def __init__(self, checkpoint: Path | None, *extra: str, env: dict | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="wand-"))  # short: ipc paths max 107 bytes
        self.endpoint = f"ipc://{self.dir}/wand.sock"
        self.log = self.dir / "daemon.log"
        cmd = [sys.executable, "-m", "wand.daemon", "--endpoint", self.endpoint, *extra]
        if checkpoint is not None:
            cmd += ["--checkpoint", str(checkpoint)]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env={**os.environ, **(env or {})},
            )

    def wait_ready(self, timeout: float = 60.0) -> Daemon:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.output()}")
            try:
                with wand.connect(self.endpoint, timeout=2) as c:
                    states = {comp["state"] for comp in c.status()["components"]}
                if states == {"ready"}:
                    return self
            except WandError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"daemon not ready in {timeout} s:\n{self.output()}")

    def connect(self, timeout: float = 10.0) -> wand.Client:
        return wand.connect(self.endpoint, timeout=timeout)

    def wanctl(self, *args: str) -> subprocess.CompletedProcess:
        return run_wanctl("--endpoint", self.endpoint, *args)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        status = process.stop(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)
        return status


def daemon_slabs(pid: int) -> list[str]:
    """The slabs process ``pid`` holds: its memfd descriptors, by their ``wand:`` names."""
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("/memfd:wand:"):
            found.append(target.removeprefix("/memfd:wand:").removesuffix(" (deleted)"))
    return sorted(found)


def as_nobody(job: Callable[[], bytes]) -> bytes:
    """What ``job`` returns when run in a forked child as uid and gid 65534 (needs root)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(65534)
            os.setuid(65534)
            os.write(w, job())
        finally:
            os._exit(0)
    os.close(w)
    try:
        return os.read(r, 1 << 20)
    finally:
        os.close(r)
        os.waitpid(pid, 0)


def _rchar(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


class Service:
    """The daemon (run with ``args``) under an emulated systemd: notify socket, fd store,
    restarts."""

    def __init__(self, workdir: Path, *args: str, env: dict | None = None) -> None:
        from wand.tools.notifyhost import NotifyHost

        self.host = NotifyHost()
        self.args, self.env, self.dir = list(args), env, workdir
        self.endpoint = f"ipc://{workdir}/wand.sock"
        self.log = workdir / "daemon.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> dict:
        cmd = [sys.executable, "-m", "wand.daemon", *self.args, "--endpoint", self.endpoint]
        self.proc = self.host.start(cmd, self.log, self.env, cwd=ROOT)
        self.host.collect(lambda m: any(x.startswith("READY=1") for x in m[-3:]), timeout=120)
        with wand.connect(self.endpoint) as c:
            status = c.status()
        status["rchar"] = _rchar(self.proc.pid)
        return status

    def crash(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.host.drain()
        self.host.messages.clear()

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.host.close()


class Raw:
    """A bare DEALER on a daemon's endpoint, for sending anything at all."""

    def __init__(self, endpoint: str, timeout_ms: int = 10000) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
        self.sock.connect(endpoint)

    def ask(self, msg: dict) -> dict:
        self.sock.send(msgpack.packb(msg))
        return msgpack.unpackb(self.sock.recv())

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


def run_wanctl(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "wanctl", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def check_config(cache: Path, *flags: str) -> subprocess.CompletedProcess:
    """``wand FLAGS --check-config``, its tokenizer cache in ``cache``."""
    return subprocess.run(
        [sys.executable, "-m", "wand.daemon", *flags, "--check-config"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={**os.environ, "CACHE_DIRECTORY": str(cache)},
    )


def t2v_pipeline(modules: dict, tokenizer: str, scheduler):
    """diffusers' own t2v-A14B pipeline around ``modules`` (component name → module): the
    reference a wand pipeline is compared with."""
    from diffusers import WanPipeline
    from transformers import AutoTokenizer

    return WanPipeline(
        tokenizer=AutoTokenizer.from_pretrained(tokenizer),
        text_encoder=modules["text_encoder"],
        vae=modules["vae"],
        scheduler=scheduler,
        transformer=modules["high_noise_model"],
        transformer_2=modules["low_noise_model"],
        boundary_ratio=0.875,
    )


@pytest.fixture
def start_daemon() -> Iterator:
    """``start_daemon(checkpoint, *flags)`` → a started :class:`Daemon`, stopped at teardown."""
    started: list[Daemon] = []

    def start(checkpoint: Path | None, *extra: str, env: dict | None = None) -> Daemon:
        d = Daemon(checkpoint, *extra, env=env)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


@pytest.fixture(scope="module")
def daemon(tiny) -> Iterator[Daemon]:
    """One ready daemon on the tiny t2v-A14B original checkpoint, shared by a test module."""
    d = Daemon(tiny("t2v-A14B", "original")).wait_ready()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def big_daemon(ckpt_root: Path) -> Iterator[Daemon]:
    """A daemon on a checkpoint wide enough (≈ 90 MB) to see memory figures above noise."""
    from wand.wan import write_tiny

    path = ckpt_root / "t2v-A14B-wide"
    if not path.exists():
        write_tiny(path, "t2v-A14B", "original", width=512, layers=4)
    d = Daemon(path).wait_ready()
    yield d
    d.stop()


@pytest.fixture(scope="session")
def fake_libcuda(tmp_path_factory) -> Path:
    """Path of the fake CUDA driver (tests/fakecuda), built once per session.

    Load it with ``ctypes.CDLL(path)``, or put its folder on LD_LIBRARY_PATH so that a child
    process's ``libcuda.so.1`` is the fake. Skips when gcc or NVIDIA's cuda.h is missing.
    """
    from fakecuda import build

    try:
        return build.build(tmp_path_factory.mktemp("fakecuda"))
    except build.Unavailable as e:
        pytest.skip(f"fake CUDA driver not buildable: {e}")
