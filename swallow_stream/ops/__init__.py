"""The model's ops, with two implementations of one interface.

`TORCH_OPS`: plain torch (CPU, and the oracle for the kernels). `triton_ops()`: the Triton
kernels of `swallow_kernels` (CUDA; on CPU under TRITON_INTERPRET=1 for tests), built here from
the kernels' plain functions (the kernels package does not import swallow_stream).

A layer of the model's forward is four ops: `attn_in` (residual add + RMSNorm + QKV + RoPE + KV
write), `attention`, `attn_out` (o_proj + residual add), `moe` (RMSNorm + router + experts, output
left unreduced for the next attn_in / rms_norm to sum). The torch set composes the reference ops
(`fused.py`); the Triton set runs them in 6 launches a decode layer (T <= 128, issue #10) and as
cuBLAS GEMMs around the norm / RoPE / router kernels for prefill.

`prepare_experts(w)` runs once per layer at model construction: the Triton set repacks MXFP4
experts into the kernels' layout (`w.packed`) and, on CUDA, releases the HF-layout copy.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import fused, reference
from .mxfp4 import FP4_VALUES, dequantize_mxfp4
from .reference import ExpertWeights


@dataclass(frozen=True)
class OpSet:
    name: str
    rms_norm: Callable
    rope: Callable
    store_kv: Callable
    attention: Callable
    route: Callable
    experts: Callable
    # Fused forms the model's forward uses: RoPE + KV-cache write in one op; the MoE output left
    # unreduced (fp32 [T, k, H]) for the next rms_norm to sum with the residual add.
    rope_store_kv: Callable
    experts_partial: Callable
    # A layer's ops (model.py): see the module docstring.
    attn_in: Callable
    attn_out: Callable
    moe: Callable
    prepare_experts: Callable[[ExpertWeights], None] = field(default=lambda w: None)


TORCH_OPS = OpSet(
    name="torch",
    rms_norm=reference.rms_norm,
    rope=reference.rope,
    store_kv=reference.store_kv,
    attention=reference.attention,
    route=reference.route,
    experts=reference.experts,
    rope_store_kv=reference.rope_store_kv,
    experts_partial=reference.experts_partial,
    attn_in=fused.attn_in,
    attn_out=fused.attn_out,
    moe=fused.moe,
)


def _pack(w: ExpertWeights):
    from swallow_kernels.ops import pack_experts

    return pack_experts(w.gate_up_blocks, w.gate_up_scales, w.gate_up_bias, w.down_blocks, w.down_scales, w.down_bias)


def _prepare_experts_triton(w: ExpertWeights) -> None:
    if w.packed is None and w.gate_up_blocks is not None:
        w.packed = _pack(w)
        if w.gate_up_blocks.device.type == "cuda":
            # one copy of the experts on the GPU: the kernels' layout
            w.gate_up_blocks = w.gate_up_scales = w.down_blocks = w.down_scales = None
            w.dequantized = None


def _experts_partial_triton(x: torch.Tensor, expert_weights: torch.Tensor, expert_ids: torch.Tensor, w: ExpertWeights,
                            swiglu_limit: float) -> torch.Tensor:
    if not w.quantized:  # dense (bf16) experts (--keep-dense-experts): the torch op, graph-safe off the CPU
        return reference.experts_partial(x, expert_weights, expert_ids, w, swiglu_limit)
    _prepare_experts_triton(w)
    from swallow_kernels.ops import experts_partial

    return experts_partial(x, expert_weights, expert_ids, w.packed, swiglu_limit)


def _experts_triton(x: torch.Tensor, expert_weights: torch.Tensor, expert_ids: torch.Tensor, w: ExpertWeights,
                    swiglu_limit: float) -> torch.Tensor:
    if not w.quantized:
        return reference.experts(x, expert_weights, expert_ids, w, swiglu_limit)
    _prepare_experts_triton(w)
    from swallow_kernels.ops import experts

    return experts(x, expert_weights, expert_ids, w.packed, swiglu_limit)


def _attention_triton(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, sinks, window, scale,
                      host_lens=None) -> torch.Tensor:
    from swallow_kernels.ops import attention

    # the kernel reads the lengths on the device: host_lens is the torch loop's alone
    return attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, sinks, window, scale)


def _moe_triton(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, router_weight: torch.Tensor,
                router_bias: torch.Tensor, top_k: int, w: ExpertWeights, swiglu_limit: float):
    from swallow_kernels import ops as k

    if w.quantized and x.shape[0] <= k.DECODE_MAX_TOKENS:  # decode: route_group, gate_up, down
        _prepare_experts_triton(w)
        return k.moe(x, norm_weight, eps, router_weight, router_bias, top_k, w.packed, swiglu_limit)
    h, _ = k.rms_norm(x, norm_weight, eps)
    weights, ids = k.route(h, router_weight, router_bias, top_k)
    return _experts_partial_triton(h, weights, ids, w, swiglu_limit), ids


@functools.cache
def triton_ops() -> OpSet:
    from swallow_kernels import ops as k

    return OpSet(
        name="triton",
        rms_norm=k.rms_norm,
        rope=k.rope,
        store_kv=k.store_kv,
        attention=_attention_triton,
        route=k.route,
        experts=_experts_triton,
        rope_store_kv=k.rope_store_kv,
        experts_partial=_experts_partial_triton,
        attn_in=k.attn_in,
        attn_out=k.attn_out,
        moe=_moe_triton,
        prepare_experts=_prepare_experts_triton,
    )


def get_ops(backend: str, device_type: str) -> OpSet:
    """backend: "torch", "triton", or "auto" (triton on CUDA, torch elsewhere)."""
    if backend == "auto":
        backend = "triton" if device_type == "cuda" else "torch"
    if backend == "torch":
        return TORCH_OPS
    if backend == "triton":
        return triton_ops()
    raise ValueError(f"unknown ops backend {backend!r}: use 'auto', 'torch' or 'triton'")


__all__ = ["FP4_VALUES", "TORCH_OPS", "ExpertWeights", "OpSet", "dequantize_mxfp4", "get_ops", "triton_ops"]
