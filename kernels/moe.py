"""MXFP4 mixture of experts: router, grouping of tokens by expert, and the two expert matmuls.

    route:    logits = x W^T + b (fp32) -> top-k -> softmax over the k     [T, k] fp32, [T, k] int32
              (E/16 programs a token block score the experts; the last to finish takes the top-k)
    group:    (token, slot) pairs sorted by expert and cut into M-tiles of one expert each
    route_group (decode, T <= 128): RMSNorm + route + group in one launch; the last token block
              to finish its top-k groups all the pairs (`moe` = route_group, gate_up, down)
    gate_up:  act[row] = swiglu(x[token] @ Wgu_e^T + b_e)
    down:     y[pair]  = w[pair] * (act[row] @ Wd_e^T + b_e)
    combine:  out[t]   = sum_j y[t*k + j]

Weights are repacked once (`pack_experts`, layout in mxfp4.py) and dequantized in registers right
before the tensor-core dot. A program owns one token tile (up to BLOCK_M pairs of one expert)
times BLOCK_N weight rows, so an expert's weights are read once per token tile: in decode one
tile holds all of an expert's tokens in the common case, and the weights stream once per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import (ACT_DTYPES, cdiv, check, check_device, check_dtype, check_shape, last_to_arrive, mma, next_pow2,
                      round_to, tickets)
from .mxfp4 import ACC_SCALE as _ACC_SCALE, dequant, pack_mxfp4, scale_pad

ACC_SCALE = tl.constexpr(_ACC_SCALE)
FLT_MAX = tl.constexpr(3.4028234663852886e38)


@dataclass
class MoEWeights:
    """One layer's experts in the kernels' layout (see mxfp4.py)."""

    gate_up_words: torch.Tensor  # [E, 2, I, H/8] int32 (gate rows, then up rows)
    gate_up_scales: torch.Tensor  # [E, 2, I, SP(H)] u8
    gate_up_bias: torch.Tensor  # [E, 2I] fp32, HF order (gate even, up odd)
    down_words: torch.Tensor  # [E, H, I/8] int32
    down_scales: torch.Tensor  # [E, H, SP(I)] u8
    down_bias: torch.Tensor  # [E, H] fp32

    @property
    def num_experts(self) -> int:
        return self.gate_up_words.shape[0]

    @property
    def hidden(self) -> int:
        return self.down_words.shape[1]

    @property
    def inter(self) -> int:
        return self.gate_up_words.shape[2]


def pack_experts(gate_up_blocks: torch.Tensor, gate_up_scales: torch.Tensor, gate_up_bias: torch.Tensor,
                 down_blocks: torch.Tensor, down_scales: torch.Tensor, down_bias: torch.Tensor) -> MoEWeights:
    """HF MXFP4 experts (blocks [E, 2I, H/32, 16], scales [E, 2I, H/32], [E, H, I/32, 16], [E, H, I/32];
    gate_up rows interleaved) -> MoEWeights. Same byte count as the blocks; runs on their device."""
    check(gate_up_blocks.dim() == 4 and down_blocks.dim() == 4, "MXFP4 blocks must be [E, rows, K/32, 16]")
    e, i2, g, _ = gate_up_blocks.shape
    h = g * 32
    check(i2 % 2 == 0 and (i2 // 2) % 32 == 0, f"intermediate size {i2 // 2} must be a multiple of 32")
    inter = i2 // 2
    check_shape("gate_up_scales", gate_up_scales, (e, i2, h // 32))
    check_shape("down_blocks", down_blocks, (e, h, inter // 32, 16))
    check_shape("down_scales", down_scales, (e, h, inter // 32))
    check_shape("gate_up_bias", gate_up_bias, (e, i2))
    check_shape("down_bias", down_bias, (e, h))
    # de-interleave: HF row 2i (gate i), 2i+1 (up i) -> [E, 2, I, ...]
    gub = gate_up_blocks.view(e, inter, 2, g, 16).transpose(1, 2)
    gus = gate_up_scales.view(e, inter, 2, g).transpose(1, 2)
    gw, gs = pack_mxfp4(gub, gus)
    dw, ds = pack_mxfp4(down_blocks, down_scales)
    return MoEWeights(gw, gs, gate_up_bias.float().contiguous(), dw, ds, down_bias.float().contiguous())


# ---------------------------------------------------------------------------------------------
# Router


@triton.jit
def _router_logits(x_ptr, w_ptr, b_ptr, norm_w_ptr, h_ptr, logits_ptr, rows, row_ok, ec, ec_ok, H, stride_x, stride_w, eps,
                   BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK_E: tl.constexpr, BLOCK_H: tl.constexpr,
                   NORM: tl.constexpr, WRITE_H):
    """Logits of experts `ec` [CHUNK_E] for token rows `rows` [BLOCK_T] (fp32, bias added, NaN and
    +-inf made finite) into the scratch [rows, BLOCK_E]. NORM: the rows are first RMS-normed
    (weight `norm_w_ptr`, fp32 statistics, rounded to x's dtype like `rms_norm`'s output), in a
    first pass over H for the statistics; WRITE_H: this program also stores the normed rows to h."""
    h = tl.arange(0, BLOCK_H)
    x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_x
    if NORM:
        ss = tl.zeros([BLOCK_T], tl.float32)
        for h0 in range(0, H, BLOCK_H):
            hh = h0 + h
            xf = tl.load(x_rows + hh[None, :], mask=row_ok[:, None] & (hh < H)[None, :], other=0.0).to(tl.float32)
            ss += tl.sum(xf * xf, axis=1)
        inv = tl.rsqrt(ss / H + eps)
    part = tl.zeros([BLOCK_T, CHUNK_E], tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hh = h0 + h
        x_ok = row_ok[:, None] & (hh < H)[None, :]
        xt = tl.load(x_rows + hh[None, :], mask=x_ok, other=0.0)
        if NORM:
            nw = tl.load(norm_w_ptr + hh, mask=hh < H, other=0.0)
            xt = round_to(nw[None, :] * (xt.to(tl.float32) * inv[:, None]), x_ptr.dtype.element_ty)
            if WRITE_H:
                tl.store(h_ptr + rows[:, None].to(tl.int64) * H + hh[None, :], xt, mask=x_ok)
        wt = tl.load(w_ptr + ec[None, :] * stride_w + hh[:, None],
                     mask=ec_ok[None, :] & (hh < H)[:, None], other=0.0)  # [BLOCK_H, CHUNK_E]
        part = mma(xt, wt, part)
    part += tl.load(b_ptr + ec, mask=ec_ok, other=0.0).to(tl.float32)[None, :]
    # NaN -> lowest finite, +-inf -> finite extremes: every real expert outranks the -inf padding,
    # so each arg-max in _top_k lands on an untaken expert < E whatever the logits.
    part = tl.where(part != part, -FLT_MAX, tl.minimum(tl.maximum(part, -FLT_MAX), FLT_MAX))
    tl.store(logits_ptr + rows[:, None] * BLOCK_E + ec[None, :], part)


@triton.jit
def _top_k(logits_ptr, weights_ptr, ids_ptr, rows, row_ok, E,
           TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """Top-k of the scratch logits of `rows` (written by other programs: .cg loads) and the softmax
    over the k -> weights, ids [T, TOP_K]."""
    e = tl.arange(0, BLOCK_E)
    e_ok = e < E
    logits = tl.load(logits_ptr + rows[:, None] * BLOCK_E + e[None, :], cache_modifier=".cg")
    logits = tl.where(e_ok[None, :], logits, float("-inf"))
    # Top-k by repeated arg-max (ties -> lowest id), in descending order like torch.topk.
    j = tl.arange(0, BLOCK_K)
    top_v = tl.full([BLOCK_T, BLOCK_K], float("-inf"), tl.float32)
    top_i = tl.zeros([BLOCK_T, BLOCK_K], tl.int32)
    for kk in tl.static_range(TOP_K):
        m = tl.max(logits, axis=1)
        idx = tl.minimum(tl.min(tl.where(logits == m[:, None], e[None, :], BLOCK_E), axis=1), E - 1)
        top_v = tl.where(j[None, :] == kk, m[:, None], top_v)
        top_i = tl.where(j[None, :] == kk, idx[:, None], top_i)
        logits = tl.where(e[None, :] == idx[:, None], float("-inf"), logits)
    p = tl.exp(top_v - tl.max(top_v, axis=1)[:, None])  # padded slots: exp(-inf) = 0
    p = p / tl.sum(p, axis=1)[:, None]
    out = rows[:, None] * TOP_K + j[None, :]
    mask = row_ok[:, None] & (j < TOP_K)[None, :]
    tl.store(weights_ptr + out, p, mask=mask)
    tl.store(ids_ptr + out, top_i, mask=mask)


@triton.jit
def _route_token_block(x_ptr, w_ptr, b_ptr, norm_w_ptr, h_ptr, weights_ptr, ids_ptr, logits_ptr, ticket_ptr, T, H, E,
                       stride_x, stride_w, eps, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                       CHUNK_E: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr):
    """One program of a (token blocks, expert chunks) router grid: logits of its CHUNK_E experts
    (NORM: of the RMS-normed rows, program column 0 storing them to h), then the last program of
    the token block to arrive does its top-k and resets its ticket. -> (rows [BLOCK_T], last)."""
    pid_t = tl.program_id(0)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    ec = tl.program_id(1) * CHUNK_E + tl.arange(0, CHUNK_E)
    _router_logits(x_ptr, w_ptr, b_ptr, norm_w_ptr, h_ptr, logits_ptr, rows, row_ok, ec, ec < E, H, stride_x, stride_w, eps,
                   BLOCK_T, BLOCK_E, CHUNK_E, BLOCK_H, NORM, tl.program_id(1) == 0)
    last = True
    if BLOCK_E // CHUNK_E > 1:
        last = last_to_arrive(ticket_ptr + pid_t, BLOCK_E // CHUNK_E, rows)
    if last:
        _top_k(logits_ptr, weights_ptr, ids_ptr, rows, row_ok, E, TOP_K, BLOCK_T, BLOCK_E, BLOCK_K)
        if BLOCK_E // CHUNK_E > 1:
            tl.store(ticket_ptr + pid_t, 0)
    return rows, last


@triton.jit
def route_kernel(
    x_ptr,  # [T, H]
    w_ptr,  # [E, H]
    b_ptr,  # [E]
    weights_ptr,  # [T, TOP_K] fp32 out
    ids_ptr,  # [T, TOP_K] int32 out
    logits_ptr,  # [token blocks * BLOCK_T, BLOCK_E] fp32 scratch
    ticket_ptr,  # [token blocks] int32, zero between launches (the last program resets its own)
    T, H, E,
    stride_x, stride_w,
    TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,  # next_pow2(E), >= 16
    CHUNK_E: tl.constexpr,  # experts a program scores (16): BLOCK_E / CHUNK_E programs a token block
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,  # next_pow2(TOP_K)
):
    # Grid (token blocks, expert chunks): the router matrix is read by BLOCK_E / CHUNK_E programs
    # at once instead of one. Each writes its logits to the scratch; the last program of a token
    # block to arrive (`last_to_arrive`) does the top-k for it.
    _route_token_block(x_ptr, w_ptr, b_ptr, x_ptr, x_ptr, weights_ptr, ids_ptr, logits_ptr, ticket_ptr, T, H, E,
                       stride_x, stride_w, 0.0, TOP_K, BLOCK_T, BLOCK_E, CHUNK_E, BLOCK_H, BLOCK_K, False)


def route_config(num_tokens: int, num_experts: int) -> dict:
    block_e = max(16, next_pow2(num_experts))
    return {"BLOCK_T": 16, "BLOCK_E": block_e, "CHUNK_E": 16,
            "BLOCK_H": 128, "num_warps": 4}


def _check_router(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int) -> int:
    check_device(x, weight, bias)
    check_dtype("x", x, ACT_DTYPES)
    check(x.dim() == 2 and x.stride(1) == 1, f"x must be [T, H] with a contiguous last axis, got {list(x.shape)}")
    h = x.shape[1]
    check(weight.dim() == 2 and weight.shape[1] == h and weight.stride(1) == 1, f"router weight must be [E, {h}], got {list(weight.shape)}")
    e = weight.shape[0]
    check_shape("router bias", bias, (e,))
    check(0 < top_k <= e, f"top_k {top_k} out of range for {e} experts")
    return e


def route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H] -> (weights [T, k] fp32, expert ids [T, k] int32): top-k of x W^T + b, softmax over k."""
    e = _check_router(x, weight, bias, top_k)
    t, h = x.shape
    weights = torch.empty((t, top_k), dtype=torch.float32, device=x.device)
    ids = torch.empty((t, top_k), dtype=torch.int32, device=x.device)
    if t:
        cfg = route_config(t, e)
        blocks = cdiv(t, cfg["BLOCK_T"])
        scratch = torch.empty((blocks * cfg["BLOCK_T"], cfg["BLOCK_E"]), dtype=torch.float32, device=x.device)
        route_kernel[(blocks, cfg["BLOCK_E"] // cfg["CHUNK_E"])](
            x, weight, bias.contiguous(), weights, ids, scratch, tickets(x.device, blocks, "route"), t, h, e,
            x.stride(0), weight.stride(0), TOP_K=top_k, BLOCK_K=next_pow2(top_k), **cfg,
        )
    return weights, ids


# ---------------------------------------------------------------------------------------------
# Grouping by expert


@triton.jit
def _group(ids_ptr, sorted_ptr, tile_expert_ptr, tile_row_ptr, tile_len_ptr, P, E, NUM_TILES,
           BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_TILES: tl.constexpr):
    """Counting sort of the P (token, slot) pairs by expert, in one program, two passes over
    BLOCK_P chunks, and the M-tiles of one expert each (see group_kernel). The ids may have been
    written by other programs of the launch: .cg loads."""
    eb = tl.arange(0, BLOCK_E)
    pp = tl.arange(0, BLOCK_P)
    counts = tl.zeros([BLOCK_E], tl.int32)
    for p0 in range(0, P, BLOCK_P):
        ids = tl.load(ids_ptr + p0 + pp, mask=p0 + pp < P, other=E, cache_modifier=".cg")
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
        ids = tl.load(ids_ptr + p, mask=p < P, other=E, cache_modifier=".cg")
        onehot = (ids[:, None] == eb[None, :]).to(tl.int32)  # [BLOCK_P, BLOCK_E]
        rank = tl.sum(tl.cumsum(onehot, axis=0) * onehot, axis=1) - 1  # among earlier same-expert pairs
        dest = tl.sum(onehot * filled[None, :], axis=1) + rank
        tl.store(sorted_ptr + dest, p, mask=p < P)
        filled += tl.sum(onehot, axis=0)


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
    _group(ids_ptr, sorted_ptr, tile_expert_ptr, tile_row_ptr, tile_len_ptr, P, E, NUM_TILES,
           BLOCK_M, BLOCK_P, BLOCK_E, BLOCK_TILES)


@triton.jit
def route_group_kernel(
    x_ptr,  # [T, H] residual stream
    norm_w_ptr,  # [H] fp32 RMSNorm weight
    w_ptr,  # [E, H] router
    b_ptr,  # [E]
    h_ptr,  # [T, H] out: the normed rows (x's dtype), the experts' input
    weights_ptr,  # [T, TOP_K] fp32 out
    ids_ptr,  # [T, TOP_K] int32 out
    sorted_ptr, tile_expert_ptr, tile_row_ptr, tile_len_ptr,  # out, as group_kernel's
    logits_ptr,  # [token blocks * BLOCK_T, BLOCK_E] fp32 scratch
    ticket_ptr,  # [token blocks + 1] int32, zero between launches
    T, H, E, NUM_TILES,
    stride_x, stride_w,
    eps,
    TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    CHUNK_E: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,  # the expert matmuls' token tile
    BLOCK_P: tl.constexpr,
    GROUP_E: tl.constexpr,  # group_kernel's BLOCK_E
    BLOCK_TILES: tl.constexpr,
):
    # RMSNorm + router + top-k + grouping in one launch (decode, T <= 128). Grid as route_kernel's:
    # each program norms its BLOCK_T rows itself (a first pass over H for the statistics; program
    # column 0 stores them for the experts), scores CHUNK_E experts; the last of a token block does
    # its top-k, then counts in at a second ticket: the last token block to finish groups all
    # T * TOP_K pairs by expert (group_kernel's counting sort).
    rows, last = _route_token_block(x_ptr, w_ptr, b_ptr, norm_w_ptr, h_ptr, weights_ptr, ids_ptr, logits_ptr, ticket_ptr,
                                    T, H, E, stride_x, stride_w, eps, TOP_K, BLOCK_T, BLOCK_E, CHUNK_E, BLOCK_H,
                                    BLOCK_K, True)
    if last:
        blocks = tl.num_programs(0)
        if last_to_arrive(ticket_ptr + blocks, blocks, rows):
            _group(ids_ptr, sorted_ptr, tile_expert_ptr, tile_row_ptr, tile_len_ptr, T * TOP_K, E, NUM_TILES,
                   BLOCK_M, BLOCK_P, GROUP_E, BLOCK_TILES)
            tl.store(ticket_ptr + blocks, 0)


# ---------------------------------------------------------------------------------------------
# Expert matmuls (kernel MXFP4 layout, see mxfp4.py)
#
# Operands are swapped: the dequantized weight tile [BLOCK_N rows, BLOCK_K] is the MMA's A
# (rows fill the 64-row wgmma / 16-row mma.sync M dimension) and the few tokens of an expert are
# its N (>= 16), so decode tiles waste no tensor-core rows on padding tokens. The K loop runs
# unmasked over K // BLOCK_K steps; a masked step takes the tail (K = 2880 is no power of two).


@triton.jit
def _weight_tile(w_ptr, s_ptr, rows, row_ok, k0, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 TAIL: tl.constexpr, EVEN_N: tl.constexpr):
    """Rows `rows` of one expert's [R, K] weight at k0 .. k0+BLOCK_K -> bf16 [BLOCK_N, BLOCK_K] (x 2^-63)."""
    kw = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    ks = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    sp: tl.constexpr = ((K // 32 + 15) // 16) * 16
    w_ptrs = w_ptr + rows[:, None] * (K // 8) + kw[None, :]
    s_ptrs = s_ptr + rows[:, None] * sp + ks[None, :]
    if EVEN_N:  # no row mask: unpredicated loads, no zero-fill
        if TAIL:
            words = tl.load(w_ptrs, mask=(kw < K // 8)[None, :], other=0)
        else:
            words = tl.load(w_ptrs)
        scales = tl.load(s_ptrs)
    else:
        if TAIL:
            words = tl.load(w_ptrs, mask=row_ok[:, None] & (kw < K // 8)[None, :], other=0)
        else:
            words = tl.load(w_ptrs, mask=row_ok[:, None], other=0)
        scales = tl.load(s_ptrs, mask=row_ok[:, None], other=0)
    return dequant(words, scales, BLOCK_N, BLOCK_K)


@triton.jit
def _gate_up_step(x_cols, m_ok, wg, sg, wu, su, n, n_ok, k0, acc_g, acc_u,
                  H: tl.constexpr, I: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TAIL: tl.constexpr):
    kk = k0 + tl.arange(0, BLOCK_K)
    if TAIL:
        xt = tl.load(x_cols + kk[:, None], mask=(kk < H)[:, None], other=0.0)  # [BLOCK_K, BLOCK_M]
    else:
        xt = tl.load(x_cols + kk[:, None])
    g = _weight_tile(wg, sg, n, n_ok, k0, H, BLOCK_N, BLOCK_K, TAIL, I % BLOCK_N == 0).to(xt.dtype)
    acc_g = mma(g, xt, acc_g)
    u = _weight_tile(wu, su, n, n_ok, k0, H, BLOCK_N, BLOCK_K, TAIL, I % BLOCK_N == 0).to(xt.dtype)
    acc_u = mma(u, xt, acc_u)
    return acc_g, acc_u


@triton.jit
def moe_gate_up_kernel(
    x_ptr,  # [T, H]
    w_ptr,  # [E, 2, I, H/8] int32: gate rows, then up rows
    s_ptr,  # [E, 2, I, SP(H)] u8
    bias_ptr,  # [E, 2I] fp32, HF order (gate even, up odd)
    sorted_ptr, tile_expert_ptr, tile_row_ptr, tile_len_ptr,  # from group_kernel
    act_ptr,  # [P, I] out, rows in sorted (expert-grouped) order, x's dtype
    stride_x,
    limit,
    H: tl.constexpr,
    I: tl.constexpr,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,  # tokens of one expert (MMA N)
    BLOCK_N: tl.constexpr,  # activated columns = weight rows of each of gate and up (MMA M)
    BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile)
    if expert < 0:
        return
    row0 = tl.load(tile_row_ptr + tile)
    m = tl.arange(0, BLOCK_M)
    m_ok = m < tl.load(tile_len_ptr + tile)
    # Columns past the tile's tokens read token 0 (in bounds, never stored): unmasked loads.
    pair = tl.load(sorted_ptr + row0 + m, mask=m_ok, other=0)
    x_cols = x_ptr + (pair // TOP_K).to(tl.int64)[None, :] * stride_x
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < I
    sp: tl.constexpr = ((H // 32 + 15) // 16) * 16
    e64 = expert.to(tl.int64)
    wg = w_ptr + e64 * (2 * I * (H // 8))
    wu = wg + I * (H // 8)
    sg = s_ptr + e64 * (2 * I * sp)
    su = sg + I * sp
    acc_g = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    acc_u = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for k0 in range(0, (H // BLOCK_K) * BLOCK_K, BLOCK_K):
        acc_g, acc_u = _gate_up_step(x_cols, m_ok, wg, sg, wu, su, n, n_ok, k0, acc_g, acc_u, H, I, BLOCK_N, BLOCK_K, False)
    if H % BLOCK_K:
        acc_g, acc_u = _gate_up_step(x_cols, m_ok, wg, sg, wu, su, n, n_ok, (H // BLOCK_K) * BLOCK_K, acc_g, acc_u,
                                     H, I, BLOCK_N, BLOCK_K, True)
    bias = bias_ptr + e64 * (2 * I)
    gate = acc_g * ACC_SCALE + tl.load(bias + 2 * n, mask=n_ok, other=0.0)[:, None]
    up = acc_u * ACC_SCALE + tl.load(bias + 2 * n + 1, mask=n_ok, other=0.0)[:, None]
    gate = tl.minimum(gate, limit)
    up = tl.minimum(tl.maximum(up, -limit), limit)
    act = gate * tl.sigmoid(1.702 * gate) * (up + 1.0)
    rows = (row0 + m).to(tl.int64)
    tl.store(act_ptr + rows[None, :] * I + n[:, None], act.to(act_ptr.dtype.element_ty), mask=m_ok[None, :] & n_ok[:, None])


@triton.jit
def _down_step(a_cols, m_ok, wd, sd, n, n_ok, k0, acc,
               H: tl.constexpr, I: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TAIL: tl.constexpr):
    kk = k0 + tl.arange(0, BLOCK_K)
    if TAIL:
        at = tl.load(a_cols + kk[:, None], mask=(kk < I)[:, None], other=0.0)  # [BLOCK_K, BLOCK_M]
    else:
        at = tl.load(a_cols + kk[:, None])
    w = _weight_tile(wd, sd, n, n_ok, k0, I, BLOCK_N, BLOCK_K, TAIL, H % BLOCK_N == 0).to(at.dtype)
    return mma(w, at, acc)


@triton.jit
def moe_down_kernel(
    act_ptr,  # [P, I], sorted order
    w_ptr,  # [E, H, I/8] int32
    s_ptr,  # [E, H, SP(I)] u8
    bias_ptr,  # [E, H] fp32
    sorted_ptr, tile_expert_ptr, tile_row_ptr, tile_len_ptr,
    route_w_ptr,  # [P] fp32 routing weight of each pair
    y_ptr,  # [P, H] fp32 out, rows in pair (token-major) order
    H: tl.constexpr,
    I: tl.constexpr,
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
    a_cols = act_ptr + tl.where(m_ok, row0 + m, row0).to(tl.int64)[None, :] * I  # unmasked loads, as in gate_up
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < H
    sp: tl.constexpr = ((I // 32 + 15) // 16) * 16
    e64 = expert.to(tl.int64)
    wd = w_ptr + e64 * (H * (I // 8))
    sd = s_ptr + e64 * (H * sp)
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for k0 in range(0, (I // BLOCK_K) * BLOCK_K, BLOCK_K):
        acc = _down_step(a_cols, m_ok, wd, sd, n, n_ok, k0, acc, H, I, BLOCK_N, BLOCK_K, False)
    if I % BLOCK_K:
        acc = _down_step(a_cols, m_ok, wd, sd, n, n_ok, (I // BLOCK_K) * BLOCK_K, acc, H, I, BLOCK_N, BLOCK_K, True)
    pair = tl.load(sorted_ptr + row0 + m, mask=m_ok, other=0)
    rw = tl.load(route_w_ptr + pair, mask=m_ok, other=0.0)
    y = (acc * ACC_SCALE + tl.load(bias_ptr + e64 * H + n, mask=n_ok, other=0.0)[:, None]) * rw[None, :]
    tl.store(y_ptr + pair.to(tl.int64)[None, :] * H + n[:, None], y, mask=m_ok[None, :] & n_ok[:, None])


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


def tokens_per_expert(num_tokens: int, top_k: int, num_experts: int) -> int:
    return cdiv(num_tokens * top_k, num_experts)


def launch_config(num_tokens: int, top_k: int = 4, num_experts: int = 128) -> dict:
    """Tiles of both expert matmuls, from the mean tokens an expert gets (T*k/E): the token tile
    (MMA N) is that rounded up to a power of two, 16..64. Few tokens an expert (decode): 64 weight
    rows x 128 k a step, 4 warps, no cp.async pipeline (each thread's 16-byte weight loads go
    straight to registers; other CTAs on the SM hide the latency). Many (prefill): 64 x 64 tiles."""
    per_expert = tokens_per_expert(num_tokens, top_k, num_experts)
    bm = min(64, max(16, next_pow2(per_expert)))
    if bm <= 32:
        return {"BLOCK_M": bm, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 1}
    return {"BLOCK_M": bm, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2}


def group_config(num_pairs: int, num_experts: int) -> dict:
    """Chunk sizes of the single-program grouping: [BLOCK_P, BLOCK_E] one-hot tiles kept at 4k
    elements (16 a thread with 8 warps) so the counting sort stays in registers on every Triton
    the package supports (8k tiles spilled under Triton 3.4)."""
    block_e = next_pow2(num_experts + 1)
    return {
        "BLOCK_P": max(16, min(next_pow2(num_pairs), 4096 // block_e)),
        "BLOCK_E": block_e,
        "BLOCK_TILES": max(16, 4096 // block_e),
        "num_warps": 4 if block_e <= 32 else 8,
    }


def num_tiles_bound(num_pairs: int, num_experts: int, block_m: int) -> int:
    """M-tiles the grouping may produce (each expert's last tile may be partial), known on the host."""
    return cdiv(num_pairs, block_m) + min(num_experts, num_pairs)


def group_by_expert(expert_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, ...]:
    """ids [T, k] -> (sorted pairs [P], tile expert / first row / rows [NUM_TILES]), no host sync."""
    p = expert_ids.numel()
    num_tiles = num_tiles_bound(p, num_experts, block_m)
    dev = expert_ids.device
    sorted_pairs = torch.empty(p, dtype=torch.int32, device=dev)
    tiles = torch.empty((3, num_tiles), dtype=torch.int32, device=dev)
    group_kernel[(1,)](
        expert_ids, sorted_pairs, tiles[0], tiles[1], tiles[2], p, num_experts, num_tiles,
        BLOCK_M=block_m, **group_config(p, num_experts),
    )
    return sorted_pairs, tiles[0], tiles[1], tiles[2]


def route_group_config(num_tokens: int, num_experts: int, top_k: int) -> dict:
    """route_config's router tiles, group_config's chunks (its BLOCK_E renamed GROUP_E), the
    expert matmuls' token tile, and the larger of the two warp counts (the grouping's). The
    counting sort's one-hot tiles are halved (2k elements): next to the router's state the 4k
    tiles spilled 8 bytes on sm_80 (20B, T >= 16)."""
    rc, gc = route_config(num_tokens, num_experts), group_config(num_tokens * top_k, num_experts)
    return {**rc, "BLOCK_M": launch_config(num_tokens, top_k, num_experts)["BLOCK_M"], "BLOCK_P": max(16, gc["BLOCK_P"] // 2),
            "GROUP_E": gc["BLOCK_E"], "BLOCK_TILES": gc["BLOCK_TILES"], "num_warps": max(rc["num_warps"], gc["num_warps"])}


def route_group(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor, bias: torch.Tensor,
                top_k: int, *, block_m: int | None = None):
    """RMSNorm + router + grouping in one launch (`route_group_kernel`). x [T, H] residual stream
    (T <= 128 is what it is sized for). -> (h = rms_norm(x) [T, H], weights [T, k] fp32,
    ids [T, k] int32, (sorted pairs, tile expert, tile row, tile len) as `group_by_expert`'s).
    `block_m` overrides the token tile (the expert matmuls' BLOCK_M)."""
    e = _check_router(x, weight, bias, top_k)
    t, h = x.shape
    check_shape("norm weight", norm_weight, (h,))
    check(norm_weight.dtype == torch.float32 and norm_weight.is_contiguous(), "norm weight must be contiguous fp32")
    cfg = route_group_config(t, e, top_k)
    if block_m is not None:
        cfg["BLOCK_M"] = block_m
    p = t * top_k
    n_tiles = num_tiles_bound(p, e, cfg["BLOCK_M"])
    dev = x.device
    hn = torch.empty((t, h), dtype=x.dtype, device=dev)
    weights = torch.empty((t, top_k), dtype=torch.float32, device=dev)
    ids = torch.empty((t, top_k), dtype=torch.int32, device=dev)
    sorted_pairs = torch.empty(p, dtype=torch.int32, device=dev)
    tiles = torch.empty((3, n_tiles), dtype=torch.int32, device=dev)
    if t:
        blocks = cdiv(t, cfg["BLOCK_T"])
        scratch = torch.empty((blocks * cfg["BLOCK_T"], cfg["BLOCK_E"]), dtype=torch.float32, device=dev)
        route_group_kernel[(blocks, cfg["BLOCK_E"] // cfg["CHUNK_E"])](
            x, norm_weight, weight, bias.contiguous(), hn, weights, ids, sorted_pairs, tiles[0], tiles[1], tiles[2],
            scratch, tickets(dev, blocks + 1, "route_group"), t, h, e, n_tiles, x.stride(0), weight.stride(0), float(eps),
            TOP_K=top_k, BLOCK_K=next_pow2(top_k), **cfg,
        )
    return hn, weights, ids, (sorted_pairs, tiles[0], tiles[1], tiles[2])


def _check_packed(w: MoEWeights, h: int) -> tuple[int, int]:
    e, inter = w.num_experts, w.inter
    check(w.gate_up_words.dtype == torch.int32 and w.down_words.dtype == torch.int32, "packed MXFP4 words must be int32")
    check(w.gate_up_scales.dtype == torch.uint8 and w.down_scales.dtype == torch.uint8, "MXFP4 scales must be uint8")
    check_shape("gate_up_words", w.gate_up_words, (e, 2, inter, h // 8))
    check_shape("gate_up_scales", w.gate_up_scales, (e, 2, inter, scale_pad(h)))
    check_shape("down_words", w.down_words, (e, h, inter // 8))
    check_shape("down_scales", w.down_scales, (e, h, scale_pad(inter)))
    check_shape("gate_up_bias", w.gate_up_bias, (e, 2 * inter))
    check_shape("down_bias", w.down_bias, (e, h))
    check(h % 32 == 0 and inter % 32 == 0, f"hidden {h} and intermediate {inter} must be multiples of 32")
    for name in ("gate_up_words", "gate_up_scales", "down_words", "down_scales", "gate_up_bias", "down_bias"):
        check(getattr(w, name).is_contiguous(), f"{name} must be contiguous")
    check(w.gate_up_bias.dtype == torch.float32 and w.down_bias.dtype == torch.float32, "expert biases must be fp32")
    return e, inter


def _check_moe_input(x: torch.Tensor, w: MoEWeights) -> tuple[int, int]:
    check(isinstance(w, MoEWeights), "experts takes MoEWeights (see pack_experts)")
    check_device(x, w.gate_up_words, w.gate_up_scales, w.down_words, w.down_scales, w.gate_up_bias, w.down_bias)
    check_dtype("x", x, ACT_DTYPES)
    check(x.dim() == 2 and x.is_contiguous(), f"x must be contiguous [T, H], got {list(x.shape)}")
    return _check_packed(w, x.shape[1])


def _expert_matmuls(x: torch.Tensor, expert_weights: torch.Tensor, groups: tuple, w: MoEWeights, swiglu_limit: float,
                    top_k: int, cfg: dict) -> torch.Tensor:
    """gate_up and down launches over the grouped pairs -> fp32 [T, k, H]."""
    t, h = x.shape
    inter = w.inter
    y = torch.empty((t, top_k, h), dtype=torch.float32, device=x.device)
    if t == 0:
        return y
    cfg = dict(cfg)
    bm, bn, bk = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K")
    sorted_pairs, tile_expert, tile_row, tile_len = groups
    num_tiles = tile_expert.numel()
    act = torch.empty((t * top_k, inter), dtype=x.dtype, device=x.device)
    moe_gate_up_kernel[(num_tiles, cdiv(inter, bn))](
        x, w.gate_up_words, w.gate_up_scales, w.gate_up_bias, sorted_pairs, tile_expert, tile_row, tile_len, act,
        x.stride(0), float(swiglu_limit), H=h, I=inter, TOP_K=top_k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **cfg,
    )
    moe_down_kernel[(num_tiles, cdiv(h, bn))](
        act, w.down_words, w.down_scales, w.down_bias, sorted_pairs, tile_expert, tile_row, tile_len,
        expert_weights, y, H=h, I=inter, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **cfg,
    )
    return y


def experts_partial(
    x: torch.Tensor,
    expert_weights: torch.Tensor,
    expert_ids: torch.Tensor,
    w: MoEWeights,
    swiglu_limit: float,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """y[t, j] = weight[t,j] * (down_e(swiglu(gate_up_e(x[t]) + b1_e)) + b2_e), e = ids[t,j]:
    fp32 [T, k, H], unreduced (the next rms_norm sums it: no combine launch). x [T, H];
    expert_weights [T, k] fp32; expert_ids [T, k] int32. `config` overrides the tiles."""
    e, inter = _check_moe_input(x, w)
    t, h = x.shape
    check_device(x, expert_weights, expert_ids)
    check(expert_ids.dim() == 2 and expert_ids.shape[0] == t and expert_ids.dtype == torch.int32 and expert_ids.is_contiguous(),
          f"expert_ids must be contiguous int32 [{t}, k], got {expert_ids.dtype} {list(expert_ids.shape)}")
    top_k = expert_ids.shape[1]
    check(expert_weights.shape == (t, top_k) and expert_weights.dtype == torch.float32 and expert_weights.is_contiguous(),
          f"expert_weights must be contiguous fp32 [{t}, {top_k}]")
    cfg = dict(config or launch_config(t, top_k, e))
    check(cfg["BLOCK_K"] % 32 == 0 and cfg["BLOCK_K"] <= 512 and cfg["BLOCK_M"] >= 16 and cfg["BLOCK_N"] >= 16,
          f"bad MoE tile config {config}")
    if t == 0:
        return torch.empty((0, top_k, h), dtype=torch.float32, device=x.device)
    groups = group_by_expert(expert_ids, e, cfg["BLOCK_M"])
    return _expert_matmuls(x, expert_weights, groups, w, swiglu_limit, top_k, cfg)


def moe(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, router_weight: torch.Tensor, router_bias: torch.Tensor,
        top_k: int, w: MoEWeights, swiglu_limit: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The MoE block of a decode step from the residual stream x [T, H]: rms_norm, route, experts,
    in three launches (route_group, gate_up, down). -> (fp32 partials [T, k, H], ids [T, k])."""
    e, _ = _check_moe_input(x, w)
    check(router_weight.shape[0] == e, f"router has {router_weight.shape[0]} experts, the weights {e}")
    cfg = launch_config(x.shape[0], top_k, e)
    h, weights, ids, groups = route_group(x, norm_weight, eps, router_weight, router_bias, top_k, block_m=cfg["BLOCK_M"])
    return _expert_matmuls(h, weights, groups, w, swiglu_limit, top_k, cfg), ids


def combine(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 [T, k, H] -> sum over k, [T, H] in `dtype`."""
    check(y.dim() == 3 and y.dtype == torch.float32 and y.is_contiguous(), "MoE partials must be contiguous fp32 [T, k, H]")
    t, top_k, h = y.shape
    out = torch.empty((t, h), dtype=dtype, device=y.device)
    if t:
        block_h = min(1024, next_pow2(h))
        moe_combine_kernel[(t, cdiv(h, block_h))](y, out, h, TOP_K=top_k, BLOCK_H=block_h, num_warps=4)
    return out


def experts(
    x: torch.Tensor,
    expert_weights: torch.Tensor,
    expert_ids: torch.Tensor,
    w: MoEWeights,
    swiglu_limit: float,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """out[t] = sum_j y[t, j] (`experts_partial`), in x's dtype [T, H]."""
    return combine(experts_partial(x, expert_weights, expert_ids, w, swiglu_limit, config=config), x.dtype)
