"""A request as the scheduler sees it: its tokens, its cache blocks, its progress."""

from __future__ import annotations

import enum
import itertools
from typing import Callable

import torch

from ..sampling import SamplingParams

_ids = itertools.count()

# A generated token the host has not read yet (one-step-late decoding): the last entry of
# token_ids until the step's result is read; its value lives on the device.
PENDING_TOKEN = -1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """token_ids = prompt + generated so far. `num_computed` tokens have their KV in the cache.

    block_tables[g] lists the cache blocks of group g (0: full-attention layers, 1: sliding
    layers); a sliding group's entries for blocks before its window are -1 (returned to the pool).
    Those -1 entries are always a prefix, `num_dropped_sliding` long. The block manager bumps
    `tables_version` whenever it changes either table, so (seq_id, tables_version) names a
    table's contents (the model runner rewrites a row's device table only when that changes).
    """

    def __init__(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        emit: Callable[["SequenceOutput"], None],
        request_id: str | None = None,
        cache_salt: str | None = None,
    ):
        self.seq_id = next(_ids)
        self.request_id = request_id or f"req-{self.seq_id}"
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        # generation ends at this length: prompt + max_tokens (the engine's submit caps
        # max_tokens to what the context and the KV cache hold)
        self.max_len = self.num_prompt_tokens + params.max_tokens if params.max_tokens is not None else 1 << 62
        self.cache_salt = cache_salt  # prefix-cache tenant: blocks are shared only within one salt
        self.emit = emit
        self.status = SequenceStatus.WAITING
        self.num_computed = 0
        self.num_cached_prompt_tokens = 0  # prefix-cache hit on first admission
        self.num_preemptions = 0
        self.released = False  # its admission slot was given back (cancelled or finished)
        self.block_tables: list[list[int]] = [[], []]
        self.num_dropped_sliding = 0  # leading -1 entries of block_tables[1]
        self.tables_version = 0
        self.block_hashes: list[int] = []  # chained hashes of the full blocks computed so far
        self.generator: torch.Generator | None = None
        self.finish_reason: str | None = None
        self.pending_row = -1  # row of the last launched step that sampled the PENDING_TOKEN

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed


class SequenceOutput:
    """What the engine hands a request's consumer after a step (or at the end)."""

    __slots__ = ("token_ids", "logprobs", "top_logprobs", "finish_reason", "error", "num_cached_tokens")

    def __init__(
        self,
        token_ids: list[int],
        logprobs: list[float] | None = None,
        top_logprobs: list[list[tuple[int, float]]] | None = None,
        finish_reason: str | None = None,
        error: Exception | None = None,
        num_cached_tokens: int = 0,
    ):
        self.token_ids = token_ids
        self.logprobs = logprobs
        self.top_logprobs = top_logprobs
        self.finish_reason = finish_reason
        self.error = error
        self.num_cached_tokens = num_cached_tokens
