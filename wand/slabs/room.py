"""How much memory a new CPU slab may take: what the machine has, and what every memory
cgroup above this process still allows.

A memfd's pages are reserved up front (``fallocate``), but in a cgroup with a limit the
reservation is no error: the kernel charges the pages, finds the limit reached, and with the
OOM killer on kills the daemon. So a slab is refused first, when it does not fit with a
margin for the daemon's own memory (read buffers, Python): in ``MemAvailable``, nor at any
level of the cgroup path (v2: ``memory.max`` less ``memory.current``; v1:
``memory.limit_in_bytes`` less ``memory.usage_in_bytes``; the file cache each level holds
counts as room, as the kernel reclaims it first).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from wand.common.errors import WandError
from wand.common.sizes import size

MARGIN_BYTES = 64 << 20  # kept free beside a slab, plus MARGIN_SHARE of a cgroup's limit
MARGIN_SHARE = 0.02
UNLIMITED = 1 << 62  # v1 writes "no limit" as a page-rounded 2^63 - 1


@dataclass(frozen=True)
class Room:
    """Memory left where it is scarcest: ``limit`` is None for the machine as a whole."""

    where: str
    free: int
    limit: int | None = None

    def margin(self) -> int:
        return MARGIN_BYTES + int(MARGIN_SHARE * (self.limit or 0))


def check(nbytes: int) -> None:
    """Refuse a slab of ``nbytes`` that does not fit, with its margin, in every room."""
    for room in rooms():
        if nbytes + room.margin() > room.free:
            limit = f" of its {size(room.limit)} limit" if room.limit else ""
            raise WandError(
                f"not enough memory: a slab of {size(nbytes)} does not fit: {room.where} has "
                f"{size(room.free)} left{limit}, and {size(room.margin())} stay free for the "
                "daemon itself",
                "memory",
            )


def available() -> int | None:
    """The least memory left anywhere that limits this process (no margin taken off)."""
    free = [r.free for r in rooms()]
    return min(free) if free else None


def rooms() -> list[Room]:
    machine = _meminfo_available()
    found = [Room("the machine", machine)] if machine is not None else []
    return found + [r for base in _cgroup_folders() for r in _limited(base)]


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_folders() -> list[tuple[Path, str, str]]:
    """This process's memory cgroup folders, each with its limit and usage files: the v2
    one and the v1 memory one, where mounted."""
    mounts = _cgroup_mounts()
    found = []
    for line in _lines("/proc/self/cgroup"):
        _, controllers, path = line.split(":", 2)
        if controllers == "" and "cgroup2" in mounts:
            found.append((_inside(mounts["cgroup2"], path), "memory.max", "memory.current"))
        elif "memory" in controllers.split(",") and "memory" in mounts:
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes")
            found.append((_inside(mounts["memory"], path), *files))
    return found


def _cgroup_mounts() -> dict[str, tuple[Path, str]]:
    """Mount point and mount root of the cgroup2 file system and of v1's memory hierarchy."""
    mounts: dict[str, tuple[Path, str]] = {}
    for line in _lines("/proc/self/mountinfo"):
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        fstype, options = fields[sep + 1], fields[sep + 3] if len(fields) > sep + 3 else ""
        if fstype == "cgroup2":
            mounts.setdefault("cgroup2", (Path(fields[4]), fields[3]))
        elif fstype == "cgroup" and "memory" in options.split(","):
            mounts.setdefault("memory", (Path(fields[4]), fields[3]))
    return mounts


def _inside(mount: tuple[Path, str], path: str) -> Path:
    """The folder of cgroup ``path`` under a mount of the hierarchy rooted at ``root``."""
    point, root = mount
    relative = path.removeprefix(root) if root != "/" else path
    return point / relative.lstrip("/")


def _limited(found: tuple[Path, str, str]) -> list[Room]:
    """The room at each level from the cgroup up to the mount's root that has a limit."""
    base, limit_file, usage_file = found
    out = []
    for level in (base, *base.parents):
        limit, usage = _number(level / limit_file), _number(level / usage_file)
        if limit is not None and usage is not None and limit < UNLIMITED:
            cache = _file_cache(level)
            out.append(Room(f"cgroup {level}", max(limit - usage + cache, 0), limit))
        if not (level.parent / limit_file).exists():
            break
    return out


def _file_cache(level: Path) -> int:
    """File pages the cgroup holds (reclaimable, unlike a memfd's pages, without swap)."""
    wanted = ("active_file", "inactive_file", "total_active_file", "total_inactive_file")
    stats = dict(line.split() for line in _lines(level / "memory.stat") if line.count(" ") == 1)
    v1 = "total_active_file" in stats
    return sum(int(stats.get(k, 0)) for k in wanted if k.startswith("total_") == v1)


def _number(path: Path) -> int | None:
    lines = _lines(path)
    try:
        return int(lines[0]) if lines and lines[0] != "max" else None
    except ValueError:
        return None


def _lines(path: str | Path) -> list[str]:
    try:
        with open(path) as f:
            return f.read().splitlines()
    except OSError:
        return []
