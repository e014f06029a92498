"""A daemon in a memory cgroup with the OOM killer on: a checkpoint too big for the limit is
a ``memory`` error naming the figures, and the daemon keeps serving (before the check, the
kernel killed it while it reserved the slab)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from wand.common.sizes import size
from wand.wan import write_tiny

CGROUP = Path("/sys/fs/cgroup")


class MemoryCgroup:
    """A transient memory cgroup of its own: v2 where the root offers the memory controller,
    else v1's memory hierarchy."""

    def __init__(self) -> None:
        name = f"wand-test-{uuid.uuid4().hex[:8]}"
        v2 = "memory" in _read(CGROUP / "cgroup.subtree_control").split()
        self.path = CGROUP / name if v2 else CGROUP / "memory" / name
        self.limit_file, self.usage_file = (
            ("memory.max", "memory.current")
            if v2
            else ("memory.limit_in_bytes", "memory.usage_in_bytes")
        )
        if not v2 and not (CGROUP / "memory" / self.limit_file).exists():
            raise OSError("no memory controller, v2 or v1, under /sys/fs/cgroup")
        self.path.mkdir()
        swap = self.path / ("memory.swap.max" if v2 else "memory.memsw.limit_in_bytes")
        if v2 and swap.exists():
            swap.write_text("0")  # over the limit means the OOM killer, not swap

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def usage(self) -> int:
        return int(_read(self.path / self.usage_file))

    def limit(self, nbytes: int) -> None:
        (self.path / self.limit_file).write_text(str(nbytes))

    def remove(self) -> None:
        deadline = time.monotonic() + 10
        while self.path.exists():
            try:
                self.path.rmdir()
            except OSError:  # its last process is still exiting
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


@pytest.fixture
def memory_cgroup() -> Iterator[MemoryCgroup]:
    try:
        group = MemoryCgroup()
    except OSError as e:
        pytest.skip(f"cannot make a memory cgroup here: {e}")
    yield group
    group.remove()


def test_a_checkpoint_too_big_for_the_cgroup_is_a_memory_error(
    memory_cgroup, start_daemon, tiny, ckpt_root
):
    wide = ckpt_root / "t2v-A14B-wide"
    if not wide.exists():
        write_tiny(wide, "t2v-A14B", "original", width=512, layers=4)  # about 90 MB resident
    d = start_daemon(tiny())
    memory_cgroup.add(d.proc.pid)
    d.wait_ready()  # torch imported, a tiny checkpoint resident: what it needs to serve
    limit = memory_cgroup.usage() + (40 << 20)
    memory_cgroup.limit(limit)
    out = d.wanctl("load", str(wide), "--name", "wide")
    assert d.proc.poll() is None, f"the daemon died ({d.proc.returncode}):\n{d.output()}"
    assert out.returncode == 1, out
    assert "memory" in out.stderr and f"of its {size(limit)} limit" in out.stderr, out.stderr
    assert "cgroup" in out.stderr, out.stderr
    assert d.wanctl("ping").returncode == 0
    with d.connect() as c:
        assert c.attach("t2v-A14B/vae")


def test_the_smallest_room_over_the_cgroup_and_its_ancestors_counts(tmp_path):
    """cgroup v2 files, written out (CI may have v1 only): ``a`` limits ``a/b``, whose own
    limit is looser; file cache counts as room; the root (no ``memory.max``) ends the walk."""
    from wand.slabs import room

    stats = "anon 1000\nactive_file 100\ninactive_file 50\nshmem 7\n"
    for level, limit, current in (("", None, 0), ("a", "1000000", "600000"), ("a/b", "max", "1")):
        folder = tmp_path / "cg" / level
        folder.mkdir(parents=True, exist_ok=True)
        if limit is not None:
            (folder / "memory.max").write_text(limit + "\n")
            (folder / "memory.current").write_text(current + "\n")
            (folder / "memory.stat").write_text(stats)
    found = room._limited((tmp_path / "cg" / "a" / "b", "memory.max", "memory.current"))
    assert [(r.where, r.free, r.limit) for r in found] == [
        (f"cgroup {tmp_path / 'cg' / 'a'}", 1000000 - 600000 + 150, 1000000)
    ]
