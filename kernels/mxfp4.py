"""The kernels' MXFP4 layout: HF blocks and scales repacked once at load so that a thread turns
one 32-bit word into eight bf16 weights with ~10 integer ops and four packed multiplies.

HF on disk: blocks u8 [..., R, K/32, 16] (two E2M1 codes a byte, low nibble = even k),
            scales u8 [..., R, K/32] (E8M0, bias 127).
Kernels:    words  int32 [..., R, K/8]  word i holds k = 8i .. 8i+7 (same bytes as HF: 4 per 8 values)
            scales u8    [..., R, SP]   SP = K/32 rounded up to 16 (16-byte aligned rows; the pad
                                        also covers the masked tail step of any BLOCK_K <= 512)

Inside a word the eight E2M1 codes are scattered so that four bf16x2 registers come out of
shifts and masks: value q (k = 8i + q) goes to pair j = q//4 + 2*((q//2) % 2), half c = q % 2
(the order `tl.join`/`tl.reshape` in `dequant` produces). Pair j's (m, e0, e1) bits sit at
EM[j] + 16c .. +2 and its sign at SG[j] + 16c; moved to bf16 bits 6..8 and 15 they give the
bf16 whose value is v * 2^-126 (E2M1 subnormal 0.5 lands on the bf16 subnormal 2^-127). One
multiply by 2^(s-64) then gives v * 2^(s-127) * 2^-63; the kernels multiply their fp32
accumulators by 2^63. Exact for E8M0 scales 65..191 (checkpoints use ~110..130).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET

EM = (0, 3, 6, 9)  # low bit of pair j's (m, e0, e1) in each 16-bit half
SG = (13, 12, 15, 14)  # sign bit of pair j in each 16-bit half
ACC_SCALE = 2.0**63  # undoes the 2^-63 folded into the bf16 scale


def scale_pad(k: int) -> int:
    return -(-(k // 32) // 16) * 16


def _positions() -> tuple[list[int], list[int]]:
    em, sg = [], []
    for q in range(8):
        j, c = q // 4 + 2 * ((q // 2) % 2), q % 2
        em.append(EM[j] + 16 * c)
        sg.append(SG[j] + 16 * c)
    return em, sg


def pack_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HF blocks [..., R, K/32, 16] u8 + scales [..., R, K/32] u8 -> (words [..., R, K/8] int32,
    scales [..., R, SP] u8). Runs on the tensors' device."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError("MXFP4 blocks and scales must be uint8")
    if blocks.shape[-1] != 16 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    *lead, r, g, _ = blocks.shape
    k = g * 32
    b = blocks.reshape(*lead, r, k // 2)
    codes = torch.stack((b & 15, b >> 4), dim=-1).reshape(*lead, r, k // 8, 8).to(torch.int64)
    em, sg = _positions()
    word = torch.zeros(codes.shape[:-1], dtype=torch.int64, device=blocks.device)
    for q in range(8):
        c = codes[..., q]
        word |= (c & 7) << em[q]
        word |= (c >> 3) << sg[q]
    word = torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)
    sp = scale_pad(k)
    s = torch.zeros((*lead, r, sp), dtype=torch.uint8, device=scales.device)
    s[..., :g] = scales
    return word.contiguous(), s


def unpack_mxfp4(words: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse view for tests: words [..., R, K/8] + scales [..., R, SP] -> weights [..., R, K]."""
    from_bits = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
    lut = torch.tensor(from_bits, dtype=torch.float32, device=words.device)
    w = words.to(torch.int64) & 0xFFFFFFFF
    em, sg = _positions()
    vals = []
    for q in range(8):
        mag = lut[(w >> em[q]) & 7]
        vals.append(torch.where(((w >> sg[q]) & 1) == 1, -mag, mag))
    v = torch.stack(vals, dim=-1).flatten(-2)  # [..., R, K]
    k = v.shape[-1]
    s = scales[..., : k // 32].to(torch.int32) - 127
    return torch.ldexp(v.unflatten(-1, (k // 32, 32)), s.unsqueeze(-1).float()).flatten(-2).to(dtype)


# Pairs 0..3 of one word -> bf16x2, times the bf16x2 scale $9, split into eight bf16 (low halves
# $0..$3, high halves $4..$7). fma with +0 (ptxas: RZ; -0 weights become +0, harmless): sm_80 has
# no bf16x2 mul. bf16 arithmetic keeps subnormals (no ftz), which the E2M1 0.5 case relies on.
_DEQUANT_ASM = tl.constexpr("""{
.reg .b32 p<4>, t, u, z;
mov.b32 z, 0;
shl.b32 t, $8, 6; and.b32 t, t, 0x01C001C0; shl.b32 u, $8, 2; and.b32 u, u, 0x80008000; or.b32 p0, t, u;
shl.b32 t, $8, 3; and.b32 p1, t, 0x81C081C0;
and.b32 p2, $8, 0x81C081C0;
shr.b32 t, $8, 3; and.b32 t, t, 0x01C001C0; shl.b32 u, $8, 1; and.b32 u, u, 0x80008000; or.b32 p3, t, u;
fma.rn.bf16x2 p0, p0, $9, z;
fma.rn.bf16x2 p1, p1, $9, z;
fma.rn.bf16x2 p2, p2, $9, z;
fma.rn.bf16x2 p3, p3, $9, z;
mov.b32 {$0, $4}, p0;
mov.b32 {$1, $5}, p1;
mov.b32 {$2, $6}, p2;
mov.b32 {$3, $7}, p3;
}""")


@triton.jit
def _shift(w, s: tl.constexpr):
    if s > 0:
        return w << s
    elif s < 0:
        return w >> (-s)
    else:
        return w


@triton.jit
def _pair_ref(w, em: tl.constexpr, sg: tl.constexpr, s):
    """Interpreter twin of one asm pair: (low, high) values as fp32, times the fp32 scale s."""
    p = (_shift(w, 6 - em) & 0x01C001C0) | (_shift(w, 15 - sg) & 0x80008000)
    lo = (p << 16).to(tl.float32, bitcast=True)
    hi = (p & 0xFFFF0000).to(tl.float32, bitcast=True)
    return (lo * s).to(tl.bfloat16), (hi * s).to(tl.bfloat16)


@triton.jit
def dequant(words, scales, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """words int32 [ROWS, BLOCK_K/8], scales u8 [ROWS, BLOCK_K/32] -> bf16 [ROWS, BLOCK_K] holding
    w * 2^-63 (exact; see the module doc)."""
    s = scales.to(tl.uint32)
    if INTERPRET:
        sw = tl.broadcast_to(((s + 63) << 23)[:, :, None], [ROWS, BLOCK_K // 32, 4]).reshape(ROWS, BLOCK_K // 8)
        sf = sw.to(tl.float32, bitcast=True)
        w = words.to(tl.uint32, bitcast=True)
        l0, h0 = _pair_ref(w, 0, 13, sf)
        l1, h1 = _pair_ref(w, 3, 12, sf)
        l2, h2 = _pair_ref(w, 6, 15, sf)
        l3, h3 = _pair_ref(w, 9, 14, sf)
    else:
        s2 = ((s + 63) << 7) * 0x10001  # bf16 2^(s-64) in both halves
        sw = tl.broadcast_to(s2[:, :, None], [ROWS, BLOCK_K // 32, 4]).reshape(ROWS, BLOCK_K // 8)
        l0, l1, l2, l3, h0, h1, h2, h3 = tl.inline_asm_elementwise(
            _DEQUANT_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [words, sw], dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)
    lo = tl.join(tl.join(l0, l1), tl.join(l2, l3))
    hi = tl.join(tl.join(h0, h1), tl.join(h2, h3))
    return tl.reshape(tl.join(lo, hi), [ROWS, BLOCK_K])
