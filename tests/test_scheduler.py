"""The scheduler and block manager on their own: pure Python, no model, every decision checked."""

from swallow_stream.engine.block_manager import KVCacheManager
from swallow_stream.engine.scheduler import Scheduler
from swallow_stream.engine.sequence import Sequence, SequenceStatus
from swallow_stream.sampling import SamplingParams


def seq(tokens):
    return Sequence(list(tokens), SamplingParams(), emit=lambda out: None)


def seq_of(n, start=1000):
    return seq(range(start, start + n))


def run_step(kv, batch, sampled_token=7):
    """What the engine does after the model ran: computed tokens advance, full blocks get named,
    a sequence whose known tokens are all computed gets one sampled token."""
    for s, n in batch:
        s.num_computed += n
        kv.commit(s)
        if s.num_computed == len(s.token_ids):
            s.token_ids.append(sampled_token)


def test_running_decodes_first_then_prefill_chunks_under_the_token_budget():
    kv = KVCacheManager(num_full_blocks=64, num_sliding_blocks=0, block_size=4, window=0)
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=16)
    a, b = seq_of(10), seq_of(30, 2000)
    sched.add(a)
    sched.add(b)
    batch, unfittable = sched.schedule()
    assert batch == [(a, 10), (b, 6)] and unfittable == []  # b's prompt is chunked
    run_step(kv, batch)
    assert len(a.token_ids) == 11 and len(b.token_ids) == 30  # a sampled, b has more to prefill
    batch, _ = sched.schedule()
    assert batch == [(a, 1), (b, 15)]  # the decode first, then as much prefill as the budget allows
    run_step(kv, batch)
    batch, _ = sched.schedule()
    assert batch == [(a, 1), (b, 9)]
    assert [s.status for s in (a, b)] == [SequenceStatus.RUNNING] * 2


def test_admission_is_fifo_and_bounded_by_max_num_seqs():
    kv = KVCacheManager(num_full_blocks=64, num_sliding_blocks=0, block_size=4, window=0)
    sched = Scheduler(kv, max_num_seqs=2, max_num_batched_tokens=64)
    seqs = [seq_of(5, 1000 * (i + 1)) for i in range(3)]
    for s in seqs:
        sched.add(s)
    batch, _ = sched.schedule()
    assert [s for s, _ in batch] == seqs[:2]
    assert list(sched.waiting) == [seqs[2]] and seqs[2].status == SequenceStatus.WAITING
    run_step(kv, batch)
    sched.remove(seqs[0])
    assert seqs[0].status == SequenceStatus.FINISHED
    batch, _ = sched.schedule()
    assert batch == [(seqs[1], 1), (seqs[2], 5)]


def test_out_of_blocks_preempts_the_newest_and_admits_nobody_that_step():
    kv = KVCacheManager(num_full_blocks=6, num_sliding_blocks=0, block_size=4, window=0,
                        enable_prefix_caching=False)
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64)
    a, b, c = seq_of(8), seq_of(8, 2000), seq_of(3, 3000)
    sched.add(a)
    sched.add(b)
    batch, _ = sched.schedule()
    assert batch == [(a, 8), (b, 8)] and kv.num_free_blocks == 2
    run_step(kv, batch)
    a.token_ids += [9] * 8  # a now needs 3 more blocks; only 2 are free
    sched.add(c)
    batch, _ = sched.schedule()
    assert batch == [(a, 9)]
    assert b.status == SequenceStatus.WAITING and b.num_computed == 0 and b.num_preemptions == 1
    assert list(sched.waiting) == [b, c]  # the preempted one goes first when blocks come back
    assert sched.num_preemptions == 1 and c.status == SequenceStatus.WAITING
    sched.remove(a)
    assert kv.num_free_blocks == 6


def test_a_sequence_larger_than_the_whole_cache_is_unfittable_and_others_still_run():
    kv = KVCacheManager(num_full_blocks=4, num_sliding_blocks=0, block_size=4, window=0)
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64)
    huge, small = seq_of(17), seq_of(3, 5000)
    sched.add(huge)
    sched.add(small)
    batch, unfittable = sched.schedule()
    assert unfittable == [huge] and batch == [(small, 3)]
    assert sched.has_work()
    sched.remove(small)
    assert not sched.has_work() and kv.num_free_blocks == 4


X, Y, Z, W = ([i] * 4 for i in (11, 22, 33, 44))


def committed(kv, tokens):
    s = seq(tokens)
    kv.allocate(s, len(tokens))
    s.num_computed = len(tokens)
    kv.commit(s)
    return s


