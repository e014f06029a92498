"""GPU placement without a GPU: names, UUIDs, handles, staging plans and digests.

Everything here is pure logic or runs on CPU tensors; tests/test_cuda.py needs the GPU.
"""

from __future__ import annotations

import struct
import subprocess
import sys

import pytest
import torch

from wand.common import manifest, placement, protocol, views
from wand.common.errors import DeviceError, ProtocolError
from wand.daemon import config
from wand.load.gpu import Chunk, Piece, Read, plan

UUID = "GPU-58e5a0f1-6e2c-4b7e-9f0a-1c2d3e4f5a6b"


# --- device names and UUIDs --------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "index"), [("cpu", None), ("cuda", 0), ("cuda:0", 0), ("cuda:7", 7)]
)
def test_device_names_parse(name, index):
    assert placement.parse(name) == index
    config._check_device(name, "here")


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "cuda:-1", "CUDA:0", "cuda0", "mps"])
def test_bad_device_names_are_config_errors(name):
    with pytest.raises(ValueError, match="expected 'cpu', 'cuda' or 'cuda:N'"):
        placement.parse(name)
    with pytest.raises(config.ConfigError, match=f"here: device {name!r}"):
        config._check_device(name, "here")


def test_config_accepts_per_component_gpu_placement():
    entry = config.checkpoint(
        {"path": "/x", "device": {"*": "cuda:0", "text_encoder": "cpu"}}, "checkpoint 1"
    )
    assert entry.device == {"*": "cuda:0", "text_encoder": "cpu"}
    flags = config.parse_assignments(["text_encoder=cpu", "cuda:1"])
    cfg = config.with_overrides(config.Config((entry,)), device=flags)
    assert cfg.checkpoints[0].device == {"text_encoder": "cpu", "*": "cuda:1"}


def test_uuids_have_one_form():
    bare = UUID.removeprefix("GPU-")
    assert placement.canonical_uuid(bare) == UUID  # torch's str(props.uuid)
    assert placement.canonical_uuid(UUID) == UUID  # nvidia-smi
    assert placement.canonical_uuid(" " + UUID.upper() + "\n") == UUID
    with pytest.raises(ValueError):
        placement.canonical_uuid("GPU-1234")


def test_a_client_finds_the_gpu_by_uuid_under_its_own_numbering():
    other = "GPU-00000000-0000-0000-0000-000000000001"
    assert placement.local_index(UUID, [UUID, other], None) == 0
    assert placement.local_index(UUID, [other, UUID], "3,1") == 1  # daemon's cuda:1 is our 1


@pytest.mark.parametrize(
    ("visible", "cvd", "shown"),
    [([], "", "CUDA_VISIBLE_DEVICES=''"), (["GPU-x"], None, "CUDA_VISIBLE_DEVICES=unset")],
)
def test_a_client_that_cannot_see_the_gpu_is_told_which_and_why(visible, cvd, shown):
    with pytest.raises(DeviceError, match="cannot see") as e:
        placement.local_index(UUID, visible, cvd)
    assert UUID in str(e.value) and shown in str(e.value)
    assert e.value.code == "device" and "device" in protocol.ERRORS


def test_a_missing_gpu_index_is_explained():
    assert "no CUDA GPU is visible (CUDA_VISIBLE_DEVICES='')" in placement.describe_missing(
        0, 0, ""
    )
    text = placement.describe_missing(2, 2, "0,1")
    assert "cuda:2" in text and "sees 2 GPUs (cuda:0..cuda:1" in text


# --- handles ------------------------------------------------------------------------------


def _handle(**changes):
    handle = {"kind": "vmm", "uuid": UUID, "nbytes": 1 << 30, "size": 1 << 30, "token": "ab"}
    return {**handle, **changes}


def test_a_gpu_handle_crosses_the_wire_unchanged():
    reply = protocol.ok(7, {"handle": _handle(), "manifest": {}})
    assert protocol.parse_reply(reply)["result"]["handle"] == _handle()


