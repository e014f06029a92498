"""The tensors of one component on disk: a single file, or safetensors shards with an index."""

from __future__ import annotations

import json
from pathlib import Path

from wand.common.errors import CheckpointError
from wand.common.spec import Scale
from wand.load.files import is_file, read_small
from wand.load.tensorfile import TensorFile, TensorInfo


class Source:
    """Key → (file, info) for every tensor of a component, across all its files.

    ``origin`` is the file that lists the keys (the index, or the only file): a key that
    should be there and is not is reported against it. A single file may store a key under
    another name (a prefix: ``stored``) and a weight with a scale (``scales``);
    ``scale_suffix`` says what its scales are called when it is a scaled file.
    """

    def __init__(
        self,
        origin: Path,
        files: dict[str, TensorFile],
        stored: dict[str, str] | None = None,
        scales: dict[str, Scale] | None = None,
        scale_suffix: str | None = None,
    ) -> None:
        self.origin = origin
        self._files = files  # key → the file holding it
        self._stored = stored or {}  # key → its name in the file, where they differ
        self._scales = scales or {}
        self.scale_suffix = scale_suffix

    def __contains__(self, key: str) -> bool:
        return key in self._files

    def keys(self) -> list[str]:
        return list(self._files)

    def file(self, key: str) -> Path:
        return self._files[key].path

    def stored_key(self, key: str) -> str:
        return self._stored.get(key, key)

    def info(self, key: str) -> TensorInfo:
        return self._files[key].info(self.stored_key(key))

    def scale(self, key: str) -> Scale | None:
        return self._scales.get(key)


def open_file(path: Path) -> Source:
    f = TensorFile(path)
    return Source(path, dict.fromkeys(f.keys(), f))


def open_index(index: Path) -> Source:
    """Shards named by a ``*.safetensors.index.json``; every key must be in the shard named."""
    weight_map = _weight_map(index)
    shards: dict[str, TensorFile] = {}
    files: dict[str, TensorFile] = {}
    for key, shard in weight_map.items():
        if shard not in shards:
            path = index.parent / shard
            if not is_file(path):
                what = "is not a regular file" if path.exists() else "is missing"
                raise CheckpointError(f"{index}: shard {shard!r} (holding {key!r}) {what}")
            shards[shard] = TensorFile(path)
        if key not in shards[shard].keys():
            raise CheckpointError(f"{shards[shard].path}: no tensor {key!r} (listed in {index})")
        files[key] = shards[shard]
    return Source(index, files)


def open_weights(folder: Path, index_name: str, single_name: str) -> Source:
    """A diffusers/transformers weights folder: sharded with an index, or one file."""
    if is_file(folder / index_name):
        return open_index(folder / index_name)
    if is_file(folder / single_name):
        return open_file(folder / single_name)
    raise CheckpointError(f"{folder}: neither {index_name} nor {single_name} found")


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(read_small(index))["weight_map"]
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise CheckpointError(f"{index}: not a shard index: {e}") from None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(f"{index}: weight_map must map tensor names to file names")
    for key, shard in weight_map.items():
        if Path(shard).name != shard or shard in (".", ".."):
            raise CheckpointError(f"{index}: shard {shard!r} of {key!r} is not a plain file name")
    return weight_map
