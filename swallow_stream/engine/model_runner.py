"""The model runner owns every tensor: weights, the paged KV cache, each step's inputs.

The scheduler hands it [(sequence, number of new tokens)]; it builds the flat batch and the
cache addressing, runs the model, and samples one token for each sequence that reached the end
of its known tokens (decodes, and prefills whose last chunk this was).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..model import BatchMeta, CacheGroupMeta, GptOss, ModelWeights
from ..ops import OpSet
from ..sampling import sample
from .block_manager import FULL, SLIDING
from .sequence import Sequence

log = logging.getLogger("swallow_stream.engine")


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

    On CUDA the forward of each batch-size bucket is captured once as a CUDA graph and replayed:
    one host-to-device copy of the step's metadata, then a single graph launch. Rows past the
    real batch are padding (no cache write, a one-token context) whose outputs are dropped.
    Elsewhere the same buffers feed an eager forward (buckets are exact sizes: no padding).
    """

    def __init__(self, model: GptOss, kv_caches, max_num_seqs: int, max_blocks: int, use_graphs: bool):
        self.model = model
        self.kv_caches = kv_caches
        self.use_graphs = use_graphs
        dev = model.device
        n = max_num_seqs
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slots = torch.full((2, n), -1, dtype=torch.int64, device=dev)
        self.tables = torch.zeros((2, n, max_blocks), dtype=torch.int32, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        if use_graphs:
            sizes = [b for b in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256) if b < n] + [n]
        else:
            sizes = list(range(1, n + 1))
        self.buckets = sorted(set(sizes))
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def _meta(self, b: int) -> BatchMeta:
        return BatchMeta(
            query_start_loc=self.query_start_loc[: b + 1],
            seq_lens=self.seq_lens[:b],
            full=CacheGroupMeta(self.slots[FULL, :b], self.tables[FULL, :b]),
            sliding=CacheGroupMeta(self.slots[SLIDING, :b], self.tables[SLIDING, :b]),
        )

    def _forward(self, b: int) -> torch.Tensor:
        return self.model.forward(self.input_ids[:b], self.positions[:b], self._meta(b), self.kv_caches)

    def _capture(self, b: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # compiles kernels, settles allocations
                self._forward(b)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._forward(b)
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

    def run(self, batch: list[tuple[Sequence, int]], block_size: int, has_sliding: bool) -> torch.Tensor:
        """-> hidden [B, H] for a batch of decodes."""
        b = len(batch)
        bucket = next(x for x in self.buckets if x >= b)
        width = self.tables.shape[2]
        ids, pos, slots, lens = [], [], [[], []], []
        tables = torch.zeros((2, bucket, width), dtype=torch.int32)
        for i, (seq, _) in enumerate(batch):
            p = seq.num_computed
            ids.append(seq.token_ids[p])
            pos.append(p)
            lens.append(p + 1)
            for g in (FULL, SLIDING) if has_sliding else (FULL,):
                t = seq.block_tables[g]
                slots[g].append(t[p // block_size] * block_size + p % block_size)
                tables[g, i, : len(t)] = torch.tensor(t, dtype=torch.int32)
        pad = bucket - b
        self.input_ids[:bucket].copy_(torch.tensor(ids + [0] * pad), non_blocking=True)
        self.positions[:bucket].copy_(torch.tensor(pos + [0] * pad), non_blocking=True)
        self.seq_lens[:bucket].copy_(torch.tensor(lens + [1] * pad, dtype=torch.int32), non_blocking=True)
        for g in (FULL, SLIDING):
            col = slots[g] if slots[g] else [-1] * b
            self.slots[g, :bucket].copy_(torch.tensor(col + [-1] * pad), non_blocking=True)
        self.tables[:, :bucket].copy_(tables, non_blocking=True)
        if not self.use_graphs:
            return self._forward(bucket)[:b]
        if bucket not in self.graphs:
            self.graphs[bucket] = self._capture(bucket)
        graph, out = self.graphs[bucket]
        graph.replay()
        return out[:b]


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
        self.decode = StaticDecode(self.model, self.kv_caches, max_num_seqs, max_blocks, use_cuda_graphs)
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
        )
        return (
            torch.tensor(ids, dtype=torch.int64, device=dev),
            torch.tensor(pos, dtype=torch.int64, device=dev),
            meta,
            sample_rows,
        )

    @torch.inference_mode()
    def run(self, batch: list[tuple[Sequence, int]]) -> list[tuple[int, float | None, list[tuple[int, float]] | None]]:
        """One step. Returns, for each sequence that samples (in batch order),
        (token id, its logprob or None, top logprobs or None)."""
        decode = all(n == 1 and seq.num_computed + 1 == len(seq.token_ids) for seq, n in batch)
        if decode and self.decode.fits(len(batch), max(len(s.block_tables[FULL]) for s, _ in batch)):
            hidden = self.decode.run(batch, self.block_size, self.has_sliding)
            rows = list(range(len(batch)))
        else:
            ids, pos, meta, rows = self.prepare(batch)
            hidden = self.model.forward(ids, pos, meta, self.kv_caches)[rows]
        if not rows:
            return []
        sampling = [seq for seq, n in batch if seq.num_computed + n == len(seq.token_ids)]
        logits = self.model.logits(hidden)
        params = [s.params for s in sampling]
        for s in sampling:
            if s.params.seed is not None and s.generator is None:
                s.generator = torch.Generator(device=self.device).manual_seed(s.params.seed)
        tokens = sample(logits, params, [s.generator for s in sampling])
        want_lp = [s.params.logprobs for s in sampling]
        logprobs = None
        if any(want_lp):
            logprobs = torch.log_softmax(logits, dim=-1)
        tokens_l = tokens.tolist()
        out: list[tuple[int, float | None, list[tuple[int, float]] | None]] = []
        for i, s in enumerate(sampling):
            lp = top = None
            if want_lp[i]:
                lp = float(logprobs[i, tokens_l[i]])
                if s.params.top_logprobs:
                    v, ix = logprobs[i].topk(s.params.top_logprobs)
                    top = list(zip(ix.tolist(), v.tolist()))
            out.append((tokens_l[i], lp, top))
        return out
