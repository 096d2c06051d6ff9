"""The UI under attack (issue #14), on real servers on loopback with gradio_client and httpx:
the API key guards every Gradio route that can generate, uploads are closed, the UI's queue is
bounded, each UI session is its own prefix-cache tenant, and a short context still chats."""

from __future__ import annotations

import json

import httpx
import pytest
from gradio_client import Client

from server_helpers import ScriptedBackend, reasoning_then_answer, serve
from test_ui import assistant_texts, chat_args

KEY = "ui-sekret"
PAYLOAD = {"data": list(chat_args("hi", max_tokens=16))}


@pytest.fixture(scope="module")
def keyed_ui(tiny_backend):
    from swallow_stream.server import Settings, build_app

    with serve(build_app(tiny_backend, Settings(api_key=KEY, ui_concurrency=2))) as srv:
        yield srv


@pytest.mark.parametrize("method, path", [
    ("POST", "/gradio_api/call/chat"),
    ("POST", "/gradio_api/call/respond"),
    ("POST", "/gradio_api/call/v2/chat"),
    ("POST", "/gradio_api/run/chat"),
    ("POST", "/gradio_api/api/chat"),
    ("POST", "/gradio_api/queue/join"),
    ("GET", "/gradio_api/queue/data?session_hash=abc"),
    ("POST", "/gradio_api/stream/abc"),
    ("POST", "/gradio_api/cancel"),
    ("GET", "/gradio_api/info"),
    ("GET", "/gradio_api/heartbeat/abc"),
    ("GET", "/config"),
])
def test_gradio_routes_refuse_without_the_key(keyed_ui, method, path):
    r = httpx.request(method, keyed_ui.url + path, json=PAYLOAD, timeout=30)
    assert r.status_code == 401, (path, r.status_code, r.text[:200])


def test_uploads_are_closed_with_or_without_a_key(keyed_ui, tiny_server):
    files = {"files": ("x.bin", b"\0" * (1 << 20))}
    for srv in (keyed_ui, tiny_server):
        r = httpx.post(srv.url + "/gradio_api/upload", files=files, timeout=30)
        assert r.status_code == 403


def test_oversized_gradio_bodies_are_refused(tiny_server):
    data = {"data": list(chat_args("a" * (9 << 20), max_tokens=16))}
    r = httpx.post(tiny_server.url + "/gradio_api/call/chat", content=json.dumps(data).encode(),
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413


def test_gradio_client_needs_the_key(keyed_ui):
    with pytest.raises(Exception):
        Client(keyed_ui.url, verbose=False).predict(*chat_args("hi", max_tokens=16), api_name="/chat")
    with pytest.raises(Exception):
        Client(keyed_ui.url, auth=("me", "wrong-key"), verbose=False)
    c = Client(keyed_ui.url, auth=("anyone", KEY), verbose=False)
    hist, _box, stats = c.predict(*chat_args("hi", max_tokens=16), api_name="/chat")
    assert hist[0]["content"] in ("hi", [{"type": "text", "text": "hi"}]) and assistant_texts(hist)
    assert "tokens" in stats


def test_login_cookie_opens_the_api(keyed_ui):
    with httpx.Client(base_url=keyed_ui.url, timeout=30) as c:
        assert c.post("/login", data={"username": "x", "password": "nope"}).status_code == 400
        assert c.post("/gradio_api/call/chat", json=PAYLOAD).status_code == 401
        assert c.post("/login", data={"username": "x", "password": KEY}).status_code == 200
        r = c.post("/gradio_api/call/chat", json=PAYLOAD)
        assert r.status_code == 200 and r.json()["event_id"]
        with c.stream("GET", f"/gradio_api/call/chat/{r.json()['event_id']}") as events:
            body = "".join(events.iter_text())
        assert "event: complete" in body


def test_remote_backend_is_not_reached_without_the_key(standin):
    from swallow_stream import load
    from swallow_stream.server import Settings, build_app

    b = load(None, backend="openai", base_url=standin.url + "/v1", make_default=False)
    try:
        with serve(build_app(b, Settings(api_key=KEY, model_source="remote"))) as srv:
            before = len(standin.state.get("requests", []))
            r = httpx.post(srv.url + "/gradio_api/call/chat", json=PAYLOAD, timeout=30)
            assert r.status_code == 401
            assert len(standin.state.get("requests", [])) == before
            assert httpx.post(srv.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]},
                              timeout=30).status_code == 401
    finally:
        b.shutdown()


def test_ui_queue_is_bounded():
    from swallow_stream.server import Settings, build_app

    b = ScriptedBackend(delay=0.05)
    b.script = lambda messages: reasoning_then_answer(2, 60)
    with serve(build_app(b, Settings(ui_concurrency=1, ui_max_queue=1))) as srv:
        c = Client(srv.url, verbose=False)
        jobs = [c.submit(*chat_args(f"q{i}", max_tokens=100), api_name="/chat") for i in range(5)]
        outcomes = []
        for job in jobs:
            try:
                job.result(timeout=60)
                outcomes.append("ok")
            except Exception as e:
                outcomes.append(str(e))
    refused = [o for o in outcomes if o != "ok"]
    assert refused and all("queue" in o.lower() for o in refused), outcomes
    assert outcomes.count("ok") >= 2


def test_a_short_context_still_chats():
    from swallow_stream import load
    from swallow_stream.server import Settings, build_app

    b = load("tiny", make_default=False, max_num_seqs=2, max_model_len=256)
    try:
        with serve(build_app(b, Settings())) as srv:
            comps = httpx.get(srv.url + "/config", timeout=30).json()["components"]
            default = next(c["props"]["value"] for c in comps if c["props"].get("label") == "Max new tokens")
            c = Client(srv.url, verbose=False)
            hist, _box, stats = c.predict(*chat_args("hi", max_tokens=default), api_name="/chat")
            assert assistant_texts(hist) and not any(t.startswith("⚠️") for t in assistant_texts(hist)), hist
    finally:
        b.shutdown()


def test_ui_sessions_do_not_share_the_prefix_cache(tiny_server):
    engine = tiny_server.backend.engine
    prompt = "Account recovery form. " * 12 + "My PIN is 9876."
    Client(tiny_server.url, verbose=False).predict(*chat_args(prompt, max_tokens=16), api_name="/chat")
    hits = engine.counters.prefix_cache_hit_tokens_total
    Client(tiny_server.url, verbose=False).predict(*chat_args(prompt, max_tokens=16), api_name="/chat")
    assert engine.counters.prefix_cache_hit_tokens_total == hits
