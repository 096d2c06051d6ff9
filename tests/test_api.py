"""The Python API: stream / astream events, outcome, cancellation and input errors."""

import asyncio
import gc
import time

import pytest

from swallow_stream import (
    ContextLengthExceededError,
    InvalidRequestError,
    astream,
    load,
    stream,
)
from swallow_stream.harmony import get_tokenizer, render_prompt

from engine_helpers import script_tokens, wait_idle


def test_stream_events_and_outcome(tiny_engine):
    s = stream("Hello there", model=tiny_engine, temperature=0, max_tokens=12, logprobs=True)
    events = list(s)
    assert s.finish_reason in ("length", "stop")
    ids = [e.token_id for e in events if e.token_id is not None]
    assert ids == s.token_ids and len(ids) == s.usage.completion_tokens
    assert s.prompt_token_ids == render_prompt("Hello there")
    assert s.usage.prompt_tokens == len(s.prompt_token_ids)
    assert all(e.logprob is not None and e.logprob <= 0 for e in events if e.token_id is not None)
    assert all(str(e) == e.text for e in events)
    assert s.stats.time_to_first_token > 0 and s.stats.total_time >= s.stats.time_to_first_token
    # text of events equals the decoded non-special content
    assert all(e.text == "" for e in events if e.special and e.token_id is not None and e.token_id >= 200000)


def test_channels_from_a_harmony_completion(make_engine, tiny_path):
    engine = make_engine(tiny_path)
    tok = get_tokenizer()
    completion = (
        [200005] + tok.encode("analysis") + [200008] + tok.encode("ユーザーは東京の旅程を求めている。")
        + [200007, 200006] + tok.encode("assistant") + [200005] + tok.encode("final") + [200008]
        + tok.encode("浅草から始めましょう。") + [200002]
    )
    script_tokens(engine, completion)
    s = stream("東京の一日プラン", model=engine, temperature=0)
    events = list(s)
    assert s.finish_reason == "stop"  # on <|return|>, not on the <|end|> after the analysis
    assert s.token_ids == completion
    assert s.reasoning == "ユーザーは東京の旅程を求めている。"
    assert s.answer == "浅草から始めましょう。"
    assert "".join(e.text for e in events if e.channel == "analysis") == s.reasoning
    assert "".join(e.text for e in events if e.channel == "final") == s.answer
    assert s.usage.reasoning_tokens > 0
    assert [e.special for e in events if e.token_id == 200007] == [True]


def test_stop_string_ends_generation(make_engine, tiny_path):
    engine = make_engine(tiny_path)
    tok = get_tokenizer()
    completion = [200005] + tok.encode("final") + [200008] + tok.encode("one two three STOP four five six")
    script_tokens(engine, completion)
    s = stream("count", model=engine, temperature=0, stop=["STOP"], max_tokens=100)
    text = "".join(e.text for e in s)
    assert s.finish_reason == "stop"
    assert text == "one two three " and s.answer == "one two three "
    wait_idle(engine)


def test_break_cancels_and_frees_cache(tiny_engine):
    s = stream("Tell me a long story", model=tiny_engine, temperature=0.7, max_tokens=500)
    for i, _ in enumerate(s):
        if i == 3:
            break
    assert s.finish_reason == "cancelled"
    wait_idle(tiny_engine)


def test_garbage_collection_cancels(tiny_engine):
    s = stream("Tell me a long story", model=tiny_engine, temperature=0.7, max_tokens=500)
    next(s)
    del s
    gc.collect()
    wait_idle(tiny_engine)


async def test_astream_in_running_loop(tiny_engine):
    s = astream("Hello", model=tiny_engine, temperature=0, max_tokens=8)
    ids = [e.token_id async for e in s if e.token_id is not None]
    ref = stream("Hello", model=tiny_engine, temperature=0, max_tokens=8).collect()
    assert ids == ref.token_ids and s.finish_reason == ref.finish_reason


async def test_astream_break_frees_cache(tiny_engine):
    s = astream("Hello", model=tiny_engine, temperature=0.5, max_tokens=400)
    n = 0
    async for _ in s:
        n += 1
        if n == 2:
            break
    await asyncio.sleep(0)
    assert s.finish_reason == "cancelled"
    await asyncio.to_thread(wait_idle, tiny_engine)


def test_load_tiny_offline_and_default(fresh_registry):
    t0 = time.monotonic()
    b = load("tiny")
    assert time.monotonic() - t0 < 60
    assert b.is_tiny and b.name == "tiny"
    s = stream("hi", temperature=0, max_tokens=3).collect()  # default model
    assert s.model == "tiny" and s.usage.completion_tokens == 3
    assert fresh_registry.default() is b
    b.shutdown()
    assert fresh_registry.default() is None  # a shut-down backend drops out of every lookup