def test_a_malformed_gpu_handle_is_a_protocol_error():
    from wand.slabs import vmm

    bad = _handle()
    del bad["size"]
    with pytest.raises(ProtocolError, match="malformed vmm handle"):
        vmm.map_fd(bad, -1, False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a GPU-less client gets")
def test_a_client_without_the_gpu_gets_the_clear_error(monkeypatch):
    from wand.slabs import vmm

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(DeviceError, match="cannot see") as e:
        vmm.map_fd(_handle(), -1, False)
    assert UUID in str(e.value) and "CUDA_VISIBLE_DEVICES=''" in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the GPU-less daemon")
def test_a_daemon_without_the_gpu_refuses_the_placement(tiny, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "wand.daemon", "--checkpoint", str(tiny()), "--device", "cuda:0"]
        + ["--endpoint", f"ipc://{tmp_path}/w.sock"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 78, out.stderr
    assert "cuda:0: no CUDA GPU is visible" in out.stderr


def test_status_lists_no_gpus_for_cpu_slabs(daemon):
    with daemon.connect() as c:
        status = c.status()
    assert status["gpus"] == []
    assert {(x["device"], x["uuid"]) for x in status["components"]} == {("cpu", None)}


# --- staging plans ------------------------------------------------------------------------


def _covered(reads: list[Read], chunks: list[Chunk], capacity: int) -> None:
    """Every byte of every read lands exactly once, from the right place, in whole elements."""
    seen: dict[int, int] = {}
    for c in chunks:
        assert 0 < c.nbytes <= capacity
        for p in c.pieces:
            r = reads[p.read]
            assert r.source == c.source
            assert c.offset + p.at == r.offset + p.start  # the bytes it reads are the tensor's
            assert p.at + p.nbytes <= c.nbytes
            assert p.start % r.itemsize == 0 and (
                p.nbytes % r.itemsize == 0 or p.start + p.nbytes == r.nbytes
            )
            assert seen.get(p.read, 0) == p.start  # pieces in order, no gap, no overlap
            seen[p.read] = p.start + p.nbytes
    assert seen == {i: r.nbytes for i, r in enumerate(reads) if r.nbytes}


def test_small_tensors_share_a_chunk():
    reads = [Read(0, 8, 100, 4), Read(0, 108, 60, 2), Read(0, 168, 32, 4)]
    chunks = plan(reads, 1024)
    assert chunks == [
        Chunk(0, 8, 192, [Piece(0, 0, 0, 100), Piece(1, 100, 0, 60), Piece(2, 160, 0, 32)])
    ]


def test_a_tensor_that_does_not_fit_starts_a_new_chunk():
    reads = [Read(0, 0, 600, 4), Read(0, 600, 600, 4)]
    chunks = plan(reads, 1000)
    assert [(c.offset, c.nbytes) for c in chunks] == [(0, 600), (600, 600)]


def test_a_large_tensor_is_split_between_whole_elements():
    reads = [Read(0, 0, 100, 4), Read(0, 100, 2500, 4)]
    chunks = plan(reads, 1002)
    _covered(reads, chunks, 1002)
    assert chunks[0].pieces[1] == Piece(1, 100, 0, 900)  # fills the rest: 902 → 900
    assert [c.nbytes for c in chunks] == [1000, 1000, 600]


def test_sources_are_never_mixed_and_unsorted_reads_are_fine():
    reads = [Read(1, 0, 40, 2), Read(0, 50, 10, 1), Read(0, 0, 30, 2), Read(2, 0, 0, 4)]
    chunks = plan(reads, 64)
    _covered(reads, chunks, 64)
    assert [(c.source, c.offset, c.nbytes) for c in chunks] == [(0, 0, 60), (1, 0, 40)]


@pytest.mark.parametrize("capacity", [8, 100, 4096, 1 << 20])
def test_plans_cover_everything_for_any_capacity(capacity):
    gen = torch.Generator().manual_seed(capacity)
    reads, offset = [], 0
    for i in range(200):
        itemsize = [1, 2, 4, 8][int(torch.randint(4, (1,), generator=gen))]
        n = int(torch.randint(0, 3000, (1,), generator=gen)) * itemsize
        reads.append(Read(i % 3, offset, n, itemsize))
        offset += n + int(torch.randint(0, 16, (1,), generator=gen))
    _covered(reads, plan(reads, capacity), capacity)


def test_an_element_larger_than_a_chunk_is_refused():
    with pytest.raises(ValueError, match="smaller than one element"):
        plan([Read(0, 0, 16, 8)], 4)


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_staged_fill_matches_the_cpu_loader(tiny, layout):
    """The GPU loading path, run on CPU tensors: file reads and .pth memory copies, chunks
    split mid-tensor, casts, progress."""
    from wand.load import cpu as loader
    from wand.load import gpu as staging
    from wand.wan import read_checkpoint

    spec = read_checkpoint(tiny("t2v-A14B", layout))
    for comp in spec.components.values():
        rows, nbytes = manifest.layout(comp)
        expected = torch.zeros(nbytes, dtype=torch.uint8)
        loader.fill(expected, comp, rows)
        for capacity, depth in ((8, 2), (1000, 3), (1 << 20, 8)):
            got, progress = torch.zeros(nbytes, dtype=torch.uint8), []
            staging.fill(got, comp, rows, progress.append, capacity=capacity, depth=depth)
            assert torch.equal(got, expected), (comp.name, capacity)
            assert sum(progress) == comp.nbytes


# --- on-device digests --------------------------------------------------------------------


def _reference_sum64(t: torch.Tensor) -> bytes:
    data = bytes(t.reshape(-1).view(torch.uint8).numpy())
    n = len(data)
    words = [int.from_bytes(data[i : i + 2], "little", signed=True) for i in range(0, n - 1, 2)]
    words += [data[-1]] if n % 2 else []
    s1 = sum(words)
    s2 = sum((i + 1) * w for i, w in enumerate(words))
    return struct.pack("<QQQ", n, s1 % 2**64, s2 % 2**64)


def test_sum64_matches_its_definition(monkeypatch):
    monkeypatch.setattr(views, "SUM_BLOCK", 16)  # many blocks, combined on the host
    views._positions.cache_clear()
    try:
        tensors = [
            torch.randint(0, 256, (1001,), dtype=torch.uint8),
            torch.randn(10, 7),
            torch.randn(33, dtype=torch.float64).to(torch.bfloat16),
            torch.tensor([-32768, 32767, -1], dtype=torch.int16),
            torch.empty(0),
        ]
        assert views.sum64_digests(tensors) == [_reference_sum64(t) for t in tensors]
    finally:
        views._positions.cache_clear()


def test_sum64_sees_swaps_and_flips():
    t = torch.arange(64, dtype=torch.int16)
    swapped, flipped = t.clone(), t.clone()
    swapped[[3, 4]] = swapped[[4, 3]]
    flipped[10] ^= 1
    digests = views.sum64_digests([t, swapped, flipped])
    assert len(set(digests)) == 3


@pytest.mark.parametrize("method", ["crc32", "sum64"])
def test_verify_dispatches_on_the_checksum_method(tiny, method):
    from wand.load import cpu as loader
    from wand.wan import read_checkpoint

    comp = read_checkpoint(tiny()).components["vae"]
    rows, nbytes = manifest.layout(comp)
    flat = torch.zeros(nbytes, dtype=torch.uint8)
    loader.fill(flat, comp, rows)
    man = {"tensors": rows, "aliases": {}}
    man["checksum"] = manifest.checksum(views.digests(flat, man, method), method)
    assert man["checksum"].startswith(method + ":")
    assert views.verify(flat, man)
    flat[int(rows[-1][4])] ^= 1
    assert not views.verify(flat, man)
    with pytest.raises(ProtocolError, match="unknown checksum method"):
        views.verify(flat, {**man, "checksum": "md4:00"})


# --- the device check's benchmark, what of it runs without a GPU ----------------------------


def test_gpubench_reads_files_in_parallel_and_renders_its_table(tmp_path):
    from wand.tools import gpubench

    files = []
    for i, size in enumerate((0, 1, (1 << 20) + 3)):
        files.append(tmp_path / f"f{i}")
        files[-1].write_bytes(b"x" * size)
    read = gpubench.parallel_read(files, threads=3)
    assert read["bytes"] == (1 << 20) + 4 and read["gbps"] > 0
    rate = {"seconds": 2.0, "gbps": 10.0}
    times = {"median_seconds": 0.03, "runs": 5}
    table = gpubench.render(
        {
            "width": 1976,
            "write_seconds": 60.0,
            "tensors": 2000,
            "disk_bytes": 20e9,
            "resident_bytes": 12e9,
            "page_cache_read": rate,
            "h2d": {"seconds": 0.02, "gbps": 50.0},
            "daemon": {"load_seconds": 2.5, "gbps": 8.6},
            "from_pretrained_cuda": {"seconds": 30.0},
            "attach_state_dicts": times,
            "attach_modules": {**times, "median_seconds": 1.5},
            "gpu": "NVIDIA H100",
            "restart": {"adopted_seconds": 2.5, "cold_seconds": 9.0, "adopted": 4, "components": 4},
        }
    )
    lines = {line.split("  ")[0]: line for line in table.splitlines()}
    assert lines["daemon cold load to GPU"].endswith("PASS")  # 8.6 >= 0.85 * min(10, 50)
    assert lines["from_pretrained + .to(cuda)"].endswith("PASS")  # 30 s >= 3 * 2.5 s
    assert lines["attach 4 state dicts"].endswith("PASS")
    assert lines["attach 4 modules"].endswith("FAIL")
    assert lines["restart, slabs adopted"].endswith("FAIL")  # 2.5 s, not < 2 s
