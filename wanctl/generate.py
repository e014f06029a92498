"""``wanctl generate``: one video from the resident checkpoint, with Wan2.2 generate.py's options.

:func:`check` turns the options into a checked :class:`Job`: every option is checked before
anything is attached or written, and a bad one exits 2. :func:`attach` builds the pipeline for
it, :func:`generate` makes the video.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import re
import sys
import time
import warnings
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wanctl import exits
from wanctl.generate_args import OTHER_TASKS, UsageError, add_parser, notes, served
from wanctl.render import size as human

if TYPE_CHECKING:
    from PIL.Image import Image

    from wand.client.connection import Client
    from wand.client.pipeline import VideoPipeline
    from wand.wan.footprint import Geometry

__all__ = ["UsageError", "add_parser", "run"]

LORA_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
SEEDS = 2**64  # torch's generators take seeds below this
# library notices that wanctl generate's own use of the libraries triggers: (logger, message)
NOTICES = [
    # diffusers' image-to-video pipeline imports CLIPImageProcessor; wand uses no image encoder
    ("transformers.utils.import_utils", "`CLIPImageProcessor` requires torchvision"),
]
# (module, message) of warnings wanctl generate expects: several LoRAs are several adapters
EXPECTED_WARNINGS = [("peft\\.tuners", "Already found a `peft_config` attribute")]


@dataclass(frozen=True)
class Lora:
    """One LoRA option: the file (or the name of a LoRA the daemon holds), its scale and the
    experts it goes into."""

    option: str  # "--lora", "--lora-high", "--lora-low"
    text: str  # as given
    source: Path | str  # a file, or the name of a LoRA the daemon holds
    scale: float
    expert: str  # "high", "low" or "both" (wand.wan.lora_keys.EXPERTS)


@dataclass
class Job:
    """The request, checked and completed with the task's defaults."""

    checkpoint: str
    task: str
    prompt: str
    image: Image | None  # the first frame, as the model gets it (ti2v-5B: cropped)
    call: dict[str, Any]  # keyword arguments of the pipeline call
    solver: str  # "unipc" or "dpm++"
    out: Path
    frames_dir: Path | None
    fps: int
    seed: int
    loras: list[Lora]
    fuse: bool  # fuse the LoRAs before generating
    notes: list[str] = field(default_factory=list)  # options without effect, and why


def run(args: argparse.Namespace) -> int:
    marks = launch_marks(args)
    try:
        with quiet_libraries():
            _import_libraries()
            marks["imported"] = time.time()
            from wand.client.connection import Client

            with Client(args.endpoint, timeout=args.timeout, name="wanctl-generate") as c:
                marks["connected"] = time.time()
                job = check(args, c)
                marks["checked"] = time.time()
                for note in job.notes:
                    print(f"wanctl generate: note: {note}", file=sys.stderr)
                pipe, seconds = attach(job, c)
                marks["attached"] = time.time()
                report = generate(pipe, job)
    except UsageError as e:
        print(f"wanctl generate: {e}", file=sys.stderr)
        return exits.USAGE
    report.update(seconds, timeline=timeline(marks, pipe.timings))
    if args.timings:
        print(render_timeline(report["timeline"]), file=sys.stderr)
    print(json.dumps(report, indent=2) if args.json else summary(report))
    return exits.OK


def launch_marks(args: argparse.Namespace) -> dict[str, float]:
    """When this command started and reached its main (the command's own process; through the
    warm client, when the warm client forked the process that runs it)."""
    from wand.client import prebuilt

    if prebuilt.launched:
        return {k: prebuilt.launched[k] for k in ("started", "main", "forked")}
    return {"started": args.started, "main": args.main}


# the way to the first denoising step, in order: (part, from mark, to mark)
TIMELINE = (
    ("process start and wanctl's imports", "started", "main"),
    ("hand-off to the warm client", "main", "forked"),
    ("imports (torch, diffusers, transformers)", None, "imported"),
    ("connect to the daemon", "imported", "connected"),
    ("check the options", "connected", "checked"),
    ("modules (attach and bind)", "checked", "attached"),
)


