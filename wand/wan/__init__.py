"""Wan2.2 checkpoint knowledge: layouts, key names, configs and resident dtypes."""

from wand.wan.load import load_state_dict
from wand.wan.loras import read_lora
from wand.wan.reader import read_checkpoint
from wand.wan.single_file import read_files
from wand.wan.tasks import LAYOUTS, TASKS
from wand.wan.tiny import write_tiny

__all__ = [
    "LAYOUTS",
    "TASKS",
    "load_state_dict",
    "read_checkpoint",
    "read_files",
    "read_lora",
    "write_tiny",
]
