"""The store: named components, each one slab plus its manifest, and their load state.

It is model-agnostic: it loads whatever a :class:`~wand.spec.CheckpointSpec` names.
Components are addressed ``<checkpoint>/<component>``; a bare component name is accepted
while it is unambiguous.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from wand import loader, manifest
from wand.errors import WandError
from wand.slab import ShmSlab
from wand.spec import CheckpointSpec, ComponentSpec

log = logging.getLogger("wand.store")


@dataclass
class Component:
    checkpoint: str
    spec: ComponentSpec
    state: str = "queued"  # queued → loading → ready | failed
    error: str | None = None
    done_bytes: int = 0
    load_seconds: float | None = None
    slab: ShmSlab | None = None
    manifest: dict[str, Any] | None = None
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = self.spec.nbytes

    @property
    def addr(self) -> str:
        return f"{self.checkpoint}/{self.spec.name}"

    def summary(self) -> dict[str, Any]:
        dtypes = Counter()
        for t in self.spec.tensors:
            dtypes[manifest.dtype_name(t.dtype)] += t.dtype.itemsize * math.prod(t.shape)
        return {
            "name": self.addr,
            "checkpoint": self.checkpoint,
            "component": self.spec.name,
            "class": self.spec.cls,
            "device": "cpu",
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


class Store:
    def __init__(self) -> None:
        self.checkpoints: dict[str, CheckpointSpec] = {}
        self.components: dict[str, Component] = {}
        self._lock = threading.Lock()

    def add(self, name: str, spec: CheckpointSpec) -> list[Component]:
        with self._lock:
            if name in self.checkpoints:
                raise WandError(f"a checkpoint named {name!r} is already loaded", "bad_args")
            self.checkpoints[name] = spec
            comps = [Component(name, c) for c in spec.components.values()]
            self.components.update({c.addr: c for c in comps})
        return comps

    def load(self, comp: Component) -> None:
        """Fill ``comp``'s slab; on failure the component is marked failed and the error raised."""
        comp.state = "loading"
        start = time.perf_counter()
        rows, nbytes = manifest.layout(comp.spec)
        slab = comp.slab = ShmSlab(comp.addr, nbytes)  # registered now so a stop frees it
        try:
            digests = loader.fill(slab.flat, comp.spec, rows, lambda n: _add_progress(comp, n))
        except Exception as e:
            slab.free()
            comp.slab = None
            comp.state, comp.error = "failed", str(e)
            raise
        slab.seal()
        comp.manifest = manifest.manifest(
            comp.spec,
            rows,
            nbytes,
            name=comp.addr,
            checkpoint=comp.checkpoint,
            checksum=manifest.checksum(digests),
        )
        comp.load_seconds = time.perf_counter() - start
        comp.state = "ready"
        log.info(
            "%s ready: %d tensors, %.1f MB in %.2f s",
            comp.addr,
            len(rows),
            nbytes / 1e6,
            comp.load_seconds,
        )

    def resolve(self, name: str) -> Component:
        if not isinstance(name, str) or not name:
            raise WandError("component name must be a non-empty string", "bad_args")
        if name in self.components:
            return self.components[name]
        matches = [c for c in self.components.values() if c.spec.name == name]
        if len(matches) == 1:
            return matches[0]
        known = ", ".join(self.components) or "none"
        if matches:
            raise WandError(
                f"{name!r} is in several checkpoints; say which: "
                + ", ".join(c.addr for c in matches),
                "ambiguous_component",
            )
        raise WandError(f"no component {name!r}; loaded: {known}", "unknown_component")

    def free_all(self) -> None:
        for comp in self.components.values():
            if comp.slab:
                comp.slab.free()
                comp.slab = None


def _add_progress(comp: Component, n: int) -> None:
    comp.done_bytes += n
