"""Dense experts quantized to MXFP4 at load: the quantizer's error bounds and layout, and a dense
bf16 checkpoint served through the MXFP4 path against the same checkpoint kept dense."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from swallow_stream import stream
from swallow_stream.checkpoint import open_checkpoint, preset, write_checkpoint
from swallow_stream.checkpoint.quantize import quantize_mxfp4, read_quantized
from swallow_stream.ops import FP4_VALUES, dequantize_mxfp4

GRID = torch.tensor(sorted(set(abs(v) for v in FP4_VALUES)))  # 0, .5, 1, 1.5, 2, 3, 4, 6


def test_values_on_the_grid_round_trip_exactly():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (3, 8, 64), generator=g)
    vals = torch.tensor(FP4_VALUES)[codes]
    vals[..., ::32] = 6.0  # each block reaches the largest magnitude, so its scale is 2**exp exactly
    w = vals * torch.exp2(torch.randint(-8, 8, (3, 8, 2), generator=g).float()).repeat_interleave(32, -1)
    blocks, scales = quantize_mxfp4(w)
    assert blocks.shape == (3, 8, 2, 16) and scales.shape == (3, 8, 2) and blocks.dtype == torch.uint8
    assert torch.equal(dequantize_mxfp4(blocks, scales), w)


def test_error_is_within_half_a_grid_step_and_nothing_saturates():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 16, 128, generator=g) * torch.logspace(-3, 2, 16)[:, None]
    blocks, scales = quantize_mxfp4(w.to(torch.bfloat16))
    back = dequantize_mxfp4(blocks, scales)
    x = w.to(torch.bfloat16).float().reshape(4, 16, 4, 32)
    scale = torch.exp2(scales.float() - 127).unsqueeze(-1)
    q = (x / scale).abs()
    assert q.max() <= 6.0  # the scale maps each block's largest value to at most 6
    # half the distance to the next grid point above, in units of the block scale
    idx = torch.bucketize(q, GRID).clamp(max=len(GRID) - 1)
    half_step = (GRID[idx] - GRID[(idx - 1).clamp(min=0)]) / 2
    err = (back.reshape(x.shape) - x).abs() / scale
    assert (err <= half_step + 1e-6).all()
    # and the largest magnitude of each block is kept to within a quarter of itself
    amax = x.abs().amax(-1)
    assert ((back.reshape(x.shape).abs().amax(-1) - amax).abs() <= amax / 4 + 1e-12).all()


def test_layout_is_huggingface_mxfp4():
    w = torch.zeros(1, 1, 32)
    w[0, 0, 0], w[0, 0, 1], w[0, 0, 2] = 1.0, -0.5, 6.0  # scale 1: codes 2, 9 (sign|1), 7
    blocks, scales = quantize_mxfp4(w)
    assert scales.item() == 127
    assert blocks[0, 0, 0, 0].item() == 2 | (9 << 4)  # low nibble = even element
    assert blocks[0, 0, 0, 1].item() == 7


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory):
    cfg = dataclasses.replace(preset("tiny"), quant_method=None)
    return write_checkpoint(tmp_path_factory.mktemp("dense"), cfg, seed=3)


def test_dense_checkpoint_quantized_at_load_reads_like_an_mxfp4_one(dense_checkpoint, caplog):
    ckpt = open_checkpoint(dense_checkpoint)
    assert ckpt.config.quant_method is None
    with caplog.at_level(logging.INFO, logger="swallow_stream.checkpoint"):
        sd, cfg = read_quantized(ckpt, torch.device("cpu"))
    assert cfg.quant_method == "mxfp4" and "quantized" in caplog.text
    dense = ckpt.read(["model.layers.0.mlp.experts.gate_up_proj"])["model.layers.0.mlp.experts.gate_up_proj"]
    blocks = sd["model.layers.0.mlp.experts.gate_up_proj_blocks"]
    e, h, two_i = dense.shape
    assert blocks.shape == (e, two_i, h // 32, 16)
    back = dequantize_mxfp4(blocks, sd["model.layers.0.mlp.experts.gate_up_proj_scales"])
    rel = (back - dense.float().transpose(1, 2)).norm() / dense.float().norm()
    assert rel < 0.15  # E2M1: ~3 bits of mantissa


def test_quantized_at_load_serves_exactly_like_the_same_weights_quantized_on_disk(dense_checkpoint, tmp_path,
                                                                                   make_engine):
    """Two paths to the same MXFP4 weights: quantize while loading, or write an MXFP4 checkpoint
    and load that. Same logprobs, token for token; and not the dense model's."""
    from safetensors.torch import save_file

    ckpt = open_checkpoint(dense_checkpoint)
    sd, cfg = read_quantized(ckpt, torch.device("cpu"))
    disk = tmp_path / "mxfp4"
    write_checkpoint(disk, cfg, seed=3)  # config.json, generation_config.json, then our tensors
    for f in disk.glob("model*.safetensors*"):
        f.unlink()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(disk / "model.safetensors"), metadata={"format": "pt"})

    prompt = "東京の一日観光プランを作ってください。"
    runs = {}
    for name, path, quantize in (("load", dense_checkpoint, True), ("disk", disk, None),
                                 ("dense", dense_checkpoint, False)):
        engine = make_engine(path, quantize_dense_experts=quantize)
        s = stream(prompt, model=engine, temperature=0, max_tokens=12, logprobs=True)
        runs[name] = [(ev.token_id, ev.logprob) for ev in s if ev.token_id is not None]
    assert runs["load"] == runs["disk"]
    assert runs["load"] != runs["dense"]
