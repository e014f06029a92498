"""The options of ``wanctl generate``: its own, and every option of Wan2.2's ``generate.py``.

generate.py's options are accepted in both spellings (``--sample_steps`` as generate.py writes
them, ``--sample-steps`` as wanctl does). Those that wand makes moot (offloading, sharding,
sequence parallelism, dtype conversion) are accepted with a one-line note saying why they have
no effect; those that cannot apply (prompt extension, the animate and speech-to-video tasks'
options) exit 2 with the reason.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from wand.daemon.config import TASKS  # the served tasks, without importing wand.wan

LORA = "PATH[:SCALE]"
SOLVERS = ("unipc", "dpm++")  # --sample_solver: UniPC or DPM-Solver++, both for flow matching


def str2bool(v: str) -> bool:
    """generate.py's ``str2bool`` (wan/utils/utils.py)."""
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError("Boolean value expected (True/False)")


ONLY_WITH_EXTEND = "used only with --use-prompt-extend, which wand does not offer"
NOT_SHARDED = (
    "the daemon holds one copy of each model and every client shares it: nothing is sharded"
)
# generate.py options wand makes moot → (argparse keywords, why they have no effect)
MOOT: dict[str, tuple[dict[str, Any], str]] = {
    "offload-model": (
        {"type": str2bool, "metavar": "BOOL"},
        "the daemon keeps every model resident on its device: nothing is moved to the CPU and back",
    ),
    "t5-cpu": (
        {"action": "store_true"},
        "the text encoder runs where the daemon holds it (wand --device text_encoder=cpu "
        "puts it on the CPU)",
    ),
    "convert-model-dtype": (
        {"action": "store_true"},
        "the experts run in the dtype the daemon holds them in (bfloat16 unless wand --dtype "
        "says otherwise)",
    ),
    "t5-fsdp": ({"action": "store_true"}, NOT_SHARDED),
    "dit-fsdp": ({"action": "store_true"}, NOT_SHARDED),
    "ulysses-size": (
        {"type": int, "metavar": "N"},
        "wanctl generate runs in one process on one device: no sequence parallelism",
    ),
    "prompt-extend-method": ({"choices": ["dashscope", "local_qwen"]}, ONLY_WITH_EXTEND),
    "prompt-extend-model": ({"metavar": "MODEL"}, ONLY_WITH_EXTEND),
    "prompt-extend-target-lang": ({"choices": ["zh", "en"]}, ONLY_WITH_EXTEND),
}
PROMPT_EXTEND = (
    "--use-prompt-extend: wand holds no prompt-extension model (generate.py runs Qwen locally "
    "or asks DashScope): extend the prompt first and pass it with --prompt"
)
# generate.py's tasks that wand does not serve, and their own options (flags take no value)
OTHER_TASKS = {
    "animate-14B": ("src-root-path", "refert-num", "replace-flag", "use-relighting-lora"),
    "s2v-14B": (
        "num-clip",
        "audio",
        "enable-tts",
        "tts-prompt-audio",
        "tts-prompt-text",
        "tts-text",
        "pose-video",
        "start-from-ref",
        "infer-frames",
    ),
}
FLAGS = {"replace-flag", "use-relighting-lora", "enable-tts", "start-from-ref"}


class UsageError(Exception):
    pass


def both(name: str) -> list[str]:
    """An option's spellings: wanctl's dashed one, and generate.py's with underscores."""
    return [f"--{name}", f"--{name.replace('-', '_')}"] if "-" in name else [f"--{name}"]


