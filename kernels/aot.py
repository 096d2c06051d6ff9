"""Ahead-of-time compilation of every kernel at the configurations the engine launches for the
gpt-oss 20B / 120B shapes, for a CUDA target, with no GPU present.

    python -m swallow_kernels.aot [--arch 80 90] [--json]

For each (kernel config, arch): registers, spill (local memory) bytes from the bundled cuobjdump,
and whether the PTX uses wgmma. Must run without TRITON_INTERPRET (interpreted kernels cannot be
compiled); tests call it in a subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import attention, moe, norm, rope

# gpt-oss shapes (both sizes): hidden 2880, intermediate 2880, 64 q / 8 kv heads of 64, block 16.
HIDDEN = 2880
INTER = 2880
HQ, HK, HEAD_DIM = 64, 8, 64
BLOCK_SIZE = 16
EXPERTS = {"20b": 32, "120b": 128}
TOP_K = 4
H100_SMS = 132
PREFILL_TOKENS = 2048
MAX_CONTEXT = 131072


@dataclass
class KernelConfig:
    name: str
    kernel: object
    types: dict  # runtime arg -> "*bf16" / "i32" / "fp32"
    constexprs: dict
    options: dict = field(default_factory=dict)
    div16: tuple = ()  # integer args the engine always passes as multiples of 16
    tensor_cores: bool = False  # must use wgmma on sm_90

    def source(self) -> ASTSource:
        fn = self.kernel
        sig, attrs = {}, {}
        for i, arg in enumerate(fn.arg_names):
            if arg in self.constexprs:
                sig[arg] = "constexpr"
                continue
            if arg not in self.types:
                raise KeyError(f"{self.name}: no type for argument {arg!r}")
            sig[arg] = self.types[arg]
            if sig[arg].startswith("*") or arg in self.div16:
                attrs[(i,)] = [["tt.divisibility", 16]]
        return ASTSource(fn=fn, signature=sig, constexprs=self.constexprs, attrs=attrs)


def _ptrs(dtype: str, *names: str) -> dict:
    return {n: f"*{dtype}" for n in names}


def _ints(*names: str) -> dict:
    return {n: "i32" for n in names}


def _split(cfg: dict) -> tuple[dict, dict]:
    """Launcher config -> (constexprs, compile options)."""
    opts = {k: cfg[k] for k in ("num_warps", "num_stages") if k in cfg}
    return {k: v for k, v in cfg.items() if k not in opts}, opts


def engine_configs() -> list[KernelConfig]:
    out: list[KernelConfig] = []
    bf = "bf16"

    for has_res in (False, True):
        c, o = _split(norm.launch_config(HIDDEN))
        out.append(KernelConfig(
            f"rms_norm(residual={has_res})", norm.rms_norm_kernel,
            {**_ptrs(bf, "x_ptr", "res_ptr", "out_ptr", "res_out_ptr"), **_ptrs("fp32", "w_ptr"),
             **_ints("H", "stride_x", "stride_r", "stride_o", "stride_ro"), "eps": "fp32"},
            {**c, "HAS_RESIDUAL": has_res}, o, div16=("stride_x", "stride_r", "stride_o", "stride_ro")))

    out.append(KernelConfig(
        "rope", rope.rope_kernel,
        {**_ptrs(bf, "q_ptr", "k_ptr", "q_out_ptr", "k_out_ptr"), **_ptrs("i64", "pos_ptr"), **_ptrs("fp32", "cos_ptr", "sin_ptr"),
         **_ints("stride_qt", "stride_qh", "stride_kt", "stride_kh", "HQ", "HK")},
        {"HALF": HEAD_DIM // 2, "BLOCK_HQ": HQ, "BLOCK_HK": HK, "BLOCK_D": HEAD_DIM // 2},
        {"num_warps": 4}, div16=("stride_qt", "stride_qh", "stride_kt", "stride_kh")))

    out.append(KernelConfig(
        "store_kv", attention.store_kv_kernel,
        {**_ptrs(bf, "k_ptr", "v_ptr", "k_cache_ptr", "v_cache_ptr"), **_ptrs("i64", "slot_ptr"),
         **_ints("stride_kt", "stride_kh", "stride_vt", "stride_vh", "HK", "D")},
        {"BLOCK_H": HK, "BLOCK_D": HEAD_DIM}, {"num_warps": 1}, div16=("stride_kt", "stride_kh", "stride_vt", "stride_vh")))

    attn_types = {
        **_ptrs(bf, "q_ptr", "k_cache_ptr", "v_cache_ptr", "out_ptr"),
        **_ptrs("i32", "block_tables_ptr", "seq_lens_ptr", "qsl_ptr"),
        **_ptrs("fp32", "sinks_ptr", "part_acc_ptr", "part_ml_ptr"),
        **_ints("num_seqs", "stride_qt", "stride_qh", "stride_bt", "stride_ot", "stride_oh", "window"),
        "scale_log2": "fp32",
    }
    for label, (t, b, window) in {"decode(batch 1, full)": (1, 1, 0), "prefill(2k, sliding)": (PREFILL_TOKENS, 1, 128)}.items():
        lc = attention.launch_config(t, b, HQ, HK, HEAD_DIM, MAX_CONTEXT, window, H100_SMS)
        c, o = _split(lc)
        out.append(KernelConfig(
            f"attention {label}", attention.attn_kernel, attn_types,
            {**c, "HQ": HQ, "HK": HK, "D": HEAD_DIM, "BLOCK_SIZE": BLOCK_SIZE}, o,
            div16=("stride_qt", "stride_qh", "stride_ot", "stride_oh"), tensor_cores=t > 1))
        if lc["NUM_SPLITS"] > 1:
            out.append(KernelConfig(
                "attention combine", attention.attn_combine_kernel,
                {**_ptrs("fp32", "part_acc_ptr", "part_ml_ptr"), **_ptrs(bf, "out_ptr"), **_ints("stride_ot", "stride_oh")},
                {"HQ": HQ, "D": HEAD_DIM, "BLOCK_D": HEAD_DIM, "NUM_SPLITS": lc["NUM_SPLITS"],
                 "BLOCK_S": triton.next_power_of_2(lc["NUM_SPLITS"])}, {"num_warps": 1}, div16=("stride_ot", "stride_oh")))

    for size, e in EXPERTS.items():
        for label, t in {"decode(batch 1)": 1, "prefill(2k)": PREFILL_TOKENS}.items():
            # Router and grouping: the same launch arithmetic as moe.route / moe.group_by_expert.
            block_t = 16 if t <= 16 else 32
            block_e = max(16, triton.next_power_of_2(e))
            out.append(KernelConfig(
                f"route {size} {label}", moe.route_kernel,
                {**_ptrs(bf, "x_ptr", "w_ptr", "b_ptr"), **_ptrs("fp32", "weights_ptr"), **_ptrs("i32", "ids_ptr"),
                 **_ints("T", "H", "E", "stride_x", "stride_w")},
                {"TOP_K": TOP_K, "BLOCK_T": block_t, "BLOCK_E": block_e, "BLOCK_H": 64 if block_e >= 128 else 128,
                 "BLOCK_K": TOP_K}, {"num_warps": 4}, div16=("H", "stride_x", "stride_w")))
            mc = moe.launch_config(t)
            p = t * TOP_K
            out.append(KernelConfig(
                f"group {size} {label}", moe.group_kernel,
                {**_ptrs("i32", "ids_ptr", "sorted_ptr", "tile_expert_ptr", "tile_row_ptr", "tile_len_ptr"), **_ints("P", "E", "NUM_TILES")},
                *_split({"BLOCK_M": mc["BLOCK_M"], **moe.group_config(p, e)})))
            if size != "120b":
                continue  # the expert matmuls do not depend on the expert count
            c, o = _split(mc)
            mx_types = {**_ptrs("u8", "blocks_ptr", "scales_ptr"), **_ptrs("fp32", "bias_ptr"),
                        **_ptrs("i32", "sorted_ptr", "tile_expert_ptr", "tile_row_ptr", "tile_len_ptr"),
                        **_ints("H", "I", "stride_be", "stride_br", "stride_se", "stride_sr")}
            mx_div = ("H", "I", "stride_be", "stride_br", "stride_se", "stride_sr")
            out.append(KernelConfig(
                f"moe gate_up {label}", moe.moe_gate_up_kernel,
                {**mx_types, **_ptrs(bf, "x_ptr", "act_ptr"), **_ints("stride_x"), "limit": "fp32"},
                {**c, "TOP_K": TOP_K}, o, div16=(*mx_div, "stride_x"), tensor_cores=t > 1))
            out.append(KernelConfig(
                f"moe down {label}", moe.moe_down_kernel,
                {**mx_types, **_ptrs(bf, "act_ptr"), **_ptrs("fp32", "route_w_ptr", "y_ptr")},
                c, o, div16=mx_div, tensor_cores=t > 1))
    out.append(KernelConfig(
        "moe combine", moe.moe_combine_kernel, {**_ptrs("fp32", "y_ptr"), **_ptrs(bf, "out_ptr"), **_ints("H")},
        {"TOP_K": TOP_K, "BLOCK_H": 1024}, {"num_warps": 4}, div16=("H",)))
    return out


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(cubin: bytes) -> dict:
    """REG / STACK / LOCAL (spill) / SHARED bytes of the kernel in a cubin, via the bundled cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if not m:
        raise RuntimeError(f"unexpected cuobjdump output:\n{text}")
    return {"registers": int(m.group(1)), "stack": int(m.group(2)), "shared": int(m.group(3)), "local": int(m.group(4))}


def compile_one(index: int, arch: int) -> dict:
    cfg = engine_configs()[index]
    k = triton.compile(cfg.source(), target=GPUTarget("cuda", arch, 32), options=cfg.options)
    usage = resource_usage(k.asm["cubin"])
    return {"name": cfg.name, "arch": arch, "tensor_cores": cfg.tensor_cores,
            "wgmma": "wgmma" in k.asm["ptx"], "mma": "mma.sync" in k.asm["ptx"] or "wgmma" in k.asm["ptx"],
            "shared_static": k.metadata.shared, **usage}


def compile_all(archs=(80, 90), workers: int | None = None) -> list[dict]:
    jobs = [(i, a) for i in range(len(engine_configs())) for a in archs]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(compile_one, *zip(*jobs)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--json", action="store_true", help="print results as JSON")
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    results = compile_all(tuple(args.arch), args.workers)
    if args.json:
        print(json.dumps(results))
        return
    for r in results:
        print(f"sm_{r['arch']}  {r['name']:<36} regs {r['registers']:>3}  local {r['local']:>5}  "
              f"shared {r['shared_static']:>6}  wgmma {r['wgmma']}")


if __name__ == "__main__":
    main()
