"""Router, grouping, the kernels' MXFP4 layout and the expert kernels against the torch reference."""

from __future__ import annotations

import pytest
import torch

from swallow_stream.ops import reference, triton_ops
from swallow_stream.ops.mxfp4 import dequantize_mxfp4
from swallow_stream.ops.reference import ExpertWeights

from swallow_kernels._common import _TICKETS
from swallow_kernels.moe import experts, group_by_expert, launch_config, moe, pack_experts, route, route_group
from swallow_kernels.mxfp4 import pack_mxfp4, scale_pad, unpack_mxfp4

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


def packed(w: ExpertWeights):
    return pack_experts(w.gate_up_blocks, w.gate_up_scales, w.gate_up_bias, w.down_blocks, w.down_scales, w.down_bias)


def moe_experts(x, rw, ids, w: ExpertWeights, limit, config=None):
    return experts(x, rw, ids, packed(w), limit, config=config)


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
    # e > 16 splits the experts over programs; the last one of a token block (ticket) takes the
    # top-k and leaves the tickets zero for the next launch (CUDA-graph replays reuse them)
    assert not _TICKETS.get(x.device, 0, "route").any()
    assert torch.equal(route(x, wt, b, k)[1], ids)


def test_route_nan_and_inf_logits_give_in_range_distinct_experts(device):
    """A NaN logit ranks lowest and +-inf clamp to finite: ids stay < E and distinct, weights finite."""
    t, h, e, k = 4, 32, 8, 4
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(3)).to(device)
    wt = torch.zeros(e, h, device=device)
    b = torch.arange(e, dtype=torch.float32, device=device)  # logits = expert id (+ the poison below)
    b_rows = b.expand(t, e).clone()
    b_rows[0, 7] = float("nan")  # the best expert is NaN: the next four win
    b_rows[1, :] = float("nan")  # all NaN
    b_rows[2, 3] = float("inf")
    b_rows[3, 5] = float("-inf")
    for row in range(t):  # one row at a time: the bias carries the row's poison
        weights, ids = route(x[row : row + 1], wt, b_rows[row], k)
        w_ref, ids_ref = reference.route(x[row : row + 1], wt, b_rows[row], k)
        assert ((ids >= 0) & (ids < e)).all() and len(set(ids[0].tolist())) == k, ids
        assert torch.isfinite(weights).all() and torch.allclose(weights.sum(-1).cpu(), torch.ones(1))
        if row != 1:  # all-NaN: ties everywhere, any k distinct experts are right
            assert torch.equal(ids, ids_ref), (row, ids, ids_ref)
            assert torch.allclose(weights, w_ref, atol=1e-6)
    _, ids = route(x[1:2], wt, b_rows[1], k)
    assert ids[0].tolist() == [0, 1, 2, 3]  # ties -> lowest ids, in order


