"""MXFP4 mixture of experts: router, grouping of tokens by expert, and the two expert matmuls.

    route:    logits = x W^T + b (fp32) -> top-k -> softmax over the k     [T, k] fp32, [T, k] int32
    group:    (token, slot) pairs sorted by expert and cut into M-tiles of one expert each
    gate_up:  act[row] = swiglu(x[token] @ Wgu_e^T + b_e), gate/up de-interleaved in the epilogue
    down:     y[pair]  = w[pair] * (act[row] @ Wd_e^T + b_e)
    combine:  out[t]   = sum_j y[t*k + j]

Weights stay packed (E2M1 nibbles + E8M0 block scales, HF layout) and are dequantized in
registers right before the tensor-core dot. A program owns one M-tile (up to BLOCK_M rows of one
expert) times one N-tile, so an expert's weight tile is read once per M-tile: in decode
(BLOCK_M >= tokens) that is once per step however many tokens chose the expert; in prefill the
same kernel is a grouped GEMM with 64-row tiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from swallow_stream.ops.reference import ExpertWeights, experts as reference_experts

from ._common import ACT_DTYPES, cdiv, check, check_device, check_dtype, check_shape, mma, next_pow2

# Tokens up to which the decode tiling is used (one M-tile covers every token of an expert).
DECODE_MAX_TOKENS = 64


# ---------------------------------------------------------------------------------------------
# Router


@triton.jit
def route_kernel(
    x_ptr,  # [T, H]
    w_ptr,  # [E, H]
    b_ptr,  # [E]
    weights_ptr,  # [T, TOP_K] fp32 out
    ids_ptr,  # [T, TOP_K] int32 out
    T, H, E,
    stride_x, stride_w,
    TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,  # next_pow2(E), >= 16
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,  # next_pow2(TOP_K)
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.arange(0, BLOCK_E)
    h = tl.arange(0, BLOCK_H)
    row_ok = rows < T
    e_ok = e < E
    logits = tl.zeros([BLOCK_T, BLOCK_E], tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hh = h0 + h
        xt = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + hh[None, :],
                     mask=row_ok[:, None] & (hh < H)[None, :], other=0.0)
        wt = tl.load(w_ptr + e[None, :] * stride_w + hh[:, None],
                     mask=e_ok[None, :] & (hh < H)[:, None], other=0.0)  # [BLOCK_H, BLOCK_E]
        logits = mma(xt, wt, logits)
    logits += tl.load(b_ptr + e, mask=e_ok, other=0.0).to(tl.float32)[None, :]
    logits = tl.where(e_ok[None, :], logits, float("-inf"))

    # Top-k by repeated arg-max (ties -> lowest id), in descending order like torch.topk.
    j = tl.arange(0, BLOCK_K)
    top_v = tl.full([BLOCK_T, BLOCK_K], float("-inf"), tl.float32)
    top_i = tl.zeros([BLOCK_T, BLOCK_K], tl.int32)
    for kk in tl.static_range(TOP_K):
        m = tl.max(logits, axis=1)
        idx = tl.min(tl.where(logits == m[:, None], e[None, :], BLOCK_E), axis=1)
        top_v = tl.where(j[None, :] == kk, m[:, None], top_v)
        top_i = tl.where(j[None, :] == kk, idx[:, None], top_i)
        logits = tl.where(e[None, :] == idx[:, None], float("-inf"), logits)
    p = tl.exp(top_v - tl.max(top_v, axis=1)[:, None])  # padded slots: exp(-inf) = 0
    p = p / tl.sum(p, axis=1)[:, None]
    out = rows[:, None] * TOP_K + j[None, :]
    mask = row_ok[:, None] & (j < TOP_K)[None, :]
    tl.store(weights_ptr + out, p, mask=mask)
    tl.store(ids_ptr + out, top_i, mask=mask)


def route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H] -> (weights [T, k] fp32, expert ids [T, k] int32): top-k of x W^T + b, softmax over k."""
    check_device(x, weight, bias)
    check_dtype("x", x, ACT_DTYPES)
    check(x.dim() == 2 and x.stride(1) == 1, f"x must be [T, H] with a contiguous last axis, got {list(x.shape)}")
    t, h = x.shape
    check(weight.dim() == 2 and weight.shape[1] == h and weight.stride(1) == 1, f"router weight must be [E, {h}], got {list(weight.shape)}")
    e = weight.shape[0]
    check_shape("router bias", bias, (e,))
    check(0 < top_k <= e, f"top_k {top_k} out of range for {e} experts")
    weights = torch.empty((t, top_k), dtype=torch.float32, device=x.device)
    ids = torch.empty((t, top_k), dtype=torch.int32, device=x.device)
    if t:
        block_t = 16 if t <= 16 else 32
        block_e = max(16, next_pow2(e))
        route_kernel[(cdiv(t, block_t),)](
            x, weight, bias.contiguous(), weights, ids, t, h, e, x.stride(0), weight.stride(0),
            TOP_K=top_k, BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_H=64 if block_e >= 128 else 128,
            BLOCK_K=next_pow2(top_k), num_warps=4,
        )
    return weights, ids


