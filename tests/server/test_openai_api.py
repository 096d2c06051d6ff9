"""The OpenAI-compatible API with the official `openai` client, on real servers on loopback."""

from __future__ import annotations

import contextlib
import io

import httpx
import openai
import pytest
from openai import OpenAI

from swallow_stream import stream
from swallow_stream.api import MODEL_120B

from server_helpers import ScriptedBackend, engine_idle, serve, wait_until

MODEL_CARD_SNIPPET = '''
from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:PORT/v1", api_key="EMPTY")
r = client.chat.completions.create(
    model="tokyotech-llm/GPT-OSS-Swallow-120B-RL-v0.1-MXFP4",
    messages=[{"role": "user", "content": "Create a casual one-day Tokyo itinerary in Japanese."}],
)
print(r.choices[0].message.content)
'''


@pytest.fixture(scope="module")
def scripted_server():
    """A scripted backend serving under the headline model's name (reasoning, then the answer)."""
    from swallow_stream.server import Settings, build_app

    b = ScriptedBackend(name=MODEL_120B, delay=0.0)
    with serve(build_app(b, Settings(), ui=False)) as srv:
        srv.backend = b
        yield srv


def client(srv, **kw) -> OpenAI:
    kw.setdefault("api_key", "EMPTY")
    return OpenAI(base_url=srv.url + "/v1", max_retries=0, timeout=60, **kw)


def test_model_card_snippet_runs_unchanged(scripted_server):
    code = MODEL_CARD_SNIPPET.replace("PORT", str(scripted_server.port))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<model card>", "exec"), {})
    assert out.getvalue() == "".join(f"word{i} " for i in range(8)) + "\n"
    # the answer only: the reasoning went to its own field
    r = client(scripted_server).chat.completions.create(model=MODEL_120B, messages=[{"role": "user", "content": "hi"}])
    msg = r.choices[0].message
    assert msg.content == "".join(f"word{i} " for i in range(8))
    assert msg.model_extra["reasoning"] == "".join(f"think{i} " for i in range(6))
    assert msg.model_extra["reasoning_content"] == msg.model_extra["reasoning"]
    assert r.model == MODEL_120B and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 14 and r.usage.completion_tokens_details.reasoning_tokens == 6
    r = client(scripted_server).chat.completions.create(model=MODEL_120B, messages=[{"role": "user", "content": "hi"}],
                                                        extra_body={"include_reasoning": False})
    assert "reasoning" not in (r.choices[0].message.model_extra or {})


def test_snippet_on_tiny_stand_in(tiny_server):
    """The tiny stand-in accepts the model card's name (responses say model 'tiny')."""
    ref = stream("Hi", model=tiny_server.backend, max_tokens=40, temperature=0).collect()
    r = client(tiny_server).chat.completions.create(
        model=MODEL_120B, messages=[{"role": "user", "content": "Hi"}], max_tokens=40, temperature=0)
    assert r.model == "tiny"
    assert r.usage.completion_tokens == 40 and r.choices[0].finish_reason == "length"
    text = "".join(ev.text for ev in stream("Hi", model=tiny_server.backend, max_tokens=40, temperature=0)
                   if ev.channel != "analysis")
    assert r.choices[0].message.content == text
    assert r.choices[0].message.model_extra["reasoning"] == ref.reasoning


def test_streaming_reasoning_then_content(scripted_server):
    chunks = list(client(scripted_server).chat.completions.create(
        model=MODEL_120B, messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True}))
    kinds = []
    reasoning, content = "", ""
    for c in chunks:
        if not c.choices:
            continue
        d = c.choices[0].delta
        extra = d.model_extra or {}
        if extra.get("reasoning"):
            kinds.append("r")
            reasoning += extra["reasoning"]
        if d.content:
            kinds.append("c")
            content += d.content
    assert reasoning == "".join(f"think{i} " for i in range(6))
    assert content == "".join(f"word{i} " for i in range(8))
    assert kinds == sorted(kinds, reverse=True) and "r" in kinds and "c" in kinds  # reasoning first
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 14


