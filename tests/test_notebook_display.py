"""A stream renders itself through IPython's display publisher: live, throttled, escaped."""

import asyncio
import itertools
from types import SimpleNamespace

from swallow_stream import astream, notebook, stream
from swallow_stream.notebook import StreamView, display_stream

from engine_helpers import wait_idle
from notebook_helpers import (  # noqa: F401 (fixtures)
    ANSWER,
    REASONING,
    Elements,
    ipython_outputs,
    scripted_engine,
)


def html_of(output) -> str:
    return output["data"]["text/html"]


def one_display(outputs):
    """All publishes belong to one output: a first display, then updates of its display id."""
    assert outputs and not outputs[0]["update"] and all(o["update"] for o in outputs[1:])
    ids = {o["transient"]["display_id"] for o in outputs}
    assert len(ids) == 1 and None not in ids
    return outputs[-1]


def test_throttle_publishes_at_most_once_per_interval(ipython_outputs):
    _, outputs = ipython_outputs
    now = [0.0]
    s = SimpleNamespace(reasoning="", answer="", finish_reason=None, model="m",
                        usage=SimpleNamespace(completion_tokens=0, reasoning_tokens=0, prompt_tokens=3),
                        stats=SimpleNamespace(time_to_first_token=None, tokens_per_second=None))
    view = StreamView([s], min_interval=0.1, clock=lambda: now[0])
    view.show()
    published = []
    for t in (0.02, 0.05, 0.099, 0.1, 0.15, 0.19, 0.2, 0.31):
        now[0] = t
        s.reasoning += "x"
        before = len(outputs)
        view.refresh()
        if len(outputs) > before:
            published.append(t)
    assert published == [0.1, 0.2, 0.31]
    now[0] = 0.32  # too soon for a plain refresh, but the final one is always sent
    s.reasoning += "END"
    view.refresh(final=True)
    assert len(outputs) == 1 + 3 + 1
    assert "xxxxxxxxEND" in html_of(one_display(outputs))


def test_live_updates_are_throttled_and_the_last_is_complete(ipython_outputs, scripted_engine):
    _, outputs = ipython_outputs
    # No time passes on this clock: besides the first display, only the final update goes out.
    s = stream("東京", model=scripted_engine, max_tokens=64)
    display_stream(s, clock=lambda: 0.0)
    assert s.usage.completion_tokens > 20
    assert len(outputs) == 2
    final = Elements(html_of(one_display(outputs)))
    assert Elements.text(final.by_class("swallow-reasoning-text")[0]) == REASONING
    assert Elements.text(final.by_class("swallow-answer")[0]).startswith("浅草から始めましょう。")

    # A clock on which every event comes a second after the last: each one is published.
    outputs.clear()
    s = stream("東京", model=scripted_engine, max_tokens=64)
    display_stream(s, clock=itertools.count().__next__)
    assert len(outputs) >= s.usage.completion_tokens + 1
    one_display(outputs)


def test_final_rendering_has_reasoning_answer_and_stats_apart(ipython_outputs, scripted_engine):
    _, outputs = ipython_outputs
    s = stream("東京", model=scripted_engine, max_tokens=64)
    display_stream(s, clock=itertools.count().__next__)  # every step published
    assert s.finish_reason == "stop"
    final = one_display(outputs)
    el = Elements(html_of(final))

    (details,) = [e for e in el.found if e["tag"] == "details"]
    assert "swallow-reasoning" in details["attrs"]["class"] and "open" not in details["attrs"]
    assert Elements.text(el.inside(details, "summary")[0]).startswith("Reasoning")
    (reasoning,) = el.by_class("swallow-reasoning-text")
    assert any(p is details for p in reasoning["parents"])
    assert Elements.text(reasoning) == REASONING  # the model's <b> is text, not markup
    assert not [e for e in el.found if e["tag"] == "b" and "太字" in Elements.text(e)]

    (answer,) = el.by_class("swallow-answer")
    assert not any(p is details for p in answer["parents"])
    assert [Elements.text(e) for e in el.inside(answer, "strong")] == ["浅草"]  # Markdown rendered
    assert "<script>alert(1)</script>" in Elements.text(answer)  # and raw HTML escaped
    assert not [e for e in el.found if e["tag"] == "script"]
    assert "&lt;script&gt;" in html_of(final) and "<script" not in html_of(final)

    (stats,) = el.by_class("swallow-stats")
    line = Elements.text(stats)
    assert line.startswith("stop") and "tokens/s" in line and "first token" in line
    assert f"{s.usage.completion_tokens} tokens ({s.usage.reasoning_tokens} reasoning)" in line

    plain = final["data"]["text/plain"]
    assert REASONING in plain and ANSWER in plain and line in plain

    # While the reasoning streamed, its block was open and there was no answer yet.
    during = [Elements(html_of(o)) for o in outputs[1:-1]]
    reasoning_phase = [e for e in during if e.by_class("swallow-reasoning-text")
                       and Elements.text(e.by_class("swallow-reasoning-text")[0]) and not e.by_class("swallow-answer")]
    assert reasoning_phase
    assert all("open" in [d for d in e.found if d["tag"] == "details"][0]["attrs"] for e in reasoning_phase)
    assert Elements.text(reasoning_phase[0].by_class("swallow-stats")[0]).startswith("streaming")


