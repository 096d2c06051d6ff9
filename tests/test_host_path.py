"""One-step-late (overlapped) decoding gives the tokens plain decoding gives.

The overlapped path is CUDA's default; on CPU `overlap=True` runs the same code: each decode step
is launched with the previous step's sampled ids taken from the device buffer, and the host reads
a step's ids only after launching the next one. Stops, max_tokens and cancellation must come out
as in plain decoding: a sequence that stopped never shows the extra token computed for it."""

import threading

import pytest

from swallow_stream.engine.sequence import PENDING_TOKEN
from swallow_stream.sampling import SamplingParams

from engine_helpers import wait_idle

PROMPTS = [[200006, 1428, 200008] + list(range(300 + 17 * i, 340 + 23 * i)) + [200007] for i in range(5)]


class Collector:
    def __init__(self):
        self.tokens, self.logprobs, self.reason = [], [], None
        self.done = threading.Event()
        self.after_finish = 0  # outputs delivered after the finishing one: must stay 0

    def __call__(self, out):
        self.after_finish += self.done.is_set()
        self.tokens += out.token_ids
        self.logprobs += out.logprobs or []
        if out.finish_reason:
            self.reason = out.finish_reason
            self.done.set()


def run(engine, prompts, params):
    cols = [Collector() for _ in prompts]
    seqs = [engine.submit(p, params[i] if isinstance(params, list) else params, c) for i, (p, c) in enumerate(zip(prompts, cols))]
    for c in cols:
        assert c.done.wait(60)
    assert not any(c.after_finish for c in cols)
    return cols, seqs


def count_launches(engine):
    calls = {"launch": 0, "fed": 0}
    launch = engine.runner.launch

    def counted(batch, feed):
        assert all((seq.token_ids[-1] == PENDING_TOKEN) == (r >= 0) for (seq, _), r in zip(batch, feed))
        out = launch(batch, feed)
        calls["launch"] += 1
        calls["fed"] += sum(r >= 0 for r in feed)
        return out

    engine.runner.launch = counted
    return calls


@pytest.fixture(scope="module")
def engines(tiny_path):
    from swallow_stream.checkpoint import open_checkpoint
    from swallow_stream.engine import EngineOptions, LLMEngine

    plain = LLMEngine(open_checkpoint(tiny_path), EngineOptions(device="cpu", overlap=False), name="plain")
    late = LLMEngine(open_checkpoint(tiny_path), EngineOptions(device="cpu", overlap=True), name="late")
    yield plain, late
    plain.shutdown()
    late.shutdown()


def test_overlapped_equals_plain_greedy_and_seeded(engines):
    plain, late = engines
    calls = count_launches(late)
    greedy = SamplingParams(temperature=0, max_tokens=24, logprobs=True)
    want, _ = run(plain, PROMPTS, greedy)
    got, _ = run(late, PROMPTS, greedy)
    assert [c.tokens for c in got] == [c.tokens for c in want]
    assert all(c.reason == "length" and len(c.tokens) == 24 for c in got)
    assert [x for c in got for x in c.logprobs] == pytest.approx([x for c in want for x in c.logprobs], abs=1e-5)
    assert sum(len(c.logprobs) for c in got) == 24 * len(PROMPTS)
    assert calls["launch"] > 20 and calls["fed"] > 50  # the overlapped path ran, fed from the device
    seeded = [SamplingParams(temperature=0.8, top_k=20, top_p=0.95, seed=i, max_tokens=16) for i in range(len(PROMPTS))]
    want, _ = run(plain, PROMPTS, seeded)
    got, _ = run(late, PROMPTS, seeded)
    assert [c.tokens for c in got] == [c.tokens for c in want]
    wait_idle(late)


def test_overlapped_stop_token_ends_where_plain_does(engines):
    plain, late = engines
    free = [c.tokens for c in run(plain, PROMPTS, SamplingParams(temperature=0, max_tokens=20))[0]]
    # each prompt stops at its own 4th generated token (the first time that id appears)
    params = [SamplingParams(temperature=0, max_tokens=20, stop_token_ids=frozenset({t[3]})) for t in free]
    want, _ = run(plain, PROMPTS, params)
    calls = count_launches(late)
    got, seqs = run(late, PROMPTS, params)
    for w, g, t in zip(want, got, free):
        assert g.tokens == w.tokens == t[: t.index(t[3]) + 1]
        assert g.reason == w.reason == "stop"
    assert calls["launch"] > 0
    # the extra token computed for a stopped sequence never reached its token ids
    assert all(PENDING_TOKEN not in s.token_ids for s in seqs)
    wait_idle(late)


def test_overlapped_max_tokens_and_mixed_lengths(engines):
    plain, late = engines
    params = [SamplingParams(temperature=0, max_tokens=n) for n in (1, 2, 3, 7, 12)]
    want, _ = run(plain, PROMPTS, params)
    launch, failures = late.runner.launch, []

    def recording(batch, feed):
        try:
            return launch(batch, feed)
        except Exception as e:  # the engine would fall back to a plain step: hidden, but wrong
            failures.append(e)
            raise

    late.runner.launch = recording
    try:
        got, _ = run(late, PROMPTS, params)
    finally:
        late.runner.launch = launch
    assert [c.tokens for c in got] == [c.tokens for c in want]
    assert [len(c.tokens) for c in got] == [1, 2, 3, 7, 12] and all(c.reason == "length" for c in got)
    # as sequences finish, the rest move to lower rows: a launch still feeds from the previous
    # (larger) launch's rows
    assert failures == []
    wait_idle(late)


def test_cancel_mid_step_emits_a_prefix_and_leaves_others_exact(engines):
    plain, late = engines
    params = SamplingParams(temperature=0, max_tokens=20)
    want, _ = run(plain, PROMPTS[:3], params)
    launch = late.runner.launch
    victim = {}
    state = {"n": 0}

    def cancelling(batch, feed):
        state["n"] += 1
        if state["n"] == 6 and "seq" in victim:
            late.cancel(victim["seq"])  # arrives while this step is being launched
        return launch(batch, feed)

    late.runner.launch = cancelling
    cols = [Collector() for _ in range(3)]
    seqs = []
    for i, (p, c) in enumerate(zip(PROMPTS[:3], cols)):
        seqs.append(late.submit(p, params, c))
        if i == 1:
            victim["seq"] = seqs[-1]
    for c in cols:
        assert c.done.wait(60)
    late.runner.launch = launch
    wait_idle(late)
    assert not any(c.after_finish for c in cols)
    assert cols[1].reason == "cancelled"
    assert 0 < len(cols[1].tokens) < 20 and cols[1].tokens == want[1].tokens[: len(cols[1].tokens)]
    assert [cols[0].tokens, cols[2].tokens] == [want[0].tokens, want[2].tokens]
    wait_idle(late)
