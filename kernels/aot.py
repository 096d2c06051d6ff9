"""Ahead-of-time compilation of every kernel at the configurations the engine launches for the
gpt-oss 20B / 120B shapes (every decode bucket and a 2k prefill), for a CUDA target, with no GPU.

    python -m swallow_kernels.aot [--arch 80 90] [--json] [--dump DIR]

For each (kernel config, arch): registers, STACK and LOCAL (spill) bytes and shared memory from
the bundled cuobjdump, the widest global load in the SASS, whether the PTX uses wgmma, and for
the MoE matmuls the SASS of the main K loop: its instruction count, the weight bytes one
iteration streams per thread, their ratio, and its global loads by width. Must run without
TRITON_INTERPRET (interpreted kernels cannot be compiled); tests call it in a subprocess.
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

from collections import Counter

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import attention, layer, moe, norm, rope

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
# Decode batch buckets (one token per sequence); the engine pads a batch to the next bucket.
DECODE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass
class KernelConfig:
    name: str
    kernel: object
    types: dict  # runtime arg -> "*bf16" / "i32" / "fp32"
    constexprs: dict
    options: dict = field(default_factory=dict)
    div16: tuple = ()  # integer args the engine always passes as multiples of 16
    tensor_cores: bool = False  # must use wgmma on sm_90
    loop_weight_bytes: int = 0  # matmuls: weight bytes one K step streams, whole CTA (MXFP4: words + scales)
    weight_format: str = "mxfp4"  # of the loop's weights: "mxfp4" (MoE) or "bf16" (the layer's skinny GEMMs)
    loop_steps: int = 0  # bf16 skinny GEMMs: K steps (Triton may unroll a constexpr-bounded loop fully)
    decode: bool = False  # a decode-step launch (the static test bounds their MoE main loops)

    def key(self) -> tuple:
        return (self.kernel.fn.__name__ if hasattr(self.kernel, "fn") else repr(self.kernel),
                tuple(sorted(self.constexprs.items())), tuple(sorted(self.options.items())))

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
    opts = {k: cfg[k] for k in ("num_warps", "num_stages", "maxnreg") if k in cfg}
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
            {**c, "HAS_RESIDUAL": has_res, "PARTS": 0}, o, div16=("stride_x", "stride_r", "stride_o", "stride_ro")))

    c, o = _split(norm.launch_config(HIDDEN))
    out.append(KernelConfig(
        "rms_norm(moe partials + residual)", norm.rms_norm_kernel,
        {**_ptrs("fp32", "x_ptr", "w_ptr"), **_ptrs(bf, "res_ptr", "out_ptr", "res_out_ptr"),
         **_ints("H", "stride_x", "stride_r", "stride_o", "stride_ro"), "eps": "fp32"},
        {**c, "HAS_RESIDUAL": True, "PARTS": TOP_K}, o, div16=("stride_x", "stride_r", "stride_o", "stride_ro")))

    out.append(KernelConfig(
        "rope_store_kv", rope.rope_store_kv_kernel,
        {**_ptrs(bf, "q_ptr", "k_ptr", "v_ptr", "q_out_ptr", "k_cache_ptr", "v_cache_ptr"), **_ptrs("i64", "pos_ptr", "slot_ptr"),
         **_ptrs("fp32", "cos_ptr", "sin_ptr"),
         **_ints("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh", "HQ", "HK")},
        {"HALF": HEAD_DIM // 2, "BLOCK_HQ": HQ, "BLOCK_HK": HK, "BLOCK_D": HEAD_DIM // 2},
        {"num_warps": 4}, div16=("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh")))

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

    # The decode layer's skinny GEMMs (layer.py): attn_in after the embedding (no residual yet) and
    # after a layer (MoE partials fp32 [T, 4, H] + residual), attn_out. One config serves every
    # decode bucket (token tile 16); listed per bucket like the other decode launches.
    for b in DECODE_BUCKETS:
        ac = layer.attn_in_config(b)
        rows = 2 * (HEAD_DIM // 2)  # one head a program: two halves
        for first in (True, False):
            out.append(KernelConfig(
                f"attn_in{'(first layer)' if first else ''} decode(batch {b})", layer.attn_in_kernel,
                {**_ptrs("bf16" if first else "fp32", "x_ptr"),
                 **_ptrs(bf, "res_ptr", "res_out_ptr", "w_ptr", "b_ptr", "q_out_ptr", "k_cache_ptr", "v_cache_ptr"),
                 **_ptrs("fp32", "norm_w_ptr", "cos_ptr", "sin_ptr"), **_ptrs("i64", "pos_ptr", "slot_ptr"),
                 **_ints("T", "stride_x", "stride_r"), "eps": "fp32"},
                *_split({**ac, "H": HIDDEN, "HQ": HQ, "HK": HK, "D": HEAD_DIM, "PARTS": 0 if first else TOP_K,
                         "HAS_RESIDUAL": not first}),
                div16=("stride_x", "stride_r"), decode=True, weight_format="bf16",
                loop_weight_bytes=rows * ac["BLOCK_K"] * 2, loop_steps=triton.cdiv(HIDDEN, ac["BLOCK_K"])))
        oc = layer.attn_out_config(b)
        out.append(KernelConfig(
            f"attn_out decode(batch {b})", layer.attn_out_kernel,
            {**_ptrs(bf, "o_ptr", "w_ptr", "b_ptr", "res_ptr", "res_out_ptr"), **_ints("T", "stride_o", "stride_r")},
            *_split({**oc, "H": HIDDEN, "K": HQ * HEAD_DIM}),
            div16=("stride_o", "stride_r"), decode=True, weight_format="bf16",
            loop_weight_bytes=oc["BLOCK_N"] * oc["BLOCK_K"] * 2, loop_steps=triton.cdiv(HQ * HEAD_DIM, oc["BLOCK_K"])))

    attn_types = {
        **_ptrs(bf, "q_ptr", "k_cache_ptr", "v_cache_ptr", "out_ptr"),
        **_ptrs("i32", "block_tables_ptr", "seq_lens_ptr", "qsl_ptr", "ticket_ptr"),
        **_ptrs("fp32", "sinks_ptr", "part_acc_ptr", "part_ml_ptr"),
        **_ints("num_seqs", "stride_qt", "stride_qh", "stride_bt", "stride_ot", "stride_oh", "window"),
        "scale_log2": "fp32",
    }
    attn_launches = {f"decode(batch {b}, {kind})": (b, b, w) for b in DECODE_BUCKETS for kind, w in (("full", 0), ("sliding", 128))}
    attn_launches.update({"prefill(2k, sliding)": (PREFILL_TOKENS, 1, 128), "prefill(2k, full)": (PREFILL_TOKENS, 1, 0)})
    for label, (t, b, window) in attn_launches.items():
        lc = attention.launch_config(t, b, HQ, HK, HEAD_DIM, MAX_CONTEXT, window, H100_SMS)
        c, o = _split(lc)
        out.append(KernelConfig(
            f"attention {label}", attention.attn_kernel, attn_types,
            {**c, "HQ": HQ, "HK": HK, "D": HEAD_DIM, "BLOCK_SIZE": BLOCK_SIZE}, o,
            div16=("stride_qt", "stride_qh", "stride_ot", "stride_oh"), tensor_cores=t > b, decode=t == b))

    mx_types = {**_ptrs("i32", "w_ptr", "sorted_ptr", "tile_expert_ptr", "tile_row_ptr", "tile_len_ptr"),
                **_ptrs("u8", "s_ptr"), **_ptrs("fp32", "bias_ptr")}
    buckets = {f"decode(batch {t})": t for t in DECODE_BUCKETS}
    buckets[f"prefill({PREFILL_TOKENS // 1024}k)"] = PREFILL_TOKENS
    for size, e in EXPERTS.items():
        for label, t in buckets.items():
            decode = t in DECODE_BUCKETS
            # Router and grouping: the same launch arithmetic as moe.route / moe.group_by_expert.
            out.append(KernelConfig(
                f"route {size} {label}", moe.route_kernel,
                {**_ptrs(bf, "x_ptr", "w_ptr", "b_ptr"), **_ptrs("fp32", "weights_ptr", "logits_ptr"),
                 **_ptrs("i32", "ids_ptr", "ticket_ptr"), **_ints("T", "H", "E", "stride_x", "stride_w")},
                *_split({"TOP_K": TOP_K, "BLOCK_K": TOP_K, **moe.route_config(t, e)}),
                div16=("H", "stride_x", "stride_w"), decode=decode))
            mc = moe.launch_config(t, TOP_K, e)
            p = t * TOP_K
            if decode:  # decode: norm + router + grouping fused (moe.route_group)
                out.append(KernelConfig(
                    f"route_group {size} {label}", moe.route_group_kernel,
                    {**_ptrs(bf, "x_ptr", "w_ptr", "b_ptr", "h_ptr"), **_ptrs("fp32", "norm_w_ptr", "weights_ptr", "logits_ptr"),
                     **_ptrs("i32", "ids_ptr", "sorted_ptr", "tile_expert_ptr", "tile_row_ptr", "tile_len_ptr", "ticket_ptr"),
                     **_ints("T", "H", "E", "NUM_TILES", "stride_x", "stride_w"), "eps": "fp32"},
                    *_split({"TOP_K": TOP_K, "BLOCK_K": TOP_K, **moe.route_group_config(t, e, TOP_K)}),
                    div16=("H", "stride_x", "stride_w"), decode=True))
            out.append(KernelConfig(
                f"group {size} {label}", moe.group_kernel,
                {**_ptrs("i32", "ids_ptr", "sorted_ptr", "tile_expert_ptr", "tile_row_ptr", "tile_len_ptr"), **_ints("P", "E", "NUM_TILES")},
                *_split({"BLOCK_M": mc["BLOCK_M"], **moe.group_config(p, e)}), decode=decode))
            c, o = _split(mc)
            bn, bk = mc["BLOCK_N"], mc["BLOCK_K"]
            out.append(KernelConfig(
                f"moe gate_up {size} {label}", moe.moe_gate_up_kernel,
                {**mx_types, **_ptrs(bf, "x_ptr", "act_ptr"), **_ints("stride_x"), "limit": "fp32"},
                {**c, "H": HIDDEN, "I": INTER, "TOP_K": TOP_K}, o, div16=("stride_x",), tensor_cores=t > 1,
                loop_weight_bytes=2 * bn * (bk // 2 + bk // 32), decode=decode))
            out.append(KernelConfig(
                f"moe down {size} {label}", moe.moe_down_kernel,
                {**mx_types, **_ptrs(bf, "act_ptr"), **_ptrs("fp32", "route_w_ptr", "y_ptr")},
                {**c, "H": HIDDEN, "I": INTER}, o, tensor_cores=t > 1,
                loop_weight_bytes=bn * (bk // 2 + bk // 32), decode=decode))
    out.append(KernelConfig(
        "moe combine", moe.moe_combine_kernel, {**_ptrs("fp32", "y_ptr"), **_ptrs(bf, "out_ptr"), **_ints("H")},
        {"TOP_K": TOP_K, "BLOCK_H": 1024}, {"num_warps": 4}, div16=("H",)))
    return out


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _run_cuobjdump(flag: str, cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_cuobjdump(), flag, f.name], capture_output=True, text=True, check=True).stdout


def resource_usage(cubin: bytes) -> dict:
    """REG / STACK / LOCAL (spill) / SHARED bytes of the kernel in a cubin, via the bundled cuobjdump."""
    text = _run_cuobjdump("--dump-resource-usage", cubin)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if not m:
        raise RuntimeError(f"unexpected cuobjdump output:\n{text}")
    return {"registers": int(m.group(1)), "stack": int(m.group(2)), "shared": int(m.group(3)), "local": int(m.group(4))}


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_GLOBAL_LOAD = re.compile(r"\b(LDG|LDGSTS)(\.[A-Z0-9_.]+)?")


def sass_instructions(cubin: bytes) -> list[tuple[int, str]]:
    """(address, instruction) of the kernel's SASS, predicates kept, NOPs dropped."""
    text = _run_cuobjdump("-sass", cubin)
    return [(int(a, 16), op) for a, op in _SASS_LINE.findall(text) if not op.startswith("NOP")]


