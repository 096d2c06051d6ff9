"""Plain-torch implementations of the model's ops: the CPU path and the oracle for the kernels.

Token-major layout throughout: a step's tokens from all sequences are flattened to T rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .mxfp4 import dequantize_mxfp4

SWIGLU_ALPHA = 1.702


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear: x [N, K], weight [M, K] -> [N, M]. One fp32 row on CPU runs as a batch of GEMVs
    over row chunks of the weight [C, M/C, K]: MKL runs a lone GEMV on one core (~8 GB/s on AVX2),
    a batch of them on every core (~16 GB/s, twice as fast for the unembedding and the experts)."""
    one_fp32_row = x.shape[0] == 1 and x.dtype == weight.dtype == torch.float32
    if one_fp32_row and x.device.type == "cpu" and weight.is_contiguous():
        m, k = weight.shape
        c = next(c for c in (16, 8, 4, 2, 1) if m % c == 0)
        if c > 1:
            y = torch.bmm(weight.view(c, m // c, k), x.t().expand(c, k, 1)).view(1, m)
            return y if bias is None else y + bias
    return F.linear(x, weight, bias)


@dataclass
class ExpertWeights:
    """One layer's experts. MXFP4 (packed) when `gate_up_blocks` is set, else dense.

    MXFP4: gate_up_blocks [E, 2I, H/32, 16] u8, gate_up_scales [E, 2I, H/32] u8,
           down_blocks [E, H, I/32, 16] u8, down_scales [E, H, I/32] u8.
    Dense: gate_up [E, H, 2I], down [E, I, H] (Hugging Face's bf16 layout).
    gate_up rows interleave gate (even) and up (odd).
    """

    gate_up_bias: torch.Tensor  # [E, 2I] fp32
    down_bias: torch.Tensor  # [E, H] fp32
    gate_up_blocks: torch.Tensor | None = None
    gate_up_scales: torch.Tensor | None = None
    down_blocks: torch.Tensor | None = None
    down_scales: torch.Tensor | None = None
    gate_up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    # CPU only: MXFP4 experts dequantized once ([E, 2I, H], [E, H, I]), trading memory for
    # not unpacking the chosen experts at every step. GPU kernels always read the packed form.
    dequantized: tuple[torch.Tensor, torch.Tensor] | None = None
    # The Triton kernels' layout (swallow_kernels.MoEWeights), made once by OpSet.prepare_experts;
    # on CUDA the HF-layout tensors above are then released.
    packed: object | None = None

    def materialize(self, dtype: torch.dtype) -> None:
        if self.gate_up_blocks is not None and self.dequantized is None:
            self.dequantized = (
                dequantize_mxfp4(self.gate_up_blocks, self.gate_up_scales, dtype),
                dequantize_mxfp4(self.down_blocks, self.down_scales, dtype),
            )

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the CPU's expert products run in: that of the dequantized copy, else fp32."""
        return self.dequantized[0].dtype if self.dequantized is not None else torch.float32

    @property
    def quantized(self) -> bool:
        return self.gate_up_blocks is not None or self.packed is not None

    @property
    def num_experts(self) -> int:
        return self.gate_up_bias.shape[0]

    def gather(self, ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """Experts `ids` [C] (a device tensor) -> gate_up [C, 2I, H], its bias [C, 1, 2I], down
        [C, H, I], its bias [C, 1, H]: weights in `dtype`, biases fp32. No read back."""
        if self.dequantized is not None:
            gate_up, down = self.dequantized[0][ids].to(dtype), self.dequantized[1][ids].to(dtype)
        elif self.quantized:
            gate_up = dequantize_mxfp4(self.gate_up_blocks[ids], self.gate_up_scales[ids], dtype)
            down = dequantize_mxfp4(self.down_blocks[ids], self.down_scales[ids], dtype)
        else:
            gate_up, down = self.gate_up[ids].transpose(1, 2).to(dtype), self.down[ids].transpose(1, 2).to(dtype)
        return gate_up, self.gate_up_bias[ids].float().unsqueeze(1), down, self.down_bias[ids].float().unsqueeze(1)

    def gate_up_weight(self, e: int, dtype: torch.dtype) -> torch.Tensor:
        """Expert e's gate_up as [2I, H]."""
        if self.dequantized is not None:
            return self.dequantized[0][e].to(dtype)
        if self.quantized:
            return dequantize_mxfp4(self.gate_up_blocks[e], self.gate_up_scales[e], dtype)
        return self.gate_up[e].t().to(dtype)

    def down_weight(self, e: int, dtype: torch.dtype) -> torch.Tensor:
        """Expert e's down as [H, I]."""
        if self.dequantized is not None:
            return self.dequantized[1][e].to(dtype)
        if self.quantized:
            return dequantize_mxfp4(self.down_blocks[e], self.down_scales[e], dtype)
        return self.down[e].t().to(dtype)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual) * weight, x + residual). x, residual [T, H]; weight [H] fp32.

    The sum is the new residual stream (in x's dtype); the norm is computed in fp32. x may be the
    MoE's fp32 partials [T, k, H] (`experts_partial`): summed over k and rounded to the residual's
    dtype first, as a stored MoE output would be.
    """
    if x.dim() == 3:
        x = x.sum(1).to(residual.dtype)
    if residual is not None:
        x = x + residual
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * y).to(x.dtype), x


def rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """NeoX (half-split) rotary embedding. q [T, Hq, D], k [T, Hk, D], positions [T];
    cos/sin [max_pos, D/2] fp32 with YaRN's concentration already folded in."""
    c = cos[positions].unsqueeze(1)
    s = sin[positions].unsqueeze(1)
    x1, x2 = torch.cat((q, k), 1).float().chunk(2, dim=-1)  # both rotated at once: [T, Hq+Hk, D/2] x2
    rotated = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    hq = q.shape[1]
    return rotated[:, :hq].to(q.dtype), rotated[:, hq:].to(k.dtype)


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write k, v [T, Hk, D] into the paged caches [num_blocks, block_size, Hk, D] at flat slots
    (block * block_size + offset); slot -1 means "do not store".

    No data-dependent shapes (no host sync on CUDA, capturable in a graph): a skipped row is
    written too, to the slot of the kept row with the largest slot and with that row's values,
    so every slot written gets one value; when no row is kept, slot 0 gets its own old value.
    On CPU, where reading back is free, a step that stores every row (the usual one) writes directly."""
    t = slot_mapping.shape[0]
    if t == 0:
        return
    slots = slot_mapping.long()
    if _reads_are_free(slots) and bool((slots >= 0).all()):  # CPU, every row stored (the usual step)
        k_cache.view(-1, *k_cache.shape[2:])[slots] = k.to(k_cache.dtype)
        v_cache.view(-1, *v_cache.shape[2:])[slots] = v.to(v_cache.dtype)
        return
    keep = slots >= 0
    stand_in = torch.argmax(slots).view(1)  # a kept row when there is one ([1]: a 0-d index would read back)
    target = torch.where(keep, slots, slots[stand_in].clamp(min=0))
    rows = torch.where(keep, torch.arange(t, device=slots.device), stand_in)
    any_kept = keep.any()
    for new, cache in ((k, k_cache), (v, v_cache)):
        flat = cache.view(-1, *cache.shape[2:])
        flat[target] = torch.where(any_kept, new[rows].to(cache.dtype), flat[target])


def rope_store_kv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """rope(q, k) then store_kv(rotated k, v): returns the rotated q; k and v go to the caches."""
    q, k = rope(q, k, positions, cos, sin)
    store_kv(k, v, k_cache, v_cache, slot_mapping)
    return q


def _reads_are_free(t: torch.Tensor) -> bool:
    """Reading a small tensor back to the host costs nothing on CPU; elsewhere it waits for the
    device and cannot be captured in a CUDA graph."""
    return t.device.type == "cpu"


# Elements of one gathered key (or value) chunk in the batched decode path: 64 MiB in fp32.
_DECODE_CHUNK_ELEMENTS = 1 << 24
# Elements of one chunk's attention scores in the per-sequence path (a long prefill chunk against a
# long context): 256 MiB in fp32.
_SCORE_ELEMENTS = 1 << 26
# Keys (elements of [B, S, Hk, D]) one chunk of CPU decodes gathers: ~1 MB in fp32, cache-sized.
_DECODE_BATCH_ELEMENTS = 1 << 18


def _attend(state, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float):
    """One online-softmax step over a chunk of keys. q [..., L, Hk, G, D], k/v [..., S, Hk, D] fp32,
    visible [..., L, S] bool; state (max, sum, acc) [..., Hk, G, L] x2 and [..., Hk, G, L, D]."""
    m, l, acc = state
    scores = torch.einsum("...lhgd,...shd->...hgls", q, k) * scale
    scores = scores.masked_fill(~visible.unsqueeze(-3).unsqueeze(-3), float("-inf"))
    m_new = torch.maximum(m, scores.amax(-1))  # finite: the state starts at the sink logit
    alpha = torch.exp(m - m_new)
    p = torch.exp(scores - m_new.unsqueeze(-1))
    acc = acc * alpha.unsqueeze(-1) + torch.einsum("...hgls,...shd->...hgld", p, v)
    return m_new, l * alpha + p.sum(-1), acc


def _sink_state(sinks: torch.Tensor, lead: tuple[int, ...], hk: int, queries: int, d: int):
    """Softmax state before any key: the sink is a logit with no value vector."""
    g = sinks.shape[0] // hk
    m = sinks.float().view(hk, g, 1).expand(*lead, hk, g, queries)
    return m, torch.ones_like(m), torch.zeros(*m.shape, d, dtype=torch.float32, device=sinks.device)


def _finish(state) -> torch.Tensor:
    """-> [..., L, Hk, G, D] fp32."""
    _, l, acc = state
    return (acc / l.unsqueeze(-1)).movedim(-2, -4)


def _visible(qpos: torch.Tensor, kpos: torch.Tensor, window: int) -> torch.Tensor:
    """qpos [..., L, 1], kpos [..., 1, S] -> [..., L, S]: causal, within the window."""
    visible = kpos <= qpos
    if window:
        visible &= kpos > qpos - window
    return visible


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
    host_lens: tuple[Sequence[int], Sequence[int]] | None = None,
) -> torch.Tensor:
    """Causal paged attention with learned sinks and an optional sliding window.

    q [T, Hq, D]; caches [num_blocks, block_size, Hk, D] already holding this step's keys;
    block_tables [B, max_blocks] int32 (entries a sequence no longer needs may be -1);
    seq_lens [B] context length after this step; query_start_loc [B+1] into T; every sequence has
    at least one query. Query j of sequence b sits at position seq_lens[b] - q_len_b + j and sees
    key k iff k <= pos and (window == 0 or k > pos - window). Each head's softmax denominator also
    holds exp(sinks[h]) (no value vector). Returns [T, Hq, D] in q's dtype.

    host_lens: (query_start_loc, seq_lens) as host integers, when the caller has them. With them,
    or on CPU, each sequence is attended over exactly its context. Without them on a device, a
    decode batch (T == B) is attended all at once over the block tables' width, in chunks, with
    no read back to the host (CUDA-graph capturable).
    """
    t, hq, d = q.shape
    if host_lens is None and not _reads_are_free(q) and t == block_tables.shape[0]:
        return _attention_decode(q, k_cache, v_cache, block_tables, seq_lens, sinks, window, scale)
    hk = k_cache.shape[2]
    bs = k_cache.shape[1]
    out = torch.empty_like(q)
    qsl, lens = host_lens if host_lens is not None else (query_start_loc.tolist(), seq_lens.tolist())
    decodes = [b for b in range(len(lens)) if qsl[b + 1] - qsl[b] == 1] if _reads_are_free(q) else []
    if decodes:
        _attend_decodes(out, q, k_cache, v_cache, block_tables, qsl, lens, decodes, sinks, window, scale)
    for b, seq_len in enumerate(lens):
        q0, q1 = qsl[b], qsl[b + 1]
        if q1 == q0 or (q1 - q0 == 1 and decodes):
            continue
        # keys from the block of the first one the first query sees (a window skips the rest)
        b0 = max(0, seq_len - (q1 - q0) - window + 1) // bs if window else 0
        blocks = block_tables[b, b0 : -(-seq_len // bs)].long().clamp(min=0)
        kk = k_cache[blocks].reshape(-1, hk, d)[: seq_len - b0 * bs].float()  # [S, Hk, D] from position b0*bs
        vv = v_cache[blocks].reshape(-1, hk, d)[: seq_len - b0 * bs].float()
        qq = q[q0:q1].float().view(q1 - q0, hk, hq // hk, d)  # [L, Hk, G, D]
        qpos = torch.arange(seq_len - (q1 - q0), seq_len, device=q.device)[:, None]
        state = _sink_state(sinks, (), hk, q1 - q0, d)
        step = max(1, _SCORE_ELEMENTS // ((q1 - q0) * hq))  # keys a chunk: scores [Hq, L, keys] bounded
        for s0 in range(0, kk.shape[0], step):
            kpos = torch.arange(b0 * bs + s0, b0 * bs + min(s0 + step, kk.shape[0]), device=q.device)[None, :]
            state = _attend(state, qq, kk[s0 : s0 + step], vv[s0 : s0 + step], _visible(qpos, kpos, window), scale)
        out[q0:q1] = _finish(state).reshape(q1 - q0, hq, d).to(q.dtype)
    return out


def _attend_decodes(out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, qsl: Sequence[int], lens: Sequence[int], rows: list[int],
                    sinks: torch.Tensor, window: int, scale: float) -> None:
    """The sequences `rows`, each one query at its last position (decodes), attended together into
    out, on CPU (where making the lengths' tensors costs nothing): a loop over the sequences costs
    a step ~0.3 ms a sequence and layer at short contexts. Each row sees one contiguous range of
    keys (the window's): their slots are gathered into [B, S] (S the longest range, the rest
    masked). Past _DECODE_BATCH_ELEMENTS keys, rows go longest first in chunks of that many: past
    the caches, a big batch's padded gathers cost more than the loop saves (16 rows of 2k tokens:
    22 ms at once, 4.5 ms a row at a time)."""
    hq, d = q.shape[1:]
    hk, bs = k_cache.shape[2], k_cache.shape[1]
    starts = {b: max(0, lens[b] - window) if window else 0 for b in rows}
    longest = max(lens[b] - starts[b] for b in rows)
    if len(rows) * longest * hk * d > _DECODE_BATCH_ELEMENTS:
        rows = sorted(rows, key=lambda b: starts[b] - lens[b])  # longest range first
    flat_k, flat_v = k_cache.flatten(0, 1), v_cache.flatten(0, 1)  # [slots, Hk, D]
    sink = sinks.float().view(1, hk, hq // hk, 1)
    i = 0
    while i < len(rows):
        if i:  # a later chunk (the rows were sorted): the longest range left
            longest = lens[rows[i]] - starts[rows[i]]
        chunk = rows[i : i + max(1, _DECODE_BATCH_ELEMENTS // (longest * hk * d))]
        i += len(chunk)
        n = len(chunk)
        start = torch.tensor([starts[b] for b in chunk])
        count = torch.tensor([lens[b] for b in chunk]) - start  # keys each row sees
        j = torch.arange(longest)
        pos = torch.minimum(start[:, None] + j, (start + count - 1)[:, None])  # [B, S]; padding repeats the last key
        width = -(-max(lens[b] for b in chunk) // bs)  # the tables' live columns (a table is max_model_len wide)
        slots = block_tables[_rows(chunk), :width].long().gather(1, pos // bs) * bs + pos % bs
        # [B, Hk, S, D] fp32, converted and transposed in one copy: both products then read it in place
        kk = flat_k[slots].transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format)
        vv = flat_v[slots].transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format)
        q_rows = _rows([qsl[b] for b in chunk])
        qq = q[q_rows].float().view(n, hk, hq // hk, d)
        scores = torch.matmul(qq, kk.transpose(-1, -2)) * scale  # [B, Hk, G, S]
        scores.masked_fill_((j[None, :] >= count[:, None]).view(n, 1, 1, longest), float("-inf"))
        # the sink: one more logit per head, with no value vector
        p = torch.softmax(torch.cat([sink.expand(n, -1, -1, -1), scores], -1), -1)[..., 1:]
        out[q_rows] = torch.matmul(p, vv).reshape(n, hq, d).to(out.dtype)  # [B, Hk, G, D]


def _rows(index: list[int]) -> slice | list[int]:
    """A list of row numbers as a slice when it is one (a view, not a gather and scatter)."""
    first = index[0]
    return slice(first, first + len(index)) if index == list(range(first, first + len(index))) else index


def _attention_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, sinks: torch.Tensor, window: int, scale: float,
) -> torch.Tensor:
    """`attention` for one query a sequence (q [B, Hq, D]), static shapes only: keys are gathered
    for the whole table width, a chunk of blocks at a time (online softmax), and masked by each
    row's position (seq_lens - 1). Work grows with the width, not with the true context."""
    b, hq, d = q.shape
    hk, bs = k_cache.shape[2], k_cache.shape[1]
    width = block_tables.shape[1]
    chunk = max(1, _DECODE_CHUNK_ELEMENTS // (b * bs * hk * d))  # blocks a chunk
    qq = q.float().view(b, 1, hk, hq // hk, d)
    qpos = (seq_lens.long() - 1).view(b, 1, 1)
    state = _sink_state(sinks, (b,), hk, 1, d)
    for c0 in range(0, width, chunk):
        blocks = block_tables[:, c0 : c0 + chunk].long().clamp(min=0)  # [B, C]
        kk = k_cache[blocks].flatten(1, 2).float()  # [B, C*bs, Hk, D]
        vv = v_cache[blocks].flatten(1, 2).float()
        kpos = torch.arange(c0 * bs, c0 * bs + kk.shape[1], device=q.device).view(1, 1, -1)
        state = _attend(state, qq, kk, vv, _visible(qpos, kpos, window), scale)
    return _finish(state).reshape(b, hq, d).to(q.dtype)


def route(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router: logits = x W^T + b; top-k on raw logits; softmax over the k.
    x [T, H] -> (weights [T, k] fp32, expert ids [T, k] int32)."""
    logits = F.linear(x.float(), weight.float(), bias.float())
    # NaN ranks lowest and infinities become the finite extremes, so top-k always picks k
    # distinct in-range experts and the softmax stays finite (ties: the lowest id first).
    big = torch.finfo(torch.float32).max
    logits = torch.nan_to_num(logits, nan=-big, posinf=big, neginf=-big)
    top, ids = torch.topk(logits, top_k, dim=-1)
    return torch.softmax(top, dim=-1), ids.to(torch.int32)


def swiglu_clamped(gate_up: torch.Tensor, limit: float) -> torch.Tensor:
    """[.., 2I] interleaved (gate even, up odd) -> [.., I]: gate*sigmoid(1.702*gate)*(up+1),
    gate clamped above at `limit`, up clamped to [-limit, limit]."""
    gate = gate_up[..., 0::2].clamp(max=limit)
    up = gate_up[..., 1::2].clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(SWIGLU_ALPHA * gate) * (up + 1)


def _expert_mlp(x: torch.Tensor, gate_up: torch.Tensor, gate_up_bias: torch.Tensor, down: torch.Tensor,
                down_bias: torch.Tensor, swiglu_limit: float) -> torch.Tensor:
    """down(swiglu(x gate_up^T + b1)) + b2 in fp32 for one expert or a batch of them:
    x [..., N, H]; gate_up [..., 2I, H]; down [..., H, I]; biases [..., 1, 2I] / [..., 1, H] fp32.
    The products run in the weights' dtype (fp32 accumulation), the epilogues in fp32."""
    gu = torch.matmul(x.to(gate_up.dtype), gate_up.transpose(-1, -2)).float() + gate_up_bias
    act = swiglu_clamped(gu, swiglu_limit).to(down.dtype)
    return torch.matmul(act, down.transpose(-1, -2)).float() + down_bias


def experts_partial(
    x: torch.Tensor,
    expert_weights: torch.Tensor,
    expert_ids: torch.Tensor,
    w: ExpertWeights,
    swiglu_limit: float,
) -> torch.Tensor:
    """Mixture of experts, unreduced. x [T, H]; expert_weights [T, k] fp32; expert_ids [T, k].
    y[t, j] = weight[t,j] * (down_e(swiglu(gate_up_e(x[t]) + b1_e)) + b2_e), e = ids[t,j]:
    fp32 [T, k, H]. Only the experts some token chose are dequantized.

    On CPU the (token, slot) pairs are grouped by expert with the counts read back (free there)
    and each chosen expert runs on exactly its tokens, its products in `w.compute_dtype` (fp32, or
    bf16 on CPUs that compute it natively), the epilogues in fp32. Elsewhere `_experts_static`
    avoids any read back."""
    if not _reads_are_free(x):
        return _experts_static(x, expert_weights, expert_ids, w, swiglu_limit)
    t, h = x.shape
    dtype = w.compute_dtype
    if t == 1 and w.dequantized is not None:  # one token (a single stream's decode): nothing to group
        # its k experts' products one by one, the epilogues for all k at once: every op costs a
        # decode step more than its arithmetic, the weights' streaming having flushed the caches
        gate_up, down = w.dequantized
        ids = expert_ids[0].long()
        xc = x.to(dtype)
        gu = torch.cat([linear(xc, gate_up[e]) for e in ids.tolist()]).float() + w.gate_up_bias[ids]  # [k, 2I]
        act = swiglu_clamped(gu, swiglu_limit).to(dtype)
        y = torch.cat([linear(act[j : j + 1], down[e]) for j, e in enumerate(ids.tolist())]).float()
        return ((y + w.down_bias[ids]) * expert_weights.view(-1, 1)).unsqueeze(0)
    k = expert_ids.shape[1]
    flat = expert_ids.reshape(-1).long()  # [T*k] (token, slot) pairs
    order = torch.argsort(flat, stable=True)  # pairs grouped by expert
    counts = torch.bincount(flat, minlength=w.num_experts).tolist()
    # padded: most experts chosen, and the busiest one's tokens at most 8 past the mean (a decode
    # batch; a large uneven prefill is compute-bound and would pay for every padded row)
    e, busiest = w.num_experts, max(counts)
    if w.dequantized is not None and 2 * sum(n > 0 for n in counts) >= e and e * (busiest - 8) <= t * k:
        return _experts_padded(x, expert_weights, flat, order, counts, busiest, w, swiglu_limit)
    tok = order // k
    xs = x[tok].to(dtype)  # [T*k, H]
    ys = torch.empty(t * k, h, dtype=torch.float32, device=x.device)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        seg = slice(start, start + n)
        ys[seg] = _expert_mlp(xs[seg], w.gate_up_weight(e, dtype), w.gate_up_bias[e : e + 1].float(),
                              w.down_weight(e, dtype), w.down_bias[e : e + 1].float(), swiglu_limit)
        start += n
    ys *= expert_weights.reshape(-1)[order].unsqueeze(1)
    y = torch.empty_like(ys)
    y[order] = ys
    return y.view(t, k, h)


def _experts_padded(x: torch.Tensor, expert_weights: torch.Tensor, flat: torch.Tensor, order: torch.Tensor,
                    counts: list[int], busiest: int, w: ExpertWeights, swiglu_limit: float) -> torch.Tensor:
    """`experts_partial` on CPU when most experts are chosen and about equally (a decode batch):
    every expert's tokens padded to the busiest one's count, [E, N, H], and two bmm over the
    dequantized experts. Same products as one expert at a time, in ~15 ops instead of ~20 an
    expert (measured: 16 tokens, 16 experts top-4: 1.25-1.6 vs 2.1-2.2 ms a layer in bf16; but
    512 tokens with the busiest expert at 2.2x the mean: 17 vs 9 ms)."""
    t, h = x.shape
    k = flat.shape[0] // t
    e = len(counts)
    dtype = w.compute_dtype
    expert_of = flat[order]  # [T*k] each sorted pair's expert
    firsts = torch.tensor(counts).cumsum(0) - torch.tensor(counts)  # [E] each expert's first sorted pair
    within = torch.arange(t * k) - firsts[expert_of]  # each sorted pair's row in its expert's block
    xs = x.new_zeros(e, busiest, h, dtype=dtype)
    xs[expert_of, within] = x[order // k].to(dtype)
    gate_up, down = w.dequantized
    gu = torch.bmm(xs, gate_up.transpose(1, 2)).float() + w.gate_up_bias.float()[:, None, :]  # [E, N, 2I]
    act = swiglu_clamped(gu, swiglu_limit).to(dtype)
    ys = torch.bmm(act, down.transpose(1, 2)).float() + w.down_bias.float()[:, None, :]  # [E, N, H]
    ys = ys[expert_of, within] * expert_weights.reshape(-1)[order].unsqueeze(1)
    y = torch.empty_like(ys)
    y[order] = ys
    return y.view(t, k, h)


# Weight elements of the experts one chunk of `_experts_static` gathers (256 MiB in fp32).
_STATIC_CHUNK_ELEMENTS = 1 << 26


def _experts_static(
    x: torch.Tensor, expert_weights: torch.Tensor, expert_ids: torch.Tensor, w: ExpertWeights, swiglu_limit: float,
) -> torch.Tensor:
    """`experts_partial` with static shapes only (no host sync on CUDA, capturable in a graph).

    The U = min(E, T*k) slots of distinct chosen experts are found on the device (sorted ids, first
    occurrences; spare slots hold E, past every real id). A token picks an expert at most once, so
    each slot's expert runs on all T tokens, a few slots at a time, and a (token, slot) pair takes
    the one row whose expert it chose. Decode (T*k <= E) gathers just the chosen experts; a large
    T spends E/k times the needed FLOPs: a fallback, where the Triton kernels are unavailable.
    Products run in x's dtype (bf16 on GPUs), not fp32."""
    t, h = x.shape
    k = expert_ids.shape[1]
    e = w.num_experts
    u = min(e, t * k)
    ids = expert_ids.long()
    sorted_ids = ids.reshape(-1).sort().values
    first = torch.ones_like(sorted_ids, dtype=torch.bool)
    first[1:] = sorted_ids[1:] != sorted_ids[:-1]
    slot = first.long().cumsum(0) - 1
    chosen = torch.full((u,), e, dtype=torch.long, device=x.device).scatter_(0, slot, sorted_ids)  # [U]
    inter = w.gate_up_bias.shape[1] // 2
    per_expert = 3 * inter * h
    chunk = max(1, _STATIC_CHUNK_ELEMENTS // per_expert)
    dtype = x.dtype
    y = torch.zeros(t, k, h, dtype=torch.float32, device=x.device)
    for c0 in range(0, u, chunk):
        ex = chosen[c0 : c0 + chunk]
        real = ex.clamp(max=e - 1)  # spare slots run the last expert; no pair takes their rows
        out = _expert_mlp(x, *w.gather(real, dtype), swiglu_limit)  # [C, T, H]
        for j in range(k):
            take = (ids[:, j] == ex.view(-1, 1)).unsqueeze(-1)  # [C, T, 1]: one true over C at most
            y[:, j] += torch.where(take, out, 0.0).sum(0)
    return y * expert_weights.unsqueeze(-1)


def experts(
    x: torch.Tensor,
    expert_weights: torch.Tensor,
    expert_ids: torch.Tensor,
    w: ExpertWeights,
    swiglu_limit: float,
) -> torch.Tensor:
    """Mixture of experts. x [T, H]; expert_weights [T, k] fp32; expert_ids [T, k].
    out[t] = sum_j weight[t,j] * (down_e(swiglu(gate_up_e(x[t]) + b1_e)) + b2_e), e = ids[t,j].
    Returns [T, H] in x's dtype."""
    return experts_partial(x, expert_weights, expert_ids, w, swiglu_limit).sum(1).to(x.dtype)
