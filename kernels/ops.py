"""The Triton implementation of the model's ops (`swallow_stream.ops.OpSet`).

Same signatures and return types as `swallow_stream.ops.reference`. CUDA tensors run compiled
kernels; CPU tensors run them in Triton's interpreter when TRITON_INTERPRET=1 was set before this
package was imported (tests), and are refused otherwise.
"""

from __future__ import annotations

from swallow_stream.ops import OpSet

from .attention import attention, store_kv
from .moe import experts, route
from .norm import rms_norm
from .rope import rope

TRITON_OPS = OpSet(
    name="triton",
    rms_norm=rms_norm,
    rope=rope,
    store_kv=store_kv,
    attention=attention,
    route=route,
    experts=experts,
)

__all__ = ["TRITON_OPS"]