# ---------------------------------------------------------------------------------------------
# Grouping by expert


@triton.jit
def group_kernel(
    ids_ptr,  # [P] int32, P = T * k pairs
    sorted_ptr,  # [P] int32 out: pair indices grouped by expert (pair order within an expert)
    tile_expert_ptr,  # [NUM_TILES] int32 out: expert of each M-tile, -1 past the last
    tile_row_ptr,  # [NUM_TILES] int32 out: first row (into sorted) of each M-tile
    tile_len_ptr,  # [NUM_TILES] int32 out: rows in each M-tile (<= BLOCK_M)
    P, E, NUM_TILES,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_E: tl.constexpr,  # > E: bin E collects padding
    BLOCK_TILES: tl.constexpr,
):
    # A single program: P <= 8k pairs; a counting sort in two passes over BLOCK_P chunks.
    eb = tl.arange(0, BLOCK_E)
    pp = tl.arange(0, BLOCK_P)
    counts = tl.zeros([BLOCK_E], tl.int32)
    for p0 in range(0, P, BLOCK_P):
        ids = tl.load(ids_ptr + p0 + pp, mask=p0 + pp < P, other=E)
        counts += tl.histogram(ids, BLOCK_E)
    counts = tl.where(eb < E, counts, 0)
    starts = tl.cumsum(counts, axis=0) - counts  # first row of each expert
    n_tiles = tl.cdiv(counts, BLOCK_M)
    tile_end = tl.cumsum(n_tiles, axis=0)  # inclusive
    tile_begin = tile_end - n_tiles
    total_tiles = tl.sum(n_tiles, axis=0)

    ti = tl.arange(0, BLOCK_TILES)
    for i0 in range(0, NUM_TILES, BLOCK_TILES):
        i = i0 + ti
        # Expert of tile i: the number of experts whose tiles all end at or before i.
        ex = tl.sum(((tile_end[None, :] <= i[:, None]) & (eb < E)[None, :]).to(tl.int32), axis=1)
        sel = eb[None, :] == ex[:, None]
        first_tile = tl.sum(tl.where(sel, tile_begin[None, :], 0), axis=1)
        local = i - first_tile
        row0 = tl.sum(tl.where(sel, starts[None, :], 0), axis=1) + local * BLOCK_M
        rows = tl.minimum(tl.sum(tl.where(sel, counts[None, :], 0), axis=1) - local * BLOCK_M, BLOCK_M)
        ok = i < total_tiles
        tl.store(tile_expert_ptr + i, tl.where(ok, ex, -1), mask=i < NUM_TILES)
        tl.store(tile_row_ptr + i, tl.where(ok, row0, 0), mask=i < NUM_TILES)
        tl.store(tile_len_ptr + i, tl.where(ok, rows, 0), mask=i < NUM_TILES)

    filled = starts
    for p0 in range(0, P, BLOCK_P):
        p = p0 + pp
        ids = tl.load(ids_ptr + p, mask=p < P, other=E)
        onehot = (ids[:, None] == eb[None, :]).to(tl.int32)  # [BLOCK_P, BLOCK_E]
        rank = tl.sum(tl.cumsum(onehot, axis=0) * onehot, axis=1) - 1  # among earlier same-expert pairs
        dest = tl.sum(onehot * filled[None, :], axis=1) + rank
        tl.store(sorted_ptr + dest, p, mask=p < P)
        filled += tl.sum(onehot, axis=0)


