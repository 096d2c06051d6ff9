"""Router, grouping and the MXFP4 expert kernels against the torch reference."""

from __future__ import annotations

import pytest
import torch

from swallow_stream.ops import reference
from swallow_stream.ops.reference import ExpertWeights

from swallow_kernels.moe import group_by_expert, launch_config, moe_experts, route

DTYPES = [torch.float32, torch.bfloat16]


def mxfp4_experts(e: int, h: int, inter: int, device, seed: int = 0) -> ExpertWeights:
    g = torch.Generator().manual_seed(seed)

    def packed(out: int, inp: int, std_log2: int):
        blocks = torch.randint(0, 256, (e, out, inp // 32, 16), generator=g, dtype=torch.int32).to(torch.uint8)
        scales = (127 + std_log2 + torch.randint(-2, 3, (e, out, inp // 32), generator=g)).to(torch.uint8)
        return blocks.to(device), scales.to(device)

    gub, gus = packed(2 * inter, h, -5)
    db, ds = packed(h, inter, -6)
    return ExpertWeights(
        gate_up_bias=(torch.randn(e, 2 * inter, generator=g) * 0.5).to(device),
        down_bias=(torch.randn(e, h, generator=g) * 0.1).to(device),
        gate_up_blocks=gub, gate_up_scales=gus, down_blocks=db, down_scales=ds,
    )


def uneven_routing(t: int, k: int, e: int, seed: int, device):
    """Distinct experts per token, skewed towards low ids, never choosing experts 1 and e-2."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([i for i in range(e) if i not in (1, e - 2)])
    prio = torch.rand(t, len(allowed), generator=g) + torch.linspace(1.0, 0.0, len(allowed))
    ids = allowed[prio.topk(k, dim=-1).indices].to(torch.int32)
    w = torch.softmax(torch.randn(t, k, generator=g), dim=-1)
    return w.to(device), ids.to(device).contiguous()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,h,e,k", [(1, 64, 8, 2), (5, 96, 32, 4), (40, 160, 128, 4)])
def test_route(device, assert_close, dtype, t, h, e, k):
    g = torch.Generator().manual_seed(t + e)
    x = torch.randn(t, h, generator=g).to(device, dtype)
    wt = (torch.randn(e, h, generator=g) * 2 / h**0.5).to(device, dtype)
    b = (torch.randn(e, generator=g) * 0.5).to(device, dtype)
    weights, ids = route(x, wt, b, k)
    w_ref, ids_ref = reference.route(x, wt, b, k)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32 and ids.shape == (t, k)
    assert torch.equal(ids, ids_ref)
    assert_close(weights, w_ref, torch.float32, scale=10)


@pytest.mark.parametrize("t,k,e,block_m", [(1, 4, 32, 16), (70, 4, 8, 16), (300, 2, 16, 64)])
def test_group_by_expert(device, t, k, e, block_m):
    _, ids = uneven_routing(t, k, e, seed=t, device=device)
    sorted_pairs, tile_e, tile_row, tile_len = (a.cpu() for a in group_by_expert(ids, e, block_m))
    flat = ids.reshape(-1).cpu()
    assert sorted(sorted_pairs.tolist()) == list(range(t * k))  # a permutation
    assert torch.equal(flat[sorted_pairs.long()], flat.sort(stable=True).values)  # grouped by expert
    valid = tile_e >= 0
    n = int(valid.sum())
    assert valid[:n].all() and not valid[n:].any()
    counts = torch.bincount(flat.long(), minlength=e)
    assert n == int(((counts + block_m - 1) // block_m).sum())
    covered = torch.zeros(t * k, dtype=torch.int32)
    for ex, r0, ln in zip(tile_e[:n].tolist(), tile_row[:n].tolist(), tile_len[:n].tolist()):
        assert 0 < ln <= block_m
        assert (flat[sorted_pairs[r0 : r0 + ln].long()] == ex).all()
        covered[r0 : r0 + ln] += 1
    assert (covered == 1).all()


# (tokens, top_k, experts, hidden, intermediate, tile override)
MOE_CASES = [
    (1, 4, 32, 96, 64, None),  # decode, one token
    (6, 4, 8, 96, 64, {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64, "num_warps": 4}),  # K tail, 4 N-tiles
    (70, 4, 8, 64, 96, None),  # prefill tiling: several M-tiles per expert, N tail (96 = 64 + 32)
    (37, 2, 16, 96, 64, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 2}),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,k,e,h,inter,cfg", MOE_CASES)
def test_experts_match_reference(device, assert_close, dtype, t, k, e, h, inter, cfg):
    w = mxfp4_experts(e, h, inter, device, seed=t)
    rw, ids = uneven_routing(t, k, e, seed=t + 1, device=device)
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(t)).to(device, dtype)
    out = moe_experts(x, rw, ids, w, 7.0, config=cfg)
    ref = reference.experts(x, rw, ids, w, 7.0)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, ref, dtype, scale=2)


def test_experts_clamp_active(device, assert_close):
    """Large activations drive gates and ups past the SwiGLU limit: the clamp is exercised."""
    w = mxfp4_experts(4, 64, 32, device, seed=5)
    w.gate_up_bias += 12.0
    rw, ids = uneven_routing(3, 2, 4, seed=2, device=device)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(9)).to(device) * 4
    assert_close(moe_experts(x, rw, ids, w, 7.0), reference.experts(x, rw, ids, w, 7.0), torch.float32)


def test_experts_dense_weights_fall_back(device, assert_close):
    g = torch.Generator().manual_seed(0)
    w = ExpertWeights(gate_up_bias=torch.randn(4, 64, generator=g).to(device), down_bias=torch.randn(4, 32, generator=g).to(device),
                      gate_up=torch.randn(4, 32, 64, generator=g).to(device), down=torch.randn(4, 32, 32, generator=g).to(device))
    rw, ids = uneven_routing(3, 2, 4, seed=1, device=device)
    x = torch.randn(3, 32, generator=g).to(device)
    assert_close(moe_experts(x, rw, ids, w, 7.0), reference.experts(x, rw, ids, w, 7.0), torch.float32)


def test_decode_tile_covers_all_tokens_of_an_expert():
    """In decode an expert's weights are read once per step: one M-tile holds all its tokens."""
    for t in (1, 8, 33, 64):
        assert launch_config(t)["BLOCK_M"] >= t


def test_experts_reject_bad_input(device):
    w = mxfp4_experts(4, 64, 32, device)
    rw, ids = uneven_routing(2, 2, 4, seed=0, device=device)
    x = torch.randn(2, 64, device=device)
    with pytest.raises(ValueError, match="expert_ids"):
        moe_experts(x, rw, ids.long(), w, 7.0)
    with pytest.raises(ValueError, match="gate_up_blocks"):
        moe_experts(torch.randn(2, 96, device=device), rw, ids, w, 7.0)
