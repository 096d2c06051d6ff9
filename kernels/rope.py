"""NeoX (half-split) rotary embedding with YaRN tables, applied to q and k in one launch;
`rope_store_kv` also writes the rotated k and v into the paged KV cache (one launch for both)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import ACT_DTYPES, check, check_device, check_dtype, next_pow2


@triton.jit
def _cos_sin_row(pos_ptr, cos_ptr, sin_ptr, t, HALF: tl.constexpr, BLOCK_D: tl.constexpr):
    """Token t's cos and sin rows [1, BLOCK_D] (fp32, zero past HALF), shared by all its heads."""
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_D)[None, :]
    c = tl.load(cos_ptr + pos * HALF + d, mask=d < HALF, other=0.0)
    s = tl.load(sin_ptr + pos * HALF + d, mask=d < HALF, other=0.0)
    return c, s


@triton.jit
def rotate_half(x1, x2, c, s):
    """NeoX rotation of the halves (x1, x2) of a head by (cos, sin): fp32 in, fp32 out."""
    return x1 * c - x2 * s, x2 * c + x1 * s


@triton.jit
def _rotate_heads(src_ptr, dst_ptr, t, dst_row, stride_t, stride_h, n_heads, c, s,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    # src row t of [T, heads, 2*HALF]; dst row `dst_row` of a contiguous [rows, heads, 2*HALF];
    # c, s [1, BLOCK_D] fp32 of this token's position.
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < n_heads) & (d < HALF)
    src = src_ptr + t * stride_t + h * stride_h + d
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = dst_ptr + dst_row * (n_heads * 2 * HALF) + h * (2 * HALF) + d
    ty = dst_ptr.dtype.element_ty
    y1, y2 = rotate_half(x1, x2, c, s)
    tl.store(dst, y1.to(ty), mask=mask)
    tl.store(dst + HALF, y2.to(ty), mask=mask)


