#!/usr/bin/env python3
"""Assemble a complete, uploadable Hugging Face Space from spaces/ and the packages it runs.

    python scripts/prepare_space.py [OUT_DIR] [--preload REPO]   (default OUT_DIR: spaces/build)
    hf upload <user>/<space> OUT_DIR --repo-type space

The Space gets spaces/{README.md, app.py, requirements.txt}, the `swallow_stream` package, and
`kernels/` as the `swallow_kernels` package (its import name), next to app.py.

--preload REPO: for a GPU Space, add REPO's root weight shards to `preload_from_hub`, their names
read from REPO's model.safetensors.index.json (only the index is downloaded here). The front
matter in spaces/ preloads only configs and indexes, so a CPU Space fits its disk.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPACE_FILES = ("README.md", "app.py", "requirements.txt")
PACKAGES = {"swallow_stream": ROOT / "swallow_stream", "swallow_kernels": ROOT / "kernels"}
SMALL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")


def shard_names(index_path: Path) -> list[str]:
    """Root weight shards named by an index (never `original/` or `metal/` copies)."""
    weight_map = json.loads(Path(index_path).read_text())["weight_map"]
    return sorted({f for f in weight_map.values() if "/" not in f})


def with_preloaded_shards(readme: str, repo: str, shards: list[str]) -> str:
    """The README with `repo`'s preload_from_hub entry listing its small files and `shards`."""
    entry = f"  - {repo} {','.join([*SMALL_FILES, *shards])}"
    pattern = re.compile(rf"^  - {re.escape(repo)} \S+$", re.M)  # preload entries carry a file list
    if not pattern.search(readme):
        raise SystemExit(f"{repo} is not in preload_from_hub of spaces/README.md")
    return pattern.sub(entry, readme, count=1)


def prepare(out: Path, preload: dict[str, Path] | None = None) -> Path:
    """preload: repo id -> its downloaded model.safetensors.index.json."""
    out = out.resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in SPACE_FILES:
        shutil.copy2(ROOT / "spaces" / name, out / name)
    for repo, index in (preload or {}).items():
        readme = out / "README.md"
        readme.write_text(with_preloaded_shards(readme.read_text(encoding="utf-8"), repo, shard_names(index)),
                          encoding="utf-8")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg, src in PACKAGES.items():
        shutil.copytree(src, out / pkg, ignore=ignore)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default=str(ROOT / "spaces" / "build"))
    ap.add_argument("--preload", action="append", default=[], metavar="REPO",
                    help="preload this repo's weight shards too (reads its index from the Hub)")
    args = ap.parse_args()
    indexes = {}
    if args.preload:
        from huggingface_hub import hf_hub_download

        indexes = {repo: Path(hf_hub_download(repo, "model.safetensors.index.json")) for repo in args.preload}
    print(prepare(Path(args.out), indexes))


if __name__ == "__main__":
    main()
