"""Human-readable tables for wanctl's replies (``--json`` prints the replies as they are)."""

from __future__ import annotations

import time
from typing import Any

from wand.common.sizes import size


def duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells
    )


def status(reply: dict[str, Any]) -> str:
    d = reply["daemon"]
    lines = [
        f"wand {d['version']}  pid {d['pid']}  {d['state']}  up {duration(d['uptime'])}  "
        f"clients {d['clients']}  {d['endpoint']}"
    ]
    lines += [
        f"checkpoint {c['name']}: {c['task']}, {c['layout']} layout, {c['path']}"
        for c in reply["checkpoints"]
    ]
    rows = [
        [
            c["name"],
            c["device"],
            c["dtype"],
            size(c["bytes"]),
            c["tensors"],
            _state(c),
            c["clients"],
        ]
        for c in reply["components"]
    ]
    headers = ["COMPONENT", "DEVICE", "DTYPE", "SIZE", "TENSORS", "STATE", "CLIENTS"]
    lines += ["", table(headers, rows)]
    lines += [f"{c['name']}: {c['error']}" for c in reply["components"] if c.get("error")]
    lines += [
        f"retired {r['component']} (resident {r['resident']}, {size(r['bytes'])}): "
        f"freed when its {r['clients']} client(s) let go"
        for r in reply.get("retired", [])
    ]
    lines += [gpu(g) for g in reply.get("gpus", [])]
    return "\n".join(lines)


def _state(c: dict[str, Any]) -> str:
    if c["state"] == "loading":
        return f"loading {c['progress']:.0%}"
    return "ready (adopted)" if c.get("adopted") else c["state"]


def gpu(g: dict[str, Any]) -> str:
    free = (
        f"{size(g['free_bytes'])} free of {size(g['total_bytes'])}"
        if g.get("total_bytes")
        else "free memory unknown"
    )
    writable = [x["component"] for x in g["residents"] if x.get("read_only") is False]
    warning = (
        f"; READ-WRITE for clients (the driver refused read-only mappings): {', '.join(writable)}"
        if writable
        else ""
    )
    return (
        f"{g['device']} {g['uuid']} {g['name']}: wand holds {size(g['held_bytes'])} "
        f"in {len(g['residents'])} slabs; {free}{warning}"
    )


def components(items: list[dict[str, Any]]) -> str:
    rows = [
        [
            c["name"],
            c["class"].split(":")[-1],
            c["dtype"],
            size(c["bytes"]),
            c["tensors"],
            c["state"],
        ]
        for c in items
    ]
    return table(["COMPONENT", "CLASS", "DTYPE", "SIZE", "TENSORS", "STATE"], rows)


def clients(items: list[dict[str, Any]]) -> str:
    now = time.time()
    rows = [
        [
            p["pid"],
            p["name"] or "-",
            p["uid"],
            ", ".join(_lease(lease) for lease in p["leases"]),
            duration(now - min(lease["since"] for lease in p["leases"])),
        ]
        for p in items
    ]
    return table(["PID", "NAME", "UID", "HOLDS", "FOR"], rows)


def _lease(lease: dict[str, Any]) -> str:
    return lease["component"] + (f" x{lease['count']}" if lease["count"] > 1 else "")


def verify(rows: list[dict[str, Any]]) -> str:
    body = [
        [
            r["name"],
            r["class"],
            r["tensors"],
            size(r["bytes"]),
            f"{r['attach_ms']:.1f}",
            f"{r['module_ms']:.1f}",
            "ok" if r["checksum_ok"] else "MISMATCH",
        ]
        for r in rows
    ]
    headers = ["COMPONENT", "MODULE", "TENSORS", "SIZE", "ATTACH MS", "MODULE MS", "CHECKSUM"]
    return table(headers, body)
