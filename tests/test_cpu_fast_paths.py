"""The CPU's fast paths compute what the plain forms compute: the fp32 products by row count (a
batch of GEMVs over weight row chunks for one row, W @ h^T for the unembedding's few rows) what
F.linear does at any output size; the dequantized experts (one token's experts in turn, a batch's
experts padded into two bmm, or one expert at a time) what each (token, expert) pair alone gives."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from swallow_stream.checkpoint.synthetic import preset, random_state_dict
from swallow_stream.model import GptOss, ModelWeights
from swallow_stream.ops import TORCH_OPS, reference
from swallow_stream.ops.mxfp4 import dequantize_mxfp4


@pytest.mark.parametrize("out_features", [64, 72, 66, 9])  # chunked 16, 8 and 2 ways, not at all
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_equals_f_linear(out_features, rows, bias):
    g = torch.Generator().manual_seed(out_features)
    x = torch.randn(rows, 40, generator=g)
    w = torch.randn(out_features, 40, generator=g)
    b = torch.randn(out_features, generator=g) if bias else None
    out = reference.linear(x, w, b)
    assert out.shape == (rows, out_features)
    torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_linear_one_row_of_a_strided_weight():
    w = torch.randn(40, 64).t()  # [64, 40], not contiguous: no chunked view of it exists
    x = torch.randn(1, 40)
    torch.testing.assert_close(reference.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("vocab", [512, 520, 513])  # chunked 16 ways, 8 ways, not at all
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 5])
def test_logits_equal_a_plain_linear(vocab, dtype, rows):
    cfg = preset("tiny", vocab_size=vocab)
    weights = ModelWeights.from_state_dict(cfg, random_state_dict(cfg, dtype=torch.float32, seed=vocab), "cpu", dtype)
    model = GptOss(cfg, weights, TORCH_OPS, max_positions=64)
    hidden = torch.randn(rows, cfg.hidden_size, generator=torch.Generator().manual_seed(rows)).to(dtype)
    out = model.logits(hidden)
    want = F.linear(hidden.float(), weights.lm_head.float())
    assert out.shape == (rows, vocab) and out.dtype == torch.float32
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, want, rtol=tol, atol=tol)
    if dtype == torch.float32:  # (bf16 rounds the logits themselves: near-ties may swap)
        assert torch.equal(out.argmax(-1), want.argmax(-1))


def mxfp4_experts(e: int, h: int, inter: int, seed: int) -> reference.ExpertWeights:
    g = torch.Generator().manual_seed(seed)

    def blocks(rows: int, cols: int):
        return (torch.randint(0, 256, (e, rows, cols // 32, 16), generator=g, dtype=torch.uint8),
                torch.randint(121, 127, (e, rows, cols // 32), generator=g, dtype=torch.uint8))

    (gub, gus), (db, ds) = blocks(2 * inter, h), blocks(h, inter)
    return reference.ExpertWeights(gate_up_bias=torch.randn(e, 2 * inter, generator=g),
                                   down_bias=torch.randn(e, h, generator=g), gate_up_blocks=gub, gate_up_scales=gus,
                                   down_blocks=db, down_scales=ds)


def pairwise_experts(x, expert_weights, expert_ids, w, limit, dtype):
    """Each (token, slot) pair alone: its expert dequantized, the products in dtype, fp32 epilogues."""
    t, k = expert_ids.shape
    out = torch.zeros(t, k, x.shape[1])
    for i in range(t):
        for j in range(k):
            e = int(expert_ids[i, j])
            gu = dequantize_mxfp4(w.gate_up_blocks[e], w.gate_up_scales[e], dtype)
            dn = dequantize_mxfp4(w.down_blocks[e], w.down_scales[e], dtype)
            a = reference.swiglu_clamped(F.linear(x[i : i + 1].to(dtype), gu).float() + w.gate_up_bias[e], limit)
            y = F.linear(a.to(dtype), dn).float() + w.down_bias[e]
            out[i, j] = expert_weights[i, j] * y[0]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t, k, routing, padded", [
    (1, 4, "random", False),  # one token: its experts in turn
    (1, 2, "random", False),
    (3, 2, "random", False),  # 6 of 16 experts chosen at most: one expert at a time
    (6, 4, "random", True),  # most experts chosen: padded into [E, N, H]
    (16, 4, "random", True),
    (40, 4, "random", True),
    (16, 2, "skewed", False),  # every token on expert 3: 8x the products padded; one expert at a time
])
def test_dequantized_experts_match_each_pair_alone(monkeypatch, dtype, t, k, routing, padded):
    e, h, inter, limit = 16, 64, 32, 7.0
    w = mxfp4_experts(e, h, inter, seed=t)
    g = torch.Generator().manual_seed(100 + t)
    x = torch.randn(t, h, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    if routing == "skewed":
        ids[:, 0] = 3
        ids[:, 1:] = torch.stack([torch.randperm(e - 1, generator=g)[: k - 1] for _ in range(t)])
        ids[:, 1:] += (ids[:, 1:] >= 3).long()
    ids = ids.int()
    weights = torch.softmax(torch.randn(t, k, generator=g), -1)
    want = pairwise_experts(x, weights, ids, w, limit, dtype)
    w.materialize(dtype)
    calls = []
    real = reference._experts_padded
    monkeypatch.setattr(reference, "_experts_padded", lambda *a: calls.append(1) or real(*a))
    out = reference.experts_partial(x, weights, ids, w, limit)
    assert out.shape == (t, k, h) and out.dtype == torch.float32
    assert bool(calls) == padded
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, want, rtol=tol, atol=tol)
