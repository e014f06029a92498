"""The store: checkpoints, the component addresses they expose, and the resident slabs.

It is model-agnostic: it loads whatever a :class:`~wand.spec.CheckpointSpec` names.
Components are addressed ``<checkpoint>/<component>``; a bare component name is accepted
while it is unambiguous. An address points at a :class:`Resident` (one slab); identical
components of different checkpoints point at the same one. A resident no address points at
is *retired*: it is freed once no lease holds it.
"""

from __future__ import annotations

import itertools
import logging
import math
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from wand import identity, loader, manifest, placement, staging
from wand.config import CheckpointConfig
from wand.errors import WandError
from wand.gpuslab import CudaSlab
from wand.placement import Device
from wand.slab import ShmSlab
from wand.spec import CheckpointSpec, ComponentSpec

log = logging.getLogger("wand.store")
_ids = itertools.count(1)


@dataclass
class Resident:
    """One component's tensors in one slab."""

    spec: ComponentSpec
    device: Device
    key: tuple  # identity.shape_key
    stamp: tuple  # identity.stamp: the file versions it was loaded from
    id: int = field(default_factory=lambda: next(_ids))
    state: str = "queued"  # queued → loading → ready | failed
    error: str | None = None
    done_bytes: int = 0
    load_seconds: float | None = None
    slab: ShmSlab | CudaSlab | None = None
    manifest: dict[str, Any] | None = None
    pending: list[str] = field(default_factory=list)  # addresses to take over once ready

    @property
    def nbytes(self) -> int:
        return self.spec.nbytes

    def summary(self) -> dict[str, Any]:
        dtypes: Counter = Counter()
        for t in self.spec.tensors:
            dtypes[manifest.dtype_name(t.dtype)] += t.dtype.itemsize * math.prod(t.shape)
        return {
            "resident": self.id,
            "component": self.spec.name,
            "class": self.spec.cls,
            "device": self.device.name,
            "uuid": self.device.uuid,
            "dtype": dtypes.most_common(1)[0][0] if dtypes else None,
            "dtypes": dict(dtypes),
            "bytes": self.nbytes,
            "tensors": len(self.spec.tensors),
            "state": self.state,
            "progress": self.done_bytes / self.nbytes if self.nbytes else 1.0,
            "load_seconds": self.load_seconds,
            "checksum": self.manifest["checksum"] if self.manifest else None,
            "error": self.error,
        }


@dataclass
class Checkpoint:
    name: str
    spec: CheckpointSpec
    config: CheckpointConfig
    origin: str  # "config" (from the configuration file or flags) or "runtime" (wanctl load)


