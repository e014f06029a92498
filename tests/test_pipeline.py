"""Pipelines over a real daemon generate exactly what diffusers' from_pretrained pipelines do."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import LAYOUT_CASES, Daemon
from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline
from PIL import Image

from wand.client.pipeline import fit_area, pick
from wand.common.errors import WandError

PROMPT = "a cat walks on the beach"
# tiny sizes; 3 steps cross both A14B boundaries (t2v: 999, 960, 857 at shift 12)
OPTIONS = dict(negative_prompt="the dog", height=32, width=32, num_frames=5, num_inference_steps=3)
GUIDANCE = {"t2v-A14B": (4.0, 3.0), "i2v-A14B": (3.5, 2.5), "ti2v-5B": (5.0,)}
SHIFT = 7.0  # neither the release's value nor the -Diffusers folders'


@pytest.fixture(scope="module")
def served(tiny):
    """``served(task, layout)`` → a ready daemon on that tiny checkpoint, one per module."""
    started: dict[tuple[str, str], Daemon] = {}

    def get(task: str, layout: str = "original") -> Daemon:
        if (task, layout) not in started:
            started[task, layout] = Daemon(tiny(task, layout)).wait_ready()
        return started[task, layout]

    yield get
    for d in started.values():
        d.stop()


def image() -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def guidance(task: str) -> dict[str, float]:
    g = GUIDANCE[task]
    return {"guidance_scale": g[0], **({"guidance_scale_2": g[1]} if len(g) > 1 else {})}


def reference(folder, cls):
    """The whole pipeline loaded the usual way from the diffusers-layout copy: experts and
    text encoder in bfloat16, VAE in float32, as Wan2.2 runs them."""
    scheduler = UniPCMultistepScheduler.from_pretrained(
        folder, subfolder="scheduler", flow_shift=SHIFT
    )
    extra = {"image_encoder": None, "image_processor": None} if cls is not WanPipeline else {}
    return cls.from_pretrained(
        folder,
        dtype={"default": torch.bfloat16, "vae": torch.float32},
        scheduler=scheduler,
        **extra,
    )


def frames(pipe, task: str, img: Image.Image | None, **kw) -> np.ndarray:
    args = {"image": img} if img is not None else {}
    g = torch.Generator().manual_seed(7)
    out = pipe(prompt=PROMPT, generator=g, **OPTIONS, **guidance(task), **args, **kw)
    return out.frames


def count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


CASES = [(task, layout, task == "i2v-A14B") for task, layout in LAYOUT_CASES]
CASES.append(("ti2v-5B", "original", True))  # the 5B image-to-video path


@pytest.mark.parametrize(("task", "layout", "with_image"), CASES)
def test_frames_match_from_pretrained(tiny, served, task, layout, with_image):
    d = served(task, layout)
    img = image() if with_image else None
    with d.connect() as c:
        vp = c.pipeline()
        served = vp.image_pipe if with_image else vp.text_pipe
        low_noise = count_calls(served.transformer_2) if served.transformer_2 else None
        got = frames(vp, task, img, flow_shift=SHIFT)
    cls = WanImageToVideoPipeline if with_image else WanPipeline
    expected = frames(reference(tiny(task, "diffusers"), cls), task, img)
    assert got.shape == (1, 5, 32, 32, 3)
    assert np.array_equal(got, expected), f"{task} {layout} image={with_image}"
    if low_noise is not None:
        assert low_noise[0] > 0  # the low-noise expert took part
    t = vp.timings
    assert set(t) == {
        "prepare",
        "encode",
        "latents",
        "first_step",
        "denoise",
        "decode",
        "first_step_at",
    }
    assert 0 < t["encode"] + t["latents"] <= t["prepare"] and 0 < t["first_step"] <= t["denoise"]


def test_defaults_are_the_release_ones(served):
    """-Diffusers folders say flow_shift 3.0; wand samples t2v-A14B at the release's 12.0."""
    with served("t2v-A14B", "diffusers").connect() as c:
        vp = c.pipeline()
    assert vp.pipe.scheduler.config.flow_shift == 12.0
    assert vp.pipe.config.boundary_ratio == 0.875
    assert vp.image_pipe is None
    kw: dict = {}
    vp._fill_defaults(vp.pipe, kw, None)
    assert kw["num_inference_steps"] == 40 and kw["num_frames"] == 81
    assert (kw["guidance_scale"], kw["guidance_scale_2"]) == (4.0, 3.0)
    assert (kw["width"], kw["height"]) == (1280, 720)
    assert kw["negative_prompt"].startswith("色调艳丽")


def test_embeddings_are_cached(served):
    with served("t2v-A14B").connect() as c:
        vp = c.pipeline()
    encoder_calls = count_calls(vp.pipe.text_encoder)
    first = frames(vp, "t2v-A14B", None)
    assert encoder_calls[0] == 2  # prompt and negative prompt
    again = frames(vp, "t2v-A14B", None)
    assert encoder_calls[0] == 2
    assert np.array_equal(first, again)
    frames(vp, "t2v-A14B", None, max_sequence_length=64)
    assert encoder_calls[0] == 4  # another length is another entry


def test_image_is_required_or_refused(served):
    with served("t2v-A14B").connect() as c:
        vp = c.pipeline()
    with pytest.raises(ValueError, match="t2v-A14B cannot use an input image"):
        vp(PROMPT, image=image())
    with served("i2v-A14B").connect() as c:
        vp = c.pipeline()
    with pytest.raises(ValueError, match="i2v-A14B needs an input image"):
        vp(PROMPT)


def test_pick_names_the_choices():
    one, two = {"name": "a", "task": "t2v-A14B"}, {"name": "b", "task": "ti2v-5B"}
    assert pick([one]) is one and pick([one, two], "b") is two
    with pytest.raises(WandError, match="several checkpoints.*a, b"):
        pick([one, two])
    with pytest.raises(WandError, match="no checkpoint 'c'.*loaded: a, b"):
        pick([one, two], "c")
    with pytest.raises(WandError, match="holds no checkpoint"):
        pick([])


def test_fit_area_keeps_the_aspect_ratio():
    assert fit_area((1920, 1080), 1280 * 720, 16) == (1280, 720)
    assert fit_area((720, 1280), 1280 * 720, 16) == (720, 1280)
    assert fit_area((1000, 1000), 1280 * 704, 32) == (928, 928)
    assert fit_area((4000, 10), 32 * 32, 16) == (640, 16)
