#!/usr/bin/env bash
# Set up a virtual environment in .venv with everything swallow-stream needs.
#   scripts/setup.sh         -> runtime (UI, servers, engine)
#   scripts/setup.sh test    -> + test tools, transformers (the numeric oracle), headless Chromium
# torch is installed first and pinned (torch==2.13.0): an unpinned torch can pull a different,
# multi-GB build. On a CUDA machine that already has a working torch, it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  "${PIP[@]}" torch==2.13.0
fi
if [ "${1:-}" = "test" ]; then
  "${PIP[@]}" -e ".[test]"
  bash scripts/install-browser.sh
else
  "${PIP[@]}" -e .
fi
