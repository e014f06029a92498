"""The daemon's configuration: one TOML file, overridden by command-line flags.

```toml
endpoint = "ipc:///run/wand/wand.sock"      # optional
[[checkpoint]]
name = "t2v"                                # optional, default: the task
path = "/srv/Wan2.2-T2V-A14B"
task = "t2v-A14B"                           # optional, detected from the folder
device = "cpu"                              # "cuda", "cuda:N", or per component:
                                            # { "*" = "cuda:0", text_encoder = "cpu" }
dtype = "bfloat16"                          # or { "*" = "bfloat16", vae = "float32" }

[[checkpoint]]                              # or one file per component instead of a folder
high_noise_model = "/srv/models/diffusion_models/wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors"
low_noise_model = "/srv/models/diffusion_models/wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors"
text_encoder = "/srv/models/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors"
vae = "/srv/models/vae/wan_2.1_vae.safetensors"
tokenizer = "/srv/google/umt5-xxl"          # optional: else the one the text encoder embeds
```
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from wand.common import dtypes, placement
from wand.common.endpoint import check as check_endpoint
from wand.common.errors import WandError
from wand.load.files import is_file, read_small

SYSTEM_CONFIG = Path("/etc/wand/wand.toml")
TASKS = ("t2v-A14B", "i2v-A14B", "ti2v-5B")
COMPONENTS = ("text_encoder", "vae", "high_noise_model", "low_noise_model", "model")
COMPONENT_FILES = COMPONENTS  # a single-file checkpoint names one file per component
FILE_FLAGS = (*COMPONENT_FILES, "tokenizer")  # settings of a single-file checkpoint
CHECKPOINT_KEYS = {"name", "path", "task", "device", "dtype", "lora", "tokenizer", *COMPONENTS}
LORA_KEYS = {"name", "path", "expert"}
LORA_EXPERTS = ("high", "low", "both")
MAX_PATH, MAX_NAME = 4096, 64


class ConfigError(WandError):
    code = "config"


@dataclass(frozen=True)
class LoraConfig:
    """A LoRA the daemon holds for a checkpoint: ``expert`` is where it goes by default."""

    name: str
    path: Path
    expert: str = "high"


@dataclass(frozen=True)
class CheckpointConfig:
    """A checkpoint folder (``path``), or one file per component (``files``, with an
    optional ``tokenizer`` folder)."""

    path: Path | None
    name: str | None = None
    task: str | None = None
    device: dict[str, str] = field(default_factory=lambda: {"*": "cpu"})
    dtype: dict[str, str] = field(default_factory=dict)
    loras: tuple[LoraConfig, ...] = ()
    files: dict[str, Path] = field(default_factory=dict)
    tokenizer: Path | None = None

    @property
    def source(self) -> str:
        """What it is read from, in messages: the folder, or its diffusion model's file."""
        if self.path is not None:
            return str(self.path)
        main = self.files.get("high_noise_model") or self.files.get("model")
        return str(main or next(iter(self.files.values())))

    def reads_same(self, other: CheckpointConfig) -> bool:
        return (self.path, self.files) == (other.path, other.files)

    def dtypes(self) -> dict[str, str]:
        """Resident dtype names by component (``"*"``: every other one), canonical."""
        return {k: _dtype(v) for k, v in self.dtype.items()}

    def device_for(self, component: str) -> str:
        """Where ``component`` lives: its own entry, else ``"*"``, else the CPU."""
        return self.device.get(component, self.device.get("*", "cpu"))


@dataclass(frozen=True)
class Config:
    checkpoints: tuple[CheckpointConfig, ...] = ()
    endpoint: str | None = None
    source: Path | None = None  # the file it was read from


def default_path() -> Path:
    if os.geteuid() == 0:
        return SYSTEM_CONFIG
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "wand" / "wand.toml"


