"""The fused attention-side kernels of a decode layer (swallow_kernels.layer: attn_in, attn_out)
against the torch compositions of the reference ops (swallow_stream.ops.fused)."""

from __future__ import annotations

import pytest
import torch

from swallow_stream.ops import fused

from swallow_kernels import layer

DTYPES = [torch.float32, torch.bfloat16]
DECODE_TS = [1, 2, 8, 40, 128]  # decode buckets and a bucket-padded T (40: 3 token tiles)


def rope_tables(max_pos: int, d: int):
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv[None, :]
    return ang.cos() * 1.1, ang.sin() * 1.1


def attn_in_case(t, h, hq, hk, d, dtype, device, residual_kind, seed):
    g = torch.Generator().manual_seed(seed)
    n_out = (hq + 2 * hk) * d
    if residual_kind == "partials":  # the previous layer's MoE output, fp32 [T, 4, H]
        x = torch.randn(t, 4, h, generator=g)
    else:
        x = torch.randn(t, h, generator=g).to(dtype)
    residual = None if residual_kind == "none" else (torch.randn(t, h, generator=g) * 2).to(dtype)
    nw = 1 + 0.2 * torch.randn(h, generator=g)
    w = (torch.randn(n_out, h, generator=g) / h**0.5).to(dtype)
    b = (torch.randn(n_out, generator=g) * 0.1).to(dtype)
    pos = torch.randint(0, 60, (t,), generator=g)
    nb, bs = t + 2, 2
    slots = torch.randperm(nb * bs, generator=g)[:t]
    slots[:: 3] = -1  # some tokens are not stored
    cos, sin = rope_tables(64, d)
    caches = [torch.zeros(nb, bs, hk, d, dtype=dtype) for _ in range(4)]
    to = lambda a: None if a is None else a.to(device)  # noqa: E731
    return (to(x), to(residual), to(nw), to(w), to(b), to(pos), to(cos), to(sin), to(slots)), [c.to(device) for c in caches]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", DECODE_TS)
@pytest.mark.parametrize("residual_kind", ["partials", "stream", "none"])
@pytest.mark.parametrize("h,hq,hk,d", [(128, 8, 2, 16), (96, 4, 1, 32)])  # GQA 4:1; H tail (96 = 64 + 32)
def test_attn_in_matches_reference(device, assert_close, dtype, t, residual_kind, h, hq, hk, d):
    (x, res, nw, w, b, pos, cos, sin, slots), caches = attn_in_case(t, h, hq, hk, d, dtype, device, residual_kind, seed=t + h)
    q, r = layer.attn_in(x, res, nw, 1e-5, w, b, pos, cos, sin, caches[0], caches[1], slots, hq, hk)
    q_ref, r_ref = fused.attn_in(x, res, nw, 1e-5, w, b, pos, cos, sin, caches[2], caches[3], slots, hq, hk)
    assert q.shape == (t, hq, d) and q.dtype == dtype and r.dtype == dtype
    assert_close(q, q_ref, dtype, scale=2)
    assert_close(caches[0], caches[2], dtype, scale=2)  # rotated k at the stored slots, zero elsewhere
    assert_close(caches[1], caches[3], dtype, scale=2)
    assert torch.equal(caches[0] == 0, caches[2] == 0)
    if residual_kind == "none":
        assert r is x
    else:
        assert_close(r, r_ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", DECODE_TS)
@pytest.mark.parametrize("h,hq,d", [(96, 8, 16), (80, 6, 16)])  # K = 128 (even steps); K = 96 and H = 80 (tails)
def test_attn_out_matches_reference(device, assert_close, dtype, t, h, hq, d):
    g = torch.Generator().manual_seed(t + h)
    o = torch.randn(t, hq, d, generator=g).to(device, dtype)
    w = (torch.randn(h, hq * d, generator=g) / (hq * d) ** 0.5).to(device, dtype)
    b = (torch.randn(h, generator=g) * 0.1).to(device, dtype)
    res = (torch.randn(t, h, generator=g) * 2).to(device, dtype)
    out = layer.attn_out(o, w, b, res)
    assert out.shape == (t, h) and out.dtype == dtype
    assert_close(out, fused.attn_out(o, w, b, res), dtype)


def test_prefill_keeps_the_unfused_path(device, assert_close):
    """T > DECODE_MAX_TOKENS: rms_norm + GEMM + rope_store_kv (same results)."""
    t = layer.DECODE_MAX_TOKENS + 3
    (x, res, nw, w, b, pos, cos, sin, slots), caches = attn_in_case(t, 32, 2, 1, 8, torch.float32, device, "partials", seed=1)
    q, r = layer.attn_in(x, res, nw, 1e-5, w, b, pos, cos, sin, caches[0], caches[1], slots, 2, 1)
    q_ref, r_ref = fused.attn_in(x, res, nw, 1e-5, w, b, pos, cos, sin, caches[2], caches[3], slots, 2, 1)
    assert_close(q, q_ref, torch.float32)
    assert_close(r, r_ref, torch.float32)
    assert_close(caches[0], caches[2], torch.float32)
