"""Writing safetensors files the way the generators write their other files."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    """``path`` holding ``tensors`` (contiguous) and ``metadata`` with safetensors' ``format``
    marker, its mode from the umask like any other file (safetensors' ``save_file`` makes its
    files 0600, which a service user cannot read)."""
    path.write_bytes(save(tensors, {"format": "pt", **(metadata or {})}))
