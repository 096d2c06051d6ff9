"""MXFP4 (OCP microscaling, E2M1 values + E8M0 block scales) in the Hugging Face gpt-oss layout.

blocks: uint8 [..., out, in/32, 16], two E2M1 values a byte, low nibble = even element.
scales: uint8 [..., out, in/32], E8M0 with bias 127: a block's values are multiplied by 2**(s-127).
"""

from __future__ import annotations

import torch

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[..., out, in/32, 16] uint8 + [..., out, in/32] uint8 -> [..., out, in] `dtype`."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"MXFP4 blocks/scales must be uint8, got {blocks.dtype}/{scales.dtype}")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    # E2M1 nibble: sign bit 3, exponent bits 1-2, mantissa bit 0; exponent 0 is subnormal
    # (m * 0.5), else (2 + m) * 2**(e-2). Decoded with integer ops, no lookup table: no host
    # tensor to copy, so it can run inside a CUDA graph.
    nib = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).to(torch.int32)  # [..., out, in/32, 16, 2]
    e = (nib >> 1) & 3
    m = nib & 1
    mant = torch.where(e == 0, m, m + 2).float()
    exp = torch.where(e == 0, -1, e - 2) + (scales.to(torch.int32) - 127)[..., None, None]
    vals = torch.ldexp(mant, exp.float())
    vals = torch.where(nib >= 8, -vals, vals)
    return vals.flatten(-3).to(dtype)
