"""fp8 residency: Linear weights of the experts and the text encoder kept in float8 with a
per-tensor scale, in a real daemon, on files from our generator, with the real classes.

What is checked against what:

- the bytes and scales quantized at load against ComfyUI's per-tensor absmax quantization
  written out here from its source (comfy/quant_ops.py, comfy-kitchen's eager kernel), of the
  values read from the files with safetensors / ``torch.load``;
- fp8 sources against their own stored bytes and scales (kept, never dequantized);
- what modules over fp8 slabs compute against the same modules over bfloat16 weights
  dequantized once from the same fp8 values. Tolerance: none, the outputs are equal. fp8 →
  bfloat16 is exact, and torch multiplies a bfloat16 tensor by a Python float in float32,
  rounding once, as the loader dequantizes (``stored.to(float32) * scale`` rounded to
  bfloat16): the weight a layer computes with is the reference's weight bit for bit, and
  the same kernels run on it.
"""

from __future__ import annotations

import json
import shutil
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Daemon, Service, check_config, t2v_pipeline
from safetensors import safe_open
from safetensors.torch import save_file
from test_pipeline import SHIFT, frames

import wand
from wand.client.lora import tuner_layers
from wand.common.errors import CheckpointError
from wand.wan import TASKS, load_state_dict, read_checkpoint, read_files, write_tiny
from wand.wan.modules import build, skeleton
from wand.wan.tiny_files import file_names
from wand.wan.tiny_lora import write_tiny_lora

E4M3, E5M2 = "float8_e4m3fn", "float8_e5m2"
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def fp8_for(task: str, fp8: str = E4M3, text_encoder: bool = True) -> dict[str, str]:
    names = (*TASKS[task].experts, *(["text_encoder"] if text_encoder else []))
    return dict.fromkeys(names, fp8)


# name → (layout, quant, task, dtypes): single files of every fp8 form, and references
SINGLE = {
    "comfy8": ("comfy", "fp8_scaled", "t2v-A14B", fp8_for("t2v-A14B")),
    "comfy16": ("comfy", "fp8_scaled", "t2v-A14B", {}),  # the same files dequantized once
    "quant8": ("comfy", "comfy_quant", "i2v-A14B", fp8_for("i2v-A14B", text_encoder=False)),
    "plain8": ("comfy", "fp8", "t2v-A14B", fp8_for("t2v-A14B")),
    "e5m2": ("comfy", "fp8_e5m2", "t2v-A14B", fp8_for("t2v-A14B", E5M2)),
    "kijai8": ("kijai", "fp8_scaled", "ti2v-5B", fp8_for("ti2v-5B")),
}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """name → {component: file} of the single-file checkpoints of :data:`SINGLE`."""
    root = tmp_path_factory.mktemp("fp8-files")
    made = {}
    for layout, quant, task, _ in SINGLE.values():
        form = (layout, quant, task)
        if form not in made:
            folder = write_tiny(root / "-".join(form), task, layout, quant=quant)
            made[form] = {r: folder / p for r, p in file_names(task, layout, quant).items()}
    return {name: made[layout, quant, task] for name, (layout, quant, task, _) in SINGLE.items()}


def toml_entry(name: str, dtypes: dict[str, str], **where: object) -> str:
    lines = ["[[checkpoint]]", f'name = "{name}"', *(f'{k} = "{v}"' for k, v in where.items())]
    table = ", ".join(f'{k} = "{v}"' for k, v in dtypes.items())
    return "\n".join([*lines, f"dtype = {{ {table} }}"]) + "\n"


@pytest.fixture(scope="module")
def served(written, tiny, tmp_path_factory):
    """One daemon: the tiny original t2v-A14B folder (float32 experts, a bfloat16 T5) with
    fp8 experts and text encoder, and every checkpoint of :data:`SINGLE`."""
    work = tmp_path_factory.mktemp("fp8-served")
    folder = tiny("t2v-A14B", "original")
    entries = [toml_entry("orig", fp8_for("t2v-A14B"), path=folder)]
    for name, (layout, *_, dtypes) in SINGLE.items():
        extra = {"tokenizer": folder / "google" / "umt5-xxl"} if layout == "kijai" else {}
        entries.append(toml_entry(name, dtypes, **written[name], **extra))
    cfg = work / "wand.toml"
    cfg.write_text("".join(entries))
    d = Daemon(None, "--config", str(cfg), env={"CACHE_DIRECTORY": str(work / "cache")})
    yield d.wait_ready(180)
    d.stop()


