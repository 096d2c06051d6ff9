"""The attention half of a decode layer in two skinny-GEMM launches around the attention kernel.

    attn_in:   residual += sum_j moe[t, j] (the previous layer's MoE partials);  h = rms_norm(residual)
               qkv = h Wqkv^T + b;  q, k = rope(q, k);  k, v -> paged KV cache          -> q, residual
    attn_out:  residual += o Wo^T + b                                                   -> residual

With `moe.moe` (route_group, gate_up, down) and `attention.attention` (context splits merged by
their last program) a decode layer makes 6 launches (issue #10 item 5), down from 10 (11 with
split attention): the two projections ran on cuBLAS, with rms_norm and RoPE + KV write launches
around them.

Shapes (gpt-oss 20B / 120B): H = 2880, D = 64, 64 q and 8 kv heads: Wqkv [5120, 2880], Wo
[2880, 4096], bf16. Decode reads each weight once a step, so the projections stream weights:
each program owns a few weight rows times a BLOCK_T tile of tokens (the MMA's N, >= 16), loads
its weight tiles in 16-byte vectors along the contiguous K axis and runs the K loop through
tensor-core dots (moe.py's operand order: weight rows are the MMA's M, tokens its N).

attn_in: a program owns one head (D = 64 output rows, as two 32-row halves, so RoPE pairs columns
d and d + 32 in registers: no shuffles) of one token tile: 80 programs a tile at the real shapes.
There is no grid-wide sync before the projection, so every program recomputes the residual sum
and the RMS statistics of its token rows itself (two passes over H: statistics, then the normed
rows feeding the dots). For T <= 16 that is 80 x ~50 KB of L2 reads (partials fp32 [T, 4, H]),
small against the 29 MB weight; at T = 128 (8 token tiles) it grows to a few hundred MB of L2
traffic, which is why larger T (prefill) keeps cuBLAS and the separate rms_norm / RoPE kernels.
Program column 0 writes the new residual.

attn_out: a program owns BLOCK_N = 32 output columns (90 programs a token tile for H = 2880) and
adds the bias and the residual in the epilogue; the RMSNorm of the MoE input is done by the
router programs (`moe.route_group`), which recompute the statistics of their token rows.

Rounding follows the unfused ops: the projection outputs are rounded to the activation dtype (as
F.linear's output is) before RoPE or the residual add; sums are rounded as rms_norm's are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import ACT_DTYPES, cdiv, check, check_device, check_dtype, mma, next_pow2, round_to
from .norm import check_stream_input, rms_norm, stream_rows
from .rope import rope_store_kv, rotate_half

# Decode buckets (T new tokens) that take the fused kernels; above this (prefill) the layer is
# rms_norm + cuBLAS GEMMs + rope_store_kv, where GEMM tiles reuse the weights over many tokens.
DECODE_MAX_TOKENS = 128


@triton.jit
def weight_rows_dot(w_rows, k, xT, acc, K: tl.constexpr, EVEN_K: tl.constexpr):
    """acc [R, BLOCK_T] + W[rows, k] @ xT: w_rows [R, 1] row pointers of a weight with contiguous
    K, k [BLOCK_K] columns, xT [BLOCK_K, BLOCK_T] activations. Unmasked (16-byte) weight loads
    when K is a multiple of BLOCK_K."""
    if EVEN_K:
        w = tl.load(w_rows + k[None, :])
    else:
        w = tl.load(w_rows + k[None, :], mask=(k < K)[None, :], other=0.0)
    return mma(w.to(xT.dtype), xT, acc)


@triton.jit
def _store_head(dst, lo, hi, mask, HALF: tl.constexpr):
    """A head's two halves [HALF, BLOCK_T] (fp32) at dst [HALF, BLOCK_T] and dst + HALF."""
    tl.store(dst, round_to(lo, dst.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, round_to(hi, dst.dtype.element_ty), mask=mask)


@triton.jit
def attn_in_kernel(
    x_ptr,  # [T, H] activations, or [T, PARTS, H] fp32 MoE partials (PARTS > 0)
    res_ptr,  # [T, H] residual stream (HAS_RESIDUAL)
    res_out_ptr,  # [T, H] out: x + residual (HAS_RESIDUAL; program column 0 writes it)
    norm_w_ptr,  # [H] fp32
    w_ptr,  # [(HQ + 2 HK) * D, H] fused q/k/v projection
    b_ptr,  # [(HQ + 2 HK) * D]
    q_out_ptr,  # [T, HQ, D] out: rotated q
    k_cache_ptr, v_cache_ptr,  # [num_blocks * block_size, HK, D] contiguous
    pos_ptr,  # [T]
    slot_ptr,  # [T] flat cache slot, -1 = do not store
    cos_ptr, sin_ptr,  # [max_pos, D/2] fp32
    T,
    stride_x, stride_r,
    eps,
    H: tl.constexpr,
    HQ: tl.constexpr,
    HK: tl.constexpr,
    D: tl.constexpr,
    PARTS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    HALF: tl.constexpr = D // 2
    EVEN_K: tl.constexpr = H % BLOCK_K == 0
    head = tl.program_id(0)  # [0, HQ): q heads, then HK k heads, then HK v heads
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    t64 = t.to(tl.int64)
    kk = tl.arange(0, BLOCK_K)
    # Activations are handled transposed, [BLOCK_K, BLOCK_T]: the dots' B operand.
    x_cols = (t64 * stride_x)[None, :]
    r_cols = (t64 * stride_r)[None, :]

    ss = tl.zeros([BLOCK_T], tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + kk
        m = (k < H)[:, None] & t_ok[None, :]
        xf = stream_rows(x_ptr, res_ptr, x_cols + k[:, None], r_cols + k[:, None], m, H, PARTS, HAS_RESIDUAL).to(tl.float32)
        ss += tl.sum(xf * xf, axis=0)
    inv = tl.rsqrt(ss / H + eps)

    n = tl.arange(0, HALF)
    w_lo = w_ptr + (head * D + n).to(tl.int64)[:, None] * H
    w_hi = w_lo + HALF * H
    acc_lo = tl.zeros([HALF, BLOCK_T], tl.float32)
    acc_hi = tl.zeros([HALF, BLOCK_T], tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + kk
        m = (k < H)[:, None] & t_ok[None, :]
        x = stream_rows(x_ptr, res_ptr, x_cols + k[:, None], r_cols + k[:, None], m, H, PARTS, HAS_RESIDUAL)
        if HAS_RESIDUAL:
            if head == 0:
                tl.store(res_out_ptr + (t64 * H)[None, :] + k[:, None], x, mask=m)
        nw = tl.load(norm_w_ptr + k, mask=k < H, other=0.0)
        hT = round_to(nw[:, None] * (x.to(tl.float32) * inv[None, :]), x.dtype)
        acc_lo = weight_rows_dot(w_lo, k, hT, acc_lo, H, EVEN_K)
        acc_hi = weight_rows_dot(w_hi, k, hT, acc_hi, H, EVEN_K)

    # Epilogue: bias, rounded to the activation dtype like F.linear's output, then RoPE / cache.
    ty = q_out_ptr.dtype.element_ty
    y_lo = round_to(acc_lo + tl.load(b_ptr + head * D + n).to(tl.float32)[:, None], ty).to(tl.float32)
    y_hi = round_to(acc_hi + tl.load(b_ptr + head * D + HALF + n).to(tl.float32)[:, None], ty).to(tl.float32)
    if head < HQ + HK:
        pos = tl.load(pos_ptr + t, mask=t_ok, other=0).to(tl.int64)
        cs = pos[None, :] * HALF + n[:, None]
        y_lo, y_hi = rotate_half(y_lo, y_hi, tl.load(cos_ptr + cs), tl.load(sin_ptr + cs))
    if head < HQ:
        _store_head(q_out_ptr + (t64 * (HQ * D))[None, :] + head * D + n[:, None], y_lo, y_hi, t_ok[None, :], HALF)
    else:
        slot = tl.load(slot_ptr + t, mask=t_ok, other=-1).to(tl.int64)
        keep = (t_ok & (slot >= 0))[None, :]
        off = (slot * (HK * D))[None, :] + ((head - HQ) % HK) * D + n[:, None]
        if head < HQ + HK:
            _store_head(k_cache_ptr + off, y_lo, y_hi, keep, HALF)
        else:
            _store_head(v_cache_ptr + off, y_lo, y_hi, keep, HALF)


@triton.jit
def attn_out_kernel(
    o_ptr,  # [T, K] attention output (K = HQ * D), rows `stride_o` apart, K contiguous
    w_ptr,  # [H, K] o_proj
    b_ptr,  # [H]
    res_ptr,  # [T, H] residual stream
    res_out_ptr,  # [T, H] out: residual + o Wo^T + b
    T,
    stride_o, stride_r,
    H: tl.constexpr,
    K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    EVEN_K: tl.constexpr = K % BLOCK_K == 0
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < H
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    t64 = t.to(tl.int64)
    # Rows past H read row H - 1 (in bounds, never stored): unmasked weight loads.
    w_rows = w_ptr + tl.minimum(n, H - 1).to(tl.int64)[:, None] * K
    o_cols = o_ptr + (t64 * stride_o)[None, :]
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_T], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        oT = tl.load(o_cols + k[:, None], mask=(k < K)[:, None] & t_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_T]
        acc = weight_rows_dot(w_rows, k, oT, acc, K, EVEN_K)
    ty = res_out_ptr.dtype.element_ty
    y = round_to(acc + tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[:, None], ty)
    mask = n_ok[:, None] & t_ok[None, :]
    r = tl.load(res_ptr + (t64 * stride_r)[None, :] + n[:, None], mask=mask, other=0.0)
    tl.store(res_out_ptr + (t64 * H)[None, :] + n[:, None], round_to(y.to(tl.float32) + r.to(tl.float32), ty), mask=mask)


def attn_in_config(num_tokens: int) -> dict:
    """Token tile 16 (the MMA's N minimum); 64 k a step: 45 unmasked steps at H = 2880. A
    128-register budget: ptxas's own choice spilled 8 bytes on sm_80 under Triton 3.4."""
    return {"BLOCK_T": 16, "BLOCK_K": 64, "num_warps": 4, "maxnreg": 128}


def attn_out_config(num_tokens: int) -> dict:
    """32 output rows (90 programs a token tile at H = 2880), 128 k a step: 32 steps at K = 4096."""
    return {"BLOCK_N": 32, "BLOCK_T": 16, "BLOCK_K": 128, "num_warps": 4}


def attn_in(
    x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
    qkv_weight: torch.Tensor, qkv_bias: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """h, residual = rms_norm(x, norm_weight, eps, residual); q, k, v = split(h Wqkv^T + b);
    rope_store_kv(q, k, v, ...). -> (rotated q [T, Hq, D], the new residual [T, H]). x [T, H], or
    the MoE's fp32 partials [T, k, H] (residual required); one launch for T <= DECODE_MAX_TOKENS."""
    t, h = x.shape[0], x.shape[-1]
    d = k_cache.shape[-1]
    hq, hk = num_heads, num_kv_heads
    if t > DECODE_MAX_TOKENS:
        hn, res = rms_norm(x, norm_weight, eps, residual)
        qkv = F.linear(hn, qkv_weight, qkv_bias)
        q = qkv[:, : hq * d].view(t, hq, d)
        k = qkv[:, hq * d : (hq + hk) * d].view(t, hk, d)
        v = qkv[:, (hq + hk) * d :].view(t, hk, d)
        return rope_store_kv(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping), res
    check_device(x, norm_weight, qkv_weight, qkv_bias, positions, cos, sin, k_cache, v_cache, slot_mapping)
    parts, act = check_stream_input(x, residual)
    if residual is not None:
        check(residual.shape == (t, h) and residual.dtype == act and residual.stride(1) == 1,
              f"residual must be [{t}, {h}] {act} with a contiguous last axis")
    n_out = (hq + 2 * hk) * d
    check(qkv_weight.shape == (n_out, h) and qkv_weight.is_contiguous(), f"qkv weight must be contiguous [{n_out}, {h}]")
    check(qkv_bias.shape == (n_out,) and qkv_bias.is_contiguous(), f"qkv bias must be contiguous [{n_out}]")
    check(norm_weight.shape == (h,) and norm_weight.dtype == torch.float32 and norm_weight.is_contiguous(),
          f"norm weight must be contiguous fp32 [{h}]")
    check(d % 2 == 0 and next_pow2(d // 2) == d // 2, f"head_dim {d} must be twice a power of two")
    check(k_cache.dim() == 4 and k_cache.shape[2:] == (hk, d) and v_cache.shape == k_cache.shape, "KV caches must be [blocks, block_size, Hk, D]")
    check(k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.dtype == v_cache.dtype, "KV caches must be contiguous, one dtype")
    check(cos.dtype == torch.float32 and cos.shape[1:] == (d // 2,) and cos.shape == sin.shape and cos.is_contiguous() and sin.is_contiguous(),
          f"cos/sin must be contiguous fp32 [max_pos, {d // 2}]")
    check(positions.shape == (t,) and slot_mapping.shape == (t,), "positions and slot_mapping must be [T]")
    q = torch.empty((t, hq, d), dtype=act, device=x.device)
    res_out = torch.empty((t, h), dtype=act, device=x.device) if residual is not None else x
    if t:
        cfg = attn_in_config(t)
        attn_in_kernel[(hq + 2 * hk, cdiv(t, cfg["BLOCK_T"]))](
            x, residual if residual is not None else x, res_out, norm_weight, qkv_weight, qkv_bias, q, k_cache, v_cache,
            positions, slot_mapping, cos, sin, t, x.stride(0), (residual if residual is not None else x).stride(0),
            float(eps), H=h, HQ=hq, HK=hk, D=d, PARTS=parts, HAS_RESIDUAL=residual is not None, **cfg,
        )
    return q, res_out


def attn_out(o: torch.Tensor, o_weight: torch.Tensor, o_bias: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """residual + (o.reshape(T, Hq * D) Wo^T + b), the projection rounded to the residual's dtype
    first (as F.linear's output is). o [T, Hq, D]; one launch for T <= DECODE_MAX_TOKENS."""
    t = o.shape[0]
    o2 = o.reshape(t, -1)
    if t > DECODE_MAX_TOKENS:
        return F.linear(o2, o_weight, o_bias) + residual
    check_device(o, o_weight, o_bias, residual)
    check_dtype("o", o, ACT_DTYPES)
    h, kdim = o_weight.shape
    check(o2.shape[1] == kdim and o2.stride(1) == 1, f"o must be [T, {kdim}] with a contiguous last axis, got {list(o2.shape)}")
    check(o_weight.is_contiguous() and o_bias.shape == (h,) and o_bias.is_contiguous(), f"o_proj must be contiguous [{h}, {kdim}], bias [{h}]")
    check(residual.shape == (t, h) and residual.dtype == o.dtype and residual.stride(1) == 1,
          f"residual must be [{t}, {h}] {o.dtype} with a contiguous last axis")
    out = torch.empty((t, h), dtype=o.dtype, device=o.device)
    if t:
        cfg = attn_out_config(t)
        attn_out_kernel[(cdiv(h, cfg["BLOCK_N"]), cdiv(t, cfg["BLOCK_T"]))](
            o2, o_weight, o_bias, residual, out, t, o2.stride(0), residual.stride(0), H=h, K=kdim, **cfg,
        )
    return out


__all__ = ["DECODE_MAX_TOKENS", "attn_in", "attn_in_kernel", "attn_out", "attn_out_kernel"]