def timeline(marks: dict[str, float], t: dict[str, float]) -> dict[str, Any]:
    """Seconds of each part of the way from the command's start to the first denoising step;
    ``other`` is what is left of the pipeline's preparation (scheduler, image, checks)."""
    parts: dict[str, float] = {}
    previous = marks["forked"] if "forked" in marks else marks["main"]
    for name, start, end in TIMELINE:
        if end in marks and (start is None or start in marks):
            parts[name] = marks[end] - (marks[start] if start else previous)
    parts["prompt encoding"] = t["encode"]
    parts["latents"] = t["latents"]
    total = t["first_step_at"] - marks["started"]
    parts["other preparation"] = total - sum(parts.values())
    return {
        "parts": parts,
        "to_first_step": total,
        "first_step": t["first_step"],
        "warm": "forked" in marks,
    }


def render_timeline(tl: dict[str, Any]) -> str:
    how = "through the warm client" if tl["warm"] else "in this process"
    lines = [f"to the first denoising step ({how}):"]
    lines += [f"  {name:<42} {seconds:7.3f} s" for name, seconds in tl["parts"].items()]
    rest = tl["to_first_step"] - tl["parts"]["prompt encoding"]
    lines.append(
        f"  {'total':<42} {tl['to_first_step']:7.3f} s  (without prompt encoding {rest:.3f} s)"
    )
    lines.append(f"  {'the first step itself':<42} {tl['first_step']:7.3f} s")
    return "\n".join(lines)


def check(args: argparse.Namespace, c: Client) -> Job:
    """The options as a :class:`Job`, every one checked against the daemon's checkpoint and
    this machine; nothing is attached or written. A bad option raises :class:`UsageError`."""
    found = notes(args)
    check_task(args.task)
    check_paths(args)
    seed = base_seed(args.base_seed)
    image = read_image(args.image) if args.image else None
    status = c.status()
    info = choose(status["checkpoints"], args.task, args.checkpoint, args.ckpt_dir)
    job = plan(args, info, image, seed)
    job.notes = found
    check_room(job, _geometry(info), rooms(status, job.checkpoint))
    check_loras(job.loras, info)
    return job


def attach(job: Job, c: Client) -> tuple[VideoPipeline, dict[str, float]]:
    """The pipeline for ``job``, its LoRAs loaded; seconds it took to attach and to load them."""
    start = time.perf_counter()
    pipe = c.pipeline(job.checkpoint, **_scheduler(job))
    attached = time.perf_counter()
    apply_loras(pipe, job)
    done = time.perf_counter()
    return pipe, {"attach_seconds": attached - start, "lora_seconds": done - attached}


