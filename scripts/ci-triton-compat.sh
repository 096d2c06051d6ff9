#!/usr/bin/env bash
# The kernels under the other Tritons the project must work with: the oldest the package accepts
# (pyproject.toml: triton>=3.4) and the GPU machine's image (Triton 3.6 with torch 2.11, where
# nothing can be installed), so a GPU session spends no device minutes on API drift.
#
# Each Triton is installed without dependencies into .venv/triton-X and put first on PYTHONPATH
# over the main venv, with numpy<2.3: the interpreters of Triton <= 3.6 turn 1-element arrays into
# ints, which NumPy 2.4 refuses. torch stays the venv's 2.13 CPU wheel: torch 2.11 exists on PyPI
# only as a multi-GB CUDA build, and the kernels use no torch API that differs. Runs the AOT
# tests (every engine config for sm_80 and sm_90, resources, loads, SASS per weight byte) and the
# kernels' interpreter tests against the torch reference.
#   scripts/ci-triton-compat.sh              # 3.4.0 and 3.6.0
#   TRITON_COMPAT_VERSIONS=3.6.0 scripts/ci-triton-compat.sh
set -euo pipefail
cd "$(dirname "$0")/.."
for v in ${TRITON_COMPAT_VERSIONS:-3.4.0 3.6.0}; do
  dir=".venv/triton-$v"
  if [ ! -f "$dir/triton/__init__.py" ]; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --target "$dir" "triton==$v" "numpy<2.3"
  fi
  start=$SECONDS
  PYTHONPATH="$PWD/$dir${PYTHONPATH:+:$PYTHONPATH}" .venv/bin/python -c \
    "import triton, sys; assert triton.__version__ == '$v', triton.__version__; print('Triton', triton.__version__, 'from', triton.__file__)"
  PYTHONPATH="$PWD/$dir${PYTHONPATH:+:$PYTHONPATH}" TRITON_DEFAULT_FP_FUSION=1 .venv/bin/python -m pytest -q -p no:cacheprovider \
    tests/kernels/test_compile.py tests/kernels/test_moe.py tests/kernels/test_norm_rope.py tests/kernels/test_attention.py \
    tests/kernels/test_layer.py tests/kernels/test_launches.py
  echo "Triton $v compat: $((SECONDS - start)) s"
done
