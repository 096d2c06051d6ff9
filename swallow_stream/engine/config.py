"""Engine options (what a caller may set) and the EngineConfig they resolve to, once.

Everything that depends on the machine (device, dtype, ops, token budgets, how experts are held
on CPU, the KV cache budget) is decided here and nowhere else.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from ..config import GenerationDefaults, ModelConfig
from ..errors import InvalidRequestError

log = logging.getLogger("swallow_stream.engine")

DEFAULT_MAX_NUM_SEQS = 16

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}


@dataclass
class EngineOptions:
    device: str | None = None  # None: cuda when available, else cpu
    dtype: str | None = None  # None: bfloat16 on cuda and on CPUs with native bf16, else float32
    ops: str = "auto"  # "auto" | "torch" | "triton"
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    max_queued_requests: int = 64
    max_model_len: int = 32768
    max_num_batched_tokens: int | None = None  # None: 2048 on cuda, 512 on cpu
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes; None: 0.9 of free GPU memory, 512 MiB on cpu
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    cuda_graphs: bool | None = None  # None: on when the device is CUDA
    # One-step-late decoding: step N+1 is launched with step N's sampled ids still on the device,
    # and the host reads step N's ids (stops, streaming) while step N+1 runs. None: on CUDA. On
    # CPU nothing runs asynchronously, so it only buys the same code path (tests).
    overlap: bool | None = None
    # No engine thread: consumers drive the steps (`pump`). For hosts where the GPU exists only
    # inside request handlers (Hugging Face ZeroGPU).
    inline: bool = False
    # CPU + torch ops: unpack MXFP4 experts once at load when they fit in this many bytes
    cpu_dequantized_experts_max_bytes: int = 8 << 30
    # Dense (bf16) experts quantized to MXFP4 while loading: None = on CUDA (a quarter of the
    # memory, the MXFP4 kernels); False keeps them dense; True quantizes on any device.
    quantize_dense_experts: bool | None = None
    revision: str | None = None

    @classmethod
    def from_kwargs(cls, **options) -> "EngineOptions":
        known = {f.name for f in fields(cls)}
        unknown = set(options) - known
        if unknown:
            raise InvalidRequestError(f"unknown engine option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        return cls(**options)

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise InvalidRequestError(f"unknown dtype {self.dtype!r}; use one of {', '.join(DTYPES)}")
        if self.ops not in ("auto", "torch", "triton"):
            raise InvalidRequestError(f"unknown ops {self.ops!r}; use 'auto', 'torch' or 'triton'")
        if self.max_num_seqs < 1 or self.max_queued_requests < 0 or self.max_model_len < 2:
            raise InvalidRequestError("max_num_seqs must be >= 1, max_queued_requests >= 0 and max_model_len >= 2")


@dataclass(frozen=True)
class StopPolicy:
    """Token ids that end generation, handed in by whoever knows the chat format: `always`, plus
    the checkpoint's eos ids, minus `never` (a format's own message separators)."""

    always: frozenset[int] = frozenset()
    never: frozenset[int] = frozenset()

    def resolve(self, cfg: ModelConfig, generation: GenerationDefaults) -> frozenset[int]:
        return (self.always | frozenset(cfg.eos_token_ids) | frozenset(generation.eos_token_ids)) - self.never


@dataclass(frozen=True)
class EngineConfig:
    device: torch.device
    dtype: torch.dtype
    ops: str  # "torch" | "triton": what runs (`resolve_ops`)
    max_model_len: int
    max_num_seqs: int
    max_queued_requests: int
    max_num_batched_tokens: int
    block_size: int
    enable_prefix_caching: bool
    cuda_graphs: bool | None
    stop_token_ids: frozenset[int]
    dequantize_experts: bool  # CPU + torch ops: hold MXFP4 experts unpacked (fp32)
    quantize_experts: bool  # dense experts -> MXFP4 while loading
    kv_cache_memory: int | None
    gpu_memory_utilization: float
    overlap: bool = False  # one-step-late decoding: the next step's inputs are fed from the device


def resolve(opts: EngineOptions, cfg: ModelConfig, generation: GenerationDefaults, stops: StopPolicy) -> EngineConfig:
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[opts.dtype] if opts.dtype else default_dtype(device)
    ops = resolve_ops(opts.ops, device)
    dense_bytes = 3 * cfg.num_hidden_layers * cfg.num_local_experts * cfg.hidden_size * cfg.intermediate_size * 4
    quantize = cfg.quant_method is None and (
        opts.quantize_dense_experts if opts.quantize_dense_experts is not None else device.type == "cuda")
    dequantize = (device.type == "cpu" and ops == "torch" and (cfg.quant_method == "mxfp4" or quantize)
                  and dense_bytes <= opts.cpu_dequantized_experts_max_bytes)
    return EngineConfig(
        device=device,
        dtype=dtype,
        ops=ops,
        max_model_len=min(opts.max_model_len, cfg.max_position_embeddings),
        max_num_seqs=opts.max_num_seqs,
        max_queued_requests=opts.max_queued_requests,
        max_num_batched_tokens=opts.max_num_batched_tokens or (2048 if device.type == "cuda" else 512),
        block_size=opts.block_size,
        enable_prefix_caching=opts.enable_prefix_caching,
        cuda_graphs=opts.cuda_graphs,
        stop_token_ids=stops.resolve(cfg, generation),
        dequantize_experts=dequantize,
        quantize_experts=quantize,
        kv_cache_memory=opts.kv_cache_memory,
        gpu_memory_utilization=opts.gpu_memory_utilization,
        # inline (ZeroGPU) steps end with the consumer's call: no step may be left in flight
        overlap=not opts.inline and (opts.overlap if opts.overlap is not None else device.type == "cuda"),
    )


# The kernels use bf16 tensor-core MMAs (and Hopper's wgmma where present): Ampere or newer.
MIN_TRITON_CAPABILITY = (8, 0)


def triton_unusable(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on `device`, or None when they can."""
    if device.type != "cuda":
        return f"Triton kernels need a CUDA device, not {device.type}"
    try:
        import triton  # noqa: F401
        import swallow_kernels  # noqa: F401
    except Exception as e:  # not installed, or broken (Windows wheels, mismatched CUDA)
        return f"Triton is not usable here ({type(e).__name__}: {e})"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < MIN_TRITON_CAPABILITY:
        return (f"{torch.cuda.get_device_name(device)} is compute capability {major}.{minor}; the kernels need "
                f"{MIN_TRITON_CAPABILITY[0]}.{MIN_TRITON_CAPABILITY[1]} or newer")
    return None


def resolve_ops(asked: str, device: torch.device) -> str:
    """'auto': Triton where it imports and the GPU supports the kernels, else the torch ops (with a
    warning on a GPU). 'triton' where it cannot run is an error naming why."""
    if asked == "torch":
        return "torch"
    reason = triton_unusable(device)
    if asked == "triton":
        if reason and not (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
            raise InvalidRequestError(f"--ops triton: {reason}; use --ops torch or auto")
        return "triton"
    if reason is None:
        return "triton"
    if device.type == "cuda":
        log.warning("using the torch ops: %s", reason)
    return "torch"


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA and on CPUs that compute it natively (AMX or AVX512-BF16); fp32 elsewhere,
    where bf16 matmuls are emulated and slower than fp32."""
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


@functools.cache
def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))
