"""Paged KV-cache bookkeeping, pure Python (no torch): which cache block holds which tokens.

Two pools: group 0 serves the full-attention layers, group 1 the sliding-window layers. A
sliding layer only ever reads the last `window` keys, so its blocks before the window go back
to the pool as the sequence grows: those layers stop growing after `window` tokens.

Prefix caching: a full block is named by a chained hash of all tokens up to its end. Freed
blocks keep their name until reused (least recently freed first), so a later request with the
same prefix (system prompt, chat history) shares them instead of recomputing. A request's cache
salt starts its chain, so requests with different salts never share a block.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from .sequence import Sequence

FULL, SLIDING = 0, 1


def _root_hash(seq: Sequence) -> int:
    """Where a sequence's chain of block hashes starts: its cache salt (one per tenant), so no
    block is ever shared, and no cache hit measured, across tenants. No salt: one shared cache."""
    return 0 if seq.cache_salt is None else hash(("cache_salt", seq.cache_salt))


class BlockPool:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.ref_count = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        # free blocks, least recently freed first; hashed ones stay findable until taken
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    def take(self) -> int:
        block, _ = self.free.popitem(last=False)
        h = self.block_hash[block]
        if h is not None and self.hash_to_block.get(h) == block:
            del self.hash_to_block[h]
        self.block_hash[block] = None
        self.block_tokens[block] = None
        self.ref_count[block] = 1
        return block

    def share(self, block: int) -> None:
        if self.ref_count[block] == 0:
            del self.free[block]
        self.ref_count[block] += 1

    def release(self, block: int) -> None:
        self.ref_count[block] -= 1
        if self.ref_count[block] == 0:
            self.free[block] = None

    def lookup(self, h: int, tokens: tuple[int, ...]) -> int | None:
        block = self.hash_to_block.get(h)
        if block is None or self.block_tokens[block] != tokens:
            return None
        return block

    def register(self, block: int, h: int, tokens: tuple[int, ...]) -> None:
        if self.block_hash[block] is not None:
            return
        self.block_hash[block] = h
        self.block_tokens[block] = tokens
        self.hash_to_block.setdefault(h, block)


@dataclass
class PrefixMatch:
    num_tokens: int = 0
    blocks: list[list[int]] = field(default_factory=lambda: [[], []])  # per group, -1 = not needed
    hashes: list[int] = field(default_factory=list)


class KVCacheManager:
    def __init__(
        self,
        num_full_blocks: int,
        num_sliding_blocks: int,
        block_size: int,
        window: int,
        enable_prefix_caching: bool = True,
    ):
        self.block_size = block_size
        self.window = window
        self.pools = [BlockPool(num_full_blocks), BlockPool(num_sliding_blocks)]
        self.has_sliding = num_sliding_blocks > 0
        self.enable_prefix_caching = enable_prefix_caching

    # -- sizes ---------------------------------------------------------------------------------
    def _first_needed_sliding_block(self, first_pos: int) -> int:
        """Lowest block index a sliding layer reads for a query at first_pos or later."""
        return max(0, first_pos - self.window + 1) // self.block_size

    def _needed(self, num_computed: int, num_new: int, tables: list[list[int]]) -> tuple[int, int]:
        """New blocks per group to compute tokens [num_computed, num_computed + num_new)."""
        end_blocks = -(-(num_computed + num_new) // self.block_size)
        need_full = max(0, end_blocks - len(tables[FULL]))
        need_sliding = 0
        if self.has_sliding:
            lo = self._first_needed_sliding_block(num_computed)
            need_sliding = max(0, end_blocks - max(len(tables[SLIDING]), lo))
        return need_full, need_sliding

    def can_allocate(self, seq: Sequence, num_new: int) -> bool:
        nf, ns = self._needed(seq.num_computed, num_new, seq.block_tables)
        return nf <= self.pools[FULL].num_free and ns <= self.pools[SLIDING].num_free

    def fits_alone(self, num_tokens: int) -> bool:
        """Could a sequence of num_tokens tokens ever be scheduled with the whole cache to itself?"""
        return -(-num_tokens // self.block_size) <= self.pools[FULL].num_blocks

    def max_tokens_alone(self) -> int:
        """The most tokens one sequence can hold with the whole cache to itself."""
        return self.pools[FULL].num_blocks * self.block_size

    # -- allocation ------------------------------------------------------------------------------
    def grow(self, seq: Sequence, num_new: int) -> bool:
        """`allocate` when `can_allocate`, else False with nothing changed. Most decode steps
        need no new block and drop none (a block every block_size tokens): that case is a few
        integer comparisons, no pool call."""
        bs = self.block_size
        c = seq.num_computed
        end_blocks = -(-(c + num_new) // bs)
        tables = seq.block_tables
        if end_blocks <= len(tables[FULL]):
            if not self.has_sliding:
                return True
            # a sliding layer's first needed block (as _first_needed_sliding_block), inlined
            lo = (c - self.window + 1) // bs if c >= self.window else 0
            if lo <= seq.num_dropped_sliding and end_blocks <= len(tables[SLIDING]):
                return True
        if not self.can_allocate(seq, num_new):
            return False
        self.allocate(seq, num_new)
        return True

    def allocate(self, seq: Sequence, num_new: int) -> None:
        """Give seq the blocks for its next num_new tokens; drop sliding blocks behind the window."""
        end_blocks = -(-(seq.num_computed + num_new) // self.block_size)
        full = seq.block_tables[FULL]
        changed = len(full) < end_blocks
        while len(full) < end_blocks:
            full.append(self.pools[FULL].take())
        if self.has_sliding:
            sl = seq.block_tables[SLIDING]
            lo = self._first_needed_sliding_block(seq.num_computed)
            dropped = seq.num_dropped_sliding  # sl[:dropped] are -1 already: not walked again
            for i in range(dropped, min(lo, len(sl))):
                if sl[i] >= 0:
                    self.pools[SLIDING].release(sl[i])
                    sl[i] = -1
                    changed = True
            while len(sl) < end_blocks:
                sl.append(self.pools[SLIDING].take() if len(sl) >= lo else -1)
                changed = True
            seq.num_dropped_sliding = max(dropped, min(lo, len(sl)))
        if changed:
            seq.tables_version += 1

    def free(self, seq: Sequence) -> None:
        for g, table in enumerate(seq.block_tables):
            for b in reversed(table):  # tail first: the shared prefix stays cached longest
                if b >= 0:
                    self.pools[g].release(b)
            table.clear()
        seq.block_hashes.clear()
        seq.num_dropped_sliding = 0
        seq.tables_version += 1

    # -- prefix caching --------------------------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> PrefixMatch:
        """Longest cached prefix of seq's tokens (whole blocks, at least one token left to compute)."""
        m = PrefixMatch()
        if not self.enable_prefix_caching:
            return m
        bs = self.block_size
        max_blocks = (len(seq.token_ids) - 1) // bs
        h = _root_hash(seq)
        full_blocks: list[int] = []
        hashes: list[int] = []
        for i in range(max_blocks):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = hash((h, tokens))
            b = self.pools[FULL].lookup(h, tokens)
            if b is None:
                break
            full_blocks.append(b)
            hashes.append(h)
        # Back off until the sliding layers' window before the hit point is cached too.
        n = len(full_blocks)
        while n > 0:
            sliding = [-1] * n
            if self.has_sliding:
                lo = self._first_needed_sliding_block(n * bs)
                ok = True
                for i in range(lo, n):
                    tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
                    b = self.pools[SLIDING].lookup(hashes[i], tokens)
                    if b is None:
                        ok = False
                        break
                    sliding[i] = b
                if not ok:
                    n -= 1
                    continue
            m.num_tokens = n * bs
            m.blocks = [full_blocks[:n], sliding]
            m.hashes = hashes[:n]
            return m
        return m

    def can_admit(self, seq: Sequence, match: PrefixMatch, num_new: int) -> bool:
        """Enough free blocks for the uncached part, counting matched blocks that sit in the free list."""
        reuse_free = [sum(1 for b in match.blocks[g] if b >= 0 and self.pools[g].ref_count[b] == 0) for g in (0, 1)]
        nf, ns = self._needed(match.num_tokens, num_new, match.blocks)
        return (
            nf + reuse_free[FULL] <= self.pools[FULL].num_free
            and ns + reuse_free[SLIDING] <= self.pools[SLIDING].num_free
        )

    def admit(self, seq: Sequence, match: PrefixMatch) -> None:
        for g in (FULL, SLIDING):
            for b in match.blocks[g]:
                if b >= 0:
                    self.pools[g].share(b)
            seq.block_tables[g] = list(match.blocks[g])
        sl = seq.block_tables[SLIDING]
        dropped = 0
        while dropped < len(sl) and sl[dropped] < 0:
            dropped += 1
        seq.num_dropped_sliding = dropped
        seq.tables_version += 1
        seq.block_hashes = list(match.hashes)
        seq.num_computed = match.num_tokens

    def commit(self, seq: Sequence) -> None:
        """After a step: name the blocks that just became full, so later requests can share them.
        Called for every sequence at every step: most steps fill no block, and return at once."""
        bs = self.block_size
        if not self.enable_prefix_caching or seq.num_computed // bs <= len(seq.block_hashes):
            return
        h = seq.block_hashes[-1] if seq.block_hashes else _root_hash(seq)
        for i in range(len(seq.block_hashes), seq.num_computed // bs):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = hash((h, tokens))
            seq.block_hashes.append(h)
            self.pools[FULL].register(seq.block_tables[FULL][i], h, tokens)
            if self.has_sliding and seq.block_tables[SLIDING][i] >= 0:
                self.pools[SLIDING].register(seq.block_tables[SLIDING][i], h, tokens)

    # -- stats -----------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.pools[FULL].num_free + self.pools[SLIDING].num_free

    @property
    def num_total_blocks(self) -> int:
        return self.pools[FULL].num_blocks + self.pools[SLIDING].num_blocks