def test_evaluating_a_stream_in_a_cell_shows_it_live(ipython_outputs, scripted_engine):
    shell, outputs = ipython_outputs
    shell.user_ns["s"] = s = stream("東京", model=scripted_engine, max_tokens=64)
    result = shell.run_cell("s")
    assert result.success
    assert s.finish_reason == "stop"
    final = Elements(html_of(one_display(outputs)))
    assert Elements.text(final.by_class("swallow-answer")[0]).startswith("浅草から")


def test_plain_text_front_end_keeps_the_repr(ipython_outputs, scripted_engine, capsys):
    shell, outputs = ipython_outputs
    shell.display_formatter.active_types = ["text/plain"]  # what a terminal IPython shows
    shell.user_ns["s"] = s = stream("東京", model=scripted_engine, max_tokens=64)
    shell.run_cell("s")
    assert "<Stream test streaming" in capsys.readouterr().out
    assert outputs == [] and s.finish_reason is None  # not consumed by being looked at
    s.cancel()
    wait_idle(scripted_engine)


def test_display_outside_ipython_prints_the_text(scripted_engine, capsys):
    s = stream("東京", model=scripted_engine, max_tokens=64)
    assert s.display() is None
    out = capsys.readouterr().out
    assert f"[reasoning] {REASONING}\n[answer] {ANSWER}\nstop · " in out


async def test_async_display_renders_without_blocking_the_loop(ipython_outputs, scripted_engine):
    _, outputs = ipython_outputs
    s = astream("東京", model=scripted_engine, max_tokens=64)
    task = s.display()
    assert len(outputs) == 1  # shown before anything is awaited
    ticks = 0

    async def ticker():
        nonlocal ticks
        while not task.done():
            ticks += 1
            await asyncio.sleep(0.002)

    await asyncio.gather(task, ticker())
    assert ticks > 5  # the loop kept running other work while the stream was shown
    assert s.answer == ANSWER
    final = Elements(html_of(one_display(outputs)))
    assert Elements.text(final.by_class("swallow-answer")[0]).startswith("浅草から")


async def test_evaluating_an_async_stream_updates_in_the_background(ipython_outputs, scripted_engine):
    _, outputs = ipython_outputs
    s = astream("東京", model=scripted_engine, max_tokens=64)
    assert s._ipython_display_() is None  # what the display hook calls: returns at once
    assert len(notebook._tasks) == 1 and s.finish_reason is None
    await asyncio.gather(*notebook._tasks)
    assert not notebook._tasks
    assert s.finish_reason == "stop"
    final = Elements(html_of(one_display(outputs)))
    assert Elements.text(final.by_class("swallow-reasoning-text")[0]) == REASONING


def test_an_interrupted_display_cancels_and_shows_it(ipython_outputs, scripted_engine):
    _, outputs = ipython_outputs
    s = stream("東京", model=scripted_engine, max_tokens=64)
    calls = itertools.count()

    def clock():
        if next(calls) == 12:
            raise KeyboardInterrupt
        return 0.0

    try:
        display_stream(s, clock=clock)
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("the interrupt was swallowed")
    assert s.finish_reason == "cancelled"
    wait_idle(scripted_engine)
    assert Elements.text(Elements(html_of(outputs[-1])).by_class("swallow-stats")[0]).startswith("cancelled")
