"""Where swallow-stream keeps files of its own (the verified vocab copy, synthetic checkpoints)."""

from __future__ import annotations

import os
from pathlib import Path

ENV_CACHE = "SWALLOW_STREAM_CACHE"


def cache_dir() -> Path:
    """`$SWALLOW_STREAM_CACHE`, else `~/.cache/swallow-stream`."""
    env = os.environ.get(ENV_CACHE)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "swallow-stream"