def check_grouping(ids: torch.Tensor, groups, e: int, block_m: int) -> None:
    """sorted pairs are a permutation grouped by expert (stable); the valid tiles come first, one
    expert each, at most block_m rows, and cover every sorted row once."""
    sorted_pairs, tile_e, tile_row, tile_len = (a.cpu() for a in groups)
    p = ids.numel()
    flat = ids.reshape(-1).cpu()
    assert sorted(sorted_pairs.tolist()) == list(range(p))  # a permutation
    assert torch.equal(flat[sorted_pairs.long()], flat.sort(stable=True).values)  # grouped by expert
    assert torch.equal(sorted_pairs.long(), flat.sort(stable=True).indices)  # pair order within an expert
    valid = tile_e >= 0
    n = int(valid.sum())
    assert valid[:n].all() and not valid[n:].any()
    counts = torch.bincount(flat.long(), minlength=e)
    assert n == int(((counts + block_m - 1) // block_m).sum())
    covered = torch.zeros(p, dtype=torch.int32)
    for ex, r0, ln in zip(tile_e[:n].tolist(), tile_row[:n].tolist(), tile_len[:n].tolist()):
        assert 0 < ln <= block_m
        assert (flat[sorted_pairs[r0 : r0 + ln].long()] == ex).all()
        covered[r0 : r0 + ln] += 1
    assert (covered == 1).all()


@pytest.mark.parametrize("t,k,e,block_m", [(1, 4, 32, 16), (70, 4, 8, 16), (300, 2, 16, 64)])
def test_group_by_expert(device, t, k, e, block_m):
    _, ids = uneven_routing(t, k, e, seed=t, device=device)
    check_grouping(ids, group_by_expert(ids, e, block_m), e, block_m)


def router_case(t, h, e, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(t, h, generator=g) * 3).to(device, dtype)  # a residual stream: not unit rms
    nw = (1 + 0.3 * torch.randn(h, generator=g)).to(device)
    wt = (torch.randn(e, h, generator=g) * 2 / h**0.5).to(device, dtype)
    b = (torch.randn(e, generator=g) * 0.5).to(device, dtype)
    return x, nw, wt, b


# Decode buckets at scaled-down shapes: one expert chunk (E=8), 2 and 8 chunks a token block
# (E=32, 128), several token blocks (T > 16: the last block to finish groups), an H tail.
ROUTE_GROUP_CASES = [(1, 96, 32, 4), (2, 64, 8, 2), (8, 160, 128, 4), (32, 64, 32, 4), (128, 96, 128, 4)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,h,e,k", ROUTE_GROUP_CASES)
def test_route_group_matches_norm_route_and_group(device, assert_close, dtype, t, h, e, k):
    """One launch: rms_norm + route + group_by_expert, against the torch reference norm and router
    (the router on the kernel's own normed rows, so ids compare exactly) and the grouping checks."""
    x, nw, wt, b = router_case(t, h, e, dtype, device, seed=t + e)
    hn, weights, ids, groups = route_group(x, nw, 1e-5, wt, b, k)
    assert_close(hn, reference.rms_norm(x, nw, 1e-5)[0], dtype)
    w_ref, ids_ref = reference.route(hn, wt, b, k)
    assert torch.equal(ids, ids_ref)
    assert_close(weights, w_ref, torch.float32, scale=10)
    check_grouping(ids, groups, e, launch_config(t, k, e)["BLOCK_M"])
    assert not _TICKETS.get(x.device, 0, "route_group").any()  # every ticket reset for the next launch / graph replay
    assert torch.equal(route_group(x, nw, 1e-5, wt, b, k)[2], ids)


@pytest.mark.parametrize("t", [3, 40])
def test_route_group_nan_and_inf_logits(device, t):
    """Poisoned logits (a NaN and +-inf router bias, an all-NaN token row): ids stay in range and
    distinct, weights finite, the grouping valid; rows that are not all NaN match the reference."""
    h, e, k = 32, 32, 4
    x, nw, wt, b = router_case(t, h, e, torch.float32, device, seed=11)
    b[7], b[3], b[5] = float("nan"), float("inf"), float("-inf")
    x[1] = float("nan")  # every logit of token 1 is NaN
    hn, weights, ids, groups = route_group(x, nw, 1e-5, wt, b, k)
    assert ((ids >= 0) & (ids < e)).all() and all(len(set(r)) == k for r in ids.tolist()), ids
    assert torch.isfinite(weights).all() and torch.allclose(weights.sum(-1).cpu(), torch.ones(t))
    w_ref, ids_ref = reference.route(hn, wt, b, k)
    rows = [r for r in range(t) if r != 1]
    assert torch.equal(ids[rows], ids_ref[rows])
    assert (ids[rows, 0] == 3).all() and not (ids == 7).any()  # +inf always first, NaN never
    assert ids[1].tolist() == [0, 1, 2, 3]  # all NaN: ties -> lowest ids
    check_grouping(ids, groups, e, launch_config(t, k, e)["BLOCK_M"])


def test_pack_mxfp4_roundtrip_and_layout():
    """The kernels' layout holds exactly the HF values: same bytes, 16-byte aligned scale rows."""
    w = mxfp4_experts(3, 160, 64, "cpu", seed=4)
    words, scales = pack_mxfp4(w.down_blocks, w.down_scales)
    assert words.dtype == torch.int32 and words.shape == (3, 160, 64 // 8)
    assert words.numel() * 4 == w.down_blocks.numel()
    assert scales.shape == (3, 160, scale_pad(64)) and scales.shape[-1] % 16 == 0
    assert torch.equal(unpack_mxfp4(words, scales), dequantize_mxfp4(w.down_blocks, w.down_scales))
    pk = packed(w)  # gate/up de-interleaved
    gu = dequantize_mxfp4(w.gate_up_blocks, w.gate_up_scales)
    assert torch.equal(unpack_mxfp4(pk.gate_up_words[:, 0], pk.gate_up_scales[:, 0]), gu[:, 0::2])
    assert torch.equal(unpack_mxfp4(pk.gate_up_words[:, 1], pk.gate_up_scales[:, 1]), gu[:, 1::2])


def test_dequant_covers_every_code_and_scale_range(device):
    """All 16 E2M1 codes at the extreme scales of the documented exact range (65, 191) and 127,
    through the kernel's dequant (an expert whose down_proj is the identity pattern)."""
    e, h, inter = 1, 32, 32
    g = torch.Generator().manual_seed(0)
    w = mxfp4_experts(e, h, inter, "cpu", seed=1)
    codes = torch.arange(16, dtype=torch.uint8).repeat(2)  # 32 values: every code twice
    row = (codes[0::2] | (codes[1::2] << 4)).view(1, 16)
    w.down_blocks[:] = row
    for s in (65, 127, 191):
        w.down_scales[:] = s
        w.gate_up_scales[:] = 120
        x = torch.randn(1, h, generator=g)
        rw, ids = torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.int32)
        out = moe_experts(x.to(device), rw.to(device), ids.to(device), _to(w, device), 7.0)
        ref = reference.experts(x, rw, ids, w, 7.0)
        assert torch.allclose(out.cpu(), ref, rtol=1e-5, atol=1e-30 if s < 100 else 1e-6), s


def _to(w: ExpertWeights, device) -> ExpertWeights:
    return ExpertWeights(**{f: (getattr(w, f).to(device) if isinstance(getattr(w, f), torch.Tensor) else getattr(w, f))
                            for f in ("gate_up_bias", "down_bias", "gate_up_blocks", "gate_up_scales", "down_blocks", "down_scales")})


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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,k,e,h,inter", [(1, 4, 32, 96, 64), (8, 2, 8, 64, 96), (40, 4, 16, 96, 64)])
def test_moe_decode_block_matches_reference(device, assert_close, dtype, t, k, e, h, inter):
    """The decode MoE block in three launches (route_group, gate_up, down) against the reference
    experts on route_group's normed rows and routing (themselves checked against the reference
    above: the interpreter truncates fp32 -> bf16, so bf16 rows of a reference norm differ by an
    ulp and may flip a near-tie expert)."""
    w = mxfp4_experts(e, h, inter, device, seed=t)
    x, nw, wt, b = router_case(t, h, e, dtype, device, seed=t)
    y, ids = moe(x, nw, 1e-5, wt, b, k, packed(w), 7.0)
    hn, rw, ids_rg, _ = route_group(x, nw, 1e-5, wt, b, k)
    assert torch.equal(ids, ids_rg)
    if dtype == torch.float32:
        assert torch.equal(ids, reference.route(reference.rms_norm(x, nw, 1e-5)[0], wt, b, k)[1])
    assert y.dtype == torch.float32 and y.shape == (t, k, h)
    assert_close(y, reference.experts_partial(hn, rw, ids, w, 7.0), dtype, scale=2)


def test_experts_clamp_active(device, assert_close):
    """Large activations drive gates and ups past the SwiGLU limit: the clamp is exercised."""
    w = mxfp4_experts(4, 64, 32, device, seed=5)
    w.gate_up_bias += 12.0
    rw, ids = uneven_routing(3, 2, 4, seed=2, device=device)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(9)).to(device) * 4
    assert_close(moe_experts(x, rw, ids, w, 7.0), reference.experts(x, rw, ids, w, 7.0), torch.float32)


def dense_experts_by_hand(x, rw, ids, w: ExpertWeights, limit):
    """gpt-oss expert math, one token and one chosen expert at a time: gate_up rows interleaved
    (even = gate, odd = up), gate clamped above and up to [-limit, limit],
    gate * sigmoid(1.702 * gate) * (up + 1), down projection, bias added before the routing weight."""
    out = torch.zeros(x.shape[0], w.down.shape[-1], dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = x[t].double() @ w.gate_up[e].double() + w.gate_up_bias[e].double()
            gate, up = h[0::2].clamp(max=limit), h[1::2].clamp(-limit, limit)
            act = gate * torch.sigmoid(1.702 * gate) * (up + 1)
            out[t] += float(rw[t, j]) * (act @ w.down[e].double() + w.down_bias[e].double())
    return out


def test_experts_dense_weights_fall_back(device, assert_close):
    """Dense (bf16 or fp32) experts on the Triton op set run the torch path; both are checked
    against the expert math written out, on activations large enough to hit both clamps."""
    g = torch.Generator().manual_seed(0)
    w = ExpertWeights(gate_up_bias=torch.randn(4, 64, generator=g).to(device), down_bias=torch.randn(4, 32, generator=g).to(device),
                      gate_up=torch.randn(4, 32, 64, generator=g).to(device), down=torch.randn(4, 32, 32, generator=g).to(device))
    rw, ids = uneven_routing(3, 2, 4, seed=1, device=device)
    x = torch.randn(3, 32, generator=g).to(device)
    cpu_w = ExpertWeights(**{f: getattr(w, f).cpu() for f in ("gate_up_bias", "down_bias", "gate_up", "down")})
    want = dense_experts_by_hand(x.cpu(), rw.cpu(), ids.cpu(), cpu_w, 7.0).float()
    got_triton = triton_ops().experts(x, rw, ids, w, 7.0)
    got_torch = reference.experts(x, rw, ids, w, 7.0)
    assert_close(got_triton.cpu(), want, torch.float32)
    assert_close(got_torch.cpu(), want, torch.float32)
    # the clamps were exercised: some gate/up values lie outside [-7, 7] before clamping
    h = torch.einsum("th,thk->tk", x.cpu(), w.gate_up.cpu()[ids.cpu()[:, 0]]) + w.gate_up_bias.cpu()[ids.cpu()[:, 0]]
    assert (h.abs() > 7).any()


def test_opset_packs_experts_once(device, assert_close):
    """The Triton OpSet repacks at prepare time and reuses the packed layout; on CUDA it drops the
    HF copy (one copy of the experts in GPU memory)."""
    ops = triton_ops()
    w = mxfp4_experts(4, 64, 32, device, seed=2)
    ref_w = _to(w, device)
    ops.prepare_experts(w)
    first = w.packed
    assert first is not None and w.quantized
    assert (w.gate_up_blocks is None) == (device.type == "cuda")
    rw, ids = uneven_routing(3, 2, 4, seed=1, device=device)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1)).to(device)
    assert_close(ops.experts(x, rw, ids, w, 7.0), reference.experts(x, rw, ids, ref_w, 7.0), torch.float32)
    assert w.packed is first


def test_tiles_follow_tokens_per_expert():
    """The token tile is T*k/E rounded up to a power of two, 16..64: decode buckets at the 120B
    shape (E=128, k=4) stay at 16, a 2k prefill fills 64."""
    for t in (1, 8, 64, 128):
        assert launch_config(t, 4, 128)["BLOCK_M"] == 16
    assert launch_config(256, 4, 32)["BLOCK_M"] == 32
    assert launch_config(2048, 4, 128)["BLOCK_M"] == 64
    assert launch_config(2048, 4, 32)["BLOCK_M"] == 64


def test_experts_reject_bad_input(device):
    w = packed(mxfp4_experts(4, 64, 32, device))
    rw, ids = uneven_routing(2, 2, 4, seed=0, device=device)
    x = torch.randn(2, 64, device=device)
    with pytest.raises(ValueError, match="expert_ids"):
        experts(x, rw, ids.long(), w, 7.0)
    with pytest.raises(ValueError, match="gate_up_words"):
        experts(torch.randn(2, 96, device=device), rw, ids, w, 7.0)
    with pytest.raises(ValueError, match="MoEWeights"):
        experts(x, rw, ids, mxfp4_experts(4, 64, 32, device), 7.0)


@pytest.mark.parametrize("t,dense", [(3, False), (130, False), (3, True)])
def test_opset_moe_block_matches_torch_opset(device, assert_close, t, dense):
    """The OpSet's `moe` on both sets: decode (fused launches), prefill (T > 128: rms_norm, route,
    group, matmuls) and dense experts (the torch expert path after the Triton norm and router)."""
    from swallow_stream.ops import TORCH_OPS

    e, h, inter, k = 8, 64, 32, 2
    if dense:
        g = torch.Generator().manual_seed(0)
        w = ExpertWeights(gate_up_bias=torch.randn(e, 2 * inter, generator=g).to(device),
                          down_bias=torch.randn(e, h, generator=g).to(device),
                          gate_up=(torch.randn(e, h, 2 * inter, generator=g) / 8).to(device),
                          down=(torch.randn(e, inter, h, generator=g) / 8).to(device))
        w_ref = w
    else:
        w = mxfp4_experts(e, h, inter, device, seed=t)
        w_ref = _to(w, device)
    x, nw, wt, b = router_case(t, h, e, torch.float32, device, seed=t)
    y, ids = triton_ops().moe(x, nw, 1e-5, wt, b, k, w, 7.0)
    y_ref, ids_ref = TORCH_OPS.moe(x, nw, 1e-5, wt, b, k, w_ref, 7.0)
    assert torch.equal(ids, ids_ref)
    assert_close(y, y_ref, torch.float32, scale=2)


def test_ticket_buffers_outlive_their_replacement():
    """A larger request replaces a ticket buffer but never frees the old one: a CUDA graph
    captured with it still writes there."""
    from swallow_kernels import _common

    pool = _common._Tickets()
    first = pool.get(torch.device("cpu"), 8, "test")
    assert pool.get(torch.device("cpu"), 1000, "test") is first  # big enough: reused
    second = pool.get(torch.device("cpu"), 4096, "test")
    assert second is not first and second.numel() >= 4096 and not second.any()
    assert any(b is first for b in pool._retired)