def _scheduler(job: Job) -> dict[str, Any]:
    """The pipeline's scheduler when it is not the checkpoint's UniPC."""
    if job.solver == "dpm++":
        from wand.wan.solvers import dpm_solver

        return {"scheduler": dpm_solver(job.call["flow_shift"])}
    return {}


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Keep out of stderr (which is for notes and the progress bar) the notices the libraries
    print for what wanctl generate does on purpose (:data:`NOTICES`,
    :data:`EXPECTED_WARNINGS`), and nothing else."""
    drops = [(logging.getLogger(name), _Drop(text)) for name, text in NOTICES]
    for logger, drop in drops:
        logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            for module, text in EXPECTED_WARNINGS:
                warnings.filterwarnings("ignore", re.escape(text), UserWarning, module)
            yield
    finally:
        for logger, drop in drops:
            logger.removeFilter(drop)


class _Drop(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _import_libraries() -> None:
    """Import torch and diffusers' pipelines first, so that their cost is a part of its own
    in the timings (none through the warm client, which imported them ahead)."""
    import torch  # noqa: F401
    from diffusers import WanImageToVideoPipeline, WanPipeline  # noqa: F401


def check_paths(args: argparse.Namespace) -> None:
    if args.out is None:
        _writable_dir(Path("."), "--out (default: a new file here)")
    else:
        if args.out.suffix.lower() != ".mp4":
            raise UsageError(f"--out {args.out}: must be an .mp4 file")
        if args.out.is_dir():
            raise UsageError(f"--out {args.out}: is a directory")
        _writable_dir(args.out.parent, f"--out {args.out}")
    if args.save_frames is not None:
        if args.save_frames.exists() and not args.save_frames.is_dir():
            raise UsageError(f"--save-frames {args.save_frames}: not a directory")
        existing = args.save_frames if args.save_frames.exists() else args.save_frames.parent
        _writable_dir(existing, f"--save-frames {args.save_frames}")
        earlier = args.save_frames.is_dir() and next(args.save_frames.glob("frame_*.png"), None)
        if earlier:  # frames of an earlier video
            _new(earlier, f"--save-frames {args.save_frames}", args.overwrite)


def _new(path: Path, what: str, overwrite: bool) -> None:
    """Refuse to replace ``path`` unless asked to (``--overwrite``)."""
    if not overwrite and path.exists():
        raise UsageError(f"{what}: {path} exists (--overwrite replaces it)")


def _writable_dir(folder: Path, what: str) -> None:
    if not folder.exists():
        raise UsageError(f"{what}: directory {folder} does not exist")
    if not folder.is_dir():
        raise UsageError(f"{what}: {folder} is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{what}: directory {folder} is not writable")


def read_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise UsageError(f"--image {path}: cannot read it as an image: {e}") from None


def check_task(task: str | None) -> None:
    from wand.wan.tasks import TASKS

    if task in OTHER_TASKS:
        raise UsageError(f"--task {task}: a Wan2.2 task wand does not serve (it serves {served()})")
    if task is not None and task not in TASKS:
        raise UsageError(f"--task {task}: unknown task; known: {served()}")


def choose(
    checkpoints: list[dict[str, Any]],
    task: str | None,
    name: str | None = None,
    folder: Path | None = None,
) -> dict[str, Any]:
    """The loaded checkpoint called ``name`` or loaded from ``folder``, else the one for
    ``task`` (any, when there is only one)."""
    if not checkpoints:
        raise UsageError("the daemon holds no checkpoint (load one with wanctl load PATH)")
    held = ", ".join(f"{c['name']} ({c['task']})" for c in checkpoints)
    found = [
        c
        for c in checkpoints
        if name in (None, c["name"])
        and task in (None, c["task"])
        and (folder is None or os.path.realpath(folder) == os.path.realpath(c["path"]))
    ]
    if not found and folder is not None:
        raise UsageError(
            f"--ckpt-dir {folder}: the daemon holds no checkpoint from that folder (it holds "
            f"{held}; wanctl load {folder} loads it)"
        )
    if not found and name is not None:
        raise UsageError(f"--checkpoint {name}: the daemon holds {held}")
    if not found:
        raise UsageError(f"--task {task}: the daemon holds {held}")
    if len(found) > 1:
        raise UsageError(f"the daemon holds {held}; choose one with --checkpoint NAME")
    return found[0]


def base_seed(seed: int) -> int:
    """generate.py's: a negative seed is a random one in [0, sys.maxsize]."""
    if seed >= SEEDS:
        raise UsageError(
            f"--base-seed {seed}: must be below 2**64 (torch's generators take 64 bits)"
        )
    return seed if seed >= 0 else random.randint(0, sys.maxsize)