def served() -> str:
    return ", ".join(TASKS)


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "generate",
        parents=[common],
        help="generate a video with the resident checkpoint",
        description="Generate one video with the checkpoint the daemon holds. The options are "
        "Wan2.2 generate.py's (either spelling: --sample-steps or --sample_steps); those left "
        "out take the original Wan2.2 release's defaults for the task.",
    )
    p.add_argument(*both("task"), help=f"{served()} (default: the loaded one)")
    p.add_argument(
        "--checkpoint",
        metavar="NAME",
        help="the loaded checkpoint to use when the daemon holds several (see wanctl status)",
    )
    p.add_argument(
        *both("ckpt-dir"),
        type=Path,
        metavar="DIR",
        help="the loaded checkpoint from this folder (the daemon loads it: wanctl load DIR)",
    )
    p.add_argument(*both("prompt"), required=True)
    p.add_argument(
        "--plain", action="store_true", help="run in this process, not in the warm client"
    )
    p.add_argument(
        "--timings",
        action="store_true",
        help="print where the time to the first denoising step went (stderr)",
    )
    p.add_argument("--negative-prompt", help="default: Wan2.2's (Chinese) negative prompt")
    p.add_argument(
        *both("image"), type=Path, help="first frame: required for i2v, optional for ti2v"
    )
    p.add_argument(
        *both("size"),
        help="WIDTH*HEIGHT (default 1280*720; ti2v 1280*704); with --image, the area to fill "
        "at the image's aspect ratio",
    )
    p.add_argument(*both("frame-num"), type=int, help="frames, 4k+1 (default 81; ti2v 121)")
    p.add_argument(
        *both("sample-solver"),
        choices=SOLVERS,
        default="unipc",
        help="flow-matching solver (default unipc)",
    )
    p.add_argument(*both("sample-steps"), type=int, help="denoising steps (default 40; ti2v 50)")
    p.add_argument(
        *both("sample-shift"), type=float, help="flow shift (default 12 t2v, 5 i2v/ti2v)"
    )
    p.add_argument(
        *both("sample-guide-scale"),
        help="classifier-free guidance: one value for every expert, or HIGH,LOW for the "
        "high-noise and low-noise experts (default 4,3 t2v; 3.5 i2v; 5 ti2v)",
    )
    p.add_argument(
        *both("base-seed"),
        type=int,
        default=-1,
        help="noise seed, 0 to 2**64-1 (default, or negative: random)",
    )
    p.add_argument(
        "--out",
        *both("save-file"),
        dest="out",
        type=Path,
        help="MP4 file to write (default: TASK-WxH-TIME.mp4)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out file (and frames in --save-frames)",
    )
    p.add_argument("--save-frames", type=Path, metavar="DIR", help="also write PNG frames here")
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar=LORA,
        help="apply a LoRA (a file, or the name of one the daemon holds) at SCALE (default 1): "
        "to both experts of an A14B checkpoint, to the model of ti2v-5B; repeatable",
    )
    p.add_argument(
        "--lora-high",
        action="append",
        default=[],
        metavar=LORA,
        help="a LoRA for the high-noise expert only (A14B: the HIGH file of a pair)",
    )
    p.add_argument(
        "--lora-low",
        action="append",
        default=[],
        metavar=LORA,
        help="a LoRA for the low-noise expert only (A14B: the LOW file of a pair)",
    )
    p.add_argument(
        "--lora-fuse",
        action="store_true",
        help="fuse the LoRAs into private copies of the layers they change before generating",
    )
    moot = p.add_argument_group(
        "generate.py options without effect here", "accepted; each prints why it does nothing"
    )
    for name, (kw, why) in MOOT.items():
        moot.add_argument(*both(name), default=None, help=why, **kw)
    refused = p.add_argument_group(
        "generate.py options wand cannot honour", "refused (exit 2) with the reason"
    )
    refused.add_argument(
        *both("use-prompt-extend"), action="store_true", help="prompt extension with Qwen"
    )
    for task, names in OTHER_TASKS.items():
        for name in names:
            kw = {"action": "store_true"} if name in FLAGS else {"metavar": "VALUE"}
            refused.add_argument(*both(name), default=None, help=f"{task} only", **kw)


def notes(args: argparse.Namespace) -> list[str]:
    """Why each moot generate.py option given has no effect; a refused one raises."""
    if args.use_prompt_extend:
        raise UsageError(PROMPT_EXTEND)
    for task, names in OTHER_TASKS.items():
        for name in names:
            if getattr(args, name.replace("-", "_")) is not None:
                raise UsageError(
                    f"--{name}: an option of Wan2.2's {task} task, which wand does not serve "
                    f"(it serves {served()})"
                )
    return [
        f"--{name} has no effect: {why}"
        for name, (_, why) in MOOT.items()
        if getattr(args, name.replace("-", "_")) is not None
    ]
