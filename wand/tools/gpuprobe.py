"""Step 0 of the device check: what this machine's CUDA driver does for GPU slabs.

``python -m wand.tools.gpuprobe [--json]`` asks, in separate processes and through wand's own
driver layer (no torch): which devices there are and whether each supports VMM and POSIX-fd
handles; the allocation granularity; whether a read-only mapping is accepted; whether an
allocation exported as a descriptor can be imported and read by another process; and whether
a descriptor held by a process with no CUDA context at all (what systemd's fd store is) keeps
the memory alive after its exporter exited, for a later process to import. The orchestrating
process itself never loads the driver. Exit status 0 when everything GPU slabs need works.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from typing import Any

SIZE = 2 << 20
PATTERN = bytes(range(251)) * (SIZE // 251) + bytes(SIZE % 251)  # a prime period


def _child(role: str, *args: str, fds: tuple[int, ...] = ()) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "wand.tools.gpuprobe", "--role", role, *args],
        capture_output=True,
        text=True,
        timeout=120,
        pass_fds=fds,
    )
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"error": (out.stderr.strip().splitlines() or ["no output"])[-1][:300]}


def probe() -> dict[str, Any]:
    found: dict[str, Any] = {"devices": _child("devices")}
    if "error" in found["devices"] or not found["devices"]["count"]:
        return found
    found["read_only"] = _child("read_only")
    here, there = socket.socketpair()
    exporter = subprocess.Popen(
        [sys.executable, "-m", "wand.tools.gpuprobe", "--role", "export", str(there.fileno())],
        pass_fds=[there.fileno()],
        stdout=subprocess.PIPE,
        text=True,
    )
    there.close()
    try:
        _, fds, _, _ = socket.recv_fds(here, 16, 1)
    except OSError as e:
        fds = []
        found["export"] = {"error": str(e)}
    exporter.wait(120)
    if exporter.returncode == 0 and len(fds) == 1:
        found["export"] = json.loads(exporter.stdout.read().strip().splitlines()[-1])
        # the exporter is gone; only this process, which has no CUDA context, holds the fd
        found["kept_by_fd"] = _child("import", str(fds[0]), fds=(fds[0],))
        os.close(fds[0])
    elif "export" not in found:
        found["export"] = {"error": f"exporter exited {exporter.returncode}"}
    here.close()
    return found


def passed(found: dict[str, Any]) -> bool:
    devices = found.get("devices", {})
    return bool(
        devices.get("count")
        and all(d["vmm"] and d["posix_fd"] for d in devices["devices"])
        and found.get("export", {}).get("exported")
        and found.get("kept_by_fd", {}).get("same")
    )


def render(found: dict[str, Any]) -> str:
    lines = []
    devices = found.get("devices", {})
    if "error" in devices:
        return f"driver: {devices['error']}"
    lines.append(f"driver: {devices['count']} device(s)")
    for d in devices.get("devices", []):
        lines.append(
            f"  cuda:{d['index']} {d['uuid']}: VMM {_yes(d['vmm'])}, POSIX-fd handles "
            f"{_yes(d['posix_fd'])}, granularity {d['granularity'] or '-'} bytes, "
            f"{d['free'] / 1e9:.1f} of {d['total'] / 1e9:.1f} GB free"
        )
    ro = found.get("read_only", {})
    lines.append(f"read-only mapping: {ro.get('read_only', ro.get('error'))}")
    ex = found.get("export", {})
    lines.append(f"export as fd, another process imports: {ex.get('exported', ex.get('error'))}")
    kept = found.get("kept_by_fd", {})
    lines.append(
        "fd held by a process without a CUDA context keeps the memory after the exporter "
        f"exits: {kept.get('same', kept.get('error'))}"
    )
    lines.append("probe: " + ("PASS" if passed(found) else "FAIL"))
    return "\n".join(lines)


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


# --- what the child processes run (the driver is loaded only here) --------------------------


def _devices() -> dict[str, Any]:
    from wand.slabs import cuda

    out = []
    for i in range(cuda.device_count()):
        vmm, fd = (cuda.attribute(i, a) for a in cuda.ATTRIBUTES.values())
        free, total = cuda.memory_info(i)
        granularity = cuda.granularity(i) if vmm else None
        out.append(
            {
                "index": i,
                "uuid": cuda.uuid(i),
                "vmm": bool(vmm),
                "posix_fd": bool(fd),
                "granularity": granularity,
                "free": free,
                "total": total,
            }
        )
    return {"count": len(out), "devices": out}


def _read_only() -> dict[str, Any]:
    from wand.common.errors import DeviceError
    from wand.slabs import cuda

    handle = cuda.create(0, SIZE)
    ptr = cuda.reserve(0, SIZE)
    try:
        cuda.map_range(0, ptr, SIZE, handle)
        try:
            cuda.set_access(0, ptr, SIZE, read_only=True)
            result: dict[str, Any] = {"read_only": True}
        except DeviceError as e:
            result = {"read_only": False, "refused": str(e)}
        cuda.unmap(0, ptr, SIZE)
    finally:
        cuda.free_address(0, ptr, SIZE)
        cuda.release(0, handle)
    return result


def _export(sock_fd: int) -> dict[str, Any]:
    """Allocate, fill, export and send the descriptor, then exit (freeing everything)."""
    from wand.slabs import cuda

    handle = cuda.create(0, SIZE)
    ptr = cuda.reserve(0, SIZE)
    cuda.map_range(0, ptr, SIZE, handle)
    cuda.set_access(0, ptr, SIZE, read_only=False)
    cuda.copy_to_device(0, ptr, PATTERN)
    cuda.synchronize(0)
    fd = cuda.export(0, handle)
    with socket.socket(fileno=sock_fd) as s:
        socket.send_fds(s, [b"fd"], [fd])
    os.close(fd)
    cuda.unmap(0, ptr, SIZE)
    cuda.free_address(0, ptr, SIZE)
    cuda.release(0, handle)
    return {"exported": True}


def _import(fd: int) -> dict[str, Any]:
    from wand.slabs import cuda

    handle = cuda.import_fd(0, fd)
    os.close(fd)
    ptr = cuda.reserve(0, SIZE)
    try:
        cuda.map_range(0, ptr, SIZE, handle)
        cuda.set_access(0, ptr, SIZE, read_only=False)
        same = cuda.copy_to_host(0, ptr, SIZE) == PATTERN
        cuda.unmap(0, ptr, SIZE)
    finally:
        cuda.free_address(0, ptr, SIZE)
        cuda.release(0, handle)
    return {"same": same}


ROLES = {
    "devices": lambda args: _devices(),
    "read_only": lambda args: _read_only(),
    "export": lambda args: _export(int(args[0])),
    "import": lambda args: _import(int(args[0])),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m wand.tools.gpuprobe", description=__doc__.split("\n")[0]
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--role", choices=ROLES, help=argparse.SUPPRESS)
    p.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.role:
        print(json.dumps(ROLES[args.role](args.args)))
        return 0
    found = probe()
    print(json.dumps(found, indent=2) if args.json else render(found))
    return 0 if passed(found) else 1


if __name__ == "__main__":
    sys.exit(main())
