#!/usr/bin/env python
"""Kernel and model benchmark for one lent GPU (H200 target: under 8 minutes, nothing from disk).

    python benchmarks/gpu_bench.py [--presets 20b 120b] [--out DIR]
    python benchmarks/gpu_bench.py --smoke      # CPU, tiny shapes, Triton interpreter: logic check

On a GPU, per preset: random weights in the real shapes are built on the device; every Triton
op is checked against the torch reference; copy bandwidth is measured; each kernel is timed
(achieved GB/s or TFLOP/s against the measured copy bandwidth / nominal bf16 dense peak), then
the whole model: decode at batch 1, 8 and 64 (one CUDA graph per batch size around the whole
step: model.GptOss.forward, LM head and the device sampler, as the engine runs it) and a
2k-token prefill, then a torch.profiler per-kernel table of one batch-1 decode step. The MoE
decode timings rotate over 8 layers' experts (more than the 50 MB L2 holds), so they measure
HBM, not cache. Prints a table and writes gpu_bench.json to $OUT (or --out, or the current
directory).

Without a GPU it prints the bytes each decode step must move (the roofline: active experts in
MXFP4 + attention/router weights in bf16 + unembedding, KV reads listed apart) and exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

BF16_DENSE_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


# ------------------------------------------------------------------------------------------------
# Roofline


def expert_bytes(cfg) -> int:
    h, i = cfg.hidden_size, cfg.intermediate_size
    gate_up = 2 * i * (h // 2 + h // 32 + 4)  # nibbles + E8M0 scales + fp32 bias
    down = h * (i // 2 + i // 32 + 4)
    return gate_up + down


def expected_active_experts(cfg, tokens: int) -> float:
    e, k = cfg.num_local_experts, cfg.num_experts_per_tok
    return e * (1.0 - (1.0 - k / e) ** tokens)


def decode_bytes(cfg, batch: int, context: int) -> dict:
    """Bytes one decode step moves at `batch` sequences of `context` tokens (bf16 activations)."""
    h, layers = cfg.hidden_size, cfg.num_hidden_layers
    attn = (h * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * h) * 2 + (cfg.q_size + 2 * cfg.kv_size + h) * 2
    router = cfg.num_local_experts * h * 2
    experts = expected_active_experts(cfg, batch) * expert_bytes(cfg)
    unembed = cfg.vocab_size * h * 2
    kv = 0
    for i in range(layers):
        span = min(context, cfg.window_of(i)) if cfg.window_of(i) else context
        kv += batch * span * 2 * cfg.kv_size * 2
    weights = layers * (attn + router + experts) + unembed
    return {"weights": weights, "experts": layers * experts, "attention": layers * attn, "unembed": unembed, "kv": kv}


def print_roofline(presets, batches, context) -> list[dict]:
    from swallow_stream.checkpoint.synthetic import preset

    rows = []
    print(f"decode-step roofline (context {context}): bytes moved per step")
    print(f"{'model':>6} {'batch':>5} {'weights GB':>11} {'experts':>9} {'attn':>7} {'unembed':>8} {'KV GB':>7}")
    for name in presets:
        cfg = preset(name)
        for b in batches:
            d = decode_bytes(cfg, b, context)
            rows.append({"preset": name, "batch": b, **d})
            print(f"{name:>6} {b:>5} {d['weights'] / 1e9:>11.3f} {d['experts'] / 1e9:>9.3f} {d['attention'] / 1e9:>7.3f} "
                  f"{d['unembed'] / 1e9:>8.3f} {d['kv'] / 1e9:>7.3f}")
    return rows


# ------------------------------------------------------------------------------------------------
# Weights built on the device


def random_weights(cfg, device, dtype=torch.bfloat16, seed=0):
    """ModelWeights in the engine layout, random (scaled like checkpoint.synthetic), made on device."""
    from swallow_stream.model import LayerWeights, ModelWeights
    from swallow_stream.ops import ExpertWeights

    g = torch.Generator(device=device).manual_seed(seed)
    h, inter, e = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts

    def randn(*shape, std, dt=dtype):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * std).to(dt)

    def mxfp4(out, inp, std):
        blocks = torch.randint(0, 256, (e, out, inp // 32, 16), generator=g, device=device, dtype=torch.uint8)
        base = round(math.log2(std / math.sqrt(8.5625))) + 127
        scales = (torch.randint(-1, 2, (e, out, inp // 32), generator=g, device=device, dtype=torch.int16) + base).to(torch.uint8)
        return blocks, scales

    layers = []
    for i in range(cfg.num_hidden_layers):
        gub, gus = mxfp4(2 * inter, h, 3.0 / math.sqrt(h))
        db, ds = mxfp4(h, inter, 1.0 / math.sqrt(inter))
        layers.append(LayerWeights(
            input_norm=1 + randn(h, std=0.1, dt=torch.float32),
            post_norm=1 + randn(h, std=0.1, dt=torch.float32),
            qkv_weight=randn(cfg.q_size + 2 * cfg.kv_size, h, std=2.0 / math.sqrt(h)),
            qkv_bias=randn(cfg.q_size + 2 * cfg.kv_size, std=0.1),
            o_weight=randn(h, cfg.q_size, std=1.0 / math.sqrt(cfg.q_size)),
            o_bias=randn(h, std=0.1),
            sinks=randn(cfg.num_attention_heads, std=1.0, dt=torch.float32),
            router_weight=randn(e, h, std=2.0 / math.sqrt(h)),
            router_bias=randn(e, std=0.5),
            experts=ExpertWeights(gate_up_bias=randn(e, 2 * inter, std=0.5, dt=torch.float32),
                                  down_bias=randn(e, h, std=0.1, dt=torch.float32),
                                  gate_up_blocks=gub, gate_up_scales=gus, down_blocks=db, down_scales=ds),
            window=cfg.window_of(i),
        ))
    return ModelWeights(embed=randn(cfg.vocab_size, h, std=1.0), norm=1 + randn(h, std=0.1, dt=torch.float32),
                        lm_head=randn(cfg.vocab_size, h, std=3.0 / math.sqrt(h)), layers=layers)


# ------------------------------------------------------------------------------------------------
# Timing


def timed(fn, device, iters=20, graph=True) -> float:
    """Median milliseconds per call. On CUDA `iters` calls are captured in one graph when
    possible (no launch overhead between them), else timed eagerly with events."""
    fn()
    if device.type != "cuda":
        t = []
        for _ in range(max(1, iters // 10)):
            t0 = time.perf_counter()
            fn()
            t.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(t)
    torch.cuda.synchronize()
    if graph:
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                fn()
            torch.cuda.current_stream().wait_stream(s)
            gr = torch.cuda.CUDAGraph()
            with torch.cuda.graph(gr):
                for _ in range(iters):
                    fn()
            gr.replay()
            torch.cuda.synchronize()
            times = []
            for _ in range(3):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                gr.replay()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / iters)
            del gr
            return statistics.median(times)
        except Exception:  # noqa: BLE001 - fall back to eager timing
            torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def copy_bandwidth(device) -> float:
    """GB/s of a large device-to-device copy (read + write bytes)."""
    n = (1 << 30) if device.type == "cuda" else (1 << 22)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), device, iters=10, graph=False)
    return 2 * n / ms / 1e6


# ------------------------------------------------------------------------------------------------
# Paged batches


class Batch:
    """A static paged batch: `num_seqs` sequences of `context` tokens, `q_len` new tokens each."""

    def __init__(self, cfg, num_seqs, q_len, context, device, block_size=16):
        from swallow_stream.model import BatchMeta, CacheGroupMeta

        per = -(-context // block_size)
        self.num_blocks = num_seqs * per
        tables = torch.arange(self.num_blocks, dtype=torch.int32, device=device).view(num_seqs, per)
        pos = torch.arange(context - q_len, context, device=device)
        self.positions = pos.repeat(num_seqs)
        seq_base = (torch.arange(num_seqs, device=device) * per * block_size).repeat_interleave(q_len)
        slots = seq_base + self.positions
        self.meta = BatchMeta(
            query_start_loc=torch.arange(num_seqs + 1, dtype=torch.int32, device=device) * q_len,
            seq_lens=torch.full((num_seqs,), context, dtype=torch.int32, device=device),
            full=CacheGroupMeta(slots, tables),
            sliding=CacheGroupMeta(slots, tables),
        )
        self.input_ids = torch.randint(0, cfg.vocab_size, (num_seqs * q_len,), device=device)
        self.block_size = block_size
        self.cfg = cfg

    def cache(self, dtype, device, scale=1.0):
        c = self.cfg
        return torch.randn(self.num_blocks, self.block_size, c.num_key_value_heads, c.head_dim, device=device, dtype=dtype) * scale


# ------------------------------------------------------------------------------------------------
# Checks and timings per preset


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6)).item()


def bench_preset(name, args, device, copy_gbs, peak_tflops, results, checks):
    from swallow_stream.checkpoint.synthetic import preset
    from swallow_stream.model import GptOss, yarn_rope_tables
    import dataclasses

    from swallow_stream.ops import TORCH_OPS, triton_ops
    from swallow_stream.sampling import MAX_CANDIDATES, SamplingTensors, build_sampling_params, device_sample
    from swallow_stream.config import GenerationDefaults

    TRITON_OPS = triton_ops()

    cfg = preset(name) if not args.smoke else preset("tiny", vocab_size=4096, sliding_window=16)
    dtype = torch.bfloat16
    t0 = time.perf_counter()
    w = random_weights(cfg, device, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"[{name}] weights built in {time.perf_counter() - t0:.1f}s")
    layer = w.layers[0]
    h, k = cfg.hidden_size, cfg.num_experts_per_tok
    cos, sin = yarn_rope_tables(cfg, args.context + args.prefill + 8, device)
    g = torch.Generator(device=device).manual_seed(1)

    def record(kernel, shape, ms, metric, value, ceiling):
        results.append({"preset": name, "kernel": kernel, "shape": shape, "ms": ms, "metric": metric,
                        "value": value, "ceiling": ceiling, "pct": 100.0 * value / ceiling if ceiling else None})

    def check(label, got, ref, tol):
        e = rel_err(got, ref)
        checks.append({"preset": name, "check": label, "rel_err": e, "ok": e <= tol})
        print(f"[{name}] check {label:<34} rel err {e:.2e} {'ok' if e <= tol else 'FAIL'}")

    # -- norm / rope / kv write --------------------------------------------------------------
    for t in (1, args.prefill):
        x = torch.randn(t, h, generator=g, device=device, dtype=dtype)
        r = torch.randn(t, h, generator=g, device=device, dtype=dtype)
        check(f"rms_norm T={t}", TRITON_OPS.rms_norm(x, layer.post_norm, 1e-5, r)[0], TORCH_OPS.rms_norm(x, layer.post_norm, 1e-5, r)[0], 2e-2)
        ms = timed(lambda: TRITON_OPS.rms_norm(x, layer.post_norm, 1e-5, r), device)
        record("rms_norm+residual", f"T={t}", ms, "GB/s", 4 * t * h * 2 / ms / 1e6, copy_gbs)
        qkv = torch.randn(t, cfg.q_size + 2 * cfg.kv_size, generator=g, device=device, dtype=dtype)
        q = qkv[:, : cfg.q_size].view(t, -1, cfg.head_dim)
        kk = qkv[:, cfg.q_size : cfg.q_size + cfg.kv_size].view(t, -1, cfg.head_dim)
        pos = torch.randint(0, args.context, (t,), generator=g, device=device)
        check(f"rope T={t}", TRITON_OPS.rope(q, kk, pos, cos, sin)[0], TORCH_OPS.rope(q, kk, pos, cos, sin)[0], 2e-2)
        ms = timed(lambda: TRITON_OPS.rope(q, kk, pos, cos, sin), device)
        record("rope", f"T={t}", ms, "GB/s", 2 * t * (cfg.q_size + cfg.kv_size) * 2 / ms / 1e6, copy_gbs)

    # -- attention ---------------------------------------------------------------------------
    for label, (nseq, qlen, ctx) in {"decode b1": (1, 1, args.context), "decode b64": (64, 1, args.context),
                                     "prefill": (1, args.prefill, args.prefill)}.items():
        bt = Batch(cfg, nseq, qlen, ctx, device)
        kc, vc = bt.cache(dtype, device), bt.cache(dtype, device)
        t = nseq * qlen
        q = torch.randn(t, cfg.num_attention_heads, cfg.head_dim, generator=g, device=device, dtype=dtype)
        for window in (0, cfg.sliding_window):
            args_ = (q, kc, vc, bt.meta.full.block_tables, bt.meta.seq_lens, bt.meta.query_start_loc, layer.sinks, window, cfg.attention_scale)
            check(f"attention {label} w={window}", TRITON_OPS.attention(*args_), TORCH_OPS.attention(*args_), 2e-2)
            ms = timed(lambda: TRITON_OPS.attention(*args_), device)
            if qlen == 1:
                span = min(ctx, window) if window else ctx
                record(f"attention {label} w={window}", f"ctx={ctx}", ms, "GB/s", nseq * span * 2 * cfg.kv_size * 2 / ms / 1e6, copy_gbs)
            else:
                pairs = sum(min(i + 1, window) if window else i + 1 for i in range(qlen))
                flops = 4 * pairs * cfg.num_attention_heads * cfg.head_dim
                record(f"attention {label} w={window}", f"T={t}", ms, "TFLOP/s", flops / ms / 1e9, peak_tflops)
        slots = bt.meta.full.slot_mapping
        kk = torch.randn(t, cfg.num_key_value_heads, cfg.head_dim, generator=g, device=device, dtype=dtype)
        ms = timed(lambda: TRITON_OPS.store_kv(kk, kk, kc, vc, slots), device)
        record("store_kv", f"T={t}", ms, "GB/s", 4 * t * cfg.kv_size * 2 / ms / 1e6, copy_gbs)
        del kc, vc

    # -- router + experts --------------------------------------------------------------------
    # Packed copies (the kernels' layout) of up to 8 layers' experts; the HF copies stay for the
    # reference. Timings rotate over them so no layer's weights sit in L2 between calls.
    rot = []
    for lw in w.layers[: min(8, len(w.layers))]:
        ew = dataclasses.replace(lw.experts)
        TRITON_OPS.prepare_experts(ew)
        rot.append(ew)
    packed0 = rot[0]
    for t in (1, 8, 64, args.prefill):
        x = torch.randn(t, h, generator=g, device=device, dtype=dtype)
        rw, ids = TRITON_OPS.route(x, layer.router_weight, layer.router_bias, k)
        rw_ref, ids_ref = TORCH_OPS.route(x, layer.router_weight, layer.router_bias, k)
        checks.append({"preset": name, "check": f"route T={t} ids", "rel_err": float((ids != ids_ref).float().mean()),
                       "ok": bool((ids == ids_ref).float().mean() >= 0.99)})
        ms = timed(lambda: TRITON_OPS.route(x, layer.router_weight, layer.router_bias, k), device)
        record("route", f"T={t}", ms, "GB/s", (cfg.num_local_experts * h * 2 + t * h * 2) / ms / 1e6, copy_gbs)
        got = TRITON_OPS.experts(x, rw, ids, packed0, cfg.swiglu_limit)
        check(f"experts T={t}", got, TORCH_OPS.experts(x, rw, ids, layer.experts, cfg.swiglu_limit), 3e-2)
        turn = [0]

        def rotating():
            turn[0] = (turn[0] + 1) % len(rot)
            return TRITON_OPS.experts(x, rw, ids, rot[turn[0]], cfg.swiglu_limit)

        ms = timed(rotating, device)
        active = int(torch.unique(ids).numel())
        if t <= 64:
            record("experts (MXFP4, decode)", f"T={t} active={active}", ms, "GB/s", active * expert_bytes(cfg) / ms / 1e6, copy_gbs)
        else:
            flops = 2 * t * k * (2 * cfg.intermediate_size * h + h * cfg.intermediate_size)
            record("experts (MXFP4, prefill)", f"T={t}", ms, "TFLOP/s", flops / ms / 1e9, peak_tflops)

    del rot, packed0
    # -- whole model -------------------------------------------------------------------------
    max_pos = max(args.context, args.prefill) + 8
    if device.type == "cuda":  # first: the kernels' model releases the HF-layout experts it repacks
        fallback = torch_ops_decode(cfg, w, args.context, device, dtype, max_pos)
    model = GptOss(cfg, w, TRITON_OPS, max_positions=max_pos)
    if device.type == "cuda":
        bt1, caches1, eager, captured, ms_torch, error = fallback
        ref = model.logits(model.forward(bt1.input_ids, bt1.positions, bt1.meta, caches1))
        check("torch-ops decode logits", eager, ref, 5e-2)
        if captured is None:
            checks.append({"preset": name, "check": "torch-ops decode, CUDA graph", "rel_err": None, "ok": False, "error": error})
            print(f"[{name}] check torch-ops decode, CUDA graph: FAIL {error}")
        else:
            check("torch-ops decode, CUDA graph", captured, ref, 5e-2)
            results.append({"preset": name, "kernel": "torch-ops decode step", "shape": f"batch=1 ctx={args.context}",
                            "ms": ms_torch, "metric": "tok/s", "value": 1e3 / ms_torch, "ceiling": None, "pct": None})
        del fallback, bt1, caches1, eager, captured, ref
    swallow = build_sampling_params(GenerationDefaults(temperature=0.6, top_p=0.95, top_k=20, min_p=0.0))
    for b in args.batches:
        bt = Batch(cfg, b, 1, args.context, device)
        caches = [(bt.cache(dtype, device, 0.5), bt.cache(dtype, device)) for _ in range(cfg.num_hidden_layers)]
        st = SamplingTensors.allocate(b, device)
        st.fill([swallow] * b, list(range(b)), [args.context] * b)

        def step():  # the engine's decode graph: embedding -> sampled ids
            logits = model.logits(model.forward(bt.input_ids, bt.positions, bt.meta, caches))
            return device_sample(logits, st, MAX_CANDIDATES)

        ms = timed(step, device, iters=5 if device.type == "cuda" else 1)
        if b == 1 and device.type == "cuda":
            from torch.profiler import ProfilerActivity, profile

            step()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                step()
                torch.cuda.synchronize()
            print(f"[{name}] decode step, batch 1: per-kernel CUDA time")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
        roof = decode_bytes(cfg, b, args.context)
        roof_ms = roof["weights"] / (copy_gbs * 1e6)
        results.append({"preset": name, "kernel": "model decode step", "shape": f"batch={b} ctx={args.context}", "ms": ms,
                        "metric": "% of roofline", "value": 100.0 * roof_ms / ms, "ceiling": 100.0,
                        "pct": 100.0 * roof_ms / ms, "tokens_per_s": b * 1e3 / ms, "roofline_ms": roof_ms})
        del caches
    bt = Batch(cfg, 1, args.prefill, args.prefill, device)
    caches = [(bt.cache(dtype, device), bt.cache(dtype, device)) for _ in range(cfg.num_hidden_layers)]
    ms = timed(lambda: model.logits(model.forward(bt.input_ids, bt.positions, bt.meta, caches)[-1:]), device, iters=2, graph=False)
    results.append({"preset": name, "kernel": "model prefill", "shape": f"T={args.prefill}", "ms": ms,
                    "metric": "tokens/s", "value": args.prefill * 1e3 / ms, "ceiling": None, "pct": None})
    del caches, model, w
    if device.type == "cuda":
        torch.cuda.empty_cache()


def torch_ops_decode(cfg, w, context, device, dtype, max_pos):
    """The torch ops' decode step at batch 1 (the fallback on GPUs without usable Triton): its
    logits eagerly, then captured in a CUDA graph (it must never read back to the host) and
    replayed, and its time. -> (batch, caches, eager, captured or None, ms, error)."""
    from swallow_stream.model import GptOss
    from swallow_stream.ops import TORCH_OPS

    model = GptOss(cfg, w, TORCH_OPS, max_positions=max_pos)
    bt = Batch(cfg, 1, 1, context, device)
    caches = [(bt.cache(dtype, device, 0.5), bt.cache(dtype, device)) for _ in range(cfg.num_hidden_layers)]

    def step():
        return model.logits(model.forward(bt.input_ids, bt.positions, bt.meta, caches))

    eager = step()
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        graph.replay()
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - reported as a failed check
        torch.cuda.synchronize()
        return bt, caches, eager, None, float("nan"), repr(exc)[:300]
    return bt, caches, eager, captured, timed(step, device, iters=3), None


def print_table(results):
    print(f"\n{'preset':>6}  {'kernel':<32} {'shape':<22} {'ms':>9} {'achieved':>20} {'% ceiling':>9}")
    for r in results:
        pct = f"{r['pct']:.1f}" if r.get("pct") is not None else "-"
        print(f"{r['preset']:>6}  {r['kernel']:<32} {r['shape']:<22} {r['ms']:>9.4f} {r['value']:>12.1f} {r['metric']:<7} {pct:>9}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["20b", "120b"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--context", type=int, default=1024, help="context of decode sequences")
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter, tiny model: checks the script itself")
    args = ap.parse_args()

    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        args.presets, args.batches, args.context, args.prefill = ["tiny"], [1, 3], 40, 24
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print_roofline(args.presets, args.batches, args.context)
        print("no CUDA GPU: roofline only")
        return 0

    roofline = print_roofline([p for p in args.presets if p != "tiny"] or ["20b"], args.batches, args.context)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)"
    peak = next((v for k, v in BF16_DENSE_PEAK_TFLOPS.items() if k in gpu), 989.0)
    copy_gbs = copy_bandwidth(device)
    print(f"device {gpu}: copy bandwidth {copy_gbs:.0f} GB/s; bf16 dense peak (nominal) {peak:.0f} TFLOP/s")
    results, checks = [], []
    t0 = time.perf_counter()
    for name in args.presets:
        bench_preset(name, args, device, copy_gbs, peak, results, checks)
    print_table(results)
    failed = [c for c in checks if not c["ok"]]
    print(f"\n{len(checks) - len(failed)}/{len(checks)} checks passed; total {time.perf_counter() - t0:.0f}s")
    out = Path(args.out) / "gpu_bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": gpu, "copy_gbs": copy_gbs, "peak_tflops": peak, "roofline": roofline,
                               "checks": checks, "results": results}, indent=1))
    print(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