# ---- the independent side --------------------------------------------------------------------


def comfy_quantize(w: torch.Tensor, fp8: torch.dtype) -> tuple[torch.Tensor, float]:
    """ComfyUI's ``TensorCoreFP8Layout.quantize(w, scale="recalculate")``: the scale is
    absmax / the fp8 maximum in float32 (kept representable for a float16 source), the
    values are ``clamp(w * (1 / scale).to(w.dtype))`` rounded to nearest. An all-zero
    tensor gets scale 1, where ComfyUI would divide by zero."""
    scale = torch.amax(w.abs()).to(torch.float32) / torch.finfo(fp8).max
    if w.dtype not in (torch.float32, torch.bfloat16):
        info = torch.finfo(w.dtype)
        scale = 1.0 / torch.clamp(1.0 / scale, min=info.min, max=info.max)
    if scale == 0:
        scale = torch.tensor(1.0)
    top = torch.finfo(fp8).max
    return torch.clamp(w * (1.0 / scale).to(w.dtype), -top, top).to(fp8), scale.item()


def stored(path: Path, key: str) -> torch.Tensor:
    """A tensor as its file stores it, read with safetensors or ``torch.load``."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            return f.get_tensor(key)
    return _pickled(path)[key]


@cache
def _pickled(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def float8_names(cls: str, config: dict) -> set[str]:
    """The weights fp8 residency keeps in float8: those of Linear layers, except in the
    modules the class keeps out of reduced precision (diffusers' float32 ones; UMT5's
    ``wo``, whose input transformers casts to its weight's dtype)."""
    module = skeleton(cls, config)
    keep = module._keep_in_fp32_modules or []
    return {
        f"{name}.weight"
        for name, m in module.named_modules()
        if isinstance(m, torch.nn.Linear) and not set(keep) & set(name.split("."))
    }


def dequantized(tensors: dict[str, torch.Tensor], scales: dict[str, float]) -> dict:
    """The reference: every float8 tensor as bfloat16, ``value × scale`` rounded once."""
    return {
        k: (v.to(torch.float32) * scales[k]).to(torch.bfloat16) if v.dtype in FP8 else v
        for k, v in tensors.items()
    }


def checkpoint_info(served: Daemon, name: str) -> dict:
    with served.connect() as c:
        return next(x for x in c.checkpoints() if x["name"] == name)


# ---- what is resident ------------------------------------------------------------------------


def test_linear_weights_are_float8_and_the_rest_as_in_bfloat16(served, tiny):
    """Experts and text encoder of the float32/bfloat16 folder: the Linear weights in fp8,
    every other tensor in the dtype and with the values the default (bfloat16) load gives;
    status shows the dtype and bytes of one byte per fp8 value."""
    folder = tiny("t2v-A14B", "original")
    default = read_checkpoint(folder)
    with served.connect() as c:
        status = {x["name"]: x for x in c.status()["components"]}
        for comp in ("high_noise_model", "low_noise_model", "text_encoder"):
            att = c.attachment(f"orig/{comp}")
            spec = default.components[comp]
            want = float8_names(spec.cls, spec.config)
            plain = load_state_dict(spec)
            got = att.tensors
            assert {k for k, v in got.items() if v.dtype in FP8} == want, comp
            assert set(att.manifest["scales"]) == want, comp
            for key in set(got) - want:
                assert torch.equal(got[key], plain[key]) and got[key].dtype == plain[key].dtype
            fp8_bytes = sum(got[k].numel() for k in want)
            kept = sum(t.nbytes for k, t in plain.items() if k not in want and _own(spec, k))
            row = status[f"orig/{comp}"]
            assert (row["dtype"], row["bytes"]) == (E4M3, fp8_bytes + kept), comp
            assert row["dtypes"][E4M3] == fp8_bytes
            c.detach(f"orig/{comp}")
    table = served.wanctl("status").stdout
    line = next(x for x in table.splitlines() if x.startswith("orig/high_noise_model "))
    assert line.split()[2] == E4M3


def _own(spec, key: str) -> bool:
    """Is ``key`` a tensor's own name (not a tied alias, which holds no bytes of its own)?"""
    return any(t.name == key for t in spec.tensors)


def test_quantized_bytes_and_scales_are_comfyuis_absmax_quantization(served, tiny):
    """Every fp8 tensor quantized at load is ComfyUI's quantization of the stored values,
    byte for byte, and its scale in the manifest is ComfyUI's scale."""
    spec = read_checkpoint(tiny("t2v-A14B", "original"))
    with served.connect() as c:
        for comp in ("high_noise_model", "text_encoder"):
            att = c.attachment(f"orig/{comp}")
            scales = att.manifest["scales"]
            for t in spec.components[comp].tensors:
                if t.name not in scales:
                    continue
                source = stored(t.file, t.key).reshape(t.shape)
                q, scale = comfy_quantize(source, torch.float8_e4m3fn)
                got = att.tensors[t.name]
                assert torch.equal(got.view(torch.uint8), q.view(torch.uint8)), t.name
                assert scales[t.name] == scale, t.name
            c.detach(f"orig/{comp}")


@pytest.mark.parametrize("name", ["comfy8", "quant8", "plain8", "e5m2", "kijai8"])
def test_fp8_sources_keep_their_stored_bytes_and_scales(served, written, name):
    """An fp8 weight stays as its file stores it, with the file's scale (1 for plain fp8);
    a Linear weight the file holds in 16 bits (Kijai quantizes only the blocks) is
    quantized as ComfyUI would; everything else is what the bfloat16 load gives."""
    _, _, task, dtypes = SINGLE[name]
    files = written[name]
    default, on_disk = read_files(files), read_files(files, dtypes=dtypes)
    kept = quantized = 0
    with served.connect() as c:
        for comp, fp8 in dtypes.items():
            att = c.attachment(f"{name}/{comp}")
            scales, got = att.manifest["scales"], att.tensors
            plain = load_state_dict(default.components[comp])
            resident = torch.float8_e4m3fn if fp8 == E4M3 else torch.float8_e5m2
            for t in on_disk.components[comp].tensors:
                value = stored(t.file, t.key).reshape(t.shape)
                if t.name not in scales:
                    assert torch.equal(got[t.name], plain[t.name]), t.name
                elif value.dtype == resident:
                    assert torch.equal(got[t.name].view(torch.uint8), value.view(torch.uint8))
                    assert scales[t.name] == (t.scale.value if t.scale else 1.0), t.name
                    kept += 1
                else:
                    q, scale = comfy_quantize(value, resident)
                    assert torch.equal(got[t.name].view(torch.uint8), q.view(torch.uint8))
                    assert scales[t.name] == scale, t.name
                    quantized += 1
            c.detach(f"{name}/{comp}")
    assert kept > 0
    assert (quantized > 0) == (name == "kijai8")  # Kijai's: embeddings and head in bf16


# ---- what modules over fp8 slabs compute ---------------------------------------------------------


def test_pipeline_on_fp8_residents_gives_the_frames_of_the_dequantized_weights(served):
    """ComfyUI's fp8_scaled files with fp8 experts and text encoder, against the same files
    dequantized once to bfloat16 at load: the same frames."""
    with served.connect() as c:
        got = frames(c.pipeline("comfy8"), "t2v-A14B", None, flow_shift=SHIFT)
        ref = frames(c.pipeline("comfy16"), "t2v-A14B", None, flow_shift=SHIFT)
    assert np.isfinite(got).all() and got.std() > 0
    assert np.array_equal(got, ref)


def test_modules_quantized_at_load_compute_as_their_dequantized_weights(served):
    """The folder quantized at load, against modules built here over its fp8 values
    dequantized once: the same frames; no fp8 byte is copied or written, and the modules
    report bfloat16 (what pipelines cast their inputs to)."""
    with served.connect() as c:
        vp = c.pipeline("orig")
        info = checkpoint_info(served, "orig")
        atts = {n: c.attachment(a) for n, a in info["components"].items()}
    ref_parts = {
        n: build(a.manifest["cls"], a.manifest["config"], dequantized(a.tensors, _scales(a)))
        for n, a in atts.items()
    }
    ref = t2v_pipeline(ref_parts, info["tokenizer"], vp.pipe.scheduler)
    modules = {"high_noise_model": vp.pipe.transformer, "text_encoder": vp.pipe.text_encoder}
    before = {n: _float8_params(m) for n, m in modules.items()}
    got = frames(vp, "t2v-A14B", None)  # the release's shift, as the scheduler is set
    assert np.array_equal(got, frames(ref, "t2v-A14B", None))
    for n, m in modules.items():
        assert m.dtype == torch.bfloat16, n
        after = _float8_params(m)
        assert after == before[n] and len(after) == len(atts[n].manifest["scales"]), n
        flat = atts[n].flat
        start, end = flat.data_ptr(), flat.data_ptr() + flat.numel()
        assert all(start <= ptr < end for _, ptr in after.values()), n  # in the slab


def test_a_module_cast_to_another_dtype_keeps_its_values(served):
    """``module.to(torch.bfloat16)`` casts each fp8 weight into a private copy: its scale
    goes into that copy, so the module computes what it did."""
    with served.connect() as c:
        att = c.attachment("orig/text_encoder")
        te = att.module().to(torch.bfloat16)
    assert not any(p.dtype in FP8 for p in te.parameters())
    ref = build(att.manifest["cls"], att.manifest["config"], dequantized(att.tensors, _scales(att)))
    ids = torch.tensor([[5, 9, 2, 1]])
    with torch.no_grad():
        assert torch.equal(te(ids).last_hidden_state, ref(ids).last_hidden_state)


def _scales(att) -> dict[str, float]:
    return att.manifest["scales"]


def _float8_params(module: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Every float8 parameter: (object, address) by name."""
    return {n: (id(p), p.data_ptr()) for n, p in module.named_parameters() if p.dtype in FP8}


def test_a_lora_on_fp8_experts_gives_the_frames_of_the_reference_and_fuses_privately(
    served, tmp_path
):
    """A LoRA on both fp8 experts, unfused and fused, against the same LoRA on the
    dequantized reference: the same frames; fusing writes private bfloat16 copies of the
    layers it touches and leaves the daemon's bytes as they were."""
    path = write_tiny_lora(tmp_path / "lora.safetensors", "t2v-A14B", "comfy", seed=3)
    with served.connect() as c:
        vp, ref = c.pipeline("comfy8"), c.pipeline("comfy16")
    plain = frames(vp, "t2v-A14B", None, flow_shift=SHIFT)
    for p in (vp, ref):
        p.load_lora_weights(str(path), expert="both")
    got = frames(vp, "t2v-A14B", None, flow_shift=SHIFT)
    assert not np.array_equal(got, plain)
    assert np.array_equal(got, frames(ref, "t2v-A14B", None, flow_shift=SHIFT))
    shared = _float8_params(vp.pipe.transformer)
    for p in (vp, ref):
        p.fuse_lora()
    fused = frames(vp, "t2v-A14B", None, flow_shift=SHIFT)
    assert np.array_equal(fused, frames(ref, "t2v-A14B", None, flow_shift=SHIFT))
    assert np.abs(fused - got).max() < 0.05  # fused: the same LoRA, rounded into bfloat16
    assert set(_float8_params(vp.pipe.transformer)) < set(shared)  # fused: private copies...
    fused_layers = [la.get_base_layer() for la in tuner_layers(vp.pipe.transformer) if la.merged]
    assert fused_layers and all(la.weight.dtype == torch.bfloat16 for la in fused_layers)
    r = served.wanctl("verify", "comfy8/high_noise_model", "comfy8/low_noise_model")
    assert r.returncode == 0, r.stdout + r.stderr  # ...the daemon's bytes are as they were
    vp.unfuse_lora()
    assert _float8_params(vp.pipe.transformer) == shared  # the shared views back
    assert np.array_equal(frames(vp, "t2v-A14B", None, flow_shift=SHIFT), got)


# ---- restarts, the GPU fill path, bad inputs -------------------------------------------------


def test_a_restarted_daemon_adopts_fp8_slabs_with_their_scales(tiny, tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir(mode=0o700)
    flags = [f"--dtype={c}={E4M3}" for c in fp8_for("t2v-A14B")]
    service = Service(workdir, "--checkpoint", str(tiny("t2v-A14B", "original")), *flags)
    try:
        service.start()
        with wand.connect(service.endpoint) as c:
            before = {n: c.attachment(n).manifest for n in ("high_noise_model", "text_encoder")}
        service.crash()
        status = service.start()
        comps = {x["component"]: x for x in status["components"]}
        assert all(x["adopted"] for x in comps.values())
        assert comps["high_noise_model"]["dtype"] == E4M3
        with wand.connect(service.endpoint) as c:
            atts = {n: c.attachment(n) for n in before}
            te = c.module("text_encoder")
        for n, man in before.items():
            assert atts[n].manifest["scales"] == man["scales"] and man["scales"], n
            assert atts[n].verify(), n
        att = atts["text_encoder"]
        ids = torch.tensor([[5, 9, 2, 1]])
        ref = build(man["cls"], man["config"], dequantized(att.tensors, man["scales"]))
        with torch.no_grad():
            assert torch.equal(te(ids).last_hidden_state, ref(ids).last_hidden_state)
    finally:
        service.close()


def test_the_gpu_staging_path_quantizes_as_the_cpu_loader(tiny, written):
    """The GPU fill path run on CPU tensors, chunks split mid-tensor: the bytes and scales
    of the CPU loader and of the plain load, for sources quantized at load and sources kept
    as stored."""
    from wand.common import manifest
    from wand.load import cpu, gpu

    specs = [
        read_checkpoint(tiny("t2v-A14B", "original"), dtypes=fp8_for("t2v-A14B")),
        read_files(written["kijai8"], dtypes=SINGLE["kijai8"][3]),
    ]
    for spec in specs:
        for comp in [c for c in spec.components.values() if c.name != "vae"]:
            rows, nbytes = manifest.layout(comp)
            expected = torch.zeros(nbytes, dtype=torch.uint8)
            _, scales = cpu.fill(expected, comp, rows)
            plain_scales: dict[str, float] = {}
            plain = load_state_dict(comp, plain_scales)  # the plain (copying) load
            assert scales and plain_scales == scales, comp.name
            for name, _, shape, stride, offset in rows:
                dt = plain[name].dtype
                view = expected.view(dt).as_strided(shape, stride, offset // dt.itemsize)
                assert torch.equal(view.view(torch.uint8), plain[name].view(torch.uint8)), name
            for capacity in (7, 1000, 1 << 20):
                got = torch.zeros(nbytes, dtype=torch.uint8)
                assert gpu.fill(got, comp, rows, capacity=capacity, depth=3) == scales
                assert torch.equal(got, expected), (comp.name, capacity)


def test_the_cpu_loader_quantizes_tensors_larger_than_its_scratch(tiny, monkeypatch):
    """A tensor read in pieces is read twice: its maximum first, then its values."""
    from wand.common import manifest
    from wand.load import cpu

    spec = read_checkpoint(tiny("t2v-A14B", "original"), dtypes=fp8_for("t2v-A14B"))
    comp = spec.components["high_noise_model"]
    rows, nbytes = manifest.layout(comp)
    whole = torch.zeros(nbytes, dtype=torch.uint8)
    _, scales = cpu.fill(whole, comp, rows)
    monkeypatch.setattr(cpu, "SCRATCH_BYTES", 96)  # 24 float32 values a piece
    pieces = torch.zeros(nbytes, dtype=torch.uint8)
    assert cpu.fill(pieces, comp, rows)[1] == scales
    assert torch.equal(pieces, whole)


def refused(tmp_path: Path, *flags: str) -> str:
    """The daemon's one-line error for ``flags`` (exit status 78)."""
    r = check_config(tmp_path, *flags)
    assert r.returncode == 78, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_fp8_for_the_vae_is_refused_with_the_reason(tiny, tmp_path):
    folder = ["--checkpoint", str(tiny("t2v-A14B", "original"))]
    for flags in (["--dtype", f"vae={E4M3}"], ["--dtype", "fp8"]):
        message = refused(tmp_path, *folder, *flags)
        assert f"vae: {E4M3} residency is for" in message and "vae=float32" in message
    r = check_config(tmp_path, *folder, "--dtype", "fp8", "--dtype", "vae=float32")
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.strip().startswith("text_encoder:"))
    assert E4M3 in line


def test_an_fp8_source_of_the_other_kind_is_refused(written, tmp_path):
    files = written["e5m2"]
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in files.items()]
    message = refused(tmp_path, *flags, "--dtype", f"high_noise_model={E4M3}")
    assert str(files["high_noise_model"]) in message
    assert f"is stored as {E5M2}" in message and f"high_noise_model={E5M2}" in message


def test_fp8_for_weights_that_are_not_floats_is_refused(tiny, tmp_path):
    """A diffusers folder whose expert holds an integer Linear weight: named by file and key."""
    folder = Path(shutil.copytree(tiny("t2v-A14B", "diffusers"), tmp_path / "ckpt"))
    key = "blocks.0.attn1.to_q.weight"
    index = folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    shard = index.parent / json.loads(index.read_text())["weight_map"][key]
    with safe_open(str(shard), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    sd[key] = sd[key].to(torch.int8)
    save_file(sd, str(shard))
    message = refused(tmp_path, "--checkpoint", str(folder), "--dtype", f"high_noise_model={E4M3}")
    assert str(shard) in message and f"{key!r} is stored as torch.int8" in message


def test_wanctl_load_says_what_is_wrong_in_one_line(start_daemon, tiny):
    d = start_daemon(tiny("ti2v-5B")).wait_ready()
    r = d.wanctl("load", str(tiny("t2v-A14B")), "--dtype", "vae=float8_e5m2")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("wanctl: checkpoint: ") and "vae: float8_e5m2 residency" in r.stderr


def test_a_scaled_file_read_for_fp8_keeps_its_scales_in_the_spec(written):
    spec = read_files(written["comfy8"], dtypes=SINGLE["comfy8"][3])
    expert = spec.components["high_noise_model"]
    fp8 = float8_names(expert.cls, expert.config)
    scaled = {t.name: t.dtype for t in expert.tensors if t.scale is not None}
    assert scaled and {n: d for n, d in scaled.items() if n in fp8} == dict.fromkeys(fp8, E4M3)
    assert set(scaled.values()) == {E4M3, "float32"}  # time_embedder: diffusers' float32
    with pytest.raises(CheckpointError):
        read_files(written["e5m2"], dtypes={"low_noise_model": E4M3})


def test_module_scales_for_tensors_that_are_not_linear_weights_are_refused(served):
    from wand.client import fp8
    from wand.common.errors import BindError

    with served.connect() as c:
        att = c.attachment("orig/low_noise_model")
    man = {**att.manifest, "scales": {**att.manifest["scales"], "scale_shift_table": 2.0}}
    module = build(man["cls"], man["config"], att.tensors)
    with pytest.raises(BindError, match="'scale_shift_table', which is not the weight of a"):
        fp8.apply(module, man)
    assert json.dumps(att.manifest["scales"])  # plain data on the wire


def test_the_bench_measures_fp8_experts_against_bfloat16(tmp_path):
    """On the bench preset (the real tensor counts): fp8 experts take at most 0.52 of their
    bfloat16 bytes; build time and time per denoising step measured for both."""
    from wand.tools import bench

    ckpt = write_tiny(tmp_path / "bench", "t2v-A14B", "original", preset="bench")
    x = bench.fp8_times(tmp_path, ckpt, "t2v-A14B", repeat=1)
    bf, f8 = x["bfloat16"], x["float8_e4m3fn"]
    assert f8["expert_bytes"] <= 0.52 * bf["expert_bytes"]
    assert all(m[k] > 0 for m in (bf, f8) for k in ("build_seconds", "step_seconds"))
    line = bench.render_fp8(x)
    ratio = f8["expert_bytes"] / bf["expert_bytes"]
    assert line.startswith("fp8 experts ") and f"({ratio:.2f}x)" in line
