#!/usr/bin/env bash
# The kernels under the other Tritons the project must work with: the oldest the package accepts
# (pyproject.toml: triton>=3.4) and the GPU machine's image (Triton 3.6 with torch 2.11, where
# nothing can be installed), so a GPU session spends no device minutes on API drift.
#
# Each Triton is installed without dependencies into .venv/triton-X and put first on PYTHONPATH
# over the main venv, with numpy<2.3: the interpreters of Triton <= 3.6 turn 1-element arrays into
# ints, which NumPy 2.4 refuses. torch stays the venv's 2.13 CPU wheel: torch 2.11 exists on PyPI
# only as a multi-GB CUDA build, and the kernels use no torch API that differs. Runs the AOT
# tests (every engine config for sm_80 and sm_90, resources, loads, SASS per weight byte), a decode
# layer through the interpreter, and (3.6) the kernels' bf16 interpreter tests against torch.
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
  # Every Triton: the AOT build of every engine config, and one decode layer per bucket run through
  # its interpreter (test_launches). The GPU image's Triton (3.6) also checks the kernels' numbers
  # against torch in bf16 on the smaller shapes (the main run covers fp32 and the large shapes).
  tests=(tests/kernels/test_compile.py tests/kernels/test_launches.py)
  select=()
  if [ "$v" = "3.6.0" ]; then
    tests+=(tests/kernels/test_moe.py tests/kernels/test_norm_rope.py tests/kernels/test_attention.py tests/kernels/test_layer.py)
    select=(-k "not dtype0 and not float32 and not 128-8-2-16")
  fi
  PYTHONPATH="$PWD/$dir${PYTHONPATH:+:$PYTHONPATH}" TRITON_DEFAULT_FP_FUSION=1 .venv/bin/python -m pytest -q -p no:cacheprovider \
    "${tests[@]}" "${select[@]}"
  echo "Triton $v compat: $((SECONDS - start)) s"
done
