"""The benchmark behind ``wanctl bench``: load, attach and ``from_pretrained``, one run.

Every figure is measured in the same run on the same files: the daemon's cold load against a
raw sequential read of the checkpoint files, attach times in fresh client processes, and the
diffusers/transformers ``from_pretrained`` baseline in a fresh process.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

COMPONENTS = ("text_encoder", "vae", "high_noise_model", "low_noise_model")
MODULE_CLASSES = (
    "transformers:UMT5EncoderModel",
    "diffusers:AutoencoderKLWan",
    "diffusers:WanTransformer3DModel",
)
BENCH_WIDTH = 512  # with the real tensor counts: 1.3 GB of files, 0.75 GB resident
READ_CHUNK = 16 << 20
# the generation both sides of the generate benchmark start
GENERATION = {"prompt": "a cat walks on the beach", "size": (32, 32), "frames": 5, "steps": 2}


def run(
    checkpoint: Path | None,
    repeat: int = 5,
    width: int = BENCH_WIDTH,
    workdir: Path | None = None,
    generate: bool = False,
) -> dict[str, Any]:
    """Every figure of ``wanctl bench``; the work folder is removed after unless given."""
    work = Path(workdir or tempfile.mkdtemp(prefix="wand-bench-"))
    try:
        return _run(work, checkpoint, repeat, width, generate)
    finally:
        if workdir is None:  # the checkpoints it wrote are gigabytes: never left behind
            shutil.rmtree(work, ignore_errors=True)


def _run(
    work: Path, checkpoint: Path | None, repeat: int, width: int, generate: bool
) -> dict[str, Any]:
    from wand.wan import read_checkpoint

    baseline_dir = None
    if checkpoint is None:
        checkpoint, baseline_dir = (
            _make_checkpoint(work, layout, width) for layout in ("original", "diffusers")
        )
        os.sync()  # let writeback of the new files finish before anything is timed
    spec = read_checkpoint(checkpoint)
    if spec.layout == "diffusers":
        baseline_dir = Path(checkpoint)
    files = sorted({t.file for c in spec.components.values() for t in c.tensors})
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "task": spec.task,
        "tensors": {n: len(c.tensors) for n, c in spec.components.items()},
        "disk_bytes": sum(f.stat().st_size for f in files),
        "resident_bytes": sum(c.nbytes for c in spec.components.values()),
    }
    progress("raw sequential read of the files")
    result["raw_read"] = raw_read(files)
    endpoint = f"ipc://{work}/bench.sock"
    progress("daemon cold load")
    daemon = start_daemon(checkpoint, endpoint, work / "daemon.log")
    try:
        result["daemon"] = _wait_loaded(daemon, endpoint)
        result["daemon"]["gbps"] = result["disk_bytes"] / result["daemon"]["load_seconds"] / 1e9
        progress(f"attaching in {repeat} fresh processes")
        result["attach_state_dicts"] = _fresh_client_times(endpoint, "state_dicts", repeat)
        result["attach_modules"] = _fresh_client_times(endpoint, "modules", repeat)
        progress("scripts to four modules: wanctl run, python, from_pretrained")
        result["scripts"] = script_times(work, endpoint, baseline_dir, repeat)
        progress("LoRA from the daemon and from its file")
        result["lora"] = lora_times(work, checkpoint, endpoint, min(repeat, 3))
    finally:
        daemon.terminate()
        daemon.wait(30)
    result["fp8"] = fp8_times(work, checkpoint, spec.task, repeat)
    small = (
        checkpoint
        if baseline_dir is None
        else _make_checkpoint(work, "original", width // 2, "half")
    )
    progress("restarts to READY, cold and with every slab adopted, at two widths")
    result["restart"] = [restart_times(c, work) for c in (small, checkpoint)]
    if baseline_dir is not None:
        progress("from_pretrained of the four components")
        result["from_pretrained"] = _fresh(["from_pretrained", str(baseline_dir)])
    if generate:
        for preset in ("tiny", "bench"):
            progress(f"generate to the first denoising step ({preset} checkpoint)")
            result.setdefault("generate", {})[preset] = generate_times(work, preset, repeat, width)
    return result


def progress(what: str) -> None:
    """What the bench measures now, on stderr (a whole run takes minutes)."""
    print(f"wanctl bench: {what}...", file=sys.stderr, flush=True)


# A user's script that needs the four modules; it prints when it has them.
SCRIPT = """
import json, time
import wand
with wand.connect() as c:
    modules = [c.module(n) for n in {components!r}]
