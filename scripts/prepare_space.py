#!/usr/bin/env python3
"""Assemble a complete, uploadable Hugging Face Space from spaces/ and the packages it runs.

    python scripts/prepare_space.py [OUT_DIR]      (default: spaces/build)
    hf upload <user>/<space> OUT_DIR --repo-type space

The Space gets spaces/{README.md, app.py, requirements.txt}, the `swallow_stream` package, and
`kernels/` as the `swallow_kernels` package (its import name), next to app.py.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPACE_FILES = ("README.md", "app.py", "requirements.txt")
PACKAGES = {"swallow_stream": ROOT / "swallow_stream", "swallow_kernels": ROOT / "kernels"}


def prepare(out: Path) -> Path:
    out = out.resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in SPACE_FILES:
        shutil.copy2(ROOT / "spaces" / name, out / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg, src in PACKAGES.items():
        shutil.copytree(src, out / pkg, ignore=ignore)
    return out


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "spaces" / "build"
    print(prepare(target))
