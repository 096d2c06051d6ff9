"""The fused ops of a layer (attn_in, attn_out, moe) as compositions of the reference ops: the
torch OpSet's implementations and the kernels' oracle. Numerically what the model's forward did
op by op before the ops were fused."""

from __future__ import annotations

import torch

from . import reference


def attn_in(
    x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
    qkv_weight: torch.Tensor, qkv_bias: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add (x may be the MoE's fp32 partials [T, k, H]) + RMSNorm + the fused q/k/v
    projection + RoPE + KV-cache write. -> (rotated q [T, Hq, D], the new residual [T, H])."""
    h, residual = reference.rms_norm(x, norm_weight, eps, residual)
    qkv = reference.linear(h, qkv_weight, qkv_bias)
    t, d = qkv.shape[0], k_cache.shape[-1]
    hq, hk = num_heads, num_kv_heads
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(t, hk, d)
    v = qkv[:, (hq + hk) * d :].view(t, hk, d)
    return reference.rope_store_kv(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping), residual


def attn_out(o: torch.Tensor, o_weight: torch.Tensor, o_bias: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """residual + o_proj(o): o [T, Hq, D] -> the new residual [T, H] (the projection rounded to the
    stream's dtype before the add)."""
    return reference.linear(o.reshape(o.shape[0], -1), o_weight, o_bias) + residual


def moe(
    x: torch.Tensor, norm_weight: torch.Tensor, eps: float, router_weight: torch.Tensor, router_bias: torch.Tensor,
    top_k: int, experts: reference.ExpertWeights, swiglu_limit: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The MoE block from the residual stream x [T, H]: RMSNorm, route, experts, left unreduced.
    -> (fp32 partials [T, k, H] for the next attn_in / rms_norm to sum, expert ids [T, k])."""
    h, _ = reference.rms_norm(x, norm_weight, eps)
    weights, ids = reference.route(h, router_weight, router_bias, top_k)
    return reference.experts_partial(h, weights, ids, experts, swiglu_limit), ids
