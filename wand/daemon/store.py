"""The store: checkpoints, the component addresses they expose, and the resident slabs.

It is model-agnostic: it loads whatever a :class:`~wand.common.spec.CheckpointSpec` names.
Components are addressed ``<checkpoint>/<component>``; a bare component name is accepted
while it is unambiguous. An address points at a :class:`Resident` (one slab); identical
components of different checkpoints point at the same one. A resident no address points at
(and none waits for) is *retired*.

Residents are ``queued`` → ``loading`` → ``ready`` | ``failed``, or ``ready`` at once when
adopted from systemd's fd store. Who creates, fills, retires and closes a slab, and when its
memory goes: ``wand/slabs/LIFETIME.md``.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import queue
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from wand import load, slabs
from wand.common import dtypes, manifest, placement
from wand.common.errors import Cancelled, WandError
from wand.common.placement import Device
from wand.common.spec import CheckpointSpec, ComponentSpec, to_record
from wand.daemon import identity
from wand.daemon.config import CheckpointConfig
from wand.daemon.fdstore import RECORD_VERSION, FdStore, Stored
from wand.slabs import Slab

log = logging.getLogger("wand.daemon.store")
_ids = itertools.count(1)


@dataclass(eq=False)  # a resident is itself: compared and hashed by identity
class Resident:
    """One component's tensors in one slab."""

    spec: ComponentSpec
    device: Device
    key: tuple  # identity.shape_key
    stamp: tuple  # identity.stamp: the file versions it was loaded from
    keys: set[str]  # identity.adoption_key of every address it serves
    id: int = field(default_factory=lambda: next(_ids))
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    state: str = "queued"  # queued → loading → ready | failed
    error: str | None = None
    done_bytes: int = 0
    load_seconds: float | None = None
    adopted: bool = False  # taken over from systemd's fd store, not read from files
    slab: Slab | None = None
    manifest: dict[str, Any] | None = None
    pending: list[str] = field(default_factory=list)  # addresses to take over once ready
    wire: dict[str, Any] = field(default_factory=dict)  # manifest as attaches get it, by address

    @property
    def nbytes(self) -> int:
        return self.spec.nbytes

    def summary(self) -> dict[str, Any]:
        """``dtype`` is the one most values are held in (an fp8 expert's Linear weights,
        whatever the bytes of its bfloat16 and float32 rest); ``dtypes`` the bytes of each."""
        by_dtype: Counter = Counter()
        values: Counter = Counter()
        for t in self.spec.tensors:
            by_dtype[t.dtype] += dtypes.nbytes(t.dtype, t.shape)
            values[t.dtype] += math.prod(t.shape)
        return {
            "resident": self.id,
            "component": self.spec.name,
            "class": self.spec.cls,
            "device": self.device.name,
            "uuid": self.device.uuid,
            "dtype": values.most_common(1)[0][0] if values else None,
            "dtypes": dict(by_dtype),
            "bytes": self.nbytes,
            "tensors": len(self.spec.tensors),
            "state": self.state,
            "progress": self.done_bytes / self.nbytes if self.nbytes else 1.0,
            "load_seconds": self.load_seconds,
            "adopted": self.adopted,
            "checksum": self.manifest["checksum"] if self.manifest else None,
            "slab": self.token,  # this slab across restarts: a warm client's cache compares it
            "error": self.error,
        }

    def record(self) -> dict[str, Any]:
        """What the fd store keeps beside the slab, for a restarted daemon to adopt it."""
        assert self.slab is not None and self.manifest is not None
        return {
            "version": RECORD_VERSION,
            "keys": sorted(self.keys),
            "handle": self.slab.handle(),
            "manifest": self.manifest,
        }


@dataclass
class Checkpoint:
    name: str
    spec: CheckpointSpec
    config: CheckpointConfig
    origin: str  # "config" (from the configuration file or flags) or "runtime" (wanctl load)
    stamps: dict[str, tuple] = field(default_factory=dict)  # component → its files' versions
    extra_loras: list = field(default_factory=list)  # LoraConfigs added by wanctl load-lora
    fingerprint: str | None = None  # identity.entry_fingerprint: its spec kept in the fd store

    def __post_init__(self) -> None:
        if not self.stamps:
            self.stamps = {n: identity.stamp(c) for n, c in self.spec.components.items()}