def plan(args: argparse.Namespace, info: dict[str, Any], image: Image | None, seed: int) -> Job:
    from wand.client.pipeline import cover_crop, fit_area, image_modes
    from wand.wan.sampling import NEGATIVE_PROMPT, SAMPLING

    task = info["task"]
    s = SAMPLING[task]
    width, height = _size(args.size, s.multiple) if args.size else s.size
    from_text, from_image = image_modes(info["extras"])
    if image is not None and not from_image:
        raise UsageError(f"{task} takes no --image")
    if image is None and not from_text:
        raise UsageError(f"{task} needs --image")
    if image is not None:
        crop = bool(info["extras"]["expand_timesteps"])  # ti2v-5B's textimage2video.py
        width, height = fit_area(image.size, width * height, s.multiple, crop)
        image = cover_crop(image, (width, height)) if crop else image
    frames = s.frames if args.frame_num is None else args.frame_num
    if frames < 1 or (frames - 1) % 4:
        raise UsageError(f"--frame-num {frames}: must be 4k+1 (1, 5, 9, ... 81, ...)")
    steps = s.steps if args.sample_steps is None else args.sample_steps
    if steps < 1:
        raise UsageError(f"--sample-steps {steps}: must be at least 1")
    shift = s.shift if args.sample_shift is None else args.sample_shift
    if shift <= 0:
        raise UsageError(f"--sample-shift {shift}: must be positive")
    guidance = _guidance(args.sample_guide_scale, task, len(s.guidance)) or s.guidance
    call = {
        "negative_prompt": NEGATIVE_PROMPT
        if args.negative_prompt is None
        else args.negative_prompt,
        "width": width,
        "height": height,
        "num_frames": frames,
        "num_inference_steps": steps,
        "flow_shift": shift,
        "guidance_scale": guidance[0],
        **({"guidance_scale_2": guidance[-1]} if len(s.guidance) > 1 else {}),
    }
    out = args.out or Path(f"{task}-{width}x{height}-{time.strftime('%Y%m%d-%H%M%S')}.mp4")
    _new(out, f"--out {out}", args.overwrite)
    loras = plan_loras(args, task, info.get("loras", {}))
    if args.lora_fuse and not loras:
        raise UsageError("--lora-fuse: no LoRA given")
    return Job(
        checkpoint=info["name"],
        task=task,
        prompt=args.prompt,
        image=image,
        call=call,
        solver=args.sample_solver,
        out=out,
        frames_dir=args.save_frames,
        fps=s.fps,
        seed=seed,
        loras=loras,
        fuse=args.lora_fuse,
    )


def _geometry(info: dict[str, Any]) -> Geometry:
    """The checkpoint's geometry, from the configs the daemon builds its modules with."""
    from wand.wan.footprint import Geometry
    from wand.wan.tasks import TASKS

    modules = _modules(info)
    expert = modules[TASKS[info["task"]].experts[0]]["config"]
    return Geometry.of(expert, modules["vae"]["config"], bool(info["extras"]["expand_timesteps"]))


