"""The Triton implementation of the model's ops, as plain functions.

Same signatures and return types as `swallow_stream.ops.reference`, except `experts`, which takes
the kernels' expert layout (`MoEWeights`, made once by `pack_experts`). `swallow_stream.ops` builds
its Triton OpSet from these; this package imports nothing from swallow_stream. CUDA tensors run
compiled kernels; CPU tensors run them in Triton's interpreter when TRITON_INTERPRET=1 was set
before this package was imported (tests), and are refused otherwise.
"""

from __future__ import annotations

from .attention import attention, store_kv
from .layer import DECODE_MAX_TOKENS, attn_in, attn_out
from .moe import MoEWeights, experts, experts_partial, moe, pack_experts, route
from .norm import rms_norm
from .rope import rope, rope_store_kv

__all__ = ["DECODE_MAX_TOKENS", "MoEWeights", "attention", "attn_in", "attn_out", "experts", "experts_partial", "moe",
           "pack_experts", "rms_norm", "rope", "rope_store_kv", "route", "store_kv"]