@dataclass(frozen=True)
class Snapshot:
    """What the store held at one moment (see :meth:`Store.snapshot`)."""

    addresses: dict[str, Resident]  # address → the resident it points at
    checkpoints: dict[str, Checkpoint]
    residents: list[Resident]
    retired: list[Resident]  # residents no address points at and none waits for

    def names_of(self, resident: Resident) -> list[str]:
        """Every address that points at ``resident``."""
        return [a for a, r in self.addresses.items() if r is resident]


class Store:
    def __init__(
        self,
        fdstore: FdStore | None = None,
        stored: dict[str, Stored] | None = None,
        stored_specs: set[str] = frozenset(),
    ) -> None:
        """``stored`` and ``stored_specs``: the slabs and the fingerprints of the specs that
        systemd's fd store handed back (each kept there while still used)."""
        self._checkpoints: dict[str, Checkpoint] = {}
        self._addresses: dict[str, Resident] = {}
        self._residents: dict[int, Resident] = {}
        self._queue: queue.Queue[Resident | None] = queue.Queue()
        self._lock = threading.RLock()
        self._fdstore = fdstore
        self._stored = stored or {}  # slabs systemd handed back, not yet adopted
        self.closing = False
        for fingerprint in stored_specs:
            if fdstore is not None:
                fdstore.adopted_spec(fingerprint)

    # --- what the server and the daemon read ----------------------------------------------

    def snapshot(self) -> Snapshot:
        """Addresses, checkpoints and residents as they are now, taken together."""
        with self._lock:
            residents = list(self._residents.values())
            retired = [r for r in residents if not self._wanted(r)]
            return Snapshot(dict(self._addresses), dict(self._checkpoints), residents, retired)

    def resident(self, rid: int) -> Resident | None:
        with self._lock:
            return self._residents.get(rid)

    def addresses_of(self, checkpoint: str) -> list[str]:
        """The addresses checkpoint ``checkpoint`` exposes (raises for an unknown one)."""
        with self._lock:
            ckpt = self.checkpoint(checkpoint)
            return [f"{ckpt.name}/{c}" for c in ckpt.spec.components]

    def __contains__(self, checkpoint: str) -> bool:
        with self._lock:
            return checkpoint in self._checkpoints

    @property
    def keeps_slabs(self) -> bool:
        """Are ready slabs kept in systemd's fd store?"""
        return bool(self._fdstore and self._fdstore.enabled)

    def next_to_load(self) -> Resident | None:
        """The next queued resident, for the loader thread (blocks); None once closing."""
        resident = None if self.closing else self._queue.get()
        return None if self.closing else resident

    # --- what is held ---------------------------------------------------------------------

    def add(self, ckpt: Checkpoint) -> list[Resident]:
        """Expose ``ckpt``'s components: each gets a stored slab that matches it, or a queued
        resident (which the loader may find to be a twin of one already held)."""
        with self._lock:
            if ckpt.name in self._checkpoints:
                raise WandError(f"a checkpoint named {ckpt.name!r} is loaded already", "bad_args")
            self._checkpoints[ckpt.name] = ckpt
            self._keep_spec(ckpt)
            added = []
            for comp in ckpt.spec.components.values():
                resident = self._resident(comp, ckpt)
                self._addresses[f"{ckpt.name}/{comp.name}"] = resident
                added.append(resident)
            return added

    def checkpoint(self, name: Any) -> Checkpoint:
        """The loaded checkpoint ``name``, or the only one loaded when ``name`` is None."""
        with self._lock:
            if name is None and len(self._checkpoints) == 1:
                return next(iter(self._checkpoints.values()))
            if isinstance(name, str) and name in self._checkpoints:
                return self._checkpoints[name]
            if name is None and self._checkpoints:
                raise WandError(
                    f"several checkpoints are loaded ({self._names()}): say which one "
                    "(wanctl: --checkpoint NAME)",
                    "ambiguous_component",
                )
            which = (
                "no checkpoint is loaded" if name is None else f"no checkpoint {str(name)[:100]!r}"
            )
            raise WandError(f"{which}; loaded: {self._names()}", "unknown_component")

    def add_component(self, name: str, comp: ComponentSpec) -> Resident:
        """One more component of a loaded checkpoint (a LoRA added at run time)."""
        with self._lock:
            ckpt = self._checkpoints[name]
            if comp.name in ckpt.spec.components:
                raise WandError(f"{name}/{comp.name} exists already", "bad_args")
            ckpt.spec.components[comp.name] = comp
            ckpt.stamps[comp.name] = identity.stamp(comp)
            resident = self._resident(comp, ckpt)
            self._addresses[f"{name}/{comp.name}"] = resident
            return resident

    def remove_component(self, name: str, component: str) -> list[Resident]:
        """Stop exposing one component; returns its resident if nothing else uses it."""
        with self._lock:
            ckpt = self._checkpoints[name]
            ckpt.spec.components.pop(component)
            ckpt.stamps.pop(component, None)
            dropped = self._addresses.pop(f"{name}/{component}")
            return [] if self._wanted(dropped) else [dropped]

    def replace(self, ckpt: Checkpoint) -> list[Resident]:
        """Reload: components whose files or placement changed get new residents, which take
        over their addresses once loaded; the others stay as they are."""
        with self._lock:
            old = self._checkpoints[ckpt.name]
            self._checkpoints[ckpt.name] = ckpt
            if old.fingerprint != ckpt.fingerprint:
                self._drop_spec(old)
                self._keep_spec(ckpt)
            changed = []
            for comp in ckpt.spec.components.values():
                addr = f"{ckpt.name}/{comp.name}"
                current = self._addresses.get(addr)
                key = identity.component_key(ckpt.config, comp)
                if (
                    current
                    and current.key == key
                    and old.stamps.get(comp.name) == (ckpt.stamps[comp.name])
                ):
                    continue
                resident = self._resident(comp, ckpt)
                if resident.state == "ready":
                    self._addresses[addr] = resident
                else:
                    resident.pending.append(addr)
                    self._addresses.setdefault(addr, resident)
                changed.append(resident)
            for comp in set(old.spec.components) - set(ckpt.spec.components):
                self._addresses.pop(f"{ckpt.name}/{comp}", None)
            return changed

    def remove(self, name: str) -> list[Resident]:
        """Stop exposing checkpoint ``name``; returns the residents it alone used."""
        with self._lock:
            ckpt = self._checkpoints.pop(name, None)
            if ckpt is None:
                raise WandError(
                    f"no checkpoint {name!r}; loaded: {self._names()}", "unknown_component"
                )
            self._drop_spec(ckpt)
            dropped = [self._addresses.pop(f"{name}/{c}") for c in ckpt.spec.components]
            for r in self._residents.values():
                r.pending = [a for a in r.pending if self._still_wanted(a)]
            return [r for r in dropped if not self._wanted(r)]

    def retired(self) -> list[Resident]:
        """Residents no address points at and none waits for."""
        with self._lock:
            return [r for r in self._residents.values() if not self._wanted(r)]

    def free(self, resident: Resident) -> None:
        """Let go of a retired resident that is not being loaded (the serving thread's part;
        the loader frees what it was loading itself)."""
        with self._lock:
            if resident.state in ("queued", "loading"):
                return
            self._residents.pop(resident.id, None)
        self._release(resident)
        log.info("freed %s (resident %d)", resident.spec.name, resident.id, extra=fields(resident))

    def resolve(self, name: Any) -> tuple[str, Resident]:
        """An address, or a bare component name while unambiguous → (address, resident)."""
        if not isinstance(name, str) or not name:
            raise WandError("component name must be a non-empty string", "bad_args")
        with self._lock:
            if name in self._addresses:
                return name, self._addresses[name]
            matches = [a for a in self._addresses if a.split("/", 1)[1] == name]
            if len(matches) == 1:
                return matches[0], self._addresses[matches[0]]
            if matches:
                raise WandError(
                    f"{name[:200]!r} is in several checkpoints; say which: {', '.join(matches)}",
                    "ambiguous_component",
                )
            known = ", ".join(self._addresses) or "none"
            raise WandError(f"no component {name[:200]!r}; loaded: {known}", "unknown_component")

    def busy(self) -> bool:
        with self._lock:
            return any(r.state in ("queued", "loading") for r in self._residents.values())

    def _keep_spec(self, ckpt: Checkpoint) -> None:
        if self._fdstore is not None and ckpt.fingerprint and ckpt.origin == "config":
            self._fdstore.put_spec(ckpt.fingerprint, to_record(ckpt.spec))

    def _drop_spec(self, ckpt: Checkpoint) -> None:
        in_use = {c.fingerprint for c in self._checkpoints.values()}
        if self._fdstore is not None and ckpt.fingerprint and ckpt.fingerprint not in in_use:
            self._fdstore.remove_spec(ckpt.fingerprint)

    def discard_stored(self, specs: set[str | None] = frozenset()) -> None:
        """Close the stored slabs no configured component adopted, and drop the stored specs
        (``specs``) no configured checkpoint used."""
        for fingerprint in specs - {None}:
            if self._fdstore is not None:
                self._fdstore.remove_spec(fingerprint)
        for token, stored in list(self._stored.items()):
            log.info("stored slab %s matches nothing configured: closed", token)
            stored.close()
            if self._fdstore is not None:
                self._fdstore.adopted(token)
                self._fdstore.remove(token)
        self._stored.clear()

    def close(self) -> None:
        """At daemon stop: cancel loading and wake the loader so it ends."""
        self.closing = True
        self._queue.put(None)

    # --- loading (the loader thread) -------------------------------------------------------

    def load(self, resident: Resident) -> None:
        """Fill ``resident``'s slab; failures mark it failed (and raise), a resident retired
        meanwhile is dropped.

        A resident whose bytes another one already holds is not loaded: its addresses go to
        that twin (the T5 and VAE files of t2v-A14B and i2v-A14B are the same, for example).
        """
        if self._drop_if_unwanted(resident):
            return
        twin = self._twin(resident)
        if twin is not None:
            self._merge(resident, twin)
            return
        resident.state = "loading"
        start = time.perf_counter()
        try:
            self._fill(resident)
        except Cancelled:
            self._cancelled(resident)
            return
        except Exception as e:
            self._failed(resident, e)
            raise
        resident.load_seconds = time.perf_counter() - start
        self._ready(resident)
        log.info(
            "%s ready (resident %d): %d tensors, %.1f MB in %.2f s",
            resident.spec.name,
            resident.id,
            len(resident.spec.tensors),
            resident.nbytes / 1e6,
            resident.load_seconds,
            extra=fields(resident),
        )

    def _fill(self, resident: Resident) -> None:
        """Make the slab, fill and seal it. A stop or an unload cancels at the next tensor."""
        rows, nbytes = manifest.layout(resident.spec)
        label = f"{resident.id}-{resident.spec.name}"
        resident.slab = slabs.create(label, nbytes, resident.device, resident.token)
        checksum, scales = load.fill(
            resident.slab,
            resident.spec,
            rows,
            progress=lambda n: _progress(resident, n),
            cancelled=lambda: self.closing or not self._wanted(resident),
        )
        resident.slab.seal()
        resident.manifest = manifest.manifest(
            resident.spec, rows, nbytes, scales, checksum=checksum
        )

    def _ready(self, resident: Resident) -> None:
        with self._lock:
            resident.state = "ready"
            for addr in resident.pending:
                if self._still_wanted(addr):
                    self._addresses[addr] = resident
            resident.pending.clear()
        self._store(resident)

    def _store(self, resident: Resident) -> None:
        if self._fdstore is None or not self._fdstore.enabled or resident.slab is None:
            return
        fd = resident.slab.export()
        try:
            self._fdstore.put(resident.token, fd, resident.record())
        finally:
            os.close(fd)

    def _failed(self, resident: Resident, error: Exception) -> None:
        with self._lock:
            resident.state, resident.error = "failed", str(error)
            resident.pending.clear()  # a failed reload leaves the old resident in place
        self._release(resident)

    def _cancelled(self, resident: Resident) -> None:
        with self._lock:
            self._residents.pop(resident.id, None)
        self._release(resident)
        log.info("%s: unloaded while loading, load cancelled", resident.spec.name)

    def _drop_if_unwanted(self, resident: Resident) -> bool:
        with self._lock:
            if self._wanted(resident) and not self.closing:
                return False
            self._residents.pop(resident.id, None)
        log.info("%s: unloaded before its load began", resident.spec.name)
        return True

    def _release(self, resident: Resident) -> None:
        slab, resident.slab = resident.slab, None
        if slab is not None:
            slab.close()
        if self._fdstore is not None:
            self._fdstore.remove(resident.token)

    def _still_wanted(self, addr: str) -> bool:
        name, comp = addr.split("/", 1)
        ckpt = self._checkpoints.get(name)
        return ckpt is not None and comp in ckpt.spec.components

    def _wanted(self, resident: Resident) -> bool:
        return any(r is resident for r in self._addresses.values()) or any(
            self._still_wanted(a) for a in resident.pending
        )

    def _twin(self, resident: Resident) -> Resident | None:
        """A ready or loading resident with the same bytes as ``resident`` would have."""
        with self._lock:
            candidates = [
                r
                for r in self._residents.values()
                if r is not resident and r.key == resident.key and r.state in ("ready", "loading")
            ]
        for r in candidates:  # reading files happens outside the lock
            if not r.adopted and identity.stamp(r.spec) != r.stamp:
                continue  # its files changed since it was loaded: not the same bytes any more
            if identity.same_component(r.spec, r.key, resident.spec, resident.key):
                return r
        return None

    def _merge(self, resident: Resident, twin: Resident) -> None:
        with self._lock:
            for addr, r in list(self._addresses.items()):
                if r is resident:
                    self._addresses[addr] = twin
            if twin.state == "ready":
                for addr in resident.pending:
                    if self._still_wanted(addr):
                        self._addresses[addr] = twin
            else:
                twin.pending.extend(resident.pending)
            resident.pending.clear()
            twin.keys |= resident.keys
            self._residents.pop(resident.id, None)
        if twin.state == "ready" and self._fdstore is not None:
            self._fdstore.remove(twin.token)  # stored again with the twin's key as well
            self._store(twin)
        log.info(
            "%s: same bytes as resident %d, sharing it",
            resident.spec.name,
            twin.id,
            extra=fields(twin),
        )

    def _resident(self, comp: ComponentSpec, ckpt: Checkpoint) -> Resident:
        """A resident for ``comp``: adopted from the fd store if a stored slab matches it,
        else queued for the loader."""
        device = _device(ckpt.config, comp.name)
        stamp = ckpt.stamps[comp.name]
        spec = ckpt.spec
        key = identity.adoption_key(spec.path, spec.layout, comp, device.uuid or "cpu", stamp)
        shape = identity.shape_key(comp, device.name)
        resident = Resident(comp, device, shape, stamp, {key})
        self._residents[resident.id] = resident
        stored = next((s for s in self._stored.values() if key in s.record["keys"]), None)
        if stored is not None and self._adopt(resident, stored):
            return resident
        self._queue.put(resident)
        return resident

    def _adopt(self, resident: Resident, stored: Stored) -> bool:
        del self._stored[stored.token]
        record, fd = stored.record, stored.fd
        stored.fd = -1
        label = f"{resident.id}-{resident.spec.name}"
        try:
            resident.slab = slabs.adopt(label, record["handle"], fd, record["manifest"])
        except WandError as e:
            log.warning("stored slab %s of %s not adopted: %s", stored.token, label, e)
            if self._fdstore is not None:
                self._fdstore.adopted(stored.token)
                self._fdstore.remove(stored.token)
            return False
        resident.token, resident.manifest = stored.token, record["manifest"]
        resident.keys |= set(record["keys"])
        resident.state, resident.adopted, resident.load_seconds = "ready", True, 0.0
        if self._fdstore is not None:
            self._fdstore.adopted(stored.token)
        log.info(
            "%s adopted from the fd store (resident %d, slab %s): no checkpoint bytes read",
            resident.spec.name,
            resident.id,
            stored.token,
            extra=fields(resident),
        )
        return True

    def _names(self) -> str:
        return ", ".join(self._checkpoints) or "none"


def _device(config: CheckpointConfig, component: str) -> Device:
    return placement.resolve(config.device_for(component))


def _progress(resident: Resident, n: int) -> None:
    resident.done_bytes += n


def fields(resident: Resident) -> dict[str, Any]:
    """Structured journal fields (journald keeps them; other handlers ignore them)."""
    return {
        "WAND_COMPONENT": resident.spec.name,
        "WAND_RESIDENT": resident.id,
        "WAND_DEVICE": resident.device.name,
    }
