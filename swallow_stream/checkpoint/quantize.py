"""Dense (bf16) experts to MXFP4 at load, so every release runs the same packed-weight path.

SFT releases and the default 20B store their experts in bf16 (~4x the bytes). Quantizing them
while reading gives the layout of the MXFP4 releases (`ops/mxfp4.py`): the same kernels and a
quarter of the memory. A dense tensor is read into host memory and sent to the device one
expert at a time, so the device never holds more than one expert's dense weights.

Scale choice: each 32-value block gets the power of two that maps its largest magnitude to at
most 6 (the E2M1 maximum), so nothing saturates; values round to the nearest E2M1 point.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from ..config import ModelConfig
from .loader import Checkpoint

log = logging.getLogger("swallow_stream.checkpoint")

# Midpoints between the non-negative E2M1 values 0, .5, 1, 1.5, 2, 3, 4, 6: bucket i is code i.
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
BLOCK = 32


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., out, in] float -> (blocks uint8 [..., out, in/32, 16], scales uint8 [..., out, in/32]),
    the Hugging Face layout: 32-value blocks along `in`, low nibble = even element, E8M0 scales."""
    if w.shape[-1] % BLOCK:
        raise ValueError(f"the input dim ({w.shape[-1]}) must be a multiple of {BLOCK}")
    x = w.float().reshape(*w.shape[:-1], w.shape[-1] // BLOCK, BLOCK)
    amax = x.abs().amax(-1, keepdim=True)
    # smallest power of two s with amax / s <= 6; all-zero blocks take the smallest scale
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    exp = torch.where(amax > 0, exp, torch.full_like(exp, -127))
    q = x / torch.exp2(exp)
    mids = torch.tensor(_E2M1_MIDPOINTS, device=w.device)
    code = torch.bucketize(q.abs().clamp(max=6.0).contiguous(), mids).to(torch.uint8)
    code |= ((q < 0) & (code > 0)).to(torch.uint8) << 3  # sign bit; a rounded zero stays +0
    blocks = code[..., 0::2] | (code[..., 1::2] << 4)
    scales = (exp.squeeze(-1) + 127).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()


def read_quantized(ckpt: Checkpoint, device: torch.device) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """All tensors on `device`, dense experts quantized layer by layer: (state dict in the MXFP4
    layout, the config saying so)."""
    cfg = ckpt.config
    experts = {n for n in ckpt.files if n.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    sd = ckpt.read([n for n in ckpt.files if n not in experts], device=device)
    t0, dense_bytes = time.monotonic(), 0
    for name in sorted(experts):
        (w,) = ckpt.read([name], device="cpu").values()
        dense_bytes += w.numel() * w.element_size()
        # stored [E, in, out] (HF's dense layout); MXFP4 blocks run along `in` of [E, out, in]
        blocks, scales = zip(*(quantize_mxfp4(w[e].to(device).transpose(0, 1)) for e in range(w.shape[0])))
        sd[name + "_blocks"], sd[name + "_scales"] = torch.stack(blocks), torch.stack(scales)
        del w
    log.info("quantized %d dense expert tensors (%.2f GiB) to MXFP4 in %.1f s", len(experts), dense_bytes / 2**30,
             time.monotonic() - t0)
    return sd, dataclasses.replace(cfg, quant_method="mxfp4")