@triton.jit
def rope_kernel(
    q_ptr, k_ptr,  # [T, HQ, D], [T, HK, D] (token/head strides free, last dim contiguous)
    q_out_ptr, k_out_ptr,  # contiguous outputs
    pos_ptr,  # [T]
    cos_ptr, sin_ptr,  # [max_pos, HALF] fp32
    stride_qt, stride_qh, stride_kt, stride_kh,
    HQ, HK,
    HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One token per program; all its q and k heads share one cos/sin row.
    t = tl.program_id(0).to(tl.int64)
    c, s = _cos_sin_row(pos_ptr, cos_ptr, sin_ptr, t, HALF, BLOCK_D)
    _rotate_heads(q_ptr, q_out_ptr, t, t, stride_qt, stride_qh, HQ, c, s, HALF, BLOCK_HQ, BLOCK_D)
    _rotate_heads(k_ptr, k_out_ptr, t, t, stride_kt, stride_kh, HK, c, s, HALF, BLOCK_HK, BLOCK_D)


def rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hk, D] (views of the fused qkv are fine), positions [T];
    cos/sin [max_pos, D/2] fp32. Returns new contiguous (q, k) in their dtypes."""
    check_device(q, k, positions, cos, sin)
    check_dtype("q", q, ACT_DTYPES)
    check(k.dtype == q.dtype, f"k dtype {k.dtype} != q dtype {q.dtype}")
    check(q.dim() == 3 and k.dim() == 3, f"q, k must be [T, heads, D], got {list(q.shape)}, {list(k.shape)}")
    t, hq, d = q.shape
    check(k.shape[0] == t and k.shape[2] == d and d % 2 == 0, f"k {list(k.shape)} does not match q {list(q.shape)}")
    check(q.stride(2) == 1 and k.stride(2) == 1, "q and k need a contiguous last (head_dim) axis")
    check(positions.shape == (t,) and not positions.is_floating_point(), "positions must be integer [T]")
    check(cos.dtype == torch.float32 and sin.dtype == torch.float32, "cos/sin tables must be fp32")
    check(cos.dim() == 2 and cos.shape[1] == d // 2 and cos.shape == sin.shape, f"cos/sin must be [max_pos, {d // 2}]")
    check(cos.is_contiguous() and sin.is_contiguous(), "cos/sin must be contiguous")
    hk = k.shape[1]
    q_out = torch.empty((t, hq, d), dtype=q.dtype, device=q.device)
    k_out = torch.empty((t, hk, d), dtype=k.dtype, device=k.device)
    if t:
        rope_kernel[(t,)](
            q, k, q_out, k_out, positions, cos, sin,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), hq, hk,
            HALF=d // 2, BLOCK_HQ=next_pow2(hq), BLOCK_HK=next_pow2(hk), BLOCK_D=next_pow2(d // 2),
            num_warps=4 if hq * d >= 2048 else 1,
        )
    return q_out, k_out


@triton.jit
def rope_store_kv_kernel(
    q_ptr, k_ptr, v_ptr,  # [T, HQ, D], [T, HK, D] x2 (token/head strides free, last dim contiguous)
    q_out_ptr,  # [T, HQ, D] contiguous
    k_cache_ptr, v_cache_ptr,  # [num_blocks * block_size, HK, D] contiguous
    pos_ptr,  # [T]
    slot_ptr,  # [T] flat cache slot, -1 = do not store
    cos_ptr, sin_ptr,  # [max_pos, HALF] fp32
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    HQ, HK,
    HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One token per program: rotate its q heads (to q_out) and k heads (straight into the cache),
    # copy its v heads into the cache. The rotated k never goes through global memory otherwise.
    t = tl.program_id(0).to(tl.int64)
    c, s = _cos_sin_row(pos_ptr, cos_ptr, sin_ptr, t, HALF, BLOCK_D)
    _rotate_heads(q_ptr, q_out_ptr, t, t, stride_qt, stride_qh, HQ, c, s, HALF, BLOCK_HQ, BLOCK_D)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        _rotate_heads(k_ptr, k_cache_ptr, t, slot, stride_kt, stride_kh, HK, c, s, HALF, BLOCK_HK, BLOCK_D)
        h = tl.arange(0, BLOCK_HK)[:, None]
        dd = tl.arange(0, 2 * BLOCK_D)[None, :]
        mask = (h < HK) & (dd < 2 * HALF)
        v = tl.load(v_ptr + t * stride_vt + h * stride_vh + dd, mask=mask)
        tl.store(v_cache_ptr + slot * (HK * 2 * HALF) + h * (2 * HALF) + dd, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def rope_store_kv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """`rope` then `store_kv` of the rotated k and v, in one launch. Returns the rotated q
    (contiguous [T, Hq, D]); k and v land in the caches [num_blocks, block_size, Hk, D] at their
    slots (-1 skips)."""
    check_device(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping)
    check_dtype("q", q, ACT_DTYPES)
    check(k.dtype == q.dtype and v.dtype == q.dtype, "q, k and v must share a dtype")
    check(q.dim() == 3 and k.dim() == 3 and k.shape == v.shape, f"q [T, Hq, D], k, v [T, Hk, D], got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    t, hq, d = q.shape
    hk = k.shape[1]
    check(k.shape[0] == t and k.shape[2] == d and d % 2 == 0, f"k {list(k.shape)} does not match q {list(q.shape)}")
    check(q.stride(2) == 1 and k.stride(2) == 1 and v.stride(2) == 1, "q, k and v need a contiguous last (head_dim) axis")
    check(positions.shape == (t,) and not positions.is_floating_point(), "positions must be integer [T]")
    check(cos.dtype == torch.float32 and sin.dtype == torch.float32, "cos/sin tables must be fp32")
    check(cos.dim() == 2 and cos.shape[1] == d // 2 and cos.shape == sin.shape and cos.is_contiguous() and sin.is_contiguous(),
          f"cos/sin must be contiguous [max_pos, {d // 2}]")
    check(k_cache.dim() == 4 and k_cache.shape[2:] == (hk, d) and v_cache.shape == k_cache.shape, "KV caches must be [blocks, block_size, Hk, D]")
    check(k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.dtype == v_cache.dtype, "KV caches must be contiguous, one dtype")
    check(slot_mapping.shape == (t,) and not slot_mapping.is_floating_point(), "slot_mapping must be integer [T]")
    q_out = torch.empty((t, hq, d), dtype=q.dtype, device=q.device)
    if t:
        rope_store_kv_kernel[(t,)](
            q, k, v, q_out, k_cache, v_cache, positions, slot_mapping, cos, sin,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), hq, hk,
            HALF=d // 2, BLOCK_HQ=next_pow2(hq), BLOCK_HK=next_pow2(hk), BLOCK_D=next_pow2(d // 2),
            num_warps=4 if hq * d >= 2048 else 1,
        )
    return q_out


