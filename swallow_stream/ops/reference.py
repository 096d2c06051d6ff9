"""Plain-torch implementations of the model's ops: the CPU path and the oracle for the kernels.

Token-major layout throughout: a step's tokens from all sequences are flattened to T rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .mxfp4 import dequantize_mxfp4

SWIGLU_ALPHA = 1.702


@dataclass
class ExpertWeights:
    """One layer's experts. MXFP4 (packed) when `gate_up_blocks` is set, else dense.

    MXFP4: gate_up_blocks [E, 2I, H/32, 16] u8, gate_up_scales [E, 2I, H/32] u8,
           down_blocks [E, H, I/32, 16] u8, down_scales [E, H, I/32] u8.
    Dense: gate_up [E, H, 2I], down [E, I, H] (Hugging Face's bf16 layout).
    gate_up rows interleave gate (even) and up (odd).
    """

    gate_up_bias: torch.Tensor  # [E, 2I] fp32
    down_bias: torch.Tensor  # [E, H] fp32
    gate_up_blocks: torch.Tensor | None = None
    gate_up_scales: torch.Tensor | None = None
    down_blocks: torch.Tensor | None = None
    down_scales: torch.Tensor | None = None
    gate_up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    # CPU only: MXFP4 experts dequantized once ([E, 2I, H], [E, H, I]), trading memory for
    # not unpacking the chosen experts at every step. GPU kernels always read the packed form.
    dequantized: tuple[torch.Tensor, torch.Tensor] | None = None
    # The Triton kernels' layout (swallow_kernels.MoEWeights), made once by OpSet.prepare_experts;
    # on CUDA the HF-layout tensors above are then released.
    packed: object | None = None

    def materialize(self, dtype: torch.dtype) -> None:
        if self.gate_up_blocks is not None and self.dequantized is None:
            self.dequantized = (
                dequantize_mxfp4(self.gate_up_blocks, self.gate_up_scales, dtype),
                dequantize_mxfp4(self.down_blocks, self.down_scales, dtype),
            )

    @property
    def quantized(self) -> bool:
        return self.gate_up_blocks is not None or self.packed is not None

    @property
    def num_experts(self) -> int:
        return self.gate_up_bias.shape[0]

    def gate_up_weight(self, e: int, dtype: torch.dtype) -> torch.Tensor:
        """Expert e's gate_up as [2I, H]."""
        if self.dequantized is not None:
            return self.dequantized[0][e].to(dtype)
        if self.quantized:
            return dequantize_mxfp4(self.gate_up_blocks[e], self.gate_up_scales[e], dtype)
        return self.gate_up[e].t().to(dtype)

    def down_weight(self, e: int, dtype: torch.dtype) -> torch.Tensor:
        """Expert e's down as [H, I]."""
        if self.dequantized is not None:
            return self.dequantized[1][e].to(dtype)
        if self.quantized:
            return dequantize_mxfp4(self.down_blocks[e], self.down_scales[e], dtype)
        return self.down[e].t().to(dtype)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual) * weight, x + residual). x, residual [T, H]; weight [H] fp32.

    The sum is the new residual stream (in x's dtype); the norm is computed in fp32. x may be the
    MoE's fp32 partials [T, k, H] (`experts_partial`): summed over k and rounded to the residual's
    dtype first, as a stored MoE output would be.
    """
    if x.dim() == 3:
        x = x.sum(1).to(residual.dtype)
    if residual is not None:
        x = x + residual
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * y).to(x.dtype), x


def rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """NeoX (half-split) rotary embedding. q [T, Hq, D], k [T, Hk, D], positions [T];
    cos/sin [max_pos, D/2] fp32 with YaRN's concentration already folded in."""
    c = cos[positions].unsqueeze(1)
    s = sin[positions].unsqueeze(1)

    def rot(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)

    return rot(q), rot(k)


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write k, v [T, Hk, D] into the paged caches [num_blocks, block_size, Hk, D] at flat slots
    (block * block_size + offset); slot -1 means "do not store"."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)


def rope_store_kv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """rope(q, k) then store_kv(rotated k, v): returns the rotated q; k and v go to the caches."""
    q, k = rope(q, k, positions, cos, sin)
    store_kv(k, v, k_cache, v_cache, slot_mapping)
    return q


def attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    sinks: torch.Tensor,
    window: int,
    scale: float,
) -> torch.Tensor:
    """Causal paged attention with learned sinks and an optional sliding window.

    q [T, Hq, D]; caches [num_blocks, block_size, Hk, D] already holding this step's keys;
    block_tables [B, max_blocks] int32 (entries a sequence no longer needs may be -1);
    seq_lens [B] context length after this step; query_start_loc [B+1] into T.
    Query j of sequence b sits at position seq_lens[b] - q_len_b + j and sees key k iff
    k <= pos and (window == 0 or k > pos - window). Each head's softmax denominator also
    holds exp(sinks[h]) (no value vector). Returns [T, Hq, D] in q's dtype.
    """
    t, hq, d = q.shape
    hk = k_cache.shape[2]
    bs = k_cache.shape[1]
    out = torch.empty_like(q)
    qsl = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for b, seq_len in enumerate(lens):
        q0, q1 = qsl[b], qsl[b + 1]
        if q1 == q0:
            continue
        nblk = -(-seq_len // bs)
        blocks = block_tables[b, :nblk].long().clamp(min=0)
        kk = k_cache[blocks].reshape(-1, hk, d)[:seq_len].float()  # [S, Hk, D]
        vv = v_cache[blocks].reshape(-1, hk, d)[:seq_len].float()
        qq = q[q0:q1].float().view(q1 - q0, hk, hq // hk, d)  # [L, Hk, G, D]
        scores = torch.einsum("lhgd,shd->hgls", qq, kk) * scale  # [Hk, G, L, S]
        qpos = torch.arange(seq_len - (q1 - q0), seq_len, device=q.device)
        kpos = torch.arange(seq_len, device=q.device)
        visible = kpos[None, :] <= qpos[:, None]
        if window:
            visible &= kpos[None, :] > qpos[:, None] - window
        scores = scores.masked_fill(~visible, float("-inf"))
        sink = sinks.float().view(hk, hq // hk, 1, 1).expand(hk, hq // hk, q1 - q0, 1)
        logits = torch.cat((scores, sink), dim=-1)
        probs = torch.softmax(logits, dim=-1)[..., :-1]
        o = torch.einsum("hgls,shd->lhgd", probs, vv)
        out[q0:q1] = o.reshape(q1 - q0, hq, d).to(q.dtype)
    return out


def route(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router: logits = x W^T + b; top-k on raw logits; softmax over the k.
    x [T, H] -> (weights [T, k] fp32, expert ids [T, k] int32)."""
    logits = F.linear(x.float(), weight.float(), bias.float())
    # NaN ranks lowest and infinities become the finite extremes, so top-k always picks k
    # distinct in-range experts and the softmax stays finite (ties: the lowest id first).
    big = torch.finfo(torch.float32).max
    logits = torch.nan_to_num(logits, nan=-big, posinf=big, neginf=-big)
    top, ids = torch.topk(logits, top_k, dim=-1)
    return torch.softmax(top, dim=-1), ids.to(torch.int32)


def swiglu_clamped(gate_up: torch.Tensor, limit: float) -> torch.Tensor:
    """[.., 2I] interleaved (gate even, up odd) -> [.., I]: gate*sigmoid(1.702*gate)*(up+1),
    gate clamped above at `limit`, up clamped to [-limit, limit]."""
    gate = gate_up[..., 0::2].clamp(max=limit)
    up = gate_up[..., 1::2].clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(SWIGLU_ALPHA * gate) * (up + 1)


def experts_partial(
    x: torch.Tensor,
    expert_weights: torch.Tensor,
    expert_ids: torch.Tensor,
    w: ExpertWeights,
    swiglu_limit: float,
) -> torch.Tensor:
    """Mixture of experts, unreduced. x [T, H]; expert_weights [T, k] fp32; expert_ids [T, k].
    y[t, j] = weight[t,j] * (down_e(swiglu(gate_up_e(x[t]) + b1_e)) + b2_e), e = ids[t,j]:
    fp32 [T, k, H]. Only the experts some token chose are dequantized."""
    t, h = x.shape
    k = expert_ids.shape[1]
    flat = expert_ids.reshape(-1).long()  # [T*k] (token, slot) pairs
    order = torch.argsort(flat, stable=True)  # pairs grouped by expert
    counts = torch.bincount(flat, minlength=w.num_experts).tolist()
    tok = order // k
    xs = x[tok].float()  # [T*k, H]
    ys = torch.empty(t * k, h, dtype=torch.float32, device=x.device)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        seg = slice(start, start + n)
        gu = torch.addmm(w.gate_up_bias[e].float(), xs[seg], w.gate_up_weight(e, torch.float32).t())
        ys[seg] = torch.addmm(w.down_bias[e].float(), swiglu_clamped(gu, swiglu_limit), w.down_weight(e, torch.float32).t())
        start += n
    ys *= expert_weights.reshape(-1)[order].unsqueeze(1)
    y = torch.empty_like(ys)
    y[order] = ys
    return y.view(t, k, h)


def experts(
    x: torch.Tensor,
    expert_weights: torch.Tensor,
    expert_ids: torch.Tensor,
    w: ExpertWeights,
    swiglu_limit: float,
) -> torch.Tensor:
    """Mixture of experts. x [T, H]; expert_weights [T, k] fp32; expert_ids [T, k].
    out[t] = sum_j weight[t,j] * (down_e(swiglu(gate_up_e(x[t]) + b1_e)) + b2_e), e = ids[t,j].
    Returns [T, H] in x's dtype."""
    return experts_partial(x, expert_weights, expert_ids, w, swiglu_limit).sum(1).to(x.dtype)
