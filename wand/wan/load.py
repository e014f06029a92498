"""Plain (copying) load of one component from its spec: for tests, tools and small models.

The daemon loads into slabs instead; this is the reference it can be checked against.
"""

from __future__ import annotations

import torch

from wand.common.dtypes import torch_dtype
from wand.common.spec import ComponentSpec
from wand.load.cast import to_resident
from wand.load.tensorfile import TensorFile


def load_state_dict(
    component: ComponentSpec, scales: dict[str, float] | None = None
) -> dict[str, torch.Tensor]:
    """Every state-dict entry (aliases included) as a CPU tensor in its resident dtype/shape;
    ``scales``, if given, gets the scale of each fp8 tensor by name."""
    files: dict[str, TensorFile] = {}
    state: dict[str, torch.Tensor] = {}
    for spec in component.tensors:
        f = files.get(str(spec.file))
        if f is None:  # one TensorFile per file, not per tensor
            f = files[str(spec.file)] = TensorFile(spec.file)
        stored = f.read(spec.key)
        tensor = torch.empty(spec.shape, dtype=torch_dtype(spec.dtype))
        scale = to_resident(tensor.view(-1), stored.view(-1), spec.scale)
        if scale is not None and scales is not None:
            scales[spec.name] = scale
        for name in (spec.name, *spec.aliases):
            state[name] = tensor
    return state
