"""``scripts/demo``, the README's first command: it exits 0, keeps the video it made and says
where, leaves nothing else behind, and takes a checkpoint path relative to where it runs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import imageio.v2 as imageio
from conftest import ROOT

from wand.wan import write_tiny


def demo(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "XDG_CACHE_HOME": str(cwd / "cache")}
    env.pop("WAND_ENDPOINT", None)
    return subprocess.run(
        [str(ROOT / "scripts" / "demo"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def leftovers() -> set[str]:
    return {p.name for p in Path("/tmp").glob("wand-demo.*")}


def test_demo_keeps_the_video_and_nothing_else(tmp_path):
    before = leftovers()
    r = demo(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    kept = tmp_path / "cache" / "wand" / "demo-corgi.mp4"
    assert f"kept the video: {kept}" in r.stdout
    with imageio.get_reader(kept) as reader:
        assert reader.count_frames() == 9 and reader.get_meta_data()["size"] == (64, 64)
    assert leftovers() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_demo_takes_a_relative_checkpoint_path(tmp_path):
    write_tiny(tmp_path / "ckpt", "ti2v-5B", "original")
    r = demo(tmp_path, "ckpt")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{tmp_path / 'ckpt'}" in r.stdout  # wanctl status names the folder it serves
    assert "ti2v-5B/model" in r.stdout