print(json.dumps({{"ready_at": time.time()}}))
"""
# The same without wand: the four components from a -Diffusers folder.
FROM_PRETRAINED_SCRIPT = """
import json, sys, time
from wand.tools.bench import from_pretrained
modules = from_pretrained(sys.argv[1])
print(json.dumps({"ready_at": time.time()}))
"""


def script_times(
    work: Path, endpoint: str, baseline_dir: Path | None, repeat: int
) -> dict[str, Any]:
    """Seconds from a command's start to the moment a script holds the four modules (median
    of ``repeat``): ``wanctl run script.py`` (its warm client started by an untimed first
    run), ``python script.py``, and a script that loads them with ``from_pretrained``."""
    script = work / "four_modules.py"
    script.write_text(SCRIPT.format(components=COMPONENTS))
    env = _warm_env(work, endpoint)  # the bench's own warm client, stopped at the end
    wanctl = [sys.executable, "-m", "wanctl", "run", str(script)]
    commands = {"wanctl_run": wanctl, "python": [sys.executable, str(script)]}
    if baseline_dir is not None:
        fp = work / "from_pretrained.py"
        fp.write_text(FROM_PRETRAINED_SCRIPT)
        commands["from_pretrained"] = [sys.executable, str(fp), str(baseline_dir)]
    try:
        _until_ready(wanctl, env)  # starts the warm client
        return {
            name: statistics.median(_until_ready(cmd, env) for _ in range(repeat))
            for name, cmd in commands.items()
        } | {"runs": repeat}
    finally:
        _stop_warm(env)


def _until_ready(cmd: list[str], env: dict[str, str]) -> float:
    start = time.time()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["ready_at"] - start


def generate_times(work: Path, preset: str, repeat: int, width: int) -> dict[str, Any]:
    """Seconds from process start to the first denoising step of one t2v-A14B generation:
    ``wanctl generate`` with the components resident in a daemon, against a fresh process
    that loads the whole pipeline with ``from_pretrained`` (medians of ``repeat`` runs).
    ``width`` applies to the "bench" preset (the real tensor counts)."""
    from wand.wan import read_checkpoint, write_tiny

    size = {"width": width} if preset == "bench" else {}
    original, diffusers = (
        write_tiny(work / f"generate-{preset}-{layout}", "t2v-A14B", layout, preset=preset, **size)
        for layout in ("original", "diffusers")
    )
    os.sync()
    endpoint = f"ipc://{work}/generate.sock"
    daemon = start_daemon(original, endpoint, work / f"generate-{preset}.log")
    out = work / "generate.mp4"
    wanctl = ["-m", "wanctl", "--endpoint", endpoint, "generate", "--json", "--overwrite"]
    wanctl += ["--out", str(out), *_generation_options()]
    env = _warm_env(work, endpoint)
    try:
        _wait_loaded(daemon, endpoint)
        _to_first_step(wanctl, env)  # starts the warm client: not timed
        runs = [_generate_run(wanctl, env) for _ in range(repeat)]
    finally:
        _stop_warm(env)
        daemon.terminate()
        daemon.wait(30)
    baseline = [
        _to_first_step(["-m", "wand.tools.bench", "first_step", str(diffusers)])
        for _ in range(repeat)
    ]
    spec = read_checkpoint(original)
    return {
        "tensors": sum(len(c.tensors) for c in spec.components.values()),
        "resident_bytes": sum(c.nbytes for c in spec.components.values()),
        "wand_seconds": statistics.median(r["seconds"] for r in runs),
        "wand_encode_seconds": statistics.median(r["encode"] for r in runs),
        "wand_rest_seconds": statistics.median(r["seconds"] - r["encode"] for r in runs),
        "parts": {n: statistics.median(r["parts"][n] for r in runs) for n in runs[0]["parts"]},
        "from_pretrained_seconds": statistics.median(baseline),
        "runs": repeat,
    }


def _generate_run(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """One ``wanctl generate``: seconds from its launch to its first step, and its timeline."""
    start = time.time()
    out = subprocess.run(
        [sys.executable, *cmd], env=env, capture_output=True, text=True, check=True
    )
    report = json.loads(out.stdout)
    parts = report["timeline"]["parts"]
    seconds = report["first_step_at"] - start
    return {"seconds": seconds, "encode": parts["prompt encoding"], "parts": parts}


def _warm_env(work: Path, endpoint: str) -> dict[str, str]:
    """The environment of the bench's own warm client (its runtime folder is in ``work``)."""
    runtime = work / "run"
    runtime.mkdir(mode=0o700, exist_ok=True)
    return {**os.environ, "WAND_ENDPOINT": endpoint, "XDG_RUNTIME_DIR": str(runtime)}