def _opcode(op: str) -> str:
    return op.split()[1] if op.startswith("@") else op.split()[0]


def load_width(op: str) -> int:
    """Bytes of one global load (LDG / cp.async LDGSTS) from its SASS modifiers."""
    mods = _opcode(op).split(".")
    for bits, width in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if bits in mods:
            return width
    return 4


def main_loop(ins: list[tuple[int, str]]) -> list[str] | None:
    """The largest backward-branch loop that loads from global memory: the K loop of a matmul."""
    best = None
    for addr, op in ins:
        m = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", op)
        if not m or int(m.group(1), 16) > addr:
            continue
        body = [o for a, o in ins if int(m.group(1), 16) <= a <= addr]
        if any(_GLOBAL_LOAD.search(_opcode(o)) for o in body) and (best is None or len(body) > len(best)):
            best = body
    return best


def analyse(cfg: KernelConfig, cubin: bytes) -> dict:
    ins = sass_instructions(cubin)
    widths = [load_width(o) for _, o in ins if _GLOBAL_LOAD.match(_opcode(o)) and "LDGDEPBAR" not in o]
    out = {"instructions": len(ins), "widest_global_load": max(widths, default=0),
           "global_loads": {str(k): v for k, v in sorted(Counter(widths).items())}}
    if cfg.loop_weight_bytes:
        threads = 32 * cfg.options.get("num_warps", 4)
        body = main_loop(ins) or []
        per_thread = cfg.loop_weight_bytes / threads
        loads = Counter(load_width(o) for o in body if _GLOBAL_LOAD.match(_opcode(o)) and "LDGDEPBAR" not in o)
        out.update({
            "loop_instructions": len(body),
            "loop_weight_bytes_per_thread": per_thread,
            "instructions_per_weight_byte": round(len(body) / per_thread, 3) if body else None,
            "loop_global_loads": {str(k): v for k, v in sorted(loads.items())},
        })
    return out