def test_prefix_hash_is_chained_a_block_never_matches_at_another_position():
    kv = KVCacheManager(num_full_blocks=32, num_sliding_blocks=0, block_size=4, window=0)
    committed(kv, X + Y + [1])
    assert kv.match_prefix(seq(X + Y + [2])).num_tokens == 8  # the cache does match a real prefix
    # Y is cached as the second block; as a first block its keys would sit at other positions
    assert kv.match_prefix(seq(Y + [2])).num_tokens == 0
    assert kv.match_prefix(seq(Y + X + [2])).num_tokens == 0


def test_prefix_hash_is_chained_a_block_never_matches_after_another_prefix():
    kv = KVCacheManager(num_full_blocks=32, num_sliding_blocks=0, block_size=4, window=0)
    committed(kv, X + [1])
    committed(kv, W + Y + Z + [1])
    # X matches; Y at the same position but after X instead of W must not
    assert kv.match_prefix(seq(X + Y + Z + [2])).num_tokens == 4
    assert kv.match_prefix(seq(W + Y + Z + [2])).num_tokens == 12


def test_sliding_layers_stop_growing_after_window():
    kv = KVCacheManager(num_full_blocks=100, num_sliding_blocks=100, block_size=4, window=8)
    s = seq_of(40)
    kv.allocate(s, 40)
    s.num_computed = 40
    for _ in range(30):  # decode steps
        s.token_ids.append(7)
        kv.allocate(s, 1)
        s.num_computed += 1
    full_used = 100 - kv.pools[0].num_free
    sliding_used = 100 - kv.pools[1].num_free
    assert full_used == 70 // 4 + 1
    assert sliding_used <= 8 // 4 + 2  # one window of blocks, not the whole history
    assert s.block_tables[1][:10] == [-1] * 10
    kv.free(s)
    assert kv.num_free_blocks == 200


def test_prefix_match_requires_sliding_window_blocks():
    kv = KVCacheManager(num_full_blocks=50, num_sliding_blocks=50, block_size=4, window=8)
    a = seq_of(33)
    kv.allocate(a, 33)
    a.num_computed = 33
    kv.commit(a)
    b = seq_of(33)
    m = kv.match_prefix(b)
    assert m.num_tokens == 32  # whole blocks, one token left to compute
    assert all(x >= 0 for x in m.blocks[0]) and m.blocks[1][:6] == [-1] * 6
    kv.free(a)  # freed blocks keep their names until reused
    assert kv.match_prefix(b).num_tokens == 32
    # evict the sliding blocks: the match backs off instead of reading a missing window
    for _ in range(50):
        kv.pools[1].take()
    assert kv.match_prefix(b).num_tokens == 0


def test_block_table_bookkeeping_names_every_change_under_preemption_and_prefix_sharing():
    """The scheduler's decode fast path (`grow`) and the model runner's table rewrites rely on two
    invariants: a sliding table's -1 entries are a prefix `num_dropped_sliding` long, and
    `tables_version` changes whenever either table does (a row whose (seq_id, version) matches
    what the device holds is not rewritten). Also: `grow` allocates exactly what `allocate` does."""
    kv = KVCacheManager(num_full_blocks=40, num_sliding_blocks=24, block_size=4, window=8)
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=24)
    shared = list(range(500, 513))  # a common 13-token prefix: shared cached blocks
    seqs = [seq(shared + list(range(1000 * (i + 1), 1000 * (i + 1) + 3 + 5 * i))) for i in range(5)]
    for s in seqs:
        sched.add(s)
    seen = {}
    for step in range(60):
        before = {id(s): (s.tables_version, [list(t) for t in s.block_tables]) for s in seqs}
        batch, unfittable = sched.schedule()
        assert unfittable == []
        run_step(kv, batch, sampled_token=7 + step)
        for s in seqs:
            version, tables = before[id(s)]
            if s.block_tables != tables:
                assert s.tables_version != version, "tables changed without a new version"
            key = (s.seq_id, s.tables_version)
            assert seen.setdefault(key, [list(t) for t in s.block_tables]) == s.block_tables, "one version, two tables"
            sl, d = s.block_tables[1], s.num_dropped_sliding
            assert sl[:d] == [-1] * d and all(b >= 0 for b in sl[d:])
        if step == 30:
            sched.remove(seqs[0])  # finished: blocks back (named ones stay cached)
    assert sched.num_preemptions > 0  # the pools are small enough that the newest get preempted
    for s in seqs:
        sched.remove(s)
    assert kv.num_free_blocks == 64
