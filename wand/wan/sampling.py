"""How the original Wan2.2 release samples each task when ``generate.py`` gets no options.

From ``wan/configs/*.py`` of Wan-Video/Wan2.2. ``guidance`` lists one scale per expert in
:attr:`Task.experts` order (high-noise first), which is also diffusers' order
(``guidance_scale``, ``guidance_scale_2``); Wan2.2's own config tuples are (low, high).
"""

from __future__ import annotations

from dataclasses import dataclass

from wand.wan.tasks import TASKS

# wan/configs/shared_config.py: sample_neg_prompt
NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，"
    "低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，"
    "毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


@dataclass(frozen=True)
class Sampling:
    steps: int
    shift: float  # flow shift of the UniPC scheduler
    guidance: tuple[float, ...]  # one per expert, high-noise first
    frames: int  # 4k+1
    fps: int
    size: tuple[int, int]  # (width, height); with an input image, the area to fill
    multiple: int  # width and height must be multiples of VAE stride x DiT patch


SAMPLING: dict[str, Sampling] = {
    "t2v-A14B": Sampling(40, TASKS["t2v-A14B"].sample_shift, (4.0, 3.0), 81, 16, (1280, 720), 16),
    "i2v-A14B": Sampling(40, TASKS["i2v-A14B"].sample_shift, (3.5, 3.5), 81, 16, (1280, 720), 16),
    "ti2v-5B": Sampling(50, TASKS["ti2v-5B"].sample_shift, (5.0,), 121, 24, (1280, 704), 32),
}