def _modules(info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per component, the class and config the daemon builds its module from."""
    if "modules" not in info:
        raise UsageError(
            "the daemon runs an older wand than this wanctl (its status has no module "
            "configs): restart it (systemctl restart wand keeps every slab)"
        )
    return info["modules"]


def rooms(status: dict[str, Any], checkpoint: str) -> dict[str, tuple[str, int | None]]:
    """Per phase of a generation (:func:`wand.wan.footprint.phases`), the device it runs on
    and the memory free there (None: unknown): the experts', the VAE's, the CPU."""
    from wand.slabs import room as memory
    from wand.wan.tasks import TASKS

    info = next(c for c in status["checkpoints"] if c["name"] == checkpoint)
    comps = {c["name"]: c for c in status["components"]}
    free = {g["uuid"]: g.get("free_bytes") for g in status.get("gpus", [])}
    cpu = ("cpu", memory.available())

    def room(component: str) -> tuple[str, int | None]:
        c = comps.get(info["components"][component], {})
        return (c["device"], free.get(c["uuid"])) if c.get("uuid") else cpu

    return {"denoise": room(TASKS[info["task"]].experts[0]), "decode": room("vae"), "frames": cpu}


PHASES = {"denoise": "denoising", "decode": "decoding", "frames": "making frames"}


def check_room(job: Job, g: Geometry, room: dict[str, tuple[str, int | None]]) -> None:
    """The video fits the model's rotary table, and each phase the memory free where it
    runs (by :func:`wand.wan.footprint.phases`' estimate, which the message spells out)."""
    from wand.wan.footprint import beyond_rope, phases

    frames, width, height = (job.call[k] for k in ("num_frames", "width", "height"))
    what = f"--frame-num {frames} --size {width}*{height}"
    need = phases(g, frames, width, height)
    tokens = g.tokens(frames, width, height)
    estimate = "; ".join(
        f"{PHASES[phase]} {human(sum(parts.values()))} on {room[phase][0]} ("
        + ", ".join(f"{part} {human(n)}" for part, n in parts.items())
        + (f" for {tokens} tokens" if phase == "denoise" else "")
        + ")"
        for phase, parts in need.items()
    )
    why = beyond_rope(g, frames, width, height)
    if why is not None:
        raise UsageError(f"{what}: {why} (estimated memory: {estimate})")
    for phase, parts in need.items():
        device, free = room[phase]
        if free is not None and sum(parts.values()) > free:
            raise UsageError(
                f"{what}: {PHASES[phase]} needs about {human(sum(parts.values()))} on {device}, "
                f"{human(free)} free; fewer frames or a smaller --size (estimated memory: "
                f"{estimate})"
            )


def _size(text: str, multiple: int) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)[*x](\d+)", text)
    if not m:
        raise UsageError(f"--size {text}: expected WIDTH*HEIGHT, e.g. 1280*720")
    width, height = int(m[1]), int(m[2])
    if not width or not height or width % multiple or height % multiple:
        raise UsageError(
            f"--size {text}: width and height must be positive multiples of {multiple}"
        )
    return width, height


def _guidance(text: str | None, task: str, experts: int) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--sample-guide-scale {text}: expected a number or HIGH,LOW") from None
    if len(values) > experts:
        want = "one value or HIGH,LOW" if experts == 2 else "one value: it has one model"
        raise UsageError(f"--sample-guide-scale {text}: {task} takes {want}")
    return values


def plan_loras(args: argparse.Namespace, task: str, held: Collection[str] = ()) -> list[Lora]:
    """The LoRA options, each a file or the name of one of the daemon's LoRAs (``held``):
    ``--lora`` goes into every expert of the task, ``--lora-high`` / ``--lora-low`` into
    one, files and names alike."""
    from wand.wan.tasks import TASKS

    one_model = len(TASKS[task].experts) == 1
    options = [("--lora", "high" if one_model else "both", args.lora)]
    options += [("--lora-high", "high", args.lora_high), ("--lora-low", "low", args.lora_low)]
    loras = []
    for option, expert, texts in options:
        for text in texts:
            if one_model and option != "--lora":
                raise UsageError(f"{option} {text}: {task} has one model; use --lora")
            source, scale = parse_lora(option, text, held)
            loras.append(Lora(option, text, source, scale, expert))
    return loras


def parse_lora(option: str, text: str, held: Collection[str]) -> tuple[Path | str, float]:
    """``PATH[:SCALE]`` or ``NAME[:SCALE]`` → (the file or the name, the scale); a bare word
    (no ``/``, no file suffix) that is no file here may name a LoRA the daemon holds."""
    source, scale = _split_scale(option, text, held)
    path = Path(source).expanduser()
    if path.is_file():
        return path, scale
    if path.exists():
        raise UsageError(f"{option} {text}: {path} is not a file")
    word = _word(source)
    if word and source in held:
        return source, scale
    names = f" (it holds {', '.join(sorted(held))})" if held else ""
    why = f", and the daemon holds no LoRA named {source!r}{names}" if word else ""
    raise UsageError(f"{option} {text}: no such file{why}")


def _split_scale(option: str, text: str, held: Collection[str]) -> tuple[str, float]:
    """``SOURCE:SCALE`` → (SOURCE, SCALE); without a number after the last colon, the whole
    text is the source, unless what comes before it is a file or a held LoRA."""
    source, colon, tail = text.rpartition(":")
    try:
        scale = float(tail) if colon else None
    except ValueError:
        if _exists(source, held):
            raise UsageError(f"{option} {text}: the scale {tail!r} is not a number") from None
        scale = None
    if scale is None:
        return text, 1.0
    if not source or not math.isfinite(scale):
        raise UsageError(f"{option} {text}: expected PATH[:SCALE], SCALE a finite number")
    return source, scale


def _word(source: str) -> bool:
    return "/" not in source and not source.endswith(LORA_SUFFIXES)


def _exists(source: str, held: Collection[str]) -> bool:
    return Path(source).expanduser().exists() or (_word(source) and source in held)


def check_loras(loras: list[Lora], info: dict[str, Any]) -> None:
    """Each LoRA file fits the experts it goes into, checked on skeletons of the daemon's
    modules before anything is attached."""
    from wand.common.errors import LoraError
    from wand.wan.lora_keys import EXPERTS, check, describe, read
    from wand.wan.modules import skeleton
    from wand.wan.tasks import TASKS

    loras = [x for x in loras if isinstance(x.source, Path)]  # the daemon checked its own
    if not loras:
        return
    task, modules = info["task"], _modules(info)
    experts = dict(zip(EXPERTS["both"], TASKS[task].experts, strict=False))  # by component
    used = {c: modules[experts[c]] for lora in loras for c in EXPERTS[lora.expert]}
    models = {c: skeleton(m["class"], m["config"]) for c, m in used.items()}
    for lora in loras:
        try:
            state = read(lora.source)
            for c in EXPERTS[lora.expert]:
                check(state, models[c], describe(task, c, len(experts) == 1), lora.text)
        except LoraError as e:
            raise UsageError(f"{lora.option} {e}") from None


def apply_loras(pipe, job: Job) -> None:
    """Load every LoRA, set its scale, and fuse them when asked."""
    from wand.common.errors import LoraError

    if not job.loras:
        return
    try:
        names = [pipe.load_lora_weights(lora.source, expert=lora.expert) for lora in job.loras]
    except LoraError as e:
        raise UsageError(str(e)) from None
    pipe.set_adapters(names, [lora.scale for lora in job.loras])
    if job.fuse:
        pipe.fuse_lora()


def generate(pipe, job: Job) -> dict[str, Any]:
    import torch
    from diffusers.utils import export_to_video

    pipe.set_progress_bar_config(desc="denoising", file=sys.stderr)
    generator = torch.Generator().manual_seed(job.seed)
    frames = pipe(job.prompt, image=job.image, generator=generator, **job.call).frames[0]
    start = time.perf_counter()
    export_to_video(list(frames), str(job.out), fps=job.fps)
    if job.frames_dir is not None:
        write_pngs(frames, job.frames_dir)
    t = pipe.timings
    return {
        "out": str(job.out),
        "frames_dir": str(job.frames_dir) if job.frames_dir else None,
        "checkpoint": job.checkpoint,
        "task": job.task,
        "width": job.call["width"],
        "height": job.call["height"],
        "frames": len(frames),
        "fps": job.fps,
        "steps": job.call["num_inference_steps"],
        "solver": job.solver,
        "seed": job.seed,
        "loras": [
            {"source": str(lora.source), "scale": lora.scale, "expert": lora.expert}
            for lora in job.loras
        ],
        "lora_fused": job.fuse,
        "prepare_seconds": t["prepare"],
        "denoise_seconds": t["denoise"],
        "decode_seconds": t["decode"],
        "write_seconds": time.perf_counter() - start,
        "first_step_at": t["first_step_at"],
    }


def write_pngs(frames, folder: Path) -> None:
    """``frame_00000.png``...; the same 8-bit conversion as diffusers' ``export_to_video``."""
    import numpy as np
    from PIL import Image

    folder.mkdir(exist_ok=True)
    for i, frame in enumerate(frames):
        Image.fromarray((frame * 255).astype(np.uint8)).save(folder / f"frame_{i:05d}.png")


def summary(r: dict[str, Any]) -> str:
    n = len(r["loras"])
    loras = f", {n} LoRA{'s' if n > 1 else ''}{' fused' if r['lora_fused'] else ''}" if n else ""
    lora_time = f", lora {r['lora_seconds']:.2f} s" if n else ""
    return (
        f"wrote {r['out']}: {r['frames']} frames {r['width']}x{r['height']} at {r['fps']} fps, "
        f"{r['task']}, seed {r['seed']}{loras}; attach {r['attach_seconds']:.2f} s{lora_time}, "
        f"prepare {r['prepare_seconds']:.2f} s, denoise {r['denoise_seconds']:.2f} s "
        f"({r['steps']} steps), decode {r['decode_seconds']:.2f} s"
    )