def _stop_warm(env: dict[str, str]) -> None:
    subprocess.run([sys.executable, "-m", "wanctl", "warm", "stop"], env=env, capture_output=True)


def fp8_times(work: Path, checkpoint: Path, task: str, repeat: int) -> dict[str, Any]:
    """The experts of ``checkpoint`` resident in bfloat16, then in fp8 (one daemon each, in
    turn): their resident bytes, the time to build both expert modules in a fresh client,
    and the seconds per denoising step of ``wanctl generate`` (:data:`GENERATION`), medians
    of ``repeat`` fresh processes (at most 3 generations)."""
    from wand.client.connection import Client
    from wand.wan import TASKS

    experts = TASKS[task].experts
    endpoint = f"ipc://{work}/fp8.sock"
    out = {}
    for dtype in ("bfloat16", "float8_e4m3fn"):
        flags = [f"--dtype={e}={dtype}" for e in experts]
        daemon = start_daemon(checkpoint, endpoint, work / f"experts-{dtype}.log", *flags)
        try:
            _wait_loaded(daemon, endpoint)
            with Client(endpoint, name="bench") as c:
                comps = c.status()["components"]
            builds = [_fresh(["expert_modules", endpoint])["seconds"] for _ in range(repeat)]
            steps = [_seconds_per_step(endpoint, work) for _ in range(min(repeat, 3))]
        finally:
            daemon.terminate()
            daemon.wait(30)
        out[dtype] = {
            "expert_bytes": sum(c["bytes"] for c in comps if c["component"] in experts),
            "build_seconds": statistics.median(builds),
            "step_seconds": statistics.median(steps),
        }
    return {**out, "runs": repeat, "generations": min(repeat, 3)}


def _seconds_per_step(endpoint: str, work: Path) -> float:
    """``wanctl generate`` of :data:`GENERATION` in a fresh process: its denoising time per
    step (each step runs the expert twice: with and without the prompt)."""
    out = work / "fp8-generate.mp4"
    args = ["-m", "wanctl", "--endpoint", endpoint, "generate", "--plain", "--json"]
    args += ["--overwrite", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, *args, *_generation_options()], capture_output=True, text=True, check=True
    )
    report = json.loads(done.stdout)
    return report["denoise_seconds"] / report["steps"]


