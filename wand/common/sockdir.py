"""Whether a socket can be trusted, judged by who could have put it where it is.

A Unix socket is only as trustworthy as the folders on its path: whoever may write to one of
them can move what lies below aside and put a folder of their own, with a socket of their
own, in its place. So, as OpenSSH's StrictModes does for key files, every folder from ``/``
down to the socket's must belong to a trusted user and be writable by nobody else — unless
its sticky bit is set (``/tmp``): there only an entry's owner may rename or remove it, and
the next folder's owner is what counts.

The daemon checks the folder it listens in, trusting root and its own user, and asks more of
that folder itself: writable by nobody else at all, sticky or not. A client checks the socket
and its folders before it connects, trusting root, its own user, the system ``wand`` user
(the one sysusers.d creates for the service) and the users ``WAND_TRUST`` names.
"""

from __future__ import annotations

import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

TRUST_ENV = "WAND_TRUST"
SERVICE_USER = "wand"


@dataclass(frozen=True)
class Trust:
    """Whose files are trusted, and how to say so in a refusal."""

    uids: frozenset[int]
    who: str  # "root or this daemon's user (uid 990)"


def daemon_trust() -> Trust:
    uid = os.geteuid()
    return Trust(frozenset({0, uid}), f"root or this daemon's user (uid {uid})")


def client_trust() -> Trust:
    """Root, this user, the system ``wand`` user if there is one, and ``WAND_TRUST``'s users
    (names or uids, separated by commas or spaces); ValueError for a name that is no user."""
    uid = os.geteuid()
    uids, names = {0, uid}, [f"root, you (uid {uid})"]
    service = _uid_of(SERVICE_USER)
    if service is not None:
        uids.add(service)
        names.append(f"the {SERVICE_USER} user (uid {service})")
    listed = os.environ.get(TRUST_ENV, "").replace(",", " ").split()
    for name in listed:
        found = int(name) if name.isdigit() else _uid_of(name)
        if found is None:
            raise ValueError(f"{TRUST_ENV} names {name[:60]!r}, which is no user here")
        uids.add(found)
    names.append(f"the users {TRUST_ENV} names ({' '.join(listed) or 'none'})")
    return Trust(frozenset(uids), ", ".join(names[:-1]) + " or " + names[-1])


def folder_problem(folder: Path, trust: Trust, strict: bool = False) -> str | None:
    """What makes ``folder`` untrustworthy, if anything: the first folder from the top, among
    the existing ones on its path (as given and with links resolved), that belongs to a user
    not trusted, or that others may write to and is not sticky. ``strict``: ``folder`` itself
    must be writable by nobody else, sticky or not."""
    leaves = {Path(os.path.abspath(folder)), Path(os.path.realpath(folder))}
    for path in _chain(folder):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue  # not there (yet): the caller creates it, or finds nothing to trust
        except OSError as e:
            return f"{path} cannot be checked ({e.strerror})"
        problem = _owner_problem(path, st, trust) or _write_problem(
            path, st, sticky_ok=not (strict and path in leaves)
        )
        if problem:
            return problem
    return None


def socket_problem(path: Path, trust: Trust) -> str | None:
    """What makes the socket ``path`` untrustworthy: its folders, or its own owner."""
    problem = folder_problem(path.parent, trust)
    if problem:
        return problem
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None  # nothing there: connecting says so
    except OSError as e:
        return f"{path} cannot be checked ({e.strerror})"
    return _owner_problem(path, st, trust)


def _chain(folder: Path) -> list[Path]:
    """Every folder on the way to ``folder``, from ``/`` down: first as written (a link's
    folder decides who may replace the link), then the real path's that are not among them."""
    given = Path(os.path.abspath(folder))
    real = Path(os.path.realpath(given))
    written = [*reversed(given.parents), given]
    return written + [p for p in [*reversed(real.parents), real] if p not in written]


def _owner_problem(path: Path, st: os.stat_result, trust: Trust) -> str | None:
    if st.st_uid in trust.uids:
        return None
    return f"{path} belongs to uid {st.st_uid}{_name(st.st_uid)}, not to {trust.who}"


def _write_problem(path: Path, st: os.stat_result, sticky_ok: bool) -> str | None:
    if not st.st_mode & 0o022 or (sticky_ok and st.st_mode & stat.S_ISVTX):
        return None
    return f"{path} is writable by others (mode {stat.S_IMODE(st.st_mode):04o})"


def _uid_of(name: str) -> int | None:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


def _name(uid: int) -> str:
    try:
        return f" ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return ""
