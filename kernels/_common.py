"""Launcher helpers shared by the kernels: argument checks and the CPU-interpreter switch."""

from __future__ import annotations

import os
import threading

import torch
import triton
import triton.language as tl

# Activation dtypes the kernels accept (the KV cache uses the activation dtype).
ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreting() -> bool:
    """True when Triton runs kernels on CPU tensors (TRITON_INTERPRET=1, set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def check_device(*tensors: torch.Tensor) -> None:
    dev = tensors[0].device
    for t in tensors:
        if t.device != dev:
            raise ValueError(f"all tensors must be on one device, got {t.device} and {dev}")
    if dev.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"Triton kernels need CUDA tensors (got {dev}); on CPU set TRITON_INTERPRET=1 "
            "before importing swallow_kernels, or use the torch ops"
        )


def check_dtype(name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in allowed]}, got {t.dtype}")


def check_shape(name: str, t: torch.Tensor, shape: tuple) -> None:
    """`shape` may hold None for free dims."""
    ok = t.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, t.shape))
    if not ok:
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")


def check_contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (strides {t.stride()}, shape {list(t.shape)})")


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a small stand-in under the interpreter so that
    CPU tests exercise the same multi-program paths (context splits)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


# Fixed when the kernels are defined (TRITON_INTERPRET is read at import, as triton.jit does).
INTERPRET = tl.constexpr(interpreting())


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """fp32 x -> dtype, rounded to nearest even as GPUs convert. The interpreter truncates fp32 ->
    bf16 (it drops the low bits), which biases every rounding of the stream towards zero; there
    the bits are rounded first (compiled kernels: a plain conversion)."""
    if INTERPRET:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits += 0x7FFF + ((bits >> 16) & 1)
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def mma(a, b, acc):
    """acc + a @ b with fp32 accumulation. The interpreter multiplies bf16 operands as their raw
    uint16 bits, so there they are widened first (exact: bf16 products fit fp32)."""
    if INTERPRET:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision="ieee")


# A gpu-scope release/acquire fence (as an elementwise asm: Triton has no fence op).
FENCE_ASM = tl.constexpr("fence.acq_rel.gpu; mov.b32 $0, $1;")


@triton.jit
def last_to_arrive(ticket_ptr, arrivals, anchor):
    """Counts this program in at `ticket_ptr` once its global writes are visible gpu-wide; true in
    the one program that arrives last of `arrivals`, which may then read all of their writes (with
    .cg loads: L1 is not coherent) and must reset the ticket to 0 (`tl.store(ticket_ptr, 0)`) so
    the next launch, or CUDA-graph replay, finds it zero. `anchor`: any tensor (the asm needs one)."""
    if not INTERPRET:
        tl.inline_asm_elementwise(FENCE_ASM, "=r,r", [anchor], dtype=tl.int32, is_pure=False, pack=1)
    tl.debug_barrier()
    return tl.atomic_add(ticket_ptr, 1) == arrivals - 1


class _Tickets:
    """Zeroed int32 ticket buffers for `last_to_arrive`, one per (device, owner kernel): every
    launch leaves its tickets zero again, so a buffer is filled once, at first use. A buffer is
    never freed, not even when a larger one replaces it: CUDA graphs captured earlier keep its
    address. Engines on other threads may ask at once, hence the lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffers: dict[tuple[torch.device, str], torch.Tensor] = {}
        self._retired: list[torch.Tensor] = []

    def get(self, device: torch.device, n: int, owner: str) -> torch.Tensor:
        with self._lock:
            buf = self._buffers.get((device, owner))
            if buf is None or buf.numel() < n:
                if buf is not None:
                    self._retired.append(buf)
                buf = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
                self._buffers[(device, owner)] = buf
            return buf


_TICKETS = _Tickets()


def tickets(device: torch.device, n: int, owner: str) -> torch.Tensor:
    """[>= n] zeroed int32 tickets for `owner`'s launches on `device` (see `_Tickets`)."""
    return _TICKETS.get(device, n, owner)