def load(path: Path | None) -> Config:
    """Read ``path`` (required to exist), or the default file if there is one."""
    if path is None:
        path = default_path()
        if not is_file(path):
            return Config()
    try:
        data = tomllib.loads(read_small(path, ConfigError).decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: {e}") from None
    return parse(data, Path(path))


def parse(data: dict[str, Any], source: Path | None = None) -> Config:
    where = str(source or "configuration")
    unknown = set(data) - {"endpoint", "checkpoint"}
    if unknown:
        raise ConfigError(f"{where}: unknown setting {sorted(unknown)[0]!r}")
    address = data.get("endpoint")
    if address is not None:
        _check_endpoint(address, where)
    entries = data.get("checkpoint", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{where}: use [[checkpoint]] tables for checkpoints")
    checkpoints = tuple(
        checkpoint(e, f"{where}: checkpoint {i + 1}") for i, e in enumerate(entries)
    )
    _unique_names(checkpoints, where)
    return Config(checkpoints, address, source)


def checkpoint(entry: dict[str, Any], where: str) -> CheckpointConfig:
    """One checkpoint from a config table or from the equivalent protocol arguments."""
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a table")
    unknown = {str(k)[:60] for k in entry} - CHECKPOINT_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    path, files = entry.get("path"), _component_files(entry, where)
    if path is not None and files:
        raise ConfigError(f"{where}: 'path' (a folder) or one file per component, not both")
    if path is not None and "tokenizer" in entry:
        raise ConfigError(
            f"{where}: tokenizer goes with one file per component (a folder has its own)"
        )
    if path is None and not files:
        raise ConfigError(
            f"{where}: 'path' (the checkpoint folder), or one file per component "
            f"({', '.join(COMPONENT_FILES)}), is required"
        )
    if path is not None and not _is_path(path):
        raise ConfigError(
            f"{where}: 'path' (the checkpoint folder) is required: a string of at most "
            f"{MAX_PATH} characters"
        )
    name, task = entry.get("name"), entry.get("task")
    if name is not None and (
        not isinstance(name, str) or not name or "/" in name or len(name) > MAX_NAME
    ):
        raise ConfigError(
            f"{where}: name must be a non-empty string without '/', at most {MAX_NAME} characters"
        )
    if task is not None and task not in TASKS:
        raise ConfigError(f"{where}: task must be one of {', '.join(TASKS)}")
    device = _placements(entry.get("device", "cpu"), where)
    dtype = _dtype_names(entry.get("dtype", {}), where)
    items = entry.get("lora", [])
    if not isinstance(items, list):
        raise ConfigError(f"{where}: lora must be a list of tables (name, path, expert)")
    loras = tuple(lora(x, f"{where}: lora {i + 1}") for i, x in enumerate(items))
    names = [x.name for x in loras]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: two LoRAs have the same name")
    tokenizer = entry.get("tokenizer")
    if tokenizer is not None and not _is_path(tokenizer):
        raise ConfigError(f"{where}: tokenizer must be a folder's path")
    return CheckpointConfig(
        _absolute(path) if path is not None else None,
        name,
        task,
        device,
        dtype,
        loras,
        files,
        _absolute(tokenizer) if tokenizer is not None else None,
    )


def _component_files(entry: dict[str, Any], where: str) -> dict[str, Path]:
    """The files of a single-file checkpoint (which components it needs, the reader says)."""
    files = {k: entry[k] for k in COMPONENT_FILES if k in entry}
    for key, value in files.items():
        if not _is_path(value):
            raise ConfigError(
                f"{where}: {key} must be a file's path, at most {MAX_PATH} characters"
            )
    return {k: _absolute(v) for k, v in files.items()}


def _is_path(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_PATH and "\0" not in value


def lora(entry: Any, where: str) -> LoraConfig:
    """One LoRA from a config table or from ``load_lora``'s arguments."""
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a table (name, path, expert)")
    unknown = {str(k)[:60] for k in entry} - LORA_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    name, path, expert = entry.get("name"), entry.get("path"), entry.get("expert", "high")
    if not isinstance(name, str) or not name or len(name) > MAX_NAME or set("/:\0") & set(name):
        raise ConfigError(
            f"{where}: name must be a non-empty string without '/' or ':', at most "
            f"{MAX_NAME} characters"
        )
    if not isinstance(path, str) or not path or len(path) > MAX_PATH or "\0" in path:
        raise ConfigError(f"{where}: 'path' (the LoRA file) is required")
    if expert not in LORA_EXPERTS:
        raise ConfigError(f"{where}: expert must be one of {', '.join(LORA_EXPERTS)}")
    return LoraConfig(name, _absolute(path), expert)


def with_overrides(config: Config, **flags: Any) -> Config:
    """Command-line flags win: ``checkpoint`` (a folder) or the component files replace the
    file's checkpoints, ``device`` and ``dtype`` apply to every checkpoint, ``endpoint``
    replaces the endpoint."""
    checkpoints = config.checkpoints
    given = {
        key: str(flags[flag])
        for key, flag in (("path", "checkpoint"), *((k, k) for k in FILE_FLAGS))
        if flags.get(flag)
    }
    if given:
        checkpoints = (
            checkpoint(
                {**given, "name": flags.get("name"), "task": flags.get("task")},
                "--checkpoint" if "path" in given else "command line",
            ),
        )
    changes: dict[str, Any] = {}
    if flags.get("device"):
        changes["device"] = _placements(flags["device"], "--device")
    if flags.get("dtype"):
        changes["dtype"] = _dtype_names(flags["dtype"], "--dtype")
    checkpoints = tuple(replace(c, **changes) for c in checkpoints)
    _unique_names(checkpoints, "command line")
    if flags.get("endpoint"):
        _check_endpoint(flags["endpoint"], "--endpoint")
    return replace(
        config, checkpoints=checkpoints, endpoint=flags.get("endpoint") or config.endpoint
    )


def parse_assignments(items: list[str]) -> dict[str, str]:
    """``["cuda:0", "text_encoder=cpu"]`` → ``{"*": "cuda:0", "text_encoder": "cpu"}``."""
    out = {}
    for item in items:
        target, _, value = item.rpartition("=")
        out[target or "*"] = value
    return out


def _placements(value: Any, where: str) -> dict[str, str]:
    devices = _per_component(value, where, "device")
    for name in devices.values():
        _check_device(name, where)
    return devices


def _dtype_names(value: Any, where: str) -> dict[str, str]:
    dtypes = _per_component(value, where, "dtype")
    for name in dtypes.values():
        _dtype(name, where)
    return dtypes


def _per_component(value: Any, where: str, what: str) -> dict[str, str]:
    if isinstance(value, str):
        return {"*": value}
    if not (isinstance(value, dict) and all(isinstance(v, str) for v in value.values())):
        raise ConfigError(f"{where}: {what} must be a string or a table of strings")
    unknown = sorted(str(k)[:60] for k in value if k not in ("*", *COMPONENTS))
    if unknown:
        raise ConfigError(
            f"{where}: {what} for no component {unknown[0]!r}; components: "
            f"{', '.join(COMPONENTS)}, or * for every one"
        )
    return dict(value)


def _check_device(value: str, where: str) -> None:
    """The form only; whether the GPU exists is checked where it is used (the daemon)."""
    try:
        placement.parse(value)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def _dtype(name: str, where: str = "dtype") -> str:
    try:
        found = dtypes.canonical(name)
    except ValueError:
        found = None
    if found is None or not dtypes.is_floating(found):
        raise ConfigError(f"{where}: {name[:60]!r} is not a floating-point dtype")
    return found


def _absolute(path: str) -> Path:
    """A path from the configuration, absolute (relative ones are taken from the daemon's
    working folder): clients read the tokenizer and configs from the paths the daemon
    reports, wherever they run."""
    return Path(os.path.abspath(path))


def _check_endpoint(value: Any, where: str) -> None:
    try:
        check_endpoint(value)
    except WandError as e:
        raise ConfigError(f"{where}: {e}") from None


def _unique_names(checkpoints: tuple[CheckpointConfig, ...], where: str) -> None:
    names = [c.name for c in checkpoints if c.name]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"{where}: two checkpoints are named {sorted(dup)[0]!r}")
