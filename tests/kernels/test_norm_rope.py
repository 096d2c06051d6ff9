"""Fused residual + RMSNorm (also over unreduced MoE partials), RoPE-YaRN, the KV-cache write and
the fused RoPE + KV write against the torch reference."""

from __future__ import annotations

import pytest
import torch

from swallow_stream.checkpoint.synthetic import preset
from swallow_stream.model import yarn_rope_tables
from swallow_stream.ops import reference

from swallow_kernels.attention import store_kv
from swallow_kernels.norm import rms_norm
from swallow_kernels.rope import rope, rope_store_kv

DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden", [(1, 64), (5, 200), (3, 2880)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(device, assert_close, dtype, tokens, hidden, with_residual):
    g = torch.Generator().manual_seed(tokens * hidden)
    x = (torch.randn(tokens, hidden, generator=g) * 3).to(device, dtype)
    res = (torch.randn(tokens, hidden, generator=g)).to(device, dtype) if with_residual else None
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(device)
    y, r = rms_norm(x, w, 1e-5, res)
    y_ref, r_ref = reference.rms_norm(x, w, 1e-5, res)
    assert y.dtype == dtype and r.dtype == dtype and y.shape == x.shape
    # The interpreter truncates fp32 -> bf16 where GPUs round to nearest: equal up to one ulp.
    assert_close(r, r_ref, dtype, scale=0.5)
    assert_close(y, y_ref, dtype)


def test_rms_norm_rejects_bad_input(device):
    x = torch.randn(2, 8, device=device)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(7, device=device), 1e-5)
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, torch.ones(8, device=device), 1e-5, torch.randn(3, 8, device=device))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hq,hk,d", [(1, 4, 2, 16), (7, 12, 4, 64), (3, 64, 8, 64)])
def test_rope_on_qkv_views(device, assert_close, dtype, tokens, hq, hk, d):
    """q and k are strided views of one fused qkv row, as in the model."""
    cfg = preset("tiny", head_dim=d)
    cos, sin = yarn_rope_tables(cfg, 5000, device)
    g = torch.Generator().manual_seed(tokens + hq)
    qkv = torch.randn(tokens, (hq + 2 * hk) * d, generator=g).to(device, dtype)
    q = qkv[:, : hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(tokens, hk, d)
    pos = torch.randint(0, 5000, (tokens,), generator=g).to(device)
    qo, ko = rope(q, k, pos, cos, sin)
    qr, kr = reference.rope(q, k, pos, cos, sin)
    assert qo.dtype == dtype and qo.shape == q.shape and ko.shape == k.shape
    assert_close(qo, qr, dtype)
    assert_close(ko, kr, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_skips_negative_slots(device, dtype):
    t, hk, d, nb, bs = 6, 3, 16, 5, 4
    g = torch.Generator().manual_seed(1)
    kv = torch.randn(t, 2 * hk * d, generator=g).to(device, dtype)
    k, v = kv[:, : hk * d].view(t, hk, d), kv[:, hk * d :].view(t, hk, d)
    slots = torch.tensor([3, -1, 17, 0, -1, 19], device=device)
    caches = [torch.full((nb, bs, hk, d), 7.0, dtype=dtype, device=device) for _ in range(4)]
    store_kv(k, v, caches[0], caches[1], slots)
    reference.store_kv(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_sums_moe_partials(device, assert_close, dtype):
    """x = fp32 [T, k, H] MoE partials: the k rows are summed (the MoE combine) before the
    residual add, with the same rounding as a combined [T, H] output."""
    g = torch.Generator().manual_seed(5)
    t, k, h = 3, 4, 200
    parts = torch.randn(t, k, h, generator=g).to(device)
    res = torch.randn(t, h, generator=g).to(device, dtype)
    w = (1 + 0.1 * torch.randn(h, generator=g)).to(device)
    y, r = rms_norm(parts, w, 1e-5, res)
    y_ref, r_ref = reference.rms_norm(parts, w, 1e-5, res)
    y2, r2 = reference.rms_norm(parts.sum(1).to(dtype), w, 1e-5, res)
    assert y.dtype == dtype and r.dtype == dtype and y.shape == (t, h)
    assert torch.equal(y_ref, y2) and torch.equal(r_ref, r2)
    assert_close(r, r_ref, dtype)  # two roundings to bf16 (sum, residual add): 2 interpreter ulps
    assert_close(y, y_ref, dtype)
    with pytest.raises(ValueError, match="residual"):
        rms_norm(parts, w, 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_store_kv_fused(device, assert_close, dtype):
    """One launch: rotated q out, rotated k and v into the cache at their slots (-1 skips)."""
    t, hq, hk, d, nb, bs = 6, 8, 2, 64, 5, 4
    cfg = preset("tiny", head_dim=d)
    cos, sin = yarn_rope_tables(cfg, 5000, device)
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(t, (hq + 2 * hk) * d, generator=g).to(device, dtype)
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(t, hk, d)
    v = qkv[:, (hq + hk) * d :].view(t, hk, d)
    pos = torch.randint(0, 5000, (t,), generator=g).to(device)
    slots = torch.tensor([3, -1, 17, 0, -1, 19], device=device)
    caches = [torch.full((nb, bs, hk, d), 7.0, dtype=dtype, device=device) for _ in range(4)]
    qo = rope_store_kv(q, k, v, pos, cos, sin, caches[0], caches[1], slots)
    qr = reference.rope_store_kv(q, k, v, pos, cos, sin, caches[2], caches[3], slots)
    assert qo.shape == q.shape and qo.dtype == dtype
    assert_close(qo, qr, dtype)
    assert_close(caches[0], caches[2], dtype)
    assert torch.equal(caches[1], caches[3])
    untouched = torch.ones(nb * bs, dtype=torch.bool)
    untouched[[3, 17, 0, 19]] = False
    assert (caches[0].view(nb * bs, -1)[untouched.to(device)] == 7.0).all()
