"""The three Wan2.2 tasks, the two folder layouts, and the facts that go with each task."""

from __future__ import annotations

from dataclasses import dataclass

LAYOUTS = ("original", "diffusers")
DIFFUSERS_PIPELINES = ("WanPipeline", "WanImageToVideoPipeline")  # model_index _class_name

TRANSFORMER = "diffusers:WanTransformer3DModel"
VAE = "diffusers:AutoencoderKLWan"
TEXT_ENCODER = "transformers:UMT5EncoderModel"


@dataclass(frozen=True)
class Task:
    name: str
    experts: tuple[str, ...]  # component names of the diffusion model(s), high noise first
    model_type: str  # ``model_type`` of the original WanModel config.json
    in_channels: int  # DiT input channels: latent (+ mask + image latent for i2v)
    vae: str  # "2.1" or "2.2"
    pipeline: str  # diffusers pipeline class
    boundary_ratio: float | None
    expand_timesteps: bool
    sample_shift: float  # flow shift the original Wan2.2 code samples with


TASKS: dict[str, Task] = {
    "t2v-A14B": Task(
        name="t2v-A14B",
        experts=("high_noise_model", "low_noise_model"),
        model_type="t2v",
        in_channels=16,
        vae="2.1",
        pipeline="WanPipeline",
        boundary_ratio=0.875,
        expand_timesteps=False,
        sample_shift=12.0,
    ),
    "i2v-A14B": Task(
        name="i2v-A14B",
        experts=("high_noise_model", "low_noise_model"),
        model_type="i2v",
        in_channels=36,
        vae="2.1",
        pipeline="WanImageToVideoPipeline",
        boundary_ratio=0.9,
        expand_timesteps=False,
        sample_shift=5.0,
    ),
    "ti2v-5B": Task(
        name="ti2v-5B",
        experts=("model",),
        model_type="ti2v",
        in_channels=48,
        vae="2.2",
        pipeline="WanPipeline",
        boundary_ratio=None,
        expand_timesteps=True,
        sample_shift=5.0,
    ),
}

# diffusers folder of each expert component name
DIFFUSERS_EXPERT_DIRS = {
    "high_noise_model": "transformer",
    "low_noise_model": "transformer_2",
    "model": "transformer",
}

# what Wan2.2 runs each component in (and what from_pretrained(torch_dtype=...) gives)
DEFAULT_DTYPES: dict[str, str] = {
    "text_encoder": "bfloat16",
    "vae": "float32",
    "high_noise_model": "bfloat16",
    "low_noise_model": "bfloat16",
    "model": "bfloat16",
}

T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = "google/umt5-xxl"
VAE_FILES = {"2.1": "Wan2.1_VAE.pth", "2.2": "Wan2.2_VAE.pth"}
EXPERT_INDEX = "diffusion_pytorch_model.safetensors.index.json"
