"""Every kernel, at the configurations the engine launches for the 20B / 120B shapes (every
decode bucket and a 2k prefill), compiles ahead of time for sm_80 and sm_90 with no GPU: no
spill (STACK or LOCAL), wgmma in the prefill matmuls, and MoE main loops that can keep up with
HBM: 16-byte weight loads and a bounded number of SASS instructions per weight byte.

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
# SASS instructions per weight byte a thread may spend in a decode MoE main loop. An SM issues
# 128 thread-instructions a clock; an H200 streams ~18 B a clock per SM (4.8 TB/s, 132 SMs,
# 1.98 GHz), so above ~7 the kernel is issue-bound; 6 leaves room for the rest of the SM's work.
# An A100 streams ~13.4 B/clock/SM (2.04 TB/s, 108 SMs, 1.41 GHz): its bound is ~9.5; 7 there.
MAX_INSTR_PER_WEIGHT_BYTE = {90: 6.0, 80: 7.0}


@pytest.fixture(scope="module")
def compiled() -> dict[tuple[str, int], dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-m", "swallow_kernels.aot", "--json", "--arch", *map(str, ARCHS)],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    return {(r["name"], r["arch"]): r for r in results}


def _configs():
    # Config names without compiling (importing the module under the interpreter is fine).
    from swallow_kernels.aot import DECODE_BUCKETS, engine_configs

    return engine_configs(), DECODE_BUCKETS


CONFIGS, BUCKETS = _configs()
NAMES = [c.name for c in CONFIGS]
MOE_LOOPS = [c.name for c in CONFIGS if c.loop_weight_bytes and c.weight_format == "mxfp4"]
MOE_DECODE_LOOPS = [c.name for c in CONFIGS if c.name in MOE_LOOPS and c.decode]
GEMV_LOOPS = [c.name for c in CONFIGS if c.loop_weight_bytes and c.weight_format == "bf16"]


def test_engine_configs_cover_every_bucket():
    joined = " | ".join(NAMES)
    for needed in ("rms_norm", "rms_norm(moe partials", "rope_store_kv", "store_kv", "attention prefill", "moe combine"):
        assert needed in joined, needed
    for size in ("20b", "120b"):
        for b in BUCKETS:
            for kernel in ("route", "group", "route_group", "moe gate_up", "moe down"):
                assert f"{kernel} {size} decode(batch {b})" in NAMES
            assert f"moe gate_up {size} prefill(2k)" in NAMES
    for b in BUCKETS:
        assert f"attention decode(batch {b}, full)" in NAMES and f"attention decode(batch {b}, sliding)" in NAMES
        for kernel in ("attn_in(first layer)", "attn_in", "attn_out"):  # the decode layer's skinny GEMMs
            assert f"{kernel} decode(batch {b})" in NAMES
    assert len(MOE_DECODE_LOOPS) == 2 * 2 * len(BUCKETS)


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


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", MOE_LOOPS)
def test_moe_main_loop_streams_weights_in_16_byte_loads(compiled, name, arch):
    """The weight words (K/2 bytes a row) arrive in 16-byte loads: the loop's 16-byte loads cover
    every word byte a thread consumes per step."""
    r = compiled[(name, arch)]
    cfg = CONFIGS[NAMES.index(name)]
    word_bytes = cfg.loop_weight_bytes * 16 / 17 / (32 * cfg.options["num_warps"])  # words: 16 of every 17 bytes
    loads = r["loop_global_loads"]
    assert r["widest_global_load"] == 16
    assert loads.get("16", 0) * 16 >= word_bytes, f"{name} sm_{arch}: loads {loads} for {word_bytes:.0f} B of words"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", GEMV_LOOPS)
def test_skinny_gemm_main_loop_streams_bf16_weights_in_16_byte_loads(compiled, name, arch):
    """attn_in / attn_out: the weight tiles a thread consumes per K step (bf16, contiguous K) arrive
    in 16-byte loads: in the main loop's body, or, where Triton unrolled the constexpr-bounded loop
    (attn_out under 3.4), in the kernel's loads over all the steps."""
    r = compiled[(name, arch)]
    cfg = CONFIGS[NAMES.index(name)]
    weight_bytes = cfg.loop_weight_bytes / (32 * cfg.options["num_warps"])
    assert r["widest_global_load"] == 16
    if r["loop_instructions"]:
        loads = r["loop_global_loads"]
    else:
        loads = r["global_loads"]
        weight_bytes *= cfg.loop_steps
    assert loads.get("16", 0) * 16 >= weight_bytes, f"{name} sm_{arch}: loads {loads} for {weight_bytes:.0f} B of weights"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", MOE_DECODE_LOOPS)
def test_moe_decode_main_loop_instructions_per_weight_byte(compiled, name, arch):
    r = compiled[(name, arch)]
    assert r["loop_instructions"] > 0
    ratio = r["instructions_per_weight_byte"]
    assert ratio <= MAX_INSTR_PER_WEIGHT_BYTE[arch], (
        f"{name} sm_{arch}: {r['loop_instructions']} SASS instructions for "
        f"{r['loop_weight_bytes_per_thread']:.0f} weight bytes a thread = {ratio:.2f}/B")
