"""Paged attention with learned sinks and sliding windows, and the KV-cache write.

One kernel serves prefill and decode. A program owns one tile of BLOCK_Q query tokens of one
sequence times the G query heads that share one KV head (GQA packed into the M dimension:
M = BLOCK_Q * next_pow2(G) rows, so K/V are read once for the whole group and never repeated).
It walks the sequence's KV tiles through the block table, with an online softmax whose state
starts from the head's sink logit. Tiles wholly outside the causal range or the sliding window
are not visited. For decode the KV range may be split over NUM_SPLITS programs (flash-decoding):
each writes its partial (max, sum, acc), and the last of them to finish (a ticket per tile and KV
head, `last_to_arrive`) merges them: no combine launch of its own (issue #10: <= 6 launches a
decode layer).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (ACT_DTYPES, cdiv, check, check_device, check_dtype, check_shape, last_to_arrive, mma, next_pow2, num_sms,
                      tickets)

LOG2E = 1.4426950408889634


@triton.jit
def store_kv_kernel(
    k_ptr, v_ptr,  # [T, HK, D] (token/head strides free)
    k_cache_ptr, v_cache_ptr,  # [num_blocks * block_size, HK, D] contiguous
    slot_ptr,  # [T] flat slot, -1 = skip
    stride_kt, stride_kh, stride_vt, stride_vh,
    HK, D,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < HK) & (d < D)
        dst = slot * (HK * D) + h * D + d
        k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
        v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
        tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write k, v [T, Hk, D] into caches [num_blocks, block_size, Hk, D] at flat slots; -1 skips."""
    check_device(k, v, k_cache, v_cache, slot_mapping)
    check(k.dim() == 3 and k.shape == v.shape, f"k, v must be equal [T, Hk, D], got {list(k.shape)}, {list(v.shape)}")
    t, hk, d = k.shape
    check_shape("k_cache", k_cache, (None, None, hk, d))
    check(v_cache.shape == k_cache.shape, "k_cache and v_cache shapes differ")
    check(k_cache.is_contiguous() and v_cache.is_contiguous(), "KV caches must be contiguous")
    check(k_cache.dtype == v_cache.dtype, "KV caches must share a dtype")
    check(k.stride(2) == 1 and v.stride(2) == 1, "k, v need a contiguous last axis")
    check(slot_mapping.shape == (t,) and not slot_mapping.is_floating_point(), "slot_mapping must be integer [T]")
    if t:
        store_kv_kernel[(t,)](
            k, v, k_cache, v_cache, slot_mapping,
            k.stride(0), k.stride(1), v.stride(0), v.stride(1), hk, d,
            BLOCK_H=next_pow2(hk), BLOCK_D=next_pow2(d), num_warps=1 if hk * d <= 1024 else 2,
        )


