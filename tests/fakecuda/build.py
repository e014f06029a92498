"""Build the fake CUDA driver (fakecuda.c) into a ``libcuda.so.1`` against NVIDIA's cuda.h.

The header comes from the ``nvidia-cuda-runtime-cu12`` wheel that ``scripts/setup`` unpacks
into ``.venv/cuda-headers`` (or from ``$WAND_CUDA_INCLUDE``). Without gcc or the header the
build raises :class:`Unavailable`, which the test fixture turns into a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SOURCE = HERE / "fakecuda.c"
HEADERS = ROOT / ".venv" / "cuda-headers" / "nvidia" / "cuda_runtime" / "include"


class Unavailable(Exception):
    """The fake cannot be built here (no gcc, or no cuda.h); the message says which."""


def cuda_include() -> Path:
    """The folder holding NVIDIA's cuda.h: ``$WAND_CUDA_INCLUDE`` if set, else the venv's."""
    env = os.environ.get("WAND_CUDA_INCLUDE")
    folder = Path(env) if env else HEADERS
    if not (folder / "cuda.h").is_file():
        where = "$WAND_CUDA_INCLUDE" if env else "scripts/setup's .venv/cuda-headers"
        raise Unavailable(f"no cuda.h in {folder} ({where}); run scripts/setup")
    return folder


def compiler() -> str:
    gcc = shutil.which("gcc")
    if not gcc:
        raise Unavailable("gcc is not installed")
    return gcc


def build(outdir: Path) -> Path:
    """Compile fakecuda.c into ``outdir/libcuda.so.1`` and return that path."""
    gcc, include = compiler(), cuda_include()
    out = Path(outdir) / "libcuda.so.1"
    cmd = [gcc, "-shared", "-fPIC", "-O1", "-Wall", "-Werror", f"-I{include}"]
    cmd += ["-o", str(out), str(SOURCE)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:  # a compile error is a bug in the fake: fail, do not skip
        raise RuntimeError(f"building the fake libcuda failed:\n{done.stderr}")
    return out