def restart_times(checkpoint: Path, work: Path, *flags: str) -> dict[str, Any]:
    """Seconds from process start to READY=1: a cold start, then a restart after a crash
    (SIGKILL) that adopts every slab from the fd store (systemd's, played by NotifyHost)."""
    from wand.client.connection import Client
    from wand.tools.notifyhost import NotifyHost

    host = NotifyHost()
    endpoint = f"ipc://{work}/restart.sock"
    cmd = [sys.executable, "-m", "wand.daemon", "--checkpoint", str(checkpoint)]
    cmd += ["--endpoint", endpoint, "--log-level", "WARNING", *flags]
    times, proc = [], None
    try:
        for _ in range(2):
            start = time.perf_counter()
            proc = host.start(cmd, work / "restart.log")
            host.collect(lambda m: any(x.startswith("READY=1") for x in m), timeout=1800)
            times.append(time.perf_counter() - start)
            with Client(endpoint, name="bench") as c:
                comps = c.status()["components"]
            host.messages.clear()
            proc.kill()  # a crash: Restart= brings it back with the stored descriptors
            proc.wait()
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        host.close()
    return {
        "resident_bytes": sum(c["bytes"] for c in comps),
        "cold_seconds": times[0],
        "adopted_seconds": times[1],
        "adopted": sum(c["adopted"] for c in comps),
        "components": len(comps),
    }


def lora_times(work: Path, checkpoint: Path, endpoint: str, repeat: int) -> dict[str, Any]:
    """A rank-64 LoRA on every block layer of both experts: loading it into a fresh client's
    pipeline from its file vs. attaching it from the daemon, and what fusing costs."""
    from wand.client.connection import Client
    from wand.wan.tiny_lora import write_tiny_lora

    path = write_tiny_lora(work / "bench-lora.safetensors", checkpoint, "comfy", rank=64)
    with Client(endpoint, name="bench") as c:
        address = c.request("load_lora", name="bench", path=str(path), expert="both", timeout=600)
        c.wait_loaded([address["name"]])
    runs = {
        how: [_fresh([f"lora_{how}", endpoint, str(path)]) for _ in range(repeat)]
        for how in ("file", "daemon")
    }
    fused = runs["daemon"][-1]
    return {
        "file_bytes": path.stat().st_size,
        "file_seconds": statistics.median(r["seconds"] for r in runs["file"]),
        "daemon_seconds": statistics.median(r["seconds"] for r in runs["daemon"]),
        "fused_bytes": fused["fused_bytes"],
        "fused_layers_bytes": fused["fused_layers_bytes"],
        "runs": repeat,
    }


def _to_first_step(args: list[str], env: dict[str, str] | None = None) -> float:
    """Run ``python *args``; seconds from its launch to the first denoising step it reports."""
    start = time.time()
    out = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, check=True, env=env
    )
    return json.loads(out.stdout)["first_step_at"] - start


def _generation_options() -> list[str]:
    g = GENERATION
    return [
        *("--prompt", g["prompt"], "--size", "{}*{}".format(*g["size"]), "--base-seed", "0"),
        *("--frame-num", str(g["frames"]), "--sample-steps", str(g["steps"])),
    ]


def _make_checkpoint(work: Path, layout: str, width: int, name: str | None = None) -> Path:
    """Write a bench-preset t2v-A14B checkpoint in a child process: generating it in this
    one left gigabytes of freed heap behind that slowed the daemon's load measured next
    (0.94 s against 0.46 s on the 2-core VM)."""
    dest = work / (name or layout)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "wanctl",
            "make-tiny",
            str(dest),
            "--layout",
            layout,
            "--preset",
            "bench",
            "--width",
            str(width),
        ],
        check=True,
        capture_output=True,
    )
    return dest


def raw_read(files: list[Path]) -> dict[str, float]:
    """Sequential reads of whole files into one reused buffer: what the disk/page cache gives."""
    buf = bytearray(READ_CHUNK)
    view = memoryview(buf)
    total = 0
    start = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "bytes": total, "gbps": total / seconds / 1e9}