# ---------------------------------------------------------------------------------------------
# Expert matmuls


@triton.jit
def _mxfp4_tile(blocks_ptr, scales_ptr, rows, row_ok, byte, byte_ok, stride_br, stride_sr, DTYPE: tl.constexpr):
    """Dequantize weight rows `rows` at packed byte columns `byte` -> (even, odd) elements,
    each [BYTES, ROWS] in DTYPE (transposed for the dot: reduction dim first).

    E2M1 nibble s|e1 e0|m and E8M0 scale x: the value (1 + m/2) 2^(e-1) 2^(x-127) for e > 0 is the
    fp32 with exponent field e + x - 1 and mantissa m << 22, i.e. bits (em << 22) + ((x-1) << 23)
    where em = nibble & 7; em == 1 (0.5) has exponent field x - 1 and no mantissa; em == 0 is 0.
    Exact for scales 2..254 (real checkpoints use ~110..130)."""
    mask = byte_ok[:, None] & row_ok[None, :]
    packed = tl.load(blocks_ptr + rows[None, :].to(tl.int64) * stride_br + byte[:, None], mask=mask, other=0).to(tl.int32)
    sc = tl.load(scales_ptr + rows[None, :].to(tl.int64) * stride_sr + (byte // 16)[:, None], mask=mask, other=0).to(tl.int32)
    exp_bias = (sc - 1) << 23
    lo = packed & 15
    hi = packed >> 4
    lo_em = lo & 7
    hi_em = hi & 7
    lo_bits = tl.where(lo_em > 1, (lo_em << 22) + exp_bias, tl.where(lo_em == 1, exp_bias, 0)) | ((lo & 8) << 28)
    hi_bits = tl.where(hi_em > 1, (hi_em << 22) + exp_bias, tl.where(hi_em == 1, exp_bias, 0)) | ((hi & 8) << 28)
    even = lo_bits.to(tl.float32, bitcast=True).to(DTYPE)
    odd = hi_bits.to(tl.float32, bitcast=True).to(DTYPE)
    return even, odd


@triton.jit
def moe_gate_up_kernel(
    x_ptr,  # [T, H]
    blocks_ptr,  # [E, 2I, H/32, 16] u8
    scales_ptr,  # [E, 2I, H/32] u8
    bias_ptr,  # [E, 2I] fp32
    sorted_ptr, tile_expert_ptr, tile_row_ptr, tile_len_ptr,  # from group_kernel
    act_ptr,  # [P, I] out, rows in sorted (expert-grouped) order, x's dtype
    H, I,
    stride_x,
    stride_be, stride_br,
    stride_se, stride_sr,
    limit,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # output (activated) columns; 2 * BLOCK_N weight rows
    BLOCK_K: tl.constexpr,  # reduction elements per step (multiple of 32)
):
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile)
    if expert < 0:
        return
    row0 = tl.load(tile_row_ptr + tile)
    m = tl.arange(0, BLOCK_M)
    m_ok = m < tl.load(tile_len_ptr + tile)
    pair = tl.load(sorted_ptr + row0 + m, mask=m_ok, other=0)
    x_rows = x_ptr + (pair // TOP_K).to(tl.int64)[:, None] * stride_x
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < I
    kb = tl.arange(0, BLOCK_K // 2)
    wb = blocks_ptr + expert.to(tl.int64) * stride_be
    ws = scales_ptr + expert.to(tl.int64) * stride_se
    dtype = x_ptr.dtype.element_ty
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, H // 2, BLOCK_K // 2):  # k0 in packed bytes
        byte = k0 + kb
        b_ok = byte < H // 2
        xm = m_ok[:, None] & b_ok[None, :]
        x_even = tl.load(x_rows + 2 * byte[None, :], mask=xm, other=0.0)
        x_odd = tl.load(x_rows + 2 * byte[None, :] + 1, mask=xm, other=0.0)
        g_even, g_odd = _mxfp4_tile(wb, ws, 2 * n, n_ok, byte, b_ok, stride_br, stride_sr, dtype)
        acc_g = mma(x_even, g_even, acc_g)
        acc_g = mma(x_odd, g_odd, acc_g)
        u_even, u_odd = _mxfp4_tile(wb, ws, 2 * n + 1, n_ok, byte, b_ok, stride_br, stride_sr, dtype)
        acc_u = mma(x_even, u_even, acc_u)
        acc_u = mma(x_odd, u_odd, acc_u)
    bias = bias_ptr + expert.to(tl.int64) * (2 * I)
    gate = acc_g + tl.load(bias + 2 * n, mask=n_ok, other=0.0)[None, :]
    up = acc_u + tl.load(bias + 2 * n + 1, mask=n_ok, other=0.0)[None, :]
    gate = tl.minimum(gate, limit)
    up = tl.minimum(tl.maximum(up, -limit), limit)
    act = gate * tl.sigmoid(1.702 * gate) * (up + 1.0)
    rows = (row0 + m).to(tl.int64)
    tl.store(act_ptr + rows[:, None] * I + n[None, :], act.to(act_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def moe_down_kernel(
    act_ptr,  # [P, I], sorted order
    blocks_ptr,  # [E, H, I/32, 16] u8
    scales_ptr,  # [E, H, I/32] u8
    bias_ptr,  # [E, H] fp32
    sorted_ptr, tile_expert_ptr, tile_row_ptr, tile_len_ptr,
    route_w_ptr,  # [P] fp32 routing weight of each pair
    y_ptr,  # [P, H] fp32 out, rows in pair (token-major) order
    H, I,
    stride_be, stride_br,
    stride_se, stride_sr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile)
    if expert < 0:
        return
    row0 = tl.load(tile_row_ptr + tile)
    m = tl.arange(0, BLOCK_M)
    m_ok = m < tl.load(tile_len_ptr + tile)
    rows = (row0 + m).to(tl.int64)
    a_rows = act_ptr + rows[:, None] * I
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < H
    kb = tl.arange(0, BLOCK_K // 2)
    wb = blocks_ptr + expert.to(tl.int64) * stride_be
    ws = scales_ptr + expert.to(tl.int64) * stride_se
    dtype = act_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, I // 2, BLOCK_K // 2):
        byte = k0 + kb
        b_ok = byte < I // 2
        am = m_ok[:, None] & b_ok[None, :]
        a_even = tl.load(a_rows + 2 * byte[None, :], mask=am, other=0.0)
        a_odd = tl.load(a_rows + 2 * byte[None, :] + 1, mask=am, other=0.0)
        w_even, w_odd = _mxfp4_tile(wb, ws, n, n_ok, byte, b_ok, stride_br, stride_sr, dtype)
        acc = mma(a_even, w_even, acc)
        acc = mma(a_odd, w_odd, acc)
    pair = tl.load(sorted_ptr + row0 + m, mask=m_ok, other=0)
    rw = tl.load(route_w_ptr + pair, mask=m_ok, other=0.0)
    y = (acc + tl.load(bias_ptr + expert.to(tl.int64) * H + n, mask=n_ok, other=0.0)[None, :]) * rw[:, None]
    tl.store(y_ptr + pair.to(tl.int64)[:, None] * H + n[None, :], y, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def moe_combine_kernel(
    y_ptr,  # [T * TOP_K, H] fp32
    out_ptr,  # [T, H]
    H,
    TOP_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = h < H
    acc = tl.zeros([BLOCK_H], tl.float32)
    for j in tl.static_range(TOP_K):
        acc += tl.load(y_ptr + (t * TOP_K + j) * H + h, mask=h_ok, other=0.0)
    tl.store(out_ptr + t * H + h, acc.to(out_ptr.dtype.element_ty), mask=h_ok)


def launch_config(num_tokens: int) -> dict:
    """Tiles of both expert matmuls. Decode: one M-tile spans every token of an expert (weights
    read once), narrow N-tiles for enough programs; prefill: 64x64 tensor-core tiles."""
    if num_tokens <= DECODE_MAX_TOKENS:
        return {"BLOCK_M": max(16, next_pow2(num_tokens)), "BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3}


def _check_mxfp4(w: ExpertWeights, h: int) -> tuple[int, int]:
    e = w.num_experts
    gb, gs, db, ds = w.gate_up_blocks, w.gate_up_scales, w.down_blocks, w.down_scales
    check(gb.dtype == torch.uint8 and gs.dtype == torch.uint8 and db.dtype == torch.uint8 and ds.dtype == torch.uint8,
          "MXFP4 blocks and scales must be uint8")
    check(gb.dim() == 4 and gb.shape[0] == e and gb.shape[2] * 32 == h and gb.shape[3] == 16,
          f"gate_up_blocks must be [E, 2I, {h // 32}, 16], got {list(gb.shape)}")
    i2 = gb.shape[1]
    check(i2 % 2 == 0 and (i2 // 2) % 32 == 0, f"intermediate size {i2 // 2} must be a multiple of 32")
    inter = i2 // 2
    check_shape("gate_up_scales", gs, (e, i2, h // 32))
    check_shape("down_blocks", db, (e, h, inter // 32, 16))
    check_shape("down_scales", ds, (e, h, inter // 32))
    check_shape("gate_up_bias", w.gate_up_bias, (e, i2))
    check_shape("down_bias", w.down_bias, (e, h))
    for name, t in (("gate_up_blocks", gb), ("gate_up_scales", gs), ("down_blocks", db), ("down_scales", ds),
                    ("gate_up_bias", w.gate_up_bias), ("down_bias", w.down_bias)):
        check(t.is_contiguous(), f"{name} must be contiguous")
    check(w.gate_up_bias.dtype == torch.float32 and w.down_bias.dtype == torch.float32, "expert biases must be fp32")
    return e, inter


def group_config(num_pairs: int, num_experts: int) -> dict:
    """Chunk sizes of the single-program grouping: [BLOCK_P, BLOCK_E] one-hot tiles kept at 8k
    elements so the counting sort stays in registers."""
    block_e = next_pow2(num_experts + 1)
    return {
        "BLOCK_P": max(16, min(next_pow2(num_pairs), 8192 // block_e)),
        "BLOCK_E": block_e,
        "BLOCK_TILES": max(16, 8192 // block_e),
        "num_warps": 4 if block_e <= 64 else 8,
    }


def group_by_expert(expert_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, ...]:
    """ids [T, k] -> (sorted pairs [P], tile expert / first row / rows [NUM_TILES]), no host sync."""
    p = expert_ids.numel()
    num_tiles = cdiv(p, block_m) + min(num_experts, p)
    dev = expert_ids.device
    sorted_pairs = torch.empty(p, dtype=torch.int32, device=dev)
    tiles = torch.empty((3, num_tiles), dtype=torch.int32, device=dev)
    group_kernel[(1,)](
        expert_ids, sorted_pairs, tiles[0], tiles[1], tiles[2], p, num_experts, num_tiles,
        BLOCK_M=block_m, **group_config(p, num_experts),
    )
    return sorted_pairs, tiles[0], tiles[1], tiles[2]


def moe_experts(
    x: torch.Tensor,
    expert_weights: torch.Tensor,
    expert_ids: torch.Tensor,
    w: ExpertWeights,
    swiglu_limit: float,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """`experts` with a tile-config override (tests use it to force many tiles on small shapes)."""
    check_device(x, expert_weights, expert_ids, w.gate_up_bias, w.down_bias)
    check_dtype("x", x, ACT_DTYPES)
    check(x.dim() == 2 and x.is_contiguous(), f"x must be contiguous [T, H], got {list(x.shape)}")
    t, h = x.shape
    check(expert_ids.dim() == 2 and expert_ids.shape[0] == t and expert_ids.dtype == torch.int32 and expert_ids.is_contiguous(),
          f"expert_ids must be contiguous int32 [{t}, k], got {expert_ids.dtype} {list(expert_ids.shape)}")
    top_k = expert_ids.shape[1]
    check(expert_weights.shape == (t, top_k) and expert_weights.dtype == torch.float32 and expert_weights.is_contiguous(),
          f"expert_weights must be contiguous fp32 [{t}, {top_k}]")
    if not w.quantized:
        # Dense (bf16) checkpoints: the torch path (one GEMM pair per active expert).
        return reference_experts(x, expert_weights, expert_ids, w, swiglu_limit)
    check_device(x, w.gate_up_blocks, w.gate_up_scales, w.down_blocks, w.down_scales)
    e, inter = _check_mxfp4(w, h)
    out = torch.empty_like(x)
    if t == 0:
        return out
    cfg = dict(config or launch_config(t))
    bm, bn, bk = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K")
    check(bk % 32 == 0 and bm >= 16 and bn >= 16, f"bad MoE tile config {config}")
    p = t * top_k
    sorted_pairs, tile_expert, tile_row, tile_len = group_by_expert(expert_ids, e, bm)
    num_tiles = tile_expert.numel()
    act = torch.empty((p, inter), dtype=x.dtype, device=x.device)
    moe_gate_up_kernel[(num_tiles, cdiv(inter, bn))](
        x, w.gate_up_blocks, w.gate_up_scales, w.gate_up_bias, sorted_pairs, tile_expert, tile_row, tile_len, act,
        h, inter, x.stride(0),
        w.gate_up_blocks.stride(0), w.gate_up_blocks.stride(1), w.gate_up_scales.stride(0), w.gate_up_scales.stride(1),
        float(swiglu_limit), TOP_K=top_k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **cfg,
    )
    y = torch.empty((p, h), dtype=torch.float32, device=x.device)
    moe_down_kernel[(num_tiles, cdiv(h, bn))](
        act, w.down_blocks, w.down_scales, w.down_bias, sorted_pairs, tile_expert, tile_row, tile_len,
        expert_weights, y, h, inter,
        w.down_blocks.stride(0), w.down_blocks.stride(1), w.down_scales.stride(0), w.down_scales.stride(1),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **cfg,
    )
    block_h = min(1024, next_pow2(h))
    moe_combine_kernel[(t, cdiv(h, block_h))](y, out, h, TOP_K=top_k, BLOCK_H=block_h, num_warps=4)
    return out


def experts(
    x: torch.Tensor,
    expert_weights: torch.Tensor,
    expert_ids: torch.Tensor,
    w: ExpertWeights,
    swiglu_limit: float,
) -> torch.Tensor:
    """out[t] = sum_j weight[t,j] * (down_e(swiglu(gate_up_e(x[t]) + b1_e)) + b2_e). Returns x's dtype."""
    return moe_experts(x, expert_weights, expert_ids, w, swiglu_limit)
