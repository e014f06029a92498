"""``wanctl generate``: one video from the resident checkpoint, with Wan2.2 generate.py's options.

Every option is checked before anything is attached or written; a bad one exits 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wanctl import exits

LORA_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


class UsageError(Exception):
    pass


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "generate",
        parents=[common],
        help="generate a video with the resident checkpoint",
        description="Generate one video with the checkpoint the daemon holds. Options left out "
        "take the original Wan2.2 release's defaults for the task.",
    )
    p.add_argument("--task", help="t2v-A14B, i2v-A14B or ti2v-5B (default: the loaded one)")
    p.add_argument(
        "--checkpoint",
        metavar="NAME",
        help="the loaded checkpoint to use when the daemon holds several (see wanctl status)",
    )
    p.add_argument("--prompt", required=True)
    p.add_argument(
        "--plain", action="store_true", help="run in this process, not in the warm client"
    )
    p.add_argument("--negative-prompt", help="default: Wan2.2's (Chinese) negative prompt")
    p.add_argument("--image", type=Path, help="first frame: required for i2v, optional for ti2v")
    p.add_argument(
        "--size",
        help="WIDTH*HEIGHT (default 1280*720; ti2v 1280*704); with --image, the area to fill "
        "at the image's aspect ratio",
    )
    p.add_argument("--frame-num", type=int, help="frames, 4k+1 (default 81; ti2v 121)")
    p.add_argument("--sample-steps", type=int, help="denoising steps (default 40; ti2v 50)")
    p.add_argument("--sample-shift", type=float, help="flow shift (default 12 t2v, 5 i2v/ti2v)")
    p.add_argument(
        "--sample-guide-scale",
        help="classifier-free guidance: one value for every expert, or HIGH,LOW for the "
        "high-noise and low-noise experts (default 4,3 t2v; 3.5 i2v; 5 ti2v)",
    )
    p.add_argument("--base-seed", type=int, default=-1, help="noise seed (default: random)")
    p.add_argument("--out", type=Path, help="MP4 file to write (default: TASK-WxH-TIME.mp4)")
    p.add_argument("--save-frames", type=Path, metavar="DIR", help="also write PNG frames here")
    lora = "PATH[:SCALE]"
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar=lora,
        help="apply a LoRA file at SCALE (default 1): to both experts of an A14B checkpoint, "
        "to the model of ti2v-5B; repeatable",
    )
    p.add_argument(
        "--lora-high",
        action="append",
        default=[],
        metavar=lora,
        help="a LoRA for the high-noise expert only (A14B: the HIGH file of a pair)",
    )
    p.add_argument(
        "--lora-low",
        action="append",
        default=[],
        metavar=lora,
        help="a LoRA for the low-noise expert only (A14B: the LOW file of a pair)",
    )
    p.add_argument(
        "--lora-fuse",
        action="store_true",
        help="fuse the LoRAs into private copies of the layers they change before generating",
    )


@dataclass(frozen=True)
class Lora:
    """One LoRA option: the file (or the name of a LoRA the daemon holds), its scale and the
    experts it goes into (None: where the daemon's LoRA goes by default)."""

    option: str  # "--lora", "--lora-high", "--lora-low"
    text: str  # as given
    source: Path | str  # a file, or the name of a LoRA the daemon holds
    scale: float
    expert: str | None  # "high", "low" or "both" (wand.wan.lora_keys.EXPERTS)


@dataclass
class Job:
    """The request, checked and completed with the task's defaults."""

    checkpoint: str
    task: str
    prompt: str
    call: dict[str, Any]  # keyword arguments of the pipeline call
    out: Path
    frames_dir: Path | None
    fps: int
    seed: int
    loras: list[Lora]
    fuse: bool  # fuse the LoRAs before generating


def run(args: argparse.Namespace) -> int:
    from wand.client.connection import Client

    try:
        check_task(args.task)
        check_paths(args)
        image = read_image(args.image) if args.image else None
        with Client(args.endpoint, timeout=args.timeout, name="wanctl-generate") as c:
            info = choose(c.checkpoints(), args.task, args.checkpoint)
            job = plan(args, info, image)
            _import_libraries()
            check_loras(job.loras, info)
            start = time.perf_counter()
            pipe = c.pipeline(job.checkpoint)
            attach = time.perf_counter() - start
            apply_loras(pipe, job)
            lora = time.perf_counter() - start - attach
    except UsageError as e:
        print(f"wanctl generate: {e}", file=sys.stderr)
        return exits.USAGE
    report = generate(pipe, job, image)
    report.update(attach_seconds=attach, lora_seconds=lora)
    print(json.dumps(report, indent=2) if args.json else summary(report))
    return exits.OK


def _import_libraries() -> None:
    """Import diffusers' pipelines before attach is timed, without their notices on stderr
    (which is for the progress bar)."""
    import diffusers
    import transformers

    diffusers.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
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

    if task is not None and task not in TASKS:
        raise UsageError(f"--task {task}: unknown task; known: {', '.join(TASKS)}")


def choose(
    checkpoints: list[dict[str, Any]], task: str | None, name: str | None = None
) -> dict[str, Any]:
    """The loaded checkpoint called ``name``, else the one for ``task`` (any, when there is
    only one)."""
    if not checkpoints:
        raise UsageError("the daemon holds no checkpoint (load one with wanctl load PATH)")
    held = ", ".join(f"{c['name']} ({c['task']})" for c in checkpoints)
    found = [c for c in checkpoints if name in (None, c["name"]) and task in (None, c["task"])]
    if not found and name is not None:
        raise UsageError(f"--checkpoint {name}: the daemon holds {held}")
    if not found:
        raise UsageError(f"--task {task}: the daemon holds {held}")
    if len(found) > 1:
        raise UsageError(f"the daemon holds {held}; choose one with --checkpoint NAME")
    return found[0]


def plan(args: argparse.Namespace, info: dict[str, Any], image) -> Job:
    from wand.client.pipeline import fit_area, image_modes
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
        width, height = fit_area(image.size, width * height, s.multiple)
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
    seed = args.base_seed if args.base_seed >= 0 else random.randint(0, 2**63 - 1)
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
    loras = plan_loras(args, task, info.get("loras", {}))
    if args.lora_fuse and not loras:
        raise UsageError("--lora-fuse: no LoRA given")
    return Job(
        checkpoint=info["name"],
        task=task,
        prompt=args.prompt,
        call=call,
        out=out,
        frames_dir=args.save_frames,
        fps=s.fps,
        seed=seed,
        loras=loras,
        fuse=args.lora_fuse,
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
    """The LoRA options, each file found or named among the daemon's LoRAs (``held``):
    ``--lora FILE`` goes into every expert of the task, ``--lora NAME`` where the daemon's
    LoRA goes by default."""
    from wand.wan.tasks import TASKS

    one_model = len(TASKS[task].experts) == 1
    options = [("--lora", "high" if one_model else "both", args.lora)]
    options += [("--lora-high", "high", args.lora_high), ("--lora-low", "low", args.lora_low)]
    loras = []
    for option, expert, texts in options:
        for text in texts:
            if one_model and option != "--lora":
                raise UsageError(f"{option} {text}: {task} has one model; use --lora")
            source, scale = parse_lora(text, held)
            named = isinstance(source, str) and option == "--lora"
            loras.append(Lora(option, text, source, scale, None if named else expert))
    return loras


def parse_lora(text: str, held: Collection[str]) -> tuple[Path | str, float]:
    """``PATH[:SCALE]`` or ``NAME[:SCALE]`` → (the file or the name, the scale); a bare word
    (no ``/``, no file suffix) that is no file here may name a LoRA the daemon holds."""
    source, _, tail = text.rpartition(":")
    try:
        scale = float(tail)
    except ValueError:
        source, scale = text, 1.0
    if not source or not math.isfinite(scale):
        raise UsageError(f"{text}: expected PATH[:SCALE]")
    path = Path(source).expanduser()
    if path.is_file():
        return path, scale
    if path.exists():
        raise UsageError(f"{text}: {path} is not a file")
    word = "/" not in source and not source.endswith(LORA_SUFFIXES)
    if word and source in held:
        return source, scale
    names = f" (it holds {', '.join(sorted(held))})" if held else ""
    why = f", and the daemon holds no LoRA named {source!r}{names}" if word else ""
    raise UsageError(f"{text}: no such file{why}")


def check_loras(loras: list[Lora], info: dict[str, Any]) -> None:
    """Each LoRA fits the experts it goes into, checked on the checkpoint's files before
    anything is attached. Files this process cannot read leave it to the loading."""
    from wand.common.errors import CheckpointError, LoraError
    from wand.wan import read_checkpoint
    from wand.wan.lora_keys import EXPERTS, check, describe, read
    from wand.wan.modules import skeleton
    from wand.wan.tasks import TASKS

    loras = [x for x in loras if isinstance(x.source, Path)]  # the daemon checked its own
    if not loras:
        return
    task = info["task"]
    try:
        spec = read_checkpoint(info["path"], task)
    except (CheckpointError, OSError):
        return
    experts = dict(zip(EXPERTS["both"], TASKS[task].experts, strict=False))  # by component
    used = {c: spec.components[experts[c]] for lora in loras for c in EXPERTS[lora.expert]}
    models = {c: skeleton(comp.cls, comp.config) for c, comp in used.items()}
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


def generate(pipe, job: Job, image) -> dict[str, Any]:
    import torch
    from diffusers.utils import export_to_video

    pipe.set_progress_bar_config(desc="denoising", file=sys.stderr)
    generator = torch.Generator().manual_seed(job.seed)
    frames = pipe(job.prompt, image=image, generator=generator, **job.call).frames[0]
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
