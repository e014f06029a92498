"""The GPU benchmark run by ``scripts/device-check``: every figure from one run, one GPU.

On the same synthetic A14B checkpoint (real tensor counts, reduced width): the daemon's cold
load onto the GPU against the two hardware limits measured in the same run (parallel
page-cache reads of the files, pinned host-to-device copies), against diffusers/transformers
``from_pretrained`` + ``.to("cuda")`` in a fresh process, and the attach times of fresh
clients whose CUDA context already exists (context creation is a cost of any CUDA process).

``python -m wand.tools.gpubench --workdir DIR [--width W] [--out DIR]`` writes the checkpoints,
measures, prints the summary table and, with ``--out``, writes it there (txt and json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from wand.tools import bench

WIDTH = 1976  # ≈ 20 GB of original-layout files with the real A14B tensor counts
READ_CHUNK = 32 << 20
H2D_BYTES = 1 << 30
MODULE = "wand.tools.gpubench"  # what fresh measuring processes run (python -m)
TARGETS = {
    "state_dicts": 0.050,
    "modules": 0.5,
    "speedup": 3.0,
    "of_limit": 0.85,
    "restart": 2.0,
}


def run(workdir: Path, width: int = WIDTH, repeat: int = 5, device: str = "cuda:0") -> dict:
    from wand.wan import read_checkpoint, write_tiny

    start = time.perf_counter()
    original, diffusers = (
        write_tiny(workdir / layout, "t2v-A14B", layout, preset="bench", width=width)
        for layout in ("original", "diffusers")
    )
    os.sync()
    spec = read_checkpoint(original)
    files = sorted({t.file for c in spec.components.values() for t in c.tensors})
    r: dict[str, Any] = {
        "width": width,
        "write_seconds": time.perf_counter() - start,
        "tensors": sum(len(c.tensors) for c in spec.components.values()),
        "disk_bytes": sum(f.stat().st_size for f in files),
        "resident_bytes": sum(c.nbytes for c in spec.components.values()),
    }
    r["page_cache_read"] = parallel_read(files)  # twice: the first one warms the cache
    r["page_cache_read"] = parallel_read(files)
    r["h2d"] = pinned_h2d(device)
    endpoint = f"ipc://{workdir}/bench.sock"
    daemon = bench.start_daemon(original, endpoint, workdir / "daemon.log", "--device", device)
    try:
        r["daemon"] = bench._wait_loaded(daemon, endpoint)
        r["daemon"]["gbps"] = r["disk_bytes"] / r["daemon"]["load_seconds"] / 1e9
        for what in ("state_dicts", "modules"):
            r[f"attach_{what}"] = bench._fresh_client_times(endpoint, what, repeat, MODULE)
    finally:
        daemon.terminate()
        daemon.wait(60)
    r["from_pretrained_cuda"] = bench._fresh(["from_pretrained", str(diffusers)], MODULE)
    r["restart"] = bench.restart_times(original, workdir, "--device", device)
    return r


def parallel_read(files: list[Path], threads: int | None = None) -> dict[str, float]:
    """Positional reads of every file in ``READ_CHUNK`` pieces by ``threads`` threads, each
    into its own reused buffer: what the page cache (or the disk) gives to many readers."""
    pieces = [(f, o) for f in files for o in range(0, f.stat().st_size, READ_CHUNK)]
    buffers: dict[int, memoryview] = {}

    def read(piece: tuple[Path, int]) -> int:
        buf = buffers.setdefault(threading.get_ident(), memoryview(bytearray(READ_CHUNK)))
        fd = os.open(piece[0], os.O_RDONLY)
        try:
            return os.preadv(fd, [buf], piece[1])
        finally:
            os.close(fd)

    start = time.perf_counter()
    with ThreadPoolExecutor(threads or os.cpu_count()) as pool:
        total = sum(pool.map(read, pieces))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "bytes": total, "gbps": total / seconds / 1e9}


def pinned_h2d(device: str, repeat: int = 5) -> dict[str, float]:
    """Best of ``repeat`` copies of 1 GiB from pinned host memory to the GPU."""
    import torch

    host = torch.empty(H2D_BYTES, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(H2D_BYTES, dtype=torch.uint8, device=device)
    dev.copy_(host, non_blocking=True)  # warm-up
    best = float("inf")
    for _ in range(repeat):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        dev.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        best = min(best, begin.elapsed_time(end) / 1e3)
    del host, dev
    torch.cuda.empty_cache()  # the daemon gets the whole GPU
    return {"seconds": best, "bytes": H2D_BYTES, "gbps": H2D_BYTES / best / 1e9}


def render(r: dict[str, Any]) -> str:
    gb = r["disk_bytes"] / 1e9
    d, fp = r["daemon"], r["from_pretrained_cuda"]["seconds"]
    limit = min(r["page_cache_read"]["gbps"], r["h2d"]["gbps"])
    sds, mods = r["attach_state_dicts"], r["attach_modules"]
    rows = [
        ("files written (both layouts)", f"{r['write_seconds']:.1f} s", "", ""),
        ("page-cache read, parallel", _rate(r["page_cache_read"]), "", ""),
        ("pinned host-to-device copy", _rate(r["h2d"]), "", ""),
        (
            "daemon cold load to GPU",
            f"{d['load_seconds']:.2f} s  {d['gbps']:.2f} GB/s",
            f">= {TARGETS['of_limit']:.0%} of {limit:.2f} GB/s",
            _ok(d["gbps"] >= TARGETS["of_limit"] * limit),
        ),
        (
            "from_pretrained + .to(cuda)",
            f"{fp:.2f} s  ({fp / d['load_seconds']:.1f}x the load)",
            f">= {TARGETS['speedup']:.0f}x",
            _ok(fp >= TARGETS["speedup"] * d["load_seconds"]),
        ),
        (
            "attach 4 state dicts",
            f"{sds['median_seconds'] * 1e3:.1f} ms",
            f"< {TARGETS['state_dicts'] * 1e3:.0f} ms",
            _ok(sds["median_seconds"] < TARGETS["state_dicts"]),
        ),
        (
            "attach 4 modules",
            f"{mods['median_seconds'] * 1e3:.1f} ms",
            f"< {TARGETS['modules'] * 1e3:.0f} ms",
            _ok(mods["median_seconds"] < TARGETS["modules"]),
        ),
    ]
    if "restart" in r:
        x = r["restart"]
        rows.append(
            (
                "restart, slabs adopted",
                f"{x['adopted_seconds']:.2f} s to READY ({x['adopted']}/{x['components']} "
                f"adopted; cold {x['cold_seconds']:.1f} s)",
                f"< {TARGETS['restart']:.0f} s",
                _ok(x["adopted_seconds"] < TARGETS["restart"] and x["adopted"] == x["components"]),
            )
        )
    head = (
        f"GPU benchmark, {r.get('gpu', 'GPU')}: t2v-A14B synthetic, width {r['width']}, "
        f"{r['tensors']} tensors, {gb:.2f} GB of files, {r['resident_bytes'] / 1e9:.2f} GB "
        f"resident; attach: median of {sds['runs']} fresh clients, after CUDA context creation"
    )
    width = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, width, strict=True)) for row in rows]
    return "\n".join([head, *lines])


def _rate(m: dict[str, float]) -> str:
    return f"{m['seconds']:.2f} s  {m['gbps']:.2f} GB/s"


def _ok(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


# --- what the fresh processes run ---------------------------------------------------------


def _context() -> None:
    import torch

    torch.cuda.init()
    torch.empty(1, device="cuda")


def _measure(what: str, arg: str) -> float:
    import torch

    _context()
    if what == "state_dicts":
        return bench._measure_state_dicts(arg)
    if what == "modules":
        return bench._measure_modules(arg)
    bench._import_classes()
    start = time.perf_counter()
    models = [m.to("cuda") for m in bench.from_pretrained(arg)]
    torch.cuda.synchronize()
    assert models
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m wand.tools.gpubench", description=__doc__)
    p.add_argument("--workdir", type=Path, required=True, help="new folder for checkpoints")
    p.add_argument("--width", type=int, default=WIDTH, help="model width (size ∝ width²)")
    p.add_argument("--repeat", type=int, default=5, help="fresh clients per attach figure")
    p.add_argument("--out", type=Path, help="also write gpubench.txt and gpubench.json here")
    args = p.parse_args(argv)
    import torch

    result = run(args.workdir, args.width, args.repeat)
    result["gpu"] = torch.cuda.get_device_name(0)
    text = render(result)
    print(text)
    if args.out:
        (args.out / "gpubench.txt").write_text(text + "\n")
        (args.out / "gpubench.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if len(sys.argv) == 3 and not sys.argv[1].startswith("-"):  # a fresh measuring process
        print(json.dumps({"seconds": _measure(sys.argv[1], sys.argv[2])}))
    else:
        sys.exit(main())
