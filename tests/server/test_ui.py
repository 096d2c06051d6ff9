"""The Gradio UI through gradio_client on real servers: growing replies, reasoning in its own
message, history without earlier reasoning, stop, concurrency, the model line and tiny banner."""

from __future__ import annotations

import re
import time

import httpx
import pytest
from gradio_client import Client

from swallow_stream.server.ui import clean_history, model_messages

from server_helpers import ScriptedBackend, engine_idle, reasoning_then_answer, serve, wait_until


def chat_args(message, history=None, *, max_tokens=64, temperature=0.6, effort="medium", system=""):
    return (message, history or [], system, effort, temperature, 0.95, 20, 0.0, max_tokens)


def text_of(msg) -> str:
    c = msg["content"]
    if isinstance(c, str):
        return c
    return "".join(p.get("text", "") for p in c if isinstance(p, dict))


def assistant_texts(history) -> list[str]:
    return [text_of(m) for m in history if m["role"] == "assistant"]


@pytest.fixture(scope="module")
def scripted_ui():
    """A scripted backend behind the full app (UI included). Prompts containing "slow" stream slowly."""
    from swallow_stream.server import Settings, build_app

    b = ScriptedBackend(delay=0.02)
    b.script = lambda messages: reasoning_then_answer(10, 12) if "slow" not in messages[-1]["content"] \
        else reasoning_then_answer(10, 400)
    with serve(build_app(b, Settings(ui_concurrency=4))) as srv:
        srv.backend = b
        srv.client = Client(srv.url, verbose=False)
        yield srv


def test_reply_streams_in_growing_steps_on_tiny(tiny_server):
    c = Client(tiny_server.url, verbose=False)
    job = c.submit(*chat_args("Tell me something", max_tokens=96), api_name="/chat")
    outputs = list(job)
    final = job.result()
    assert final[0][0]["role"] == "user" and text_of(final[0][0]) == "Tell me something"
    assert final[1] == ""  # the textbox is cleared
    lengths = []
    for hist, _box, _stats in outputs:
        lengths.append(sum(len(t) for t in assistant_texts(hist)))
    growing = sorted(set(lengths))
    assert len(growing) >= 4, lengths  # several intermediate, growing states reached the client
    assert lengths == sorted(lengths)  # never shrinks
    assert "tokens/s" in final[2] and "first token" in final[2]
    assert re.search(r"\b\d+ tokens\b.*\b(stop|length)\b", final[2]), final[2]
    # the tiny demo model's babble arrives as a reasoning message, then an answer
    assert [m["role"] for m in final[0]] == ["user", "assistant", "assistant"]
    assert final[0][1]["metadata"]["title"] == "Reasoning"
    assert wait_until(lambda: engine_idle(tiny_server.backend))


def test_reasoning_in_its_own_message_then_answer(scripted_ui):
    job = scripted_ui.client.submit(*chat_args("Hello"), api_name="/chat")
    outputs = list(job)
    final = job.result()[0]
    assert [m["role"] for m in final] == ["user", "assistant", "assistant"]
    thought, answer = final[1], final[2]
    assert thought["metadata"]["title"] == "Reasoning" and thought["metadata"]["status"] == "done"
    assert thought["metadata"]["duration"] >= 0
    assert text_of(thought) == "".join(f"think{i} " for i in range(10))
    assert text_of(answer) == "".join(f"word{i} " for i in range(12))
    assert not answer.get("metadata") or not answer["metadata"].get("title")
    # while it streamed, the reasoning was shown as pending, before any answer existed
    pending = [h for h, _, _ in outputs if len(h) == 2 and (h[1].get("metadata") or {}).get("status") == "pending"]
    assert pending


def test_history_sent_without_earlier_reasoning(scripted_ui):
    b = scripted_ui.backend
    first = scripted_ui.client.submit(*chat_args("First question"), api_name="/chat").result()[0]
    n = len(b.opened)
    scripted_ui.client.submit(*chat_args("Second question", first, system="Be nice", effort="high"),
                              api_name="/chat").result()
    sent = b.opened[n]
    assert sent["messages"] == [
        {"role": "user", "content": "First question"},
        {"role": "assistant", "content": "".join(f"word{i} " for i in range(12))},
        {"role": "user", "content": "Second question"},
    ]
    assert sent["system"] == "Be nice" and sent["reasoning_effort"] == "high"
    assert sent["params"].temperature == 0.6 and sent["params"].top_k == 20 and sent["params"].max_tokens == 64


