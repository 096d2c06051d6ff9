"""The remote backend against a local vLLM stand-in: stream(), the UI, the WebSocket and the
OpenAI API all show its reasoning and answer in the right channels."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from gradio_client import Client
from openai import OpenAI
from websockets.asyncio.client import connect

from swallow_stream import stream
from swallow_stream.backends.remote import RemoteBackend, normalize_base_url
from swallow_stream.errors import ModelNotFoundError, OverloadedError
from swallow_stream.request import GenerateRequest, tenant_salt

from server_helpers import STANDIN_ANSWER, STANDIN_MODEL, STANDIN_REASONING, await_until, serve, wait_until

REASONING = "".join(STANDIN_REASONING)
ANSWER = "".join(STANDIN_ANSWER)


@pytest.fixture()
def standin_mode(standin):
    standin.state["mode"] = "normal"
    yield standin.state
    standin.state["mode"] = "normal"


def test_stream_channels_usage_and_request(remote_server, standin, standin_mode):
    b = remote_server.backend
    assert isinstance(b, RemoteBackend) and b.name == STANDIN_MODEL and not b.is_tiny
    assert (b.generation.temperature, b.generation.top_p, b.generation.top_k, b.generation.min_p) == (0.6, 0.95, 20, 0.0)
    assert b.max_model_len == 8192
    s = stream([{"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!", "reasoning": "old thoughts"},
                {"role": "user", "content": "Again"}],
               model=b, system="Be brief.", reasoning_effort="low", max_tokens=50, top_k=5, seed=3)
    events = list(s)
    assert [e.channel for e in events] == ["analysis"] * 3 + ["final"] * 4
    assert all(e.token_id is None for e in events)
    assert s.reasoning == REASONING and s.answer == ANSWER and s.finish_reason == "stop"
    assert (s.usage.prompt_tokens, s.usage.completion_tokens, s.usage.reasoning_tokens) == (21, 7, 3)
    body = standin.state["requests"][-1]
    assert body["model"] == STANDIN_MODEL and body["stream"] is True and body["reasoning_effort"] == "low"
    assert body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Again"}]
    assert (body["max_tokens"], body["top_k"], body["seed"], body["temperature"]) == (50, 5, 3, 0.6)
    assert "cache_salt" not in body  # one local user: no tenant, no salt, nothing an upstream may refuse


def test_tenants_reach_the_upstream_salted(remote_server, standin, standin_mode):
    """The prefix-cache tenant (API key / UI session, plus the request's cache_salt) is forwarded
    as vLLM's cache_salt, so tenants are kept apart in the upstream's cache too."""
    b = remote_server.backend
    list(stream("Hi", model=b, cache_salt="team-a", max_tokens=5))
    assert standin.state["requests"][-1]["cache_salt"] == tenant_salt(None, "team-a")
    salts = {b.request_body(GenerateRequest.create("Hi", b.generation, tenant=t, max_tokens=5))["cache_salt"] for t in ("key-1", "key-2")}
    assert len(salts) == 2 and not any("key-" in s for s in salts)  # distinct, and the key never leaves


def test_cancel_closes_the_http_stream(remote_server, standin, standin_mode):
    standin_mode["mode"] = "slow"
    closed = standin.state.get("streams_closed", 0)
    s = stream("go", model=remote_server.backend)
    for ev in s:
        if ev.channel == "final":
            break  # leaving the loop cancels
    assert s.finish_reason == "cancelled"
    assert wait_until(lambda: standin.state.get("streams_closed", 0) > closed, timeout=10)
    assert standin.state.get("disconnected", 0) >= 1
    assert wait_until(lambda: remote_server.backend.stats()["running"] == 0)


def test_remote_errors(remote_server, standin, standin_mode):
    standin_mode["mode"] = "overloaded"
    with pytest.raises(OverloadedError):
        stream("x", model=remote_server.backend).collect()
    standin_mode["mode"] = "normal"
    other = RemoteBackend(standin.url, model="not-there")  # a URL without /v1 gets it appended
    assert other.base_url == standin.url + "/v1"
    with pytest.raises(ModelNotFoundError):
        stream("x", model=other).collect()
    other.shutdown()
    assert normalize_base_url("https://h.example/openai/v1/") == "https://h.example/openai/v1"


async def test_websocket_on_remote(remote_server, standin_mode):
    async with connect(remote_server.ws) as ws:
        await ws.send(json.dumps({"type": "generate", "id": "r", "prompt": "Hi"}))
        frames = []
        while not frames or frames[-1]["type"] not in ("done", "error"):
            frames.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
        assert frames[0] == {"type": "start", "id": "r", "model": STANDIN_MODEL, "prompt_tokens": 0}
        tokens = [f for f in frames if f["type"] == "token"]
        assert "".join(f["text"] for f in tokens if f["channel"] == "analysis") == REASONING
        assert "".join(f["text"] for f in tokens if f["channel"] == "final") == ANSWER
        chans = [f["channel"] for f in tokens]
        assert chans.index("final") > max(i for i, c in enumerate(chans) if c == "analysis")
        assert frames[-1]["finish_reason"] == "stop" and frames[-1]["usage"]["completion_tokens"] == 7
        standin_mode["mode"] = "overloaded"
        await ws.send(json.dumps({"type": "generate", "id": "o", "prompt": "Hi"}))
        frames = []
        while not frames or frames[-1]["type"] not in ("done", "error"):
            frames.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
        assert frames[-1]["type"] == "error" and frames[-1]["code"] == "overloaded"
    assert await await_until(lambda: remote_server.backend.stats()["running"] == 0)


def test_ui_on_remote(remote_server, standin_mode):
    c = Client(remote_server.url, verbose=False)
    final = c.submit("Hi", [], "", "medium", 0.6, 0.95, 20, 0.0, 128, api_name="/chat").result()[0]
    assert [m["role"] for m in final] == ["user", "assistant", "assistant"]
    thought, answer = final[1], final[2]
    text = lambda m: m["content"] if isinstance(m["content"], str) else "".join(p["text"] for p in m["content"])  # noqa: E731
    assert thought["metadata"]["title"] == "Reasoning" and text(thought) == REASONING
    assert text(answer) == ANSWER


def test_openai_api_on_remote(remote_server, standin_mode):
    c = OpenAI(base_url=remote_server.url + "/v1", api_key="EMPTY", max_retries=0)
    r = c.chat.completions.create(model=STANDIN_MODEL, messages=[{"role": "user", "content": "Hi"}])
    assert r.choices[0].message.content == ANSWER and r.choices[0].message.model_extra["reasoning"] == REASONING
    assert [m.id for m in c.models.list().data] == [STANDIN_MODEL]


def test_cli_builds_the_remote_backend(standin):
    from swallow_stream.server.cli import create_app

    app, settings, backend = create_app(["--backend", "openai", "--base-url", standin.url + "/v1", "--port", "0"])
    try:
        assert isinstance(backend, RemoteBackend) and backend.name == STANDIN_MODEL
        assert backend.kind == "openai" and backend.base_url == standin.url + "/v1"
        with serve(app) as srv:
            health = httpx.get(srv.url + "/health", timeout=30).json()
            assert health["backend"] == "openai" and health["model"] == STANDIN_MODEL and health["ready"]
            models = httpx.get(srv.url + "/v1/models", timeout=30).json()
            assert [m["id"] for m in models["data"]] == [STANDIN_MODEL]
            assert "swallow_engine_running" in httpx.get(srv.url + "/metrics", timeout=30).text
    finally:
        backend.shutdown()