def compile_one(index: int, arch: int, dump: str | None = None) -> dict:
    cfg = engine_configs()[index]
    k = triton.compile(cfg.source(), target=GPUTarget("cuda", arch, 32), options=cfg.options)
    cubin = k.asm["cubin"]
    if dump:
        os.makedirs(dump, exist_ok=True)
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.name).strip("_")
        with open(os.path.join(dump, f"{name}.sm_{arch}.cubin"), "wb") as f:
            f.write(cubin)
    return {"name": cfg.name, "arch": arch, "tensor_cores": cfg.tensor_cores, "decode": cfg.decode,
            "constexprs": cfg.constexprs, "options": cfg.options,
            "wgmma": "wgmma" in k.asm["ptx"], "mma": "mma.sync" in k.asm["ptx"] or "wgmma" in k.asm["ptx"],
            "shared_static": k.metadata.shared, **resource_usage(cubin), **analyse(cfg, cubin)}


def compile_all(archs=(80, 90), workers: int | None = None, dump: str | None = None) -> list[dict]:
    """Every config on every arch; configs that compile to the same thing are compiled once
    (and, with `dump`, written under each name)."""
    cfgs = engine_configs()
    first: dict[tuple, int] = {}
    for i, c in enumerate(cfgs):
        first.setdefault(c.key(), i)
    jobs = sorted(set(first.values()))
    work = [(i, a) for i in jobs for a in archs]
    workers = workers or min(len(work), os.cpu_count() or 1)
    with ProcessPoolExecutor(workers) as pool:
        done = dict(zip(work, pool.map(compile_one, *zip(*work), [dump] * len(work))))
    results = []
    for i, c in enumerate(cfgs):
        for a in archs:
            r = dict(done[(first[c.key()], a)])
            r.update(name=c.name, decode=c.decode, tensor_cores=c.tensor_cores)
            if dump and first[c.key()] != i:
                src = os.path.join(dump, re.sub(r"[^A-Za-z0-9_.-]+", "_", cfgs[first[c.key()]].name).strip("_") + f".sm_{a}.cubin")
                dst = os.path.join(dump, re.sub(r"[^A-Za-z0-9_.-]+", "_", c.name).strip("_") + f".sm_{a}.cubin")
                with open(src, "rb") as f_in, open(dst, "wb") as f_out:
                    f_out.write(f_in.read())
            results.append(r)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--json", action="store_true", help="print results as JSON")
    ap.add_argument("--dump", metavar="DIR", help="write each cubin to DIR")
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    results = compile_all(tuple(args.arch), args.workers, args.dump)
    if args.json:
        print(json.dumps(results))
        return
    for r in results:
        line = (f"sm_{r['arch']}  {r['name']:<40} regs {r['registers']:>3}  stack {r['stack']:>4}  local {r['local']:>4}  "
                f"shared {r['shared_static']:>6}  ldg {r['widest_global_load']:>2}B  wgmma {str(r['wgmma']):<5}")
        if "loop_instructions" in r:
            line += (f"  loop {r['loop_instructions']} ins / {r['loop_weight_bytes_per_thread']:.0f} B = "
                     f"{r['instructions_per_weight_byte']} ins/B  loads {r['loop_global_loads']}")
        print(line)


if __name__ == "__main__":
    main()
