"""Keeping slabs in systemd's file descriptor store, so a restarted daemon need not reload.

Under systemd (``FileDescriptorStoreMax=`` in the unit), every ready slab's descriptor goes
to the store (``FDSTORE=1``, ``FDNAME=wand-slab-<token>``) together with a small sealed memfd
holding its record (``wand-record-<token>``): the slab's handle, its manifest, and the key
of what it was loaded from (checkpoint path, files' size and mtime, component, dtypes,
device, layout). ``FDSTOREREMOVE=1`` takes both out when the slab is freed. systemd keeps
them across a restart or a crash with ``Restart=`` and passes them back with the sockets
(``LISTEN_FDS``/``LISTEN_FDNAMES``); the new daemon adopts the slabs whose keys match what
its configuration asks for and closes the others.

The daemon may use the store when ``$FDSTORE`` (systemd ≥ 254) or ``$WAND_FDSTORE`` (set by
the units for older systemd) is a positive number, and it runs under a notify socket.

Beside the slabs, each checkpoint's spec (what its folder was read as) is kept too, as
``wand-spec-<fingerprint>``: the fingerprint covers the entry's settings and the version of
every file in the folder, so a restarted daemon whose folders did not change knows what they
hold without reading them (nor importing the model libraries to check shapes).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import msgpack

from wand.daemon.systemd import Notifier
from wand.slabs.memfd import seal_bytes, unseal_bytes

log = logging.getLogger("wand.daemon.fdstore")
SLAB, RECORD, SPEC = "wand-slab-", "wand-record-", "wand-spec-"
RECORD_VERSION = 1


@dataclass
class Stored:
    """A slab systemd handed back: its descriptor and its record."""

    token: str
    fd: int
    record: dict[str, Any]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def capacity() -> int:
    for var in ("FDSTORE", "WAND_FDSTORE"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 0


class FdStore:
    """The daemon's use of the store: put slabs in, take them out."""

    def __init__(self, notifier: Notifier, size: int | None = None) -> None:
        self.notifier = notifier
        self.size = capacity() if size is None else size
        self.enabled = bool(self.size and notifier.socket_path)
        self._held: set[str] = set()  # tokens in the store
        self._specs: set[str] = set()  # fingerprints of checkpoint specs in the store

    def put(self, token: str, slab_fd: int, record: dict[str, Any]) -> bool:
        """Store a slab and its record (the store dups both; the caller keeps its own)."""
        if not self.enabled or token in self._held or not self._room(2, f"slab {token}"):
            return False
        self._send_sealed(RECORD + token, record)
        self.notifier.send(FDSTORE=1, FDNAME=SLAB + token, fds=[slab_fd])
        self._held.add(token)
        return True

    def put_spec(self, fingerprint: str, spec: dict[str, Any]) -> None:
        """Store what a checkpoint folder was read as, under the fingerprint of its files."""
        if self.enabled and fingerprint not in self._specs and self._room(1, "a spec"):
            self._send_sealed(SPEC + fingerprint, {"version": RECORD_VERSION, "spec": spec})
            self._specs.add(fingerprint)

    def remove_spec(self, fingerprint: str) -> None:
        if fingerprint in self._specs:
            self._specs.discard(fingerprint)
            self.notifier.send(FDSTOREREMOVE=1, FDNAME=SPEC + fingerprint)

    def adopted_spec(self, fingerprint: str) -> None:
        self._specs.add(fingerprint)

    def _room(self, n: int, what: str) -> bool:
        if 2 * len(self._held) + len(self._specs) + n <= self.size:
            return True
        log.warning("fd store full (%d descriptors): %s is not kept", self.size, what)
        return False

    def _send_sealed(self, name: str, record: dict[str, Any]) -> None:
        fd = seal_bytes(name, msgpack.packb(record))
        try:
            self.notifier.send(FDSTORE=1, FDNAME=name, fds=[fd])
        finally:
            os.close(fd)

    def adopted(self, token: str) -> None:
        """A slab that came back from the store is in it still."""
        self._held.add(token)

    def remove(self, token: str) -> None:
        if token in self._held:
            self._held.discard(token)
            self.notifier.send(FDSTOREREMOVE=1, FDNAME=SLAB + token)
            self.notifier.send(FDSTOREREMOVE=1, FDNAME=RECORD + token)


@dataclass
class Inherited:
    """What systemd passed: stored slabs by token, stored specs by fingerprint, sockets."""

    slabs: dict[str, Stored]
    specs: dict[str, dict[str, Any]]
    sockets: list[int]


def inherited(named: list[tuple[int, str]]) -> Inherited:
    """Split the descriptors systemd passed into stored slabs, stored specs and the rest.

    A slab without a readable record, or a record without its slab, is closed.
    """
    slabs: dict[str, int] = {}
    records: dict[str, dict[str, Any]] = {}
    specs: dict[str, dict[str, Any]] = {}
    rest = []
    for fd, name in named:
        if name.startswith(SLAB):
            slabs[name[len(SLAB) :]] = fd
        elif name.startswith((RECORD, SPEC)):
            record = _read_record(fd, name)
            os.close(fd)
            if record is None:
                continue
            if name.startswith(RECORD):
                records[name[len(RECORD) :]] = record
            else:
                specs[name[len(SPEC) :]] = record["spec"]
        else:
            rest.append(fd)
    stored = {}
    for token, fd in slabs.items():
        if token in records:
            stored[token] = Stored(token, fd, records[token])
        else:
            log.warning("stored slab %s came back without its record: closed", token)
            os.close(fd)
    return Inherited(stored, specs, rest)


def _read_record(fd: int, name: str) -> dict[str, Any] | None:
    try:
        record = msgpack.unpackb(unseal_bytes(fd), raw=False)
    except Exception as e:
        log.warning("stored record %s is unreadable (%s): dropped", name, e)
        return None
    if not isinstance(record, dict) or record.get("version") != RECORD_VERSION:
        log.warning("stored record %s is of another version: dropped", name)
        return None
    return record
