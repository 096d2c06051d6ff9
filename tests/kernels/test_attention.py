"""Paged attention (prefill varlen, decode with context splits) against the torch reference.

Block tables are random permutations of cache blocks; sliding-window layers mark the blocks they
dropped with -1. The cache handed to the kernel is a view that starts one block into a buffer
whose first block is NaN: reading a -1 entry would pull NaN into the output.
"""

from __future__ import annotations

import pytest
import torch

from swallow_stream.ops import reference

from swallow_kernels._common import _TICKETS
from swallow_kernels.attention import paged_attention

from attention_cases import CASES, make_batch

DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("window", [0, 24])
@pytest.mark.parametrize("hq,hk,d,bs", [(4, 2, 16, 16), (8, 1, 32, 4)])
def test_attention_matches_reference(device, assert_close, dtype, case, window, hq, hk, d, bs):
    q_lens, seq_lens = CASES[case]
    args = make_batch(q_lens, seq_lens, hq, hk, d, bs, window, dtype, device, seed=len(case) + window)
    scale = d ** -0.5
    ref = reference.attention(*args, window, scale)
    out = paged_attention(*args, window, scale)
    assert out.dtype == dtype and out.shape == args[0].shape
    assert not out.isnan().any(), "a dropped (-1) block was read"
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("num_splits,block_q", [(3, None), (5, 2), (1, 1)])
def test_attention_tilings_agree(device, assert_close, num_splits, block_q):
    """Forced context splits (flash-decoding) and small query tiles give the same result. The last
    split program of a tile merges the splits (no combine launch) and leaves its ticket zero."""
    q_lens, seq_lens = [1, 1, 9], [70, 3, 100]
    for window in (0, 16):
        args = make_batch(q_lens, seq_lens, 4, 2, 16, 8, window, torch.float32, device, seed=7)
        ref = reference.attention(*args, window, 0.25)
        out = paged_attention(*args, window, 0.25, num_splits=num_splits, block_q=block_q)
        assert_close(out, ref, torch.float32)
        if num_splits > 1:
            assert not _TICKETS.get(device, 0, "attention").any()


def test_attention_real_head_layout(device, assert_close):
    """gpt-oss heads: 64 q / 8 kv / head_dim 64, block_size 16, decode over a long context."""
    args = make_batch([1, 1], [300, 40], 64, 8, 64, 16, 128, torch.bfloat16, device, seed=3)
    ref = reference.attention(*args, 128, 0.125)
    assert_close(paged_attention(*args, 128, 0.125), ref, torch.bfloat16)


def test_attention_rejects_bad_input(device):
    args = list(make_batch([2], [2], 4, 2, 16, 16, 0, torch.float32, device))
    bad = list(args)
    bad[3] = args[3].long()
    with pytest.raises(ValueError, match="block_tables"):
        paged_attention(*bad, 0, 0.25)
    bad = list(args)
    bad[1] = args[1].to(torch.bfloat16)
    with pytest.raises(ValueError, match="dtype"):
        paged_attention(*bad, 0, 0.25)