def start_daemon(checkpoint: Path, endpoint: str, log: Path, *flags: str) -> subprocess.Popen:
    """``wand`` on ``checkpoint`` at ``endpoint``, logging (warnings and up) to ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "wand.daemon",
                "--checkpoint",
                str(checkpoint),
                "--endpoint",
                endpoint,
                "--log-level",
                "WARNING",
                *flags,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _wait_loaded(daemon: subprocess.Popen, endpoint: str) -> dict[str, float]:
    """Wait for every component to be ready, polling gently: the load has the cores."""
    from wand.client.connection import Client
    from wand.common.errors import WandError

    start = time.perf_counter()
    client = None
    while True:
        time.sleep(0.1)
        if daemon.poll() is not None:
            raise RuntimeError(f"daemon exited with {daemon.returncode} before it was ready")
        try:
            client = client or Client(endpoint, timeout=5, name="bench")
            comps = client.status()["components"]
        except WandError:
            continue
        if all(c["state"] == "ready" for c in comps):
            client.close()
            return {
                "start_to_ready_seconds": time.perf_counter() - start,
                "load_seconds": sum(c["load_seconds"] for c in comps),
            }


def _fresh_client_times(
    endpoint: str, what: str, repeat: int, module: str = "wand.tools.bench"
) -> dict[str, float]:
    times = [_fresh([what, endpoint], module)["seconds"] for _ in range(repeat)]
    return {"median_seconds": statistics.median(times), "min_seconds": min(times), "runs": repeat}


def _fresh(args: list[str], module: str = "wand.tools.bench") -> dict[str, Any]:
    """Run one measurement in a new Python process (``python -m module *args``) and return
    what it printed."""
    out = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- what the fresh processes run ---------------------------------------------------------


def _client() -> Any:
    """``wand.connect``, with torch imported: fixed costs of any client, not timed."""
    import torch  # noqa: F401  (the client imports it on its first attach)

    from wand import connect

    return connect


def _measure_state_dicts(endpoint: str) -> float:
    connect = _client()

    start = time.perf_counter()
    with connect(endpoint) as c:
        sds = [c.attach(name) for name in COMPONENTS]
    assert all(sds)
    return time.perf_counter() - start


def _measure_modules(endpoint: str) -> float:
    connect = _client()

    _import_classes()
    start = time.perf_counter()
    with connect(endpoint) as c:
        mods = [c.module(name) for name in COMPONENTS]
    assert all(mods)
    return time.perf_counter() - start


def _import_classes() -> None:
    """Importing diffusers/transformers is a fixed cost of any client: not timed."""
    from wand.wan.modules import resolve_class

    for cls in MODULE_CLASSES:
        resolve_class(cls)


def _measure_expert_modules(endpoint: str) -> float:
    """Build the diffusion model modules (the experts) of the daemon's checkpoint."""
    connect = _client()

    _import_classes()
    start = time.perf_counter()
    with connect(endpoint) as c:
        experts = [x["name"] for x in c.list() if x["class"] == MODULE_CLASSES[2]]
        mods = [c.module(name) for name in experts]
    assert mods
    return time.perf_counter() - start


def _measure_lora(endpoint: str, path: str, how: str) -> dict[str, float]:
    """Load the bench LoRA into both experts (from its file, or the daemon's by name); with
    the daemon's, also fuse it and measure the private memory fusing takes."""
    connect = _client()

    _import_classes()
    with connect(endpoint) as c:
        vp = c.pipeline()
        start = time.perf_counter()
        vp.load_lora_weights(path if how == "file" else "bench", expert="both")
        out = {"seconds": time.perf_counter() - start}
        if how == "daemon":
            before = _private_bytes()
            vp.fuse_lora()
            out["fused_bytes"] = _private_bytes() - before
            out["fused_layers_bytes"] = sum(
                layer.get_base_layer().weight.nbytes for layer in _fused_layers(vp)
            )
    return out


def _fused_layers(vp: Any) -> list[Any]:
    from wand.client.lora import tuner_layers

    models = [vp.pipe.transformer, vp.pipe.transformer_2]
    return [la for m in models if m is not None for la in tuner_layers(m) if la.merged]


