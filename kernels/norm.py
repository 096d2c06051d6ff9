"""Fused residual add + RMSNorm: (norm(x + residual) * weight, x + residual).

x may also be the MoE's unreduced output, fp32 [T, k, H] (one weighted row per chosen expert):
the k rows are summed here, so the MoE needs no combine launch of its own."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import ACT_DTYPES, check, round_to, check_device, check_dtype, check_shape, next_pow2


@triton.jit
def stream_rows(x_ptr, res_ptr, x_offs, res_offs, mask, H, PARTS: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """The residual stream at `x_offs` / `res_offs` (any shape): x, or the sum of PARTS fp32 MoE
    partial rows (x_offs + j * H) rounded to the stream's dtype as a stored MoE output would be,
    plus the residual, the sum rounded to the stream's dtype (the norm reads the stored stream)."""
    if PARTS > 0:
        acc = tl.load(x_ptr + x_offs, mask=mask, other=0.0)
        for j in tl.static_range(1, PARTS):
            acc += tl.load(x_ptr + x_offs + j * H, mask=mask, other=0.0)
        x = round_to(acc, res_ptr.dtype.element_ty)
    else:
        x = tl.load(x_ptr + x_offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + res_offs, mask=mask, other=0.0)
        x = round_to(x.to(tl.float32) + r.to(tl.float32), res_ptr.dtype.element_ty)
    return x


@triton.jit
def rms_norm_kernel(
    x_ptr,  # [T, H] activations, or [T, PARTS, H] fp32 partial sums (PARTS > 0)
    res_ptr,  # [T, H] residual stream (read only when HAS_RESIDUAL)
    w_ptr,  # [H] fp32
    out_ptr,  # [T, H] normed output, x's dtype
    res_out_ptr,  # [T, H] x + residual, x's dtype (written only when HAS_RESIDUAL)
    H,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PARTS: tl.constexpr = 0,
):
    # One row per program: H <= 8k fits in registers, so the row is read once.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    x = stream_rows(x_ptr, res_ptr, row * stride_x + cols, row * stride_r + cols, mask, H, PARTS, HAS_RESIDUAL)
    if HAS_RESIDUAL:
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(xf * xf, axis=0) / H + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_o + cols, round_to(w * (xf * inv), out_ptr.dtype.element_ty), mask=mask)


def launch_config(hidden: int) -> dict:
    block = next_pow2(hidden)
    return {"BLOCK_H": block, "num_warps": 8 if block >= 4096 else 4 if block >= 1024 else 1}


def check_stream_input(x: torch.Tensor, residual: torch.Tensor | None) -> tuple[int, torch.dtype]:
    """x: activations [T, H], or the MoE's fp32 partials [T, k, H] (summed first; the residual
    then required). -> (k, or 0 for activations; the residual stream's dtype)."""
    if x.dim() == 3:
        check(residual is not None, "MoE partials [T, k, H] need the residual stream")
        check(x.dtype == torch.float32 and x.is_contiguous(), "MoE partials must be contiguous fp32 [T, k, H]")
        return x.shape[1], residual.dtype
    check_dtype("x", x, ACT_DTYPES)
    check(x.dim() == 2 and x.stride(-1) == 1, f"x must be [T, H] with unit last stride, got {list(x.shape)} strides {x.stride()}")
    return 0, x.dtype


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual) * weight, x + residual); x, residual [T, H]; weight [H] fp32.
    x may be fp32 [T, k, H] MoE partials (summed over k first; residual required, its dtype out)."""
    check_device(x, weight)
    parts, act_dtype = check_stream_input(x, residual)
    t, h = x.shape[0], x.shape[-1]
    check_shape("weight", weight, (h,))
    check(weight.is_contiguous(), "weight must be contiguous")
    out = torch.empty((t, h), dtype=act_dtype, device=x.device)
    if residual is not None:
        check_device(x, residual)
        check_shape("residual", residual, (t, h))
        check(residual.dtype == act_dtype, f"residual dtype {residual.dtype} != x dtype {act_dtype}")
        check(residual.stride(-1) == 1, "residual must have unit last stride")
        res_out = torch.empty_like(out)
    else:
        residual = res_out = x
    if t:
        rms_norm_kernel[(t,)](
            x, residual, weight, out, res_out, h,
            x.stride(0), residual.stride(0), out.stride(0), res_out.stride(0), float(eps),
            HAS_RESIDUAL=res_out is not x, PARTS=parts, **launch_config(h),
        )
    return out, res_out
