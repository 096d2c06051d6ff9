"""Every kernel, at the configurations the engine launches for the 20B / 120B shapes, compiles
ahead of time for sm_80 and sm_90 with no GPU: no local-memory spills, and wgmma (Hopper tensor
cores) in the PTX of the prefill attention and prefill MoE matmuls.

Compilation runs once per session in a subprocess (`python -m swallow_kernels.aot --json`):
kernels defined under TRITON_INTERPRET (set by conftest on machines without a GPU) cannot be
compiled, so the subprocess imports them afresh without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ARCHS = (80, 90)


@pytest.fixture(scope="module")
def compiled() -> dict[tuple[str, int], dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-m", "swallow_kernels.aot", "--json", "--arch", *map(str, ARCHS)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    return {(r["name"], r["arch"]): r for r in results}


def _names() -> list[str]:
    # Config names without compiling (importing the module under the interpreter is fine).
    from swallow_kernels.aot import engine_configs

    return [c.name for c in engine_configs()]


NAMES = _names()


def test_engine_configs_cover_decode_and_prefill():
    joined = " | ".join(NAMES)
    for needed in ("rms_norm", "rope", "store_kv", "attention decode", "attention prefill", "attention combine",
                   "route 20b", "route 120b", "group 20b", "group 120b", "moe gate_up decode", "moe gate_up prefill",
                   "moe down decode", "moe down prefill", "moe combine"):
        assert needed in joined, needed


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", NAMES)
def test_compiles_without_spills(compiled, name, arch):
    r = compiled[(name, arch)]
    assert r["local"] == 0 and r["stack"] == 0, f"{name} sm_{arch} spills: {r}"
    assert r["registers"] <= 255


@pytest.mark.parametrize("name", [n for n in NAMES if "prefill" in n and ("attention" in n or "moe" in n)])
def test_prefill_matmuls_use_wgmma_on_sm90(compiled, name):
    assert compiled[(name, 90)]["wgmma"], f"{name}: no wgmma in the sm_90 PTX"
    assert compiled[(name, 80)]["mma"], f"{name}: no tensor-core mma in the sm_80 PTX"