@triton.jit
def attn_kernel(
    q_ptr,  # [T, HQ, D] (token/head strides free)
    k_cache_ptr, v_cache_ptr,  # [num_blocks, BLOCK_SIZE, HK, D] contiguous
    block_tables_ptr,  # [B, max_blocks] int32, -1 = dropped block (never read)
    seq_lens_ptr,  # [B] context length after this step
    qsl_ptr,  # [B+1] query start offsets into T
    sinks_ptr,  # [HQ] fp32
    out_ptr,  # [T, HQ, D] when NUM_SPLITS == 1
    part_acc_ptr,  # [T, HQ, NUM_SPLITS, D] fp32 partial numerators when NUM_SPLITS > 1
    part_ml_ptr,  # [T, HQ, NUM_SPLITS, 2] fp32 partial (max, sum), log2 domain
    ticket_ptr,  # [tiles, HK] int32, zero between launches (NUM_SPLITS > 1)
    num_seqs,
    stride_qt, stride_qh,
    stride_bt,
    stride_ot, stride_oh,
    scale_log2,  # softmax scale * log2(e)
    window,  # 0 = full attention, else keys with pos - window < k <= pos
    HQ: tl.constexpr,
    HK: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    G_PAD: tl.constexpr,  # next_pow2(HQ // HK)
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    G: tl.constexpr = HQ // HK
    BLOCK_M: tl.constexpr = BLOCK_Q * G_PAD
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    # Sequence b owns tiles [qsl[b] // BLOCK_Q + b, qsl[b+1] // BLOCK_Q + b + 1): an upper bound
    # on its cdiv(q_len, BLOCK_Q) tiles computable without a host sync. Find b by bisection.
    lo = 0
    hi = num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        first = tl.load(qsl_ptr + mid) // BLOCK_Q + mid
        lo = tl.where(first <= tile, mid, lo)
        hi = tl.where(first <= tile, hi, mid - 1)
    b = lo
    q_begin = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_begin
    q0 = (tile - (q_begin // BLOCK_Q + b)) * BLOCK_Q
    if q0 >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    ctx = seq_len - q_len  # position of the sequence's first query

    r = tl.arange(0, BLOCK_M)
    qi = q0 + r // G_PAD  # [M] query index within the sequence
    g = r % G_PAD
    row_ok = (qi < q_len) & (g < G)
    head = kvh * G + g
    qpos = ctx + qi
    tok = (q_begin + qi).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    # Keys this tile can see: [k_lo, k_hi).
    k_hi = tl.minimum(ctx + q0 + BLOCK_Q, seq_len)
    k_lo = tl.where(window > 0, tl.maximum(ctx + q0 - window + 1, 0), 0)
    t_lo = k_lo // BLOCK_N
    t_hi = tl.cdiv(k_hi, BLOCK_N)
    per_split = tl.cdiv(t_hi - t_lo, NUM_SPLITS)
    s_lo = t_lo + split * per_split
    s_hi = tl.minimum(s_lo + per_split, t_hi)

    # Online softmax in the log2 domain; the sink is one more logit (unscaled, no value), counted
    # once: by split 0.
    sink = tl.load(sinks_ptr + head, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634
    m_i = tl.where(split == 0, sink, float("-inf"))
    l_i = tl.where(split == 0, 1.0, tl.zeros([BLOCK_M], tl.float32))
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    kv_head_off = kvh * D
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt
    for kt in range(s_lo, s_hi):
        kpos = kt * BLOCK_N + tl.arange(0, BLOCK_N)
        in_seq = kpos < seq_len
        blk = tl.load(bt_row + kpos // BLOCK_SIZE, mask=in_seq, other=-1)
        k_ok = in_seq & (blk >= 0)
        kv_off = (blk.to(tl.int64) * BLOCK_SIZE + kpos % BLOCK_SIZE) * (HK * D) + kv_head_off
        kt_tile = tl.load(k_cache_ptr + kv_off[None, :] + d[:, None],
                          mask=k_ok[None, :] & d_ok[:, None], other=0.0)  # [D, N]
        s = mma(q, kt_tile, tl.zeros([BLOCK_M, BLOCK_N], tl.float32)) * scale_log2  # [M, N]
        vis = k_ok[None, :] & (kpos[None, :] <= qpos[:, None])
        vis = vis & ((window == 0) | (kpos[None, :] > qpos[:, None] - window))
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache_ptr + kv_off[:, None] + d[None, :],
                    mask=k_ok[:, None] & d_ok[None, :], other=0.0)  # [N, D]
        acc = mma(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new

    if NUM_SPLITS == 1:
        o = acc / l_i[:, None]
        tl.store(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        base = (tok * HQ + head) * NUM_SPLITS  # [M]
        part = base + split
        tl.store(part_acc_ptr + part[:, None] * D + d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])
        tl.store(part_ml_ptr + part * 2, m_i, mask=row_ok)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_ok)
        ticket = ticket_ptr + tl.program_id(0) * HK + tl.program_id(1)
        if last_to_arrive(ticket, NUM_SPLITS, part):
            # Merge the splits' (max, sum, acc) of this program's rows, one split at a time; split
            # 0 holds the sink, so the max is finite on every real row.
            m_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
            for s_ in range(NUM_SPLITS):
                m_max = tl.maximum(m_max, tl.load(part_ml_ptr + (base + s_) * 2, mask=row_ok, other=0.0, cache_modifier=".cg"))
            denom = tl.zeros([BLOCK_M], tl.float32)
            o = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            for s_ in range(NUM_SPLITS):
                w_s = tl.exp2(tl.load(part_ml_ptr + (base + s_) * 2, mask=row_ok, other=0.0, cache_modifier=".cg") - m_max)
                denom += w_s * tl.load(part_ml_ptr + (base + s_) * 2 + 1, mask=row_ok, other=0.0, cache_modifier=".cg")
                a_s = tl.load(part_acc_ptr + (base + s_)[:, None] * D + d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                              other=0.0, cache_modifier=".cg")
                o += a_s * w_s[:, None]
            o = o / tl.where(row_ok, denom, 1.0)[:, None]
            tl.store(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                     o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
            tl.store(ticket, 0)


def launch_config(
    num_tokens: int, num_seqs: int, hq: int, hk: int, head_dim: int, max_context: int, window: int,
    sms: int, num_splits: int | None = None, block_q: int | None = None,
) -> dict:
    """Tile sizes and context splits. Decode (one query per sequence): M = 16 rows of (query,
    head) pairs and splits chosen to fill the SMs; otherwise 128-row tiles for tensor cores."""
    g_pad = next_pow2(hq // hk)
    decode = num_tokens == num_seqs
    if block_q is None:
        block_q = max(1, (16 if decode else 128) // g_pad)
    block_n = 64 if head_dim <= 128 else 32
    if num_splits is None:
        num_splits = 1
        if decode:
            span = min(max_context, window) if window else max_context
            max_tiles = max(1, cdiv(span, block_n) + 1)
            want = cdiv(2 * sms, max(1, num_seqs * hk))
            num_splits = max(1, min(want, max_tiles, 32))
    m = block_q * g_pad
    # Split decode tiles also merge the splits (their last program): ptxas's own choice of 64
    # registers then spilled 8 bytes on sm_90 (Triton 3.9), 96 still spilled under Triton 3.4; a
    # 128-register budget holds it everywhere (occupancy is not the limit: a decode grid is a few
    # hundred CTAs of 4 warps).
    extra = {"maxnreg": 128} if num_splits > 1 else {}
    return {
        "G_PAD": g_pad,
        "BLOCK_Q": block_q,
        "BLOCK_N": block_n,
        "NUM_SPLITS": num_splits,
        "BLOCK_D": next_pow2(head_dim),
        "num_warps": 8 if m >= 128 else 4,
        "num_stages": 2 if m >= 128 else 3,
        **extra,
    }


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    sinks: torch.Tensor,
    window: int,
    scale: float,
    *,
    num_splits: int | None = None,
    block_q: int | None = None,
) -> torch.Tensor:
    """`attention` with tuning overrides (tests use them to force context splits / tile sizes)."""
    check_device(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, sinks)
    check_dtype("q", q, ACT_DTYPES)
    check(q.dim() == 3 and q.stride(2) == 1, f"q must be [T, Hq, D] with a contiguous last axis, got {list(q.shape)}")
    t, hq, d = q.shape
    check(k_cache.dim() == 4 and k_cache.shape == v_cache.shape, "caches must be equal [num_blocks, block_size, Hk, D]")
    nb, bs, hk, dk = k_cache.shape
    check(dk == d, f"cache head_dim {dk} != q head_dim {d}")
    check(hq % hk == 0, f"q heads {hq} not a multiple of kv heads {hk}")
    check(k_cache.is_contiguous() and v_cache.is_contiguous(), "KV caches must be contiguous")
    check(k_cache.dtype == q.dtype and v_cache.dtype == q.dtype, f"KV cache dtype {k_cache.dtype} != q dtype {q.dtype}")
    check(block_tables.dim() == 2 and block_tables.dtype == torch.int32, "block_tables must be int32 [B, max_blocks]")
    check(block_tables.stride(1) == 1, "block_tables rows must be contiguous")
    bsz = block_tables.shape[0]
    check(seq_lens.shape == (bsz,) and seq_lens.dtype == torch.int32, f"seq_lens must be int32 [{bsz}]")
    check(query_start_loc.shape == (bsz + 1,) and query_start_loc.dtype == torch.int32, f"query_start_loc must be int32 [{bsz + 1}]")
    check_shape("sinks", sinks, (hq,))
    check(sinks.dtype == torch.float32 and sinks.is_contiguous(), "sinks must be contiguous fp32")
    check(window >= 0, f"window must be >= 0, got {window}")
    out = torch.empty((t, hq, d), dtype=q.dtype, device=q.device)
    if t == 0 or bsz == 0:
        return out
    cfg = launch_config(t, bsz, hq, hk, d, block_tables.shape[1] * bs, window, num_sms(q.device), num_splits, block_q)
    splits = cfg["NUM_SPLITS"]
    if splits > 1:
        part_acc = torch.empty((t, hq, splits, d), dtype=torch.float32, device=q.device)
        part_ml = torch.empty((t, hq, splits, 2), dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out  # unused
    grid = (t // cfg["BLOCK_Q"] + bsz, hk, splits)
    ticket = tickets(q.device, grid[0] * hk, "attention") if splits > 1 else seq_lens  # unused when 1 split
    attn_kernel[grid](
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, sinks, out, part_acc, part_ml, ticket,
        bsz, q.stride(0), q.stride(1), block_tables.stride(0), out.stride(0), out.stride(1),
        float(scale) * LOG2E, int(window),
        HQ=hq, HK=hk, D=d, BLOCK_SIZE=bs, **cfg,
    )
    return out


def attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    sinks: torch.Tensor,
    window: int,
    scale: float,
) -> torch.Tensor:
    """Causal paged attention with sinks and an optional sliding window (see the torch reference
    `swallow_stream.ops.reference.attention`). Returns [T, Hq, D] in q's dtype."""
    return paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, sinks, window, scale)


__all__ = ["attention", "paged_attention", "store_kv", "attn_kernel", "store_kv_kernel", "launch_config"]