class Store:
    def __init__(self) -> None:
        self.checkpoints: dict[str, Checkpoint] = {}
        self.addresses: dict[str, Resident] = {}
        self.residents: dict[int, Resident] = {}
        self.queue: queue.Queue[Resident] = queue.Queue()
        self.lock = threading.RLock()

    # --- what is held ---------------------------------------------------------------------

    def add(self, ckpt: Checkpoint) -> list[Resident]:
        """Expose ``ckpt``'s components; each gets a queued resident (which the loader may
        find to be a twin of one already held, see :meth:`load`)."""
        with self.lock:
            if ckpt.name in self.checkpoints:
                raise WandError(f"a checkpoint named {ckpt.name!r} is loaded already", "bad_args")
            self.checkpoints[ckpt.name] = ckpt
            queued = []
            for comp in ckpt.spec.components.values():
                resident = self._queue(comp, ckpt)
                self.addresses[f"{ckpt.name}/{comp.name}"] = resident
                queued.append(resident)
            return queued

    def replace(self, ckpt: Checkpoint) -> list[Resident]:
        """Reload: components whose files or placement changed get new residents, which take
        over their addresses once loaded; the others stay as they are."""
        with self.lock:
            old = self.checkpoints[ckpt.name]
            self.checkpoints[ckpt.name] = ckpt
            queued = []
            for comp in ckpt.spec.components.values():
                addr = f"{ckpt.name}/{comp.name}"
                current = self.addresses.get(addr)
                key = identity.shape_key(comp, _device(ckpt.config, comp.name).name)
                if current and current.key == key and current.stamp == identity.stamp(comp):
                    continue
                resident = self._queue(comp, ckpt)
                resident.pending.append(addr)
                self.addresses.setdefault(addr, resident)
                queued.append(resident)
            for comp in set(old.spec.components) - set(ckpt.spec.components):
                self.addresses.pop(f"{ckpt.name}/{comp}", None)
            return queued

    def remove(self, name: str) -> list[Resident]:
        """Stop exposing checkpoint ``name``; returns the residents it alone used."""
        with self.lock:
            ckpt = self.checkpoints.pop(name, None)
            if ckpt is None:
                raise WandError(
                    f"no checkpoint {name!r}; loaded: {self._names()}", "unknown_component"
                )
            dropped = [self.addresses.pop(f"{name}/{c}") for c in ckpt.spec.components]
            return [r for r in dropped if r not in self.addresses.values()]

    def retired(self) -> list[Resident]:
        """Residents no address points at (and that are not waiting to take one over)."""
        with self.lock:
            live = {r.id for r in self.addresses.values()}
            return [r for r in self.residents.values() if r.id not in live and not r.pending]

    def free(self, resident: Resident) -> None:
        with self.lock:
            self.residents.pop(resident.id, None)
            if resident.slab:
                resident.slab.free()
                resident.slab = None
            log.info(
                "freed %s (resident %d)", resident.spec.name, resident.id, extra=fields(resident)
            )

    def free_all(self) -> None:
        for resident in list(self.residents.values()):
            self.free(resident)

    def resolve(self, name: Any) -> tuple[str, Resident]:
        """An address, or a bare component name while unambiguous → (address, resident)."""
        if not isinstance(name, str) or not name:
            raise WandError("component name must be a non-empty string", "bad_args")
        with self.lock:
            if name in self.addresses:
                return name, self.addresses[name]
            matches = [a for a in self.addresses if a.split("/", 1)[1] == name]
            if len(matches) == 1:
                return matches[0], self.addresses[matches[0]]
            if matches:
                raise WandError(
                    f"{name!r} is in several checkpoints; say which: {', '.join(matches)}",
                    "ambiguous_component",
                )
            known = ", ".join(self.addresses) or "none"
            raise WandError(f"no component {name!r}; loaded: {known}", "unknown_component")

    def busy(self) -> bool:
        with self.lock:
            return any(r.state in ("queued", "loading") for r in self.residents.values())

    # --- loading --------------------------------------------------------------------------

    def load(self, resident: Resident) -> None:
        """Fill ``resident``'s slab (on the loader thread); failures mark it failed.

        A resident whose bytes another one already holds is not loaded: its addresses go to
        that twin (the T5 and VAE files of t2v-A14B and i2v-A14B are the same, for example).
        """
        twin = self._twin(resident)
        if twin is not None:
            self._merge(resident, twin)
            return
        resident.state = "loading"
        start = time.perf_counter()
        rows, nbytes = manifest.layout(resident.spec)
        try:
            checksum = self._fill(resident, rows, nbytes)
        except Exception as e:
            self._failed(resident, e)
            raise
        resident.manifest = manifest.manifest(resident.spec, rows, nbytes, checksum=checksum)
        resident.load_seconds = time.perf_counter() - start
        with self.lock:
            resident.state = "ready"
            for addr in resident.pending:
                if self._still_wanted(addr):
                    self.addresses[addr] = resident
            resident.pending.clear()
        log.info(
            "%s ready (resident %d): %d tensors, %.1f MB in %.2f s",
            resident.spec.name,
            resident.id,
            len(rows),
            nbytes / 1e6,
            resident.load_seconds,
            extra=fields(resident),
        )

    def _fill(self, resident: Resident, rows: list[list], nbytes: int) -> str:
        """Make the slab (registered at once, so a stop frees it), fill and seal it; return
        the checksum. GPU slabs are filled through pinned staging and digested on the GPU."""
        label = f"{resident.id}-{resident.spec.name}"
        spec, progress = resident.spec, lambda n: _progress(resident, n)
        if resident.device.uuid is None:
            slab = resident.slab = ShmSlab(label, nbytes)
            digests = loader.fill(slab.flat, spec, rows, progress)
            slab.seal()
            return manifest.checksum(digests)
        gpu = resident.slab = CudaSlab(label, nbytes, resident.device)
        staging.fill(gpu.flat, spec, rows, progress)
        gpu.seal()  # every byte is on the device before anyone can attach
        digests = manifest.digests(gpu.flat, {"tensors": rows, "aliases": {}}, "sum64")
        torch.cuda.empty_cache()  # staging scratch and digest temporaries go back
        return manifest.checksum(digests, "sum64")

    def _failed(self, resident: Resident, error: Exception) -> None:
        with self.lock:
            resident.state, resident.error = "failed", str(error)
            if resident.slab:
                resident.slab.free()
                resident.slab = None
            resident.pending.clear()  # a failed reload leaves the old resident in place

    def _still_wanted(self, addr: str) -> bool:
        name, comp = addr.split("/", 1)
        ckpt = self.checkpoints.get(name)
        return ckpt is not None and comp in ckpt.spec.components

    def _twin(self, resident: Resident) -> Resident | None:
        """A ready or loading resident with the same bytes as ``resident`` would have."""
        with self.lock:
            candidates = [
                r
                for r in self.residents.values()
                if r is not resident and r.key == resident.key and r.state in ("ready", "loading")
            ]
        for r in candidates:  # hashing files happens outside the lock
            if identity.stamp(r.spec) != r.stamp:
                continue  # its files changed since it was loaded: not the same bytes any more
            if identity.content_key(r.spec) == identity.content_key(resident.spec):
                return r
        return None

    def _merge(self, resident: Resident, twin: Resident) -> None:
        with self.lock:
            for addr, r in list(self.addresses.items()):
                if r is resident:
                    self.addresses[addr] = twin
            if twin.state == "ready":
                for addr in resident.pending:
                    if self._still_wanted(addr):
                        self.addresses[addr] = twin
            else:
                twin.pending.extend(resident.pending)
            resident.pending.clear()
            self.residents.pop(resident.id, None)
        log.info(
            "%s: same bytes as resident %d, sharing it",
            resident.spec.name,
            twin.id,
            extra=fields(twin),
        )

    def _queue(self, comp: ComponentSpec, ckpt: Checkpoint) -> Resident:
        device = _device(ckpt.config, comp.name)
        key = identity.shape_key(comp, device.name)
        resident = Resident(comp, device, key, identity.stamp(comp))
        self.residents[resident.id] = resident
        self.queue.put(resident)
        return resident

    def _names(self) -> str:
        return ", ".join(self.checkpoints) or "none"


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
