"""Continuous batching, pure Python: each step decides which sequences run and how many tokens.

Per step, under a token budget:
1. running sequences, oldest first: one token each for decodes, the next chunk for prefills
   still in progress; when cache blocks run out the newest running sequence is preempted
   (blocks freed, recomputed later; its prefix is usually still cached);
2. then waiting sequences are admitted, FIFO, while sequence slots, budget and blocks last,
   sharing whatever prefix the cache holds.
"""

from __future__ import annotations

from collections import deque

from .block_manager import KVCacheManager
from .sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take seq out (finished, cancelled or failed) and return its blocks."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq)
        seq.status = SequenceStatus.FINISHED

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.free(seq)
        seq.num_computed = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def schedule(self) -> tuple[list[tuple[Sequence, int]], list[Sequence]]:
        """-> ([(sequence, number of new tokens)], sequences that cannot fit even alone)."""
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        unfittable: list[Sequence] = []
        preempted = False

        running = self.running
        grow = self.kv.grow
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            n = len(seq.token_ids) - seq.num_computed
            if n > budget:
                n = budget
            if not grow(seq, n):
                while True:
                    victim = running[-1]
                    self._preempt(victim)
                    preempted = True
                    if victim is seq or grow(seq, n):
                        break
                if victim is seq:
                    break
            scheduled.append((seq, n))
            budget -= n
            i += 1

        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            if not self.kv.fits_alone(len(seq)):
                self.waiting.popleft()
                unfittable.append(seq)
                continue
            match = self.kv.match_prefix(seq)
            n = min(len(seq) - match.num_tokens, budget)
            if not self.kv.can_admit(seq, match, n):
                if self.running or scheduled:
                    break  # wait for blocks to come back
                self.waiting.popleft()  # the whole cache is free and still too small
                unfittable.append(seq)
                continue
            self.waiting.popleft()
            self.kv.admit(seq, match)
            if seq.num_preemptions == 0 and seq.num_generated == 0:
                seq.num_cached_prompt_tokens = match.num_tokens
            self.kv.allocate(seq, n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append((seq, n))
            budget -= n
        return scheduled, unfittable