def test_streaming_on_tiny_matches_stream(tiny_server):
    ref = list(stream("stream me", model=tiny_server.backend, max_tokens=40, temperature=0))
    with httpx.stream("POST", tiny_server.url + "/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": [{"role": "user", "content": "stream me"}],
        "max_tokens": 40, "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    import json

    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    reasoning = "".join(c["choices"][0]["delta"].get("reasoning", "") for c in chunks if c["choices"])
    assert content == "".join(e.text for e in ref if e.channel != "analysis")
    assert reasoning == "".join(e.text for e in ref if e.channel == "analysis")
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 40  # usage in the last chunk even unasked


def test_logprobs(tiny_server):
    r = client(tiny_server).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=36, temperature=0,
        logprobs=True, top_logprobs=2)
    entries = r.choices[0].logprobs.content
    assert entries and all(e.logprob <= 0 and len(e.top_logprobs) == 2 for e in entries)
    assert all(e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob for e in entries)


def test_models_endpoint(tiny_server, tiny_auth_server):
    models = client(tiny_server).models.list()
    assert [m.id for m in models.data] == ["tiny"]
    with pytest.raises(openai.AuthenticationError):
        client(tiny_auth_server).models.list()
    assert [m.id for m in client(tiny_auth_server, api_key="sekret-key").models.list().data] == ["tiny"]


def test_errors(tiny_server, tiny_auth_server, limited_server, scripted_server):
    c = client(tiny_server)
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=msgs, temperature=-3)
    assert e.value.status_code == 400 and e.value.body["type"] == "invalid_request_error"
    assert "temperature" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="tiny", messages=[])
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="tiny", messages=[{"role": "robot", "content": "x"}])
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="no-such-model", messages=msgs)
    assert e.value.status_code == 404 and e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client(scripted_server).chat.completions.create(model="tiny", messages=msgs)  # not what this one serves
    with pytest.raises(openai.AuthenticationError) as e:
        client(tiny_auth_server, api_key="wrong").chat.completions.create(model="tiny", messages=msgs, max_tokens=2)
    assert e.value.status_code == 401
    ok = client(tiny_auth_server, api_key="sekret-key").chat.completions.create(model="tiny", messages=msgs, max_tokens=2)
    assert ok.usage.completion_tokens == 2
    with pytest.raises(openai.BadRequestError) as e:
        client(limited_server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "w " * 300}])
    assert e.value.body["code"] == "context_length_exceeded"
    # raw shape, as other clients see it
    r = httpx.post(tiny_server.url + "/v1/chat/completions", content=b"{nope", timeout=30)
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_overloaded_is_429(limited_server):
    b = limited_server.backend
    c = client(limited_server)
    c.models.list()  # warm the client up first: the first request runs for ~1 s only
    with httpx.stream("POST", limited_server.url + "/v1/chat/completions", timeout=60, json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 60, "stream": True}) as r:
        lines = r.iter_lines()  # held: a dropped iterator closes the response, and the server cancels
        next(lines)  # the first one is running and holds the only slot
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert e.value.status_code == 429 and e.value.body["code"] == "overloaded"
    # leaving the SSE stream early cancels the request in the engine
    assert wait_until(lambda: engine_idle(b))


def test_internal_error_is_500():
    from swallow_stream.server import Settings, build_app

    b = ScriptedBackend()
    b.fail_with = RuntimeError("kaboom")
    with serve(build_app(b, Settings(), ui=False)) as srv:
        with pytest.raises(openai.InternalServerError) as e:
            client(srv).chat.completions.create(model="scripted-model", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 500


def test_client_giving_up_frees_the_engine(tiny_server):
    b = tiny_server.backend
    before = b.stats()["requests_finished_total"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(tiny_server.url + "/v1/chat/completions", timeout=httpx.Timeout(30, read=1.0),
                   json={"messages": [{"role": "user", "content": "a long one"}], "max_tokens": 5000,
                         "temperature": 0})  # greedy: the tiny demo model loops in its answer
    assert wait_until(lambda: b.stats()["requests_finished_total"] > before and engine_idle(b), timeout=20)
    assert b.stats()["generated_tokens_total"] > 0
