"""The model's ops, with two implementations of one interface.

`TORCH_OPS`: plain torch (CPU, and the oracle for the kernels). `triton_ops()`: the Triton
kernels of `swallow_kernels` (CUDA; on CPU under TRITON_INTERPRET=1 for tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import reference
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


TORCH_OPS = OpSet(
    name="torch",
    rms_norm=reference.rms_norm,
    rope=reference.rope,
    store_kv=reference.store_kv,
    attention=reference.attention,
    route=reference.route,
    experts=reference.experts,
)


def triton_ops() -> OpSet:
    from swallow_kernels.ops import TRITON_OPS

    return TRITON_OPS


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
