"""diffusers Wan pipelines assembled from attached components, sampling like the Wan2.2 release.

The pipeline objects are diffusers' own (``WanPipeline``, ``WanImageToVideoPipeline``); the
:class:`VideoPipeline` around them fills in the original release's per-task defaults, keeps
the text embeddings of recent prompts, and times the phases of each call.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING, Any, Protocol

import torch

from wand.client.lora import LoraMixin, ResidentLora, SharedViews
from wand.common.errors import WandError
from wand.wan.sampling import NEGATIVE_PROMPT, SAMPLING, Sampling
from wand.wan.tasks import TASKS

if TYPE_CHECKING:
    from PIL.Image import Image


EMBEDDING_CACHE = 8  # (prompt, negative prompt, length) entries kept per pipeline


def pick(checkpoints: list[dict[str, Any]], name: str | None = None) -> dict[str, Any]:
    """The loaded checkpoint called ``name``, or the only one loaded."""
    if name is not None:
        found = [c for c in checkpoints if c["name"] == name]
        if not found:
            loaded = ", ".join(c["name"] for c in checkpoints) or "none"
            raise WandError(f"no checkpoint {name!r} is loaded; loaded: {loaded}", "bad_args")
        return found[0]
    if len(checkpoints) != 1:
        loaded = ", ".join(c["name"] for c in checkpoints)
        raise WandError(
            f"several checkpoints are loaded ({loaded}); say which with checkpoint=NAME"
            if checkpoints
            else "the daemon holds no checkpoint (load one with wanctl load PATH)",
            "bad_args",
        )
    return checkpoints[0]


def image_modes(extras: dict[str, Any]) -> tuple[bool, bool]:
    """(can generate from text alone, can start from an image) for a checkpoint's extras:
    i2v-A14B needs an image, ti2v-5B (``expand_timesteps``) takes one optionally."""
    image_only = extras["pipeline"] == "WanImageToVideoPipeline"
    return not image_only, image_only or bool(extras["expand_timesteps"])


def fit_area(
    image_size: tuple[int, int], area: int, multiple: int, centre_crop: bool = False
) -> tuple[int, int]:
    """(width, height) of an image-to-video output of about ``area`` pixels with the image's
    aspect ratio, as Wan2.2 sizes it (``--size`` is an area), never under one ``multiple``:

    - i2v-A14B (``image2video.py``): each side rounded down to ``multiple``; the image is
      then resized to it.
    - ti2v-5B (``centre_crop``; ``textimage2video.py``): ``best_output_size``, the better
      ratio of rounding the width first or the height first; the image then covers it and is
      centre-cropped (:func:`cover_crop`).
    """
    w, h = image_size
    if centre_crop:
        return _best_output_size(w, h, area, multiple)
    width = int(math.sqrt(area * w / h)) // multiple * multiple
    height = int(math.sqrt(area * h / w)) // multiple * multiple
    return max(width, multiple), max(height, multiple)


def _best_output_size(w: int, h: int, area: int, multiple: int) -> tuple[int, int]:
    """Wan2.2's ``best_output_size`` (``wan/utils/utils.py``), the same float arithmetic.
    Where a rounding leaves a side at 0 (a ratio beyond area / multiple²; Wan2.2 divides by
    zero) that candidate is dropped; with none left, the short side gets one ``multiple``."""
    ratio = w / h
    ow = (area * ratio) ** 0.5
    oh = area / ow
    candidates = []  # height first, then width first: Wan2.2 prefers the former on a tie
    if oh2 := int(oh // multiple * multiple):
        candidates.append((int(area / oh2 // multiple * multiple), oh2))
    if ow1 := int(ow // multiple * multiple):
        candidates.append((ow1, int(area / ow1 // multiple * multiple)))
    candidates = [(cw, ch) for cw, ch in candidates if cw and ch]
    if not candidates:
        long = max(int(area / multiple // multiple * multiple), multiple)
        return (long, multiple) if w >= h else (multiple, long)
    return min(candidates, key=lambda c: max(ratio / (c[0] / c[1]), c[0] / c[1] / ratio))


def cover_crop(image: Image, size: tuple[int, int]) -> Image:
    """ti2v-5B's input image for an output of ``size`` (``textimage2video.py``): scaled
    (Lanczos) to cover it, then its centre cut out."""
    from PIL.Image import Resampling

    ow, oh = size
    scale = max(ow / image.width, oh / image.height)
    image = image.resize(
        (round(image.width * scale), round(image.height * scale)), Resampling.LANCZOS
    )
    x1, y1 = (image.width - ow) // 2, (image.height - oh) // 2
    return image.crop((x1, y1, x1 + ow, y1 + oh))


class Modules(Protocol):
    """What a pipeline needs of a connection (:class:`wand.client.connection.Client`)."""

    def checkpoints(self) -> list[dict[str, Any]]: ...

    def module(self, name: str, writable: bool = False) -> torch.nn.Module: ...

    def lora(self, name: str) -> ResidentLora: ...


@cache
def tokenizer(folder: str) -> Any:
    """The tokenizer in ``folder``, loaded once per process (a pipeline changes nothing in
    it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def scheduler(config: dict[str, Any], shift: float) -> Any:
    """A new UniPC flow scheduler of ``config`` at ``shift``: a copy of one built once per
    process (building one imports every compatible scheduler and computes its tables; a
    scheduler keeps the state of a generation, so each pipeline gets its own)."""
    return copy.deepcopy(_scheduler(json.dumps(config, sort_keys=True), shift))


@cache
def _scheduler(config: str, shift: float) -> Any:
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler.from_config(json.loads(config), flow_shift=shift)


def ahead(info: dict[str, Any]) -> None:
    """Load what :func:`build` needs besides the modules for checkpoint ``info`` (the warm
    client does it before it forks scripts)."""
    scheduler(info["extras"]["scheduler"], SAMPLING[info["task"]].shift)
    if info["tokenizer"]:
        tokenizer(info["tokenizer"])


def build(client: Modules, checkpoint: str | None = None, **overrides: Any) -> VideoPipeline:
    """The pipeline for a loaded checkpoint, every module bound to the daemon's memory.

    ``overrides`` replace constructor arguments of the diffusers pipeline (``scheduler``,
    ``boundary_ratio``, a component...).
    """
    info = pick(client.checkpoints(), checkpoint)
    task, extras = info["task"], info["extras"]
    if info["tokenizer"] is None:
        raise WandError(f"checkpoint {info['name']} has no tokenizer folder", "bad_args")
    sampling = SAMPLING[task]
    experts = [client.module(info["components"][e]) for e in TASKS[task].experts]
    parts = {
        "tokenizer": tokenizer(info["tokenizer"]),
        "text_encoder": client.module(info["components"]["text_encoder"]),
        "vae": client.module(info["components"]["vae"]),
        # the release's shift for every layout: -Diffusers folders say 3.0 for both A14B
        "scheduler": scheduler(extras["scheduler"], sampling.shift),
        "transformer": experts[0],
        "transformer_2": experts[1] if len(experts) > 1 else None,
        "boundary_ratio": extras["boundary_ratio"],
        "expand_timesteps": extras["expand_timesteps"],
        **overrides,
    }
    held = info.get("loras", {})

    def resident_lora(name: str) -> ResidentLora | None:
        return client.lora(held[name]["address"]) if name in held else None

    return VideoPipeline(task, sampling, parts, extras, resident_lora)


class VideoPipeline(LoraMixin):
    """Call it like the diffusers pipeline; arguments left out take the Wan2.2 defaults.

    ``image`` selects image-to-video: required for i2v-A14B, optional for ti2v-5B (whose
    image path is diffusers' ``WanImageToVideoPipeline`` with ``expand_timesteps``), refused
    for t2v-A14B. Extra keyword ``flow_shift`` changes the scheduler's shift for this and
    later calls. After each call :attr:`timings` holds, in seconds, ``prepare`` (from the
    call to the first denoising step: text encoding, latents, image encoding), within it
    ``encode`` (the text encoder; 0 for cached prompts) and ``latents``, then ``first_step``
    (the first step itself), ``denoise`` (every step) and ``decode``, and ``first_step_at``
    (epoch time the first step began).
    LoRA methods (``load_lora_weights``, ``fuse_lora``...) are
    :class:`wand.client.lora.LoraMixin`'s.
    """

    def __init__(
        self,
        task: str,
        sampling: Sampling,
        parts: dict[str, Any],
        extras: dict[str, Any],
        resident_lora: Callable[[str], ResidentLora | None] = lambda name: None,
    ) -> None:
        from diffusers import WanImageToVideoPipeline, WanPipeline

        self.task = task
        self.sampling = sampling
        self.timings: dict[str, float] = {}
        self._embeddings: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._marks: dict[str, float] = {}
        self._shared = SharedViews()
        self._resident_lora = resident_lora
        from_text, from_image = image_modes(extras)
        self.text_pipe = WanPipeline(**parts) if from_text else None
        self.image_pipe = (
            WanImageToVideoPipeline(**parts, image_encoder=None, image_processor=None)
            if from_image
            else None
        )
        for model in (parts["transformer"], parts["transformer_2"]):
            if model is not None:
                model.register_forward_pre_hook(self._on_forward)
        for pipe in (self.text_pipe, self.image_pipe):
            if pipe is not None:
                pipe.prepare_latents = self._timed("latents", pipe.prepare_latents)

    @property
    def pipe(self):
        """The diffusers pipeline used without an image (with one, for i2v-A14B)."""
        return self.text_pipe or self.image_pipe

    def set_progress_bar_config(self, **config: Any) -> None:
        for pipe in (self.text_pipe, self.image_pipe):
            if pipe is not None:
                pipe.set_progress_bar_config(**config)

    def __call__(self, prompt: str | list[str] | None = None, image: Image | None = None, **kw):
        self._marks = {"start": time.perf_counter(), "encode": 0.0, "latents": 0.0}
        pipe = self._pipe_for(image)
        if "flow_shift" in kw:
            shift = kw.pop("flow_shift")
            pipe.scheduler = type(pipe.scheduler).from_config(
                pipe.scheduler.config, flow_shift=shift
            )
        image = self._fill_defaults(pipe, kw, image)
        if "prompt_embeds" not in kw and prompt is not None:
            embeds = self.embeddings(
                prompt, kw.pop("negative_prompt"), kw.get("max_sequence_length", 512)
            )
            n = kw.get("num_videos_per_prompt") or 1
            kw["prompt_embeds"], kw["negative_prompt_embeds"] = (
                e.repeat_interleave(n, dim=0) for e in embeds
            )
            prompt = None
        kw["callback_on_step_end"] = self._step_end(kw.get("callback_on_step_end"))
        args = {"image": image} if image is not None else {}
        out = pipe(prompt=prompt, **args, **kw)
        self._record(time.perf_counter())
        return out

    def embeddings(
        self, prompt: str | list[str], negative_prompt: str | list[str], max_sequence_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt, negative prompt) embeddings, computed once per distinct triple."""
        key = (_hashable(prompt), _hashable(negative_prompt), max_sequence_length)
        if key in self._embeddings:
            self._embeddings.move_to_end(key)
            return self._embeddings[key]
        pipe = self.pipe
        start = time.perf_counter()
        with torch.no_grad():
            embeds = pipe.encode_prompt(
                prompt,
                negative_prompt,
                do_classifier_free_guidance=True,
                max_sequence_length=max_sequence_length,
                device=pipe._execution_device,
            )
        self._marks["encode"] = time.perf_counter() - start
        self._embeddings[key] = embeds
        if len(self._embeddings) > EMBEDDING_CACHE:
            self._embeddings.popitem(last=False)
        return embeds

    def _pipe_for(self, image: Image | None):
        pipe = self.text_pipe if image is None else self.image_pipe
        if pipe is None:
            need = "cannot use" if image is not None else "needs"
            raise ValueError(f"{self.task} {need} an input image")
        return pipe

    def _fill_defaults(self, pipe, kw: dict[str, Any], image: Image | None) -> Image | None:
        """Fill in the Wan2.2 defaults; the input image to use (ti2v-5B's is cropped to the
        size it chose)."""
        s = self.sampling
        kw.setdefault("negative_prompt", NEGATIVE_PROMPT)
        kw.setdefault("num_inference_steps", s.steps)
        kw.setdefault("num_frames", s.frames)
        if "guidance_scale" not in kw:
            kw["guidance_scale"] = s.guidance[0]
            if pipe.config.boundary_ratio is not None:
                kw.setdefault("guidance_scale_2", s.guidance[-1])
        if "height" not in kw and "width" not in kw:
            width, height = s.size
            if image is not None:
                crop = bool(pipe.config.get("expand_timesteps"))
                width, height = fit_area(image.size, width * height, s.multiple, crop)
                image = cover_crop(image, (width, height)) if crop else image
            kw.update(width=width, height=height)
        return image

    def _on_forward(self, module: torch.nn.Module, args: Any) -> None:
        if "first_step" not in self._marks:
            self._marks["first_step"] = time.perf_counter()
            self._marks["first_step_at"] = time.time()

    def _step_end(self, user: Callable | None) -> Callable:
        def step_end(pipe, i: int, t: torch.Tensor, tensors: dict[str, Any]) -> dict[str, Any]:
            self._marks["denoised"] = time.perf_counter()
            self._marks.setdefault("first_step_end", self._marks["denoised"])
            return user(pipe, i, t, tensors) if user is not None else {}

        return step_end

    def _timed(self, mark: str, call: Callable) -> Callable:
        """``call``, adding the seconds it takes to this call's mark ``mark``."""

        def timed(*args: Any, **kw: Any) -> Any:
            start = time.perf_counter()
            try:
                return call(*args, **kw)
            finally:
                self._marks[mark] = self._marks.get(mark, 0.0) + time.perf_counter() - start

        return timed

    def _record(self, end: float) -> None:
        m = self._marks
        self.timings = {
            "prepare": m["first_step"] - m["start"],
            "encode": m["encode"],
            "latents": m["latents"],
            "first_step": m["first_step_end"] - m["first_step"],
            "denoise": m["denoised"] - m["first_step"],
            "decode": end - m["denoised"],
            "first_step_at": m["first_step_at"],
        }


def _hashable(prompt: str | list[str]) -> str | tuple[str, ...]:
    return prompt if isinstance(prompt, str) else tuple(prompt)