def _private_bytes() -> int:
    """This process's anonymous resident memory (private copies live there)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def _measure_from_pretrained(folder: str) -> float:
    _import_classes()
    start = time.perf_counter()
    from_pretrained(folder)
    return time.perf_counter() - start


def from_pretrained(folder: str) -> list[Any]:
    """The four models of a -Diffusers folder, loaded the usual way (imports done first)."""
    import torch
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    return [
        WanTransformer3DModel.from_pretrained(
            folder, subfolder="transformer", torch_dtype=torch.bfloat16
        ),
        WanTransformer3DModel.from_pretrained(
            folder, subfolder="transformer_2", torch_dtype=torch.bfloat16
        ),
        UMT5EncoderModel.from_pretrained(folder, subfolder="text_encoder", dtype=torch.bfloat16),
        AutoencoderKLWan.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32),
    ]


class _FirstStep(Exception):
    pass


def _measure_first_step(folder: str) -> dict[str, float]:
    """Load the whole pipeline from ``folder`` and start :data:`GENERATION`; stop at the
    first denoising step."""
    import torch
    from diffusers import UniPCMultistepScheduler, WanPipeline

    from wand.wan.sampling import NEGATIVE_PROMPT, SAMPLING

    s = SAMPLING["t2v-A14B"]
    pipe = WanPipeline.from_pretrained(
        folder,
        dtype={"default": torch.bfloat16, "vae": torch.float32},
        scheduler=UniPCMultistepScheduler.from_pretrained(
            folder, subfolder="scheduler", flow_shift=s.shift
        ),
    )
    reached: list[float] = []

    def first_step(*_: Any) -> None:
        reached.append(time.time())
        raise _FirstStep

    pipe.transformer.register_forward_pre_hook(first_step)
    g = GENERATION
    try:
        pipe(
            prompt=g["prompt"],
            negative_prompt=NEGATIVE_PROMPT,
            width=g["size"][0],
            height=g["size"][1],
            num_frames=g["frames"],
            num_inference_steps=g["steps"],
            guidance_scale=s.guidance[0],
            guidance_scale_2=s.guidance[1],
            generator=torch.Generator().manual_seed(0),
        )
    except _FirstStep:
        pass
    return {"first_step_at": reached[0]}


def render(r: dict[str, Any]) -> str:
    gb = r["disk_bytes"] / 1e9
    d = r["daemon"]
    lines = [
        f"checkpoint {r['checkpoint']} ({r['task']}): {sum(r['tensors'].values())} tensors "
        f"({', '.join(f'{k} {v}' for k, v in r['tensors'].items())}), {gb:.2f} GB on disk, "
        f"{r['resident_bytes'] / 1e9:.2f} GB resident",
        f"raw sequential read      {r['raw_read']['seconds']:8.3f} s  "
        f"{r['raw_read']['gbps']:6.2f} GB/s",
        f"daemon cold load         {d['load_seconds']:8.3f} s  {d['gbps']:6.2f} GB/s "
        f"of files  ({d['gbps'] / r['raw_read']['gbps']:.2f}x raw read; "
        f"start to ready {d['start_to_ready_seconds']:.2f} s)",
        f"attach 4 state dicts     {r['attach_state_dicts']['median_seconds'] * 1e3:8.1f} ms "
        f"(median of {r['attach_state_dicts']['runs']} fresh processes; target < 10 ms)",
        f"attach 4 modules         {r['attach_modules']['median_seconds'] * 1e3:8.1f} ms "
        f"(median of {r['attach_modules']['runs']} fresh processes, after importing "
        "diffusers/transformers; target <= 250 ms)",
    ]
    if "from_pretrained" in r:
        fp = r["from_pretrained"]["seconds"]
        mods = r["attach_modules"]["median_seconds"]
        lines.append(
            f"from_pretrained x4       {fp:8.3f} s   (fresh process, after imports; "
            f"{fp / mods:.1f}x the attach of 4 modules)"
        )
    if "scripts" in r:
        lines.append(render_scripts(r["scripts"]))
    if "fp8" in r:
        lines.append(render_fp8(r["fp8"]))
    lines += [render_restart(x) for x in r.get("restart", [])]
    if "lora" in r:
        lines += render_lora(r["lora"])
    lines += [render_generate(p, g) for p, g in r.get("generate", {}).items()]
    return "\n".join(lines)


def render_scripts(x: dict[str, Any]) -> str:
    w, p = x["wanctl_run"], x["python"]
    fp = x.get("from_pretrained")
    also = f", {fp:.3f} s with from_pretrained ({fp / w:.0f}x)" if fp else ""
    return (
        f"script to 4 modules      {w:8.3f} s  wanctl run script.py vs {p:.3f} s python "
        f"script.py ({p / w:.0f}x){also}; from the command's start, median of {x['runs']}; "
        "target <= 0.25 s"
    )


def render_restart(x: dict[str, Any]) -> str:
    return (
        f"restart to READY         {x['adopted_seconds']:8.3f} s  with {x['adopted']} of "
        f"{x['components']} slabs adopted from the fd store vs {x['cold_seconds']:.3f} s cold "
        f"({x['resident_bytes'] / 1e9:.2f} GB resident; from process start; target <= 0.5 s)"
    )


def render_lora(x: dict[str, Any]) -> list[str]:
    return [
        f"LoRA into both experts   {x['daemon_seconds'] * 1e3:8.1f} ms attached from the daemon "
        f"vs {x['file_seconds'] * 1e3:.1f} ms from its file ({x['file_bytes'] / 1e6:.1f} MB, "
        f"rank 64; median of {x['runs']} fresh clients)",
        f"fused LoRA costs         {x['fused_bytes'] / 1e6:8.1f} MB private memory in the "
        f"client (the fused layers' weights: {x['fused_layers_bytes'] / 1e6:.1f} MB)",
    ]


def render_fp8(x: dict[str, Any]) -> str:
    bf, f8 = x["bfloat16"], x["float8_e4m3fn"]
    g = GENERATION
    return (
        f"fp8 experts              {f8['expert_bytes'] / 1e6:8.1f} MB resident vs "
        f"{bf['expert_bytes'] / 1e6:.1f} MB in bfloat16 "
        f"({f8['expert_bytes'] / bf['expert_bytes']:.2f}x); building both modules "
        f"{f8['build_seconds'] * 1e3:.1f} ms vs {bf['build_seconds'] * 1e3:.1f} ms "
        f"(median of {x['runs']}); a denoising step {f8['step_seconds']:.3f} s vs "
        f"{bf['step_seconds']:.3f} s ({'{}*{}'.format(*g['size'])}, {g['frames']} frames; "
        f"median of {x['generations']} wanctl generate)"
    )


def render_generate(preset: str, g: dict[str, Any]) -> str:
    w, f = g["wand_seconds"], g["from_pretrained_seconds"]
    parts = ", ".join(f"{name} {seconds:.3f}" for name, seconds in g["parts"].items())
    return (
        f"to 1st denoising step    {w:8.3f} s  wanctl generate vs {f:.3f} s from_pretrained "
        f"({f / w:.1f}x; {preset} checkpoint: {g['tensors']} tensors, "
        f"{g['resident_bytes'] / 1e6:.1f} MB; from process start, median of {g['runs']}); "
        f"without prompt encoding {g['wand_rest_seconds']:.3f} s (target <= 0.5 s)\n"
        f"                           parts: {parts}"
    )


def _main(argv: list[str]) -> None:
    what, arg, *rest = argv
    if what == "first_step":
        print(json.dumps(_measure_first_step(arg)))
        return
    if what.startswith("lora_"):
        print(json.dumps(_measure_lora(arg, rest[0], what.removeprefix("lora_"))))
        return
    measure = {
        "state_dicts": _measure_state_dicts,
        "modules": _measure_modules,
        "expert_modules": _measure_expert_modules,
        "from_pretrained": _measure_from_pretrained,
    }[what]
    print(json.dumps({"seconds": measure(arg)}))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _main(sys.argv[1:])
