"""Checkpoint discovery, validation and reading; synthetic checkpoints in the same layout."""

from .loader import Checkpoint, expected_shapes, open_checkpoint, resolve
from .synthetic import PRESETS, materialize_preset, preset, random_state_dict, write_checkpoint

__all__ = [
    "PRESETS",
    "Checkpoint",
    "expected_shapes",
    "materialize_preset",
    "open_checkpoint",
    "preset",
    "random_state_dict",
    "resolve",
    "write_checkpoint",
]
