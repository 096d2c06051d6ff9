"""Serving engine: continuous batching, preemption, prefix caching, limits and isolation."""

import threading

import pytest

from swallow_stream import ContextLengthExceededError, OverloadedError, stream

from engine_helpers import wait_idle

PROMPTS = [
    "Create a casual one-day Tokyo itinerary in Japanese.",
    "東京の一日観光プランを作ってください。",
    "Explain mixture-of-experts routing in two sentences.",
    "What is the capital of Japan?",
    "Write a haiku about Mount Fuji.",
]


def solo(engine, prompt, n):
    return stream(prompt, model=engine, temperature=0, max_tokens=n).collect().token_ids


def run_staggered(engine, prompts, n, start_after=3):
    """Start each stream once the previous one has produced `start_after` tokens."""
    results = [None] * len(prompts)
    started = [threading.Event() for _ in prompts]

    def worker(i):
        s = stream(prompts[i], model=engine, temperature=0, max_tokens=n)
        count = 0
        for ev in s:
            count += ev.token_id is not None
            if count == start_after:
                started[i].set()
        started[i].set()
        results[i] = s.token_ids

    threads = []
    for i in range(len(prompts)):
        t = threading.Thread(target=worker, args=(i,))
        t.start()
        threads.append(t)
        started[i].wait(30)
    for t in threads:
        t.join(60)
    return results


def test_concurrent_streams_equal_solo(tiny_engine):
    n = 24
    alone = [solo(tiny_engine, p, n) for p in PROMPTS]
    together = run_staggered(tiny_engine, PROMPTS, n)
    assert together == alone
    wait_idle(tiny_engine)


def test_equal_solo_across_forced_preemption(tiny_path, tiny_engine, make_engine):
    n = 40
    alone = [solo(tiny_engine, p, n) for p in PROMPTS[:4]]
    # 88 sliding + 22 full-attention blocks of 4 KiB per layer (16 tokens each): four ~100-token sequences cannot all fit
    small = make_engine(tiny_path, max_num_seqs=4, max_num_batched_tokens=64, block_size=16,
                        kv_cache_memory=(88 + 22) * 2 * 4096, enable_prefix_caching=False)
    assert small.kv.pools[0].num_blocks < 4 * 100 // 16
    together = run_staggered(small, PROMPTS[:4], n, start_after=1)
    assert small.scheduler.num_preemptions > 0
    assert together == alone
    snap = wait_idle(small)
    assert snap["kv_blocks_used"] == 0


def test_blocks_return_after_burst_and_cancel(tiny_engine):
    streams = [stream(p, model=tiny_engine, temperature=0.8, max_tokens=30) for p in PROMPTS * 3]
    for i, s in enumerate(streams):
        if i % 3 == 0:
            next(s)
            s.cancel()
    for s in streams:
        s.collect()
    assert {s.finish_reason for s in streams} <= {"length", "stop", "cancelled"}
    assert sum(s.finish_reason == "cancelled" for s in streams) == 5
    kv = tiny_engine.kv
    wait_idle(tiny_engine)
    assert kv.num_free_blocks == kv.num_total_blocks
    assert all(r == 0 for pool in kv.pools for r in pool.ref_count)


