"""Opening and reading the files a client names, so that none can hang or crash the daemon.

Every file the daemon reads on someone's say-so (checkpoints, configurations) is opened with
``O_NONBLOCK`` and checked to be a regular file *on the descriptor*, so a FIFO, a device or a
socket is refused before a single byte is read, and a swap between check and open cannot
slip one in. Bytes are read with positional reads, never through a mapping: a file that
shrinks while it is read is a short read and a clear error, not a SIGBUS.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from wand.common.errors import CheckpointError, WandError

MAX_SMALL_FILE = 64 << 20  # configuration, JSON and index files are read whole up to this


def open_regular(path: str | os.PathLike, error: type[WandError] = CheckpointError) -> int:
    """A read-only descriptor of the regular file at ``path``; ``error`` names the file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        raise error(f"{path}: {reason(e)}") from None
    except ValueError as e:  # an embedded NUL byte
        raise error(f"{path!r}: {e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{path}: not a regular file ({_kind(st.st_mode)})")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_small(path: str | os.PathLike, error: type[WandError] = CheckpointError) -> bytes:
    """The whole of a small regular file (a configuration, a JSON file)."""
    fd = open_regular(path, error)
    try:
        size = os.fstat(fd).st_size
        if size > MAX_SMALL_FILE:
            raise error(f"{path}: {size} bytes is too large for this kind of file")
        return read_exact(fd, 0, size, path, error=error)
    finally:
        os.close(fd)


def read_exact(
    fd: int,
    offset: int,
    nbytes: int,
    path: str | os.PathLike,
    what: str = "",
    error: type[WandError] = CheckpointError,
) -> bytes:
    """``nbytes`` from ``offset``; a file that ends early is an error naming it (and ``what``)."""
    buf = bytearray(nbytes)
    read_into(fd, memoryview(buf), offset, path, what, error)
    return bytes(buf)


def read_into(
    fd: int,
    buf: memoryview,
    offset: int,
    path: str | os.PathLike,
    what: str = "",
    error: type[WandError] = CheckpointError,
) -> None:
    """Fill ``buf`` from ``offset`` with positional reads (GIL released while they run)."""
    want, done = len(buf), 0
    while done < want:
        try:
            n = os.preadv(fd, [buf[done:]], offset + done)
        except OSError as e:
            raise error(f"{path}: {reason(e)}{_for(what)}") from None
        if n == 0:
            raise error(
                f"{path}: truncated{_for(what)}: it ends before byte {offset + want} "
                f"(read {offset + done})"
            )
        done += n


def is_dir(path: Path) -> bool:
    """Whether ``path`` is a directory, never raising (loops, long names, permissions)."""
    try:
        return path.is_dir()
    except (OSError, ValueError):
        return False


def is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _for(what: str) -> str:
    return f" (reading {what})" if what else ""


def reason(e: OSError) -> str:
    """What went wrong, in words (``strerror``; a symlink loop said plainly)."""
    if e.errno == errno.ELOOP:
        return "too many levels of symbolic links"
    return e.strerror or str(e)


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a plain file"