def test_tiny_demo_babbles_reasoning_then_answer(make_engine):
    """The tiny model's random weights carry a harmony-shaped imprint (checkpoint.synthetic)."""
    from swallow_stream.checkpoint import materialize_preset
    from swallow_stream.checkpoint.synthetic import DEMO_REASONING

    b = make_engine(materialize_preset("tiny"))
    for seed in (0, 1):
        s = stream("Create a casual one-day Tokyo itinerary in Japanese.", model=b, seed=seed, max_tokens=200)
        channels = [e.channel for e in s if e.text]
        assert s.finish_reason == "stop"
        assert s.reasoning == DEMO_REASONING
        assert s.answer.startswith("これは") and s.answer.endswith("です。")
        assert channels == sorted(channels)  # every analysis piece before every final piece
        assert set(channels) == {"analysis", "final"}


@pytest.mark.parametrize(
    "prompt, kw, err, match",
    [
        ([], {}, InvalidRequestError, "empty"),
        ("", {}, InvalidRequestError, "empty"),
        ([{"role": "wizard", "content": "hi"}], {}, InvalidRequestError, "wizard"),
        ([{"role": "user"}], {}, InvalidRequestError, "content"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], {}, InvalidRequestError, "image_url"),
        ("hi", {"max_tokens": 0}, InvalidRequestError, "max_tokens"),
        ("hi", {"max_tokens": -1}, InvalidRequestError, "max_tokens"),
        ("hi", {"reasoning_effort": "extreme"}, InvalidRequestError, "reasoning_effort"),
        ("hi", {"temperature": "warm"}, InvalidRequestError, "temperature"),
        ("word " * 400, {}, ContextLengthExceededError, "context length"),
        ("hi", {"max_tokens": 10_000}, ContextLengthExceededError, "max_tokens"),
    ],
)
def test_bad_input_clear_errors(make_engine, tiny_path, prompt, kw, err, match):
    engine = make_engine(tiny_path, max_model_len=256)
    with pytest.raises(err, match=match):
        stream(prompt, model=engine, **kw)
    # and the engine still serves
    assert stream("hi", model=engine, temperature=0, max_tokens=2).collect().usage.completion_tokens == 2


def test_preamble_commentary_is_answer_text_and_reasoning_is_not():
    """vLLM reports commentary with no recipient (a preamble) in `content`: so does a Stream."""
    from swallow_stream.stream import ChannelSource, Finished, QueueChannel, Stream, TokenEvent

    class Fixed(ChannelSource):
        def cancel(self):
            pass

    channel = QueueChannel()
    for ev in [TokenEvent("think ", "analysis", 1), TokenEvent("Let me check. ", "commentary", 2),
               TokenEvent("", None, 3, special=True), TokenEvent("Done.", "final", 4), Finished("stop")]:
        channel.put(ev)
    s = Stream(Fixed(channel, "m")).collect()
    assert s.reasoning == "think " and s.answer == "Let me check. Done."
    assert s.token_ids == [1, 2, 3, 4] and s.usage.reasoning_tokens == 1


def test_astream_whose_loop_closed_is_cancelled(tiny_engine):
    loop = asyncio.new_event_loop()
    s = loop.run_until_complete(_first_event(tiny_engine))
    loop.close()  # nobody will ever read the rest: the engine must stop generating it
    wait_idle(tiny_engine)
    assert s.finish_reason is None  # never read again; the request was cancelled underneath


async def _first_event(engine):
    s = astream("Tell me a long story", model=engine, temperature=0.7, max_tokens=2000)
    await s.__anext__()
    return s


def test_stop_strings_ignore_the_reasoning(make_engine, tiny_path):
    engine = make_engine(tiny_path)
    tok = get_tokenizer()
    completion = ([200005] + tok.encode("analysis") + [200008] + tok.encode("thinking STOP more") + [200007, 200006]
                  + tok.encode("assistant") + [200005] + tok.encode("final") + [200008]
                  + tok.encode("one STOP two"))
    script_tokens(engine, completion)
    s = stream("count", model=engine, temperature=0, stop=["STOP"], max_tokens=100).collect()
    assert s.reasoning == "thinking STOP more"
    assert s.answer == "one " and s.finish_reason == "stop"
    wait_idle(engine)


@pytest.mark.parametrize("seed", [2**64, -1])
def test_seed_is_64_bit(tiny_engine, seed):
    with pytest.raises(InvalidRequestError, match="seed"):
        stream("hi", model=tiny_engine, seed=seed)
    assert stream("hi", model=tiny_engine, seed=2**64 - 1, max_tokens=2).collect().finish_reason == "length"
