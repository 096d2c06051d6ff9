"""The model runner owns every tensor: weights, the paged KV cache, each step's inputs.

The scheduler hands it [(sequence, number of new tokens)]; it builds the flat batch and the
cache addressing, runs the model, and samples one token for each sequence that reached the end
of its known tokens (decodes, and prefills whose last chunk this was).

Sampling runs on the device from per-row parameter tensors (`sampling.device_sample`); a decode
step is one CUDA graph from the embedding to the sampled ids (LM head and sampler inside), and
the host reads the ids and their log-probabilities back once per step.
"""

from __future__ import annotations

import logging
import math
import operator
import random
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..config import ModelConfig
from ..model import BatchMeta, CacheGroupMeta, GptOss, ModelWeights
from ..ops import OpSet
from ..sampling import MAX_CANDIDATES, SamplingParams, SamplingTensors, candidate_count, device_sample
from .block_manager import FULL, SLIDING
from .sequence import Sequence

log = logging.getLogger("swallow_stream.engine")
_first = operator.itemgetter(0)


@dataclass
class CachePlan:
    num_full_blocks: int
    num_sliding_blocks: int
    block_size: int
    bytes_per_block: int  # one block of one layer, K and V


def plan_kv_cache(
    cfg: ModelConfig,
    budget_bytes: int,
    block_size: int,
    dtype: torch.dtype,
    max_num_seqs: int,
    max_num_batched_tokens: int,
) -> CachePlan:
    """Split a byte budget between the full-attention pool and the (small) sliding pool.

    The sliding pool needs, per running sequence, the blocks of one window plus the blocks a
    prefill chunk writes; twice that leaves room for prefix-cache reuse.
    """
    elem = torch.tensor([], dtype=dtype).element_size()
    per_block = 2 * block_size * cfg.num_key_value_heads * cfg.head_dim * elem
    n_sliding_layers = sum(1 for t in cfg.layer_types if t == "sliding_attention")
    n_full_layers = cfg.num_hidden_layers - n_sliding_layers
    sliding_blocks = 0
    if n_sliding_layers:
        per_seq = math.ceil(cfg.sliding_window / block_size) + 2
        sliding_blocks = 2 * (max_num_seqs * per_seq + math.ceil(max_num_batched_tokens / block_size))
    left = budget_bytes - sliding_blocks * n_sliding_layers * per_block
    full_blocks = left // (max(n_full_layers, 1) * per_block)
    if full_blocks < 1:
        raise ValueError(
            f"KV cache budget of {budget_bytes / 2**20:.0f} MiB is too small for this model "
            f"(the sliding-window layers alone need {sliding_blocks * n_sliding_layers * per_block / 2**20:.0f} MiB); "
            "raise kv_cache_memory or lower max_num_seqs"
        )
    if not n_full_layers:
        # all layers slide: the "full" pool still names blocks for prefix caching, nothing more
        full_blocks = sliding_blocks
    return CachePlan(int(full_blocks), int(sliding_blocks), block_size, per_block)


