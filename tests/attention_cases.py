"""Paged-attention batches shared by the kernel tests and the torch-op tests.

Block tables are random permutations of cache blocks; sliding-window layers mark the blocks they
dropped with -1. The cache handed out is a view that starts one block into a buffer whose first
block is NaN: reading a -1 entry would pull NaN into the output.
"""

from __future__ import annotations

import torch


def make_batch(q_lens, seq_lens, hq, hk, d, bs, window, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    nblk = [-(-s // bs) for s in seq_lens]
    max_blocks = max(nblk) + 1  # one spare column: entries past a sequence's end are never read
    num_blocks = sum(nblk) + 2
    storage_k = torch.randn(num_blocks + 1, bs, hk, d, generator=g).to(dtype)
    storage_v = torch.randn(num_blocks + 1, bs, hk, d, generator=g).to(dtype)
    storage_k[0] = float("nan")
    storage_v[0] = float("nan")
    storage_k, storage_v = storage_k.to(device), storage_v.to(device)
    k_cache, v_cache = storage_k[1:], storage_v[1:]
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.full((len(seq_lens), max_blocks), -1, dtype=torch.int32)
    for b, (ql, sl) in enumerate(zip(q_lens, seq_lens)):
        first_q = sl - ql
        for j in range(nblk[b]):
            dropped = window and (j + 1) * bs <= first_q - window + 1
            tables[b, j] = -1 if dropped else perm.pop()
    qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    t = int(qsl[-1])
    q = torch.randn(t, hq, d, generator=g).to(device, dtype)
    sinks = torch.randn(hq, generator=g).to(device)
    return (q, k_cache, v_cache, tables.to(device), torch.tensor(seq_lens, dtype=torch.int32, device=device),
            qsl.to(device), sinks)


CASES = {
    # name: (q_lens, seq_lens)
    "prefill": ([5, 37], [5, 37]),
    "chunked-prefill": ([20, 3], [50, 90]),
    "decode": ([1, 1, 1], [1, 17, 150]),
    "mixed": ([1, 30, 1], [40, 30, 9]),
}