def test_model_messages_unit():
    hist = clean_history([
        {"role": "user", "content": [{"type": "text", "text": "q1"}]},
        {"role": "assistant", "content": "secret thoughts", "metadata": {"title": "Reasoning", "status": "done"}},
        {"role": "assistant", "content": [{"type": "text", "text": "a1"}]},
        {"role": "user", "content": "q2"},
    ])
    assert model_messages(hist) == [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                                    {"role": "user", "content": "q2"}]


def test_cancelling_the_event_cancels_the_stream(scripted_ui):
    b = scripted_ui.backend
    b.cancel_seen.clear()
    n = len(b.cancelled)
    job = scripted_ui.client.submit(*chat_args("slow please", max_tokens=1000), api_name="/chat")
    assert wait_until(lambda: len(job.outputs()) >= 3, timeout=20)
    job.cancel()
    assert b.cancel_seen.wait(10) and len(b.cancelled) == n + 1
    src = b.cancelled[-1]
    sent = src.sent
    time.sleep(0.2)
    assert src.sent == sent < 410  # nothing more was generated after the cancel


def test_users_run_concurrently(scripted_ui):
    b = scripted_ui.backend
    n = len(b.opened)
    c1 = Client(scripted_ui.url, verbose=False)
    c2 = Client(scripted_ui.url, verbose=False)
    j1 = c1.submit(*chat_args("slow one", max_tokens=60), api_name="/chat")
    j2 = c2.submit(*chat_args("slow two", max_tokens=60), api_name="/chat")
    # both requests are open at the backend at the same time (Gradio's default would serialize them)
    assert wait_until(lambda: len(b.opened) >= n + 2 and not any(s._ended for s in b.sources[n:n + 2]), timeout=20)
    assert len(j1.result()[0]) == 3 and len(j2.result()[0]) == 3


def test_page_names_the_model_and_the_tiny_banner(tiny_server, scripted_ui):
    cfg = httpx.get(tiny_server.url + "/config", timeout=30).json()
    texts = [c.get("props", {}).get("value") for c in cfg["components"]]
    texts = [t for t in texts if isinstance(t, str)]
    assert any("Serving **`tiny`**" in t for t in texts)
    assert any("random noise" in t for t in texts)
    cfg = httpx.get(scripted_ui.url + "/config", timeout=30).json()
    texts = [c.get("props", {}).get("value") for c in cfg["components"]]
    texts = [t for t in texts if isinstance(t, str)]
    assert any("scripted-model" in t for t in texts)
    assert not any("random noise" in t for t in texts)
    # defaults from the model's generation_config; Japanese and English examples
    labels = {c.get("props", {}).get("label"): c.get("props", {}).get("value") for c in cfg["components"]}
    assert labels["Temperature"] == 0.6 and labels["top_p"] == 0.95 and labels["top_k (0 = off)"] == 20
    assert labels["Reasoning effort"] == "medium"
    page = str(cfg)
    assert "Create a casual one-day Tokyo itinerary in Japanese." in page and "東京" in page


def test_ui_shows_backend_errors():
    from swallow_stream.errors import OverloadedError
    from swallow_stream.server import Settings, build_app

    b = ScriptedBackend()
    b.fail_with = OverloadedError("server is at capacity")
    with serve(build_app(b, Settings())) as srv:
        final = Client(srv.url, verbose=False).submit(*chat_args("hi"), api_name="/chat").result()[0]
    assert final[-1]["role"] == "assistant" and "capacity" in text_of(final[-1])


def test_cancel_on_tiny_frees_the_engine(tiny_server):
    b = tiny_server.backend
    job = Client(tiny_server.url, verbose=False).submit(*chat_args("go on and on", max_tokens=5000), api_name="/chat")
    assert wait_until(lambda: b.stats()["running"] == 1, timeout=20)
    assert wait_until(lambda: len(job.outputs()) >= 2, timeout=20)
    job.cancel()
    assert wait_until(lambda: engine_idle(b), timeout=20)
