"""NeoX (half-split) rotary embedding with YaRN tables, applied to q and k in one launch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import ACT_DTYPES, check, check_device, check_dtype, next_pow2


@triton.jit
def _rotate_heads(src_ptr, dst_ptr, t, stride_t, stride_h, n_heads, c, s,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    # src/dst [T, heads, 2*HALF]; c, s [1, BLOCK_D] fp32 of this token's position.
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < n_heads) & (d < HALF)
    src = src_ptr + t * stride_t + h * stride_h + d
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = dst_ptr + t * (n_heads * 2 * HALF) + h * (2 * HALF) + d
    ty = dst_ptr.dtype.element_ty
    tl.store(dst, (x1 * c - x2 * s).to(ty), mask=mask)
    tl.store(dst + HALF, (x2 * c + x1 * s).to(ty), mask=mask)


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
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_D)[None, :]
    c = tl.load(cos_ptr + pos * HALF + d, mask=d < HALF, other=0.0)
    s = tl.load(sin_ptr + pos * HALF + d, mask=d < HALF, other=0.0)
    _rotate_heads(q_ptr, q_out_ptr, t, stride_qt, stride_qh, HQ, c, s, HALF, BLOCK_HQ, BLOCK_D)
    _rotate_heads(k_ptr, k_out_ptr, t, stride_kt, stride_kh, HK, c, s, HALF, BLOCK_HK, BLOCK_D)


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