def test_prefix_cache_hit_same_output_fewer_prefill_tokens(tiny_path, make_engine):
    engine = make_engine(tiny_path, block_size=16)
    system = "You are a meticulous travel planner for Tokyo. " * 12
    first = stream("Plan a day in Asakusa.", model=engine, system=system, temperature=0, max_tokens=16).collect()
    before = engine.snapshot()["computed_tokens_total"]
    again = stream("Plan a day in Asakusa.", model=engine, system=system, temperature=0, max_tokens=16).collect()
    computed = engine.snapshot()["computed_tokens_total"] - before
    assert again.token_ids == first.token_ids
    assert again.usage.cached_tokens >= len(first.prompt_token_ids) - 16
    assert computed <= 16 + 16  # the uncached tail of the prompt + one token per decode step
    # a different question after the same system prompt shares the system prefix
    other = stream("Plan a day in Ueno.", model=engine, system=system, temperature=0, max_tokens=4).collect()
    assert other.usage.cached_tokens >= 16 * ((len(first.prompt_token_ids) - 40) // 16)
    wait_idle(engine)


def test_overload_error_and_engine_keeps_serving(tiny_path, make_engine):
    engine = make_engine(tiny_path, max_num_seqs=1, max_queued_requests=1)
    a = stream("one", model=engine, temperature=0.8, max_tokens=200)
    b = stream("two", model=engine, temperature=0.8, max_tokens=200)
    with pytest.raises(OverloadedError, match="capacity"):
        stream("three", model=engine, max_tokens=5)
    a.cancel()
    b.cancel()
    wait_idle(engine)
    assert stream("four", model=engine, temperature=0, max_tokens=3).collect().usage.completion_tokens == 3


def test_too_long_prompt_leaves_others_running(tiny_path, make_engine):
    engine = make_engine(tiny_path, max_model_len=200)
    s = stream("a fine request", model=engine, temperature=0, max_tokens=30)
    with pytest.raises(ContextLengthExceededError):
        stream("long " * 300, model=engine)
    assert s.collect().usage.completion_tokens == 30


def test_failing_request_fails_alone(tiny_path, make_engine):
    engine = make_engine(tiny_path)
    real_prepare = engine.runner.prepare

    def prepare(batch):
        if any(seq.request_id == "poison" for seq, _ in batch):
            raise RuntimeError("injected failure")
        return real_prepare(batch)

    engine.runner.prepare = prepare
    good = stream("good", model=engine, temperature=0, max_tokens=20)
    bad = stream("bad", model=engine, temperature=0, max_tokens=20, request_id="poison")
    with pytest.raises(Exception, match="injected failure"):
        bad.collect()
    assert bad.finish_reason == "error"
    assert good.collect().usage.completion_tokens == 20
    engine.runner.prepare = real_prepare
    assert solo(engine, "good", 20) == good.token_ids
    wait_idle(engine)
    assert engine.snapshot()["requests_failed_total"] == 1


# -- block manager, pure Python -------------------------------------------------------------------
def test_inline_engine_steps_in_the_consumer(tiny_path, tiny_engine, make_engine):
    """Inline mode (ZeroGPU): no engine thread; each consumer drives steps; same tokens."""
    engine = make_engine(tiny_path, inline=True)
    assert engine.inline and engine._thread is None
    ref = [solo(tiny_engine, p, 12) for p in PROMPTS[:3]]
    streams = [stream(p, model=engine, temperature=0, max_tokens=12) for p in PROMPTS[:3]]
    assert [s.collect().token_ids for s in streams] == ref
    s = stream(PROMPTS[0], model=engine, temperature=0.7, max_tokens=100)
    next(s)
    s.cancel()
    engine.pump()
    wait_idle(engine)


def test_failed_graph_capture_falls_back_to_eager_decode(tiny_path, tiny_engine, make_engine):
    # on a CPU the capture itself fails: the engine must still serve, decoding eagerly
    engine = make_engine(tiny_path, cuda_graphs=True)
    assert engine.runner.decode.use_graphs is False and not engine.runner.decode.graphs
    assert solo(engine, PROMPTS[1], 10) == solo(tiny_engine, PROMPTS[1], 10)


def test_seed_reproduces_tokens_alone_and_in_a_batch(tiny_path, make_engine):
    """Sampling (temperature 1 on random weights) is reproducible by seed, whatever else shares
    the batch, and another seed gives another continuation."""
    engine = make_engine(tiny_path)
    prompt, n = PROMPTS[0], 24

    def sampled(seed, **kw):
        return stream(prompt, model=engine, temperature=1.0, top_p=1.0, top_k=0, seed=seed, max_tokens=n, **kw)

    alone = sampled(7).collect().token_ids
    others = [sampled(100 + i) for i in range(3)]
    together = sampled(7)
    batched = together.collect().token_ids
    for o in others:
        o.collect()
    assert engine.snapshot()["num_preemptions"] == 0 and len(alone) == n
    assert batched == alone
    assert sampled(8).collect().token_ids != alone
    # the other requests really sampled (they differ from each other and from seed 7)
    assert len({tuple(o.token_ids) for o in others} | {tuple(alone)}) == 4