class StaticDecode:
    """Decode steps (one new token per sequence) through static device buffers.

    On CUDA each batch-size bucket's whole step is captured once as a CUDA graph and replayed:
    embedding -> layers -> LM head -> sampler (per-row temperature, top-p, top-k, min-p, seed and
    position read from device tensors), so a step is a few host-to-device copies, one graph
    launch and one read-back. Rows past the real batch are padding (no cache write, a one-token
    context) whose outputs are dropped. The in-graph sampler takes the top MAX_CANDIDATES logits
    (exact when every row has 0 < top_k <= 64 or is greedy: Swallow's defaults); other batches
    sample the graph's logits over the whole vocabulary after the replay, still on the device.
    Without graphs the same buffers and the same step run eagerly (exact-size buckets).
    """

    def __init__(self, model: GptOss, kv_caches, max_num_seqs: int, max_blocks: int, use_graphs: bool):
        self.model = model
        self.kv_caches = kv_caches
        self.use_graphs = use_graphs
        dev = model.device
        n = max_num_seqs
        # [7, n] int64, rows: 0 input ids, 1 positions, 2-3 the two groups' slots, 4 feed index,
        # 5 the host's ids on a feeding step, 6 the previous step's sampled ids (device-written).
        # Rows 0-5 are a step's inputs, sent in one copy. A feeding step (see `run`) gathers its
        # input ids from rows 5-6 read as one [2n] pool, by the index in row 4.
        self.staged = torch.zeros((7, n), dtype=torch.int64, device=dev)
        self.input_ids, self.positions, self.slots, self.feed = (self.staged[0], self.staged[1], self.staged[2:4],
                                                                 self.staged[4])
        self.last_ids = self.staged[6]
        self._feed_pool = self.staged[5:7].view(-1)
        self.staged[2:4].fill_(-1)
        self.tables = torch.zeros((2, n, max_blocks), dtype=torch.int32, device=dev)
        # The host writes a step's inputs into numpy views (filling an array from lists is a
        # tenth of the cost of torch.tensor on nested lists). On a CPU device the views are the
        # buffers themselves, nothing is copied; otherwise `staged` comes from two pinned
        # buffers used in turn (the copy from the one written for step N has finished once the
        # host has read step N's ids, before it writes that buffer again for step N+2).
        self._shared_host = dev.type == "cpu"
        if self._shared_host:
            self._host_staged = [self.staged]
            self._host_tables = self.tables.numpy()
        else:
            pin = dev.type == "cuda"  # pinned memory exists only beside CUDA
            self._host_staged = [torch.zeros((6, n), dtype=torch.int64, pin_memory=pin) for _ in range(2)]
            self._host_tables = np.zeros((2, n, max_blocks), dtype=np.int32)
        self._host_staged_np = [t.numpy() for t in self._host_staged]
        self._staged_turn = 0
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.sampling = SamplingTensors.allocate(n, dev)
        self._table_keys: list[tuple | None] = [None] * n  # what each row's block tables hold
        # (sequences whose parameters the sampling rows hold, any row needing the whole
        # vocabulary, any asking for logprobs, all greedy)
        self._sampling_key: tuple | None = None
        self._view_cache: dict[int, tuple] = {}  # batch size -> `_views`
        if use_graphs:
            sizes = [b for b in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256) if b < n] + [n]
        else:
            sizes = list(range(1, n + 1))
        self.buckets = sorted(set(sizes))
        self._bucket_of = [0] + [next(x for x in self.buckets if x >= b) for b in range(1, n + 1)]  # batch -> bucket
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]] = {}
        self.pool = None

    def _meta(self, b: int) -> BatchMeta:
        """The model's batch metadata over the first b rows (see `_views`)."""
        return BatchMeta(
            query_start_loc=self.query_start_loc[: b + 1],
            seq_lens=self.seq_lens[:b],
            full=CacheGroupMeta(self.slots[FULL, :b], self.tables[FULL, :b]),
            sliding=CacheGroupMeta(self.slots[SLIDING, :b], self.tables[SLIDING, :b]),
        )

    def _step(self, b: int, logprobs: bool = True, greedy: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (sampled ids [b], their logprobs [b], logits [b, V]) from the static buffers."""
        # a decode's context is its position + 1, and its sampled token sits there: both derived
        # here, on the device, so the host copies neither
        meta, rows, input_ids, positions = self._views(b)
        torch.add(positions, 1, out=rows.position)
        meta.seq_lens.copy_(rows.position)
        hidden = self.model.forward(input_ids, positions, meta, self.kv_caches)
        logits = self.model.logits(hidden)
        ids, lps = device_sample(logits, rows, MAX_CANDIDATES, logprobs, greedy)
        return ids, lps, logits

    def _capture(self, b: int) -> tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # compiles kernels, settles allocations
                self._step(b)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._step(b)
        self.pool = graph.pool()
        return graph, out

    def capture_all(self) -> None:
        """Capture every bucket up front (padding-valued buffers: no cache writes), so no request
        pays for a capture. A failed capture leaves decode eager rather than the engine down."""
        try:
            for b in self.buckets:
                if b not in self.graphs:
                    self.graphs[b] = self._capture(b)
        except Exception:
            log.exception("CUDA graph capture failed; decoding without graphs")
            self.graphs.clear()
            self.use_graphs = False

    def fits(self, batch_size: int, max_blocks: int) -> bool:
        return batch_size <= self.buckets[-1] and max_blocks <= self.tables.shape[2]

    def _views(self, b: int) -> tuple[BatchMeta, SamplingTensors, torch.Tensor, torch.Tensor]:
        """The first b rows of the static buffers, as the model and the sampler read them:
        (meta, sampling rows, input ids [b], positions [b]). Made once per batch size, not per
        step: each is a dozen tensor slices, a few microseconds of host time apiece."""
        v = self._view_cache.get(b)
        if v is None:
            v = self._view_cache[b] = (self._meta(b), self.sampling.rows(b), self.input_ids[:b], self.positions[:b])
        return v

    def run(self, batch: list[tuple[Sequence, int]], block_size: int, has_sliding: bool,
            seed_of: Callable[[Sequence], int], feed: list[int] | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """-> (sampled ids [B], logprobs [B], logits [B, V], whether any row asked for logprobs)
        for a batch of decodes; seed_of(seq) is a row's sampling seed.

        feed (launched steps only) [B]: feed[i] >= 0: row i's input token is row feed[i] of the
        previous launch's sampled ids, still on the device (the host has not read it yet; its
        token_ids entry is a placeholder)."""
        b = len(batch)
        bucket = self._bucket_of[b]
        ids, pos = [0] * bucket, [0] * bucket
        slots_full, slots_sliding = [-1] * bucket, [-1] * bucket
        launched = feed is not None  # the next launch may feed from this step's ids: keep them
        if feed is None or not any(r >= 0 for r in feed):
            feed = None
        else:  # index into the pool [host ids (n) | previous ids (n)]; padding rows take a host 0
            n = self.last_ids.shape[0]
            feed = [n + r if r >= 0 else i for i, r in enumerate(feed)] + list(range(b, bucket))
        tables, keys = self._host_tables, self._table_keys
        width = 0  # widest block table among the rows rewritten this step
        for i, (seq, _) in enumerate(batch):
            p = seq.num_computed
            ids[i] = seq.token_ids[p]
            pos[i] = p
            blk, off = divmod(p, block_size)
            seq_tables = seq.block_tables
            slots_full[i] = seq_tables[FULL][blk] * block_size + off
            if has_sliding:
                slots_sliding[i] = seq_tables[SLIDING][blk] * block_size + off
            # the block manager bumps tables_version on every change to a sequence's tables
            key = (seq.seq_id, seq.tables_version)
            if keys[i] != key:
                keys[i] = key
                full = seq_tables[FULL]
                width = max(width, len(full))
                tables[FULL, i, : len(full)] = full
                if has_sliding:
                    sl = seq_tables[SLIDING]
                    tables[SLIDING, i, : len(sl)] = sl
        turn = self._staged_turn = (self._staged_turn + 1) % len(self._host_staged)
        staged = self._host_staged_np[turn]
        if feed is None:
            staged[:4, :bucket] = (ids, pos, slots_full, slots_sliding)
        else:
            staged[1:6, :bucket] = (pos, slots_full, slots_sliding, feed, ids)
        if not self._shared_host:
            self.staged[:6, :bucket].copy_(self._host_staged[turn][:, :bucket], non_blocking=True)
            if width:
                self.tables[:, :bucket, :width].copy_(torch.from_numpy(tables[:, :bucket, :width]), non_blocking=True)
        if feed is not None:
            # one gather: a fed row's id from the previous launch's ids (its rows may reach past
            # this step's bucket), any other row's from the host's
            torch.index_select(self._feed_pool, 0, self.feed[:bucket], out=self.input_ids[:bucket])
        # A row's sampling parameters and seed are fixed for its sequence's life: the rows are
        # rewritten only when the batch's sequences change (the key holds them, so an identity
        # match cannot be a recycled id). Positions are set on the device in the step.
        key = self._sampling_key
        if key is None or len(key[0]) != b or not all(map(operator.is_, key[0], map(_first, batch))):
            seqs = tuple(seq for seq, _ in batch)
            params = [seq.params for seq in seqs]
            self.sampling.fill(params, [seed_of(seq) for seq in seqs], pos[:b])
            key = self._sampling_key = (seqs, candidate_count(params) is None, any(p.logprobs for p in params),
                                        all(p.greedy for p in params))
        _, full_vocab, logprobs, greedy = key
        if not self.use_graphs:
            out = self._step(bucket, logprobs, greedy)
        else:
            if bucket not in self.graphs:
                self.graphs[bucket] = self._capture(bucket)
            graph, out = self.graphs[bucket]
            graph.replay()
        sampled, lps, logits = (o[:b] for o in out) if bucket != b else out
        if full_vocab:  # a row without a small top_k: the whole vocabulary
            sampled, lps = device_sample(logits, self._views(b)[1], None, logprobs)
        if launched:
            self.last_ids[:b].copy_(sampled, non_blocking=True)
        return sampled, lps, logits, logprobs


class PendingStep:
    """A launched decode step whose sampled ids the host has not read yet. The device-to-host
    copy is queued behind the step; `result()` waits for it (by then the next step is queued)."""

    def __init__(self, host: torch.Tensor, tokens: torch.Tensor, logprobs: torch.Tensor, n: int):
        self.n = n
        self.host = host
        host[0, :n].copy_(tokens, non_blocking=True)
        host[1, :n].copy_(logprobs, non_blocking=True)
        self.event = None
        if tokens.is_cuda:
            self.event = torch.cuda.Event()
            self.event.record()

    def result(self) -> list[tuple[int, float]]:
        """-> [(token id, logprob)] in batch order."""
        if self.event is not None:
            self.event.synchronize()
        ids, lps = self.host[:, : self.n].tolist()
        return [(int(t), lp) for t, lp in zip(ids, lps)]


class ModelRunner:
    def __init__(
        self,
        cfg: ModelConfig,
        weights: ModelWeights,
        ops: OpSet,
        plan: CachePlan,
        max_model_len: int,
        max_num_seqs: int = 16,
        use_cuda_graphs: bool | None = None,
    ):
        self.cfg = cfg
        self.model = GptOss(cfg, weights, ops, max_model_len)
        self.device = weights.embed.device
        self.dtype = weights.embed.dtype
        self.block_size = plan.block_size
        hk, d = cfg.num_key_value_heads, cfg.head_dim
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        for layer in range(cfg.num_hidden_layers):
            n = plan.num_sliding_blocks if cfg.window_of(layer) else plan.num_full_blocks
            shape = (n, plan.block_size, hk, d)
            self.kv_caches.append(
                (torch.zeros(shape, dtype=self.dtype, device=self.device), torch.zeros(shape, dtype=self.dtype, device=self.device))
            )
        self.has_sliding = any(cfg.window_of(i) for i in range(cfg.num_hidden_layers))
        if use_cuda_graphs is None:
            use_cuda_graphs = self.device.type == "cuda"
        max_blocks = -(-max_model_len // plan.block_size)
        self._base_seed = random.getrandbits(64)
        self.decode = StaticDecode(self.model, self.kv_caches, max_num_seqs, max_blocks, use_cuda_graphs)
        # two read-back buffers: launch N+1 fills one while the host still reads step N's
        pin = self.device.type == "cuda"
        self._readback = [torch.zeros((2, max_num_seqs), dtype=torch.float64, pin_memory=pin) for _ in range(2)]
        self._flip = 0
        if use_cuda_graphs:
            self.decode.capture_all()

    def _block_table_tensor(self, tables: list[list[int]]) -> torch.Tensor:
        width = max(1, max(len(t) for t in tables))
        return torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32, device=self.device)

    def prepare(self, batch: list[tuple[Sequence, int]]) -> tuple[torch.Tensor, torch.Tensor, BatchMeta, list[int]]:
        """-> (input_ids [T], positions [T], meta, rows of T whose logits are sampled)."""
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[list[int]] = [[], []]
        qsl = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        for seq, n in batch:
            c = seq.num_computed
            ids.extend(seq.token_ids[c : c + n])
            positions = range(c, c + n)
            pos.extend(positions)
            for g in (FULL, SLIDING) if self.has_sliding else (FULL,):
                table = seq.block_tables[g]
                slots[g].extend(table[p // bs] * bs + p % bs for p in positions)
            qsl.append(qsl[-1] + n)
            seq_lens.append(c + n)
            if c + n == len(seq.token_ids):
                sample_rows.append(qsl[-1] - 1)
        dev = self.device
        full = CacheGroupMeta(
            torch.tensor(slots[FULL], dtype=torch.int64, device=dev),
            self._block_table_tensor([s.block_tables[FULL] for s, _ in batch]),
        )
        sliding = None
        if self.has_sliding:
            sliding = CacheGroupMeta(
                torch.tensor(slots[SLIDING], dtype=torch.int64, device=dev),
                self._block_table_tensor([s.block_tables[SLIDING] for s, _ in batch]),
            )
        meta = BatchMeta(
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            full=full,
            sliding=sliding,
            host_lens=(qsl, seq_lens),
        )
        return (
            torch.tensor(ids, dtype=torch.int64, device=dev),
            torch.tensor(pos, dtype=torch.int64, device=dev),
            meta,
            sample_rows,
        )

    def _seed(self, seq: Sequence) -> int:
        """A request's seed, or a per-runner random one mixed with the sequence id: either way a
        row's noise depends on its own (seed, position) only."""
        if seq.params.seed is not None:
            return seq.params.seed
        return (self._base_seed ^ (seq.seq_id * 0x9E3779B97F4A7C15)) & (2**64 - 1)

    def can_decode(self, batch: list[tuple[Sequence, int]]) -> bool:
        """Decodes only (one new token each, the last one), within the static buffers."""
        width = 0
        for seq, n in batch:
            if n != 1 or seq.num_computed + 1 != len(seq.token_ids):
                return False
            w = len(seq.block_tables[FULL])
            if w > width:
                width = w
        return self.decode.fits(len(batch), width)

    def can_launch(self, batch: list[tuple[Sequence, int]]) -> bool:
        """Whether `launch` takes this batch: `can_decode`, and no row asking for top logprobs
        (those read the step's logits, which the next step overwrites)."""
        return self.can_decode(batch) and not any(seq.params.top_logprobs for seq, _ in batch)

    @torch.inference_mode()
    def launch(self, batch: list[tuple[Sequence, int]], feed: list[int]) -> PendingStep:
        """One decode step, not waited for. feed[i] >= 0: sequence i's last token is still a
        placeholder, and its value is row feed[i] of the previous launch's sampled ids (on the
        device). The host reads this step's ids through the returned handle, one step later."""
        tokens, token_lp, _, _ = self.decode.run(batch, self.block_size, self.has_sliding, self._seed, feed)
        self._flip ^= 1
        return PendingStep(self._readback[self._flip], tokens, token_lp, len(batch))

    @torch.inference_mode()
    def run(self, batch: list[tuple[Sequence, int]]) -> list[tuple[int, float | None, list[tuple[int, float]] | None]]:
        """One step. Returns, for each sequence that samples (in batch order),
        (token id, its logprob or None, top logprobs or None)."""
        if self.can_decode(batch):  # every row samples
            sampling = [seq for seq, _ in batch]
            tokens, token_lp, logits, want_lp = self.decode.run(batch, self.block_size, self.has_sliding, self._seed)
            if not want_lp:  # the step's one read-back
                return [(t, None, None) for t in tokens.tolist()]
        else:
            sampling = [seq for seq, n in batch if seq.num_computed + n == len(seq.token_ids)]
            if not sampling:
                ids, pos, meta, _ = self.prepare(batch)
                self.model.forward(ids, pos, meta, self.kv_caches)
                return []
            params = [s.params for s in sampling]
            want_lp = any(p.logprobs for p in params)
            ids, pos, meta, rows = self.prepare(batch)
            hidden = self.model.forward(ids, pos, meta, self.kv_caches)[rows]
            logits = self.model.logits(hidden)
            t = SamplingTensors.allocate(len(rows), self.device)
            t.fill(params, [self._seed(s) for s in sampling], [len(s.token_ids) for s in sampling])
            tokens, token_lp = device_sample(logits, t, candidate_count(params), want_lp, all(p.greedy for p in params))
        # the step's one read-back (ids < 2^53 are exact in float64)
        host = torch.stack((tokens.double(), token_lp.double())).tolist()
        if not want_lp:
            return [(int(t), None, None) for t in host[0]]
        out: list[tuple[int, float | None, list[tuple[int, float]] | None]] = []
        for i, s in enumerate(sampling):
            tok = int(host[0][i])
            lp = top = None
            if s.params.logprobs:
                lp = host[1][i]
                if s.params.top_logprobs:
                    v, ix = torch.log_softmax(logits[i], dim=-1).topk(s.params.top_logprobs)
                    top = list(zip(ix.tolist(), v.tolist()))
            out.append((tok, lp, top))
        return out
