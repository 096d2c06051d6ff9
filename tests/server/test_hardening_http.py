"""HTTP doors under attack (issue #14), on real servers on loopback: OpenAI error shapes for
nested JSON and unsupported fields, logprobs of content tokens only, seeds and empty content,
what /health and /metrics say without the key, the key kept out of the access log, KV admission,
prefix-cache isolation through /v1, and stop strings that ignore the reasoning."""

from __future__ import annotations

import logging

import httpx
import pytest

from swallow_stream.harmony import get_tokenizer
from swallow_stream.harmony.tokens import TOKEN_CHANNEL, TOKEN_MESSAGE, TOKEN_RETURN
from swallow_stream.stream import ChannelSource, Finished, TokenEvent

from server_helpers import ScriptedBackend, serve

CHAT = "/v1/chat/completions"


def post(srv, body, **kw):
    return httpx.post(srv.url + CHAT, json=body, timeout=60, **kw)


def test_nested_json_is_a_400_in_openai_shape_and_keeps_the_connection(tiny_server):
    with httpx.Client(base_url=tiny_server.url, timeout=60) as c:
        r = c.post(CHAT, content=b"[" * 100_000 + b"]" * 100_000, headers={"content-type": "application/json"})
        assert r.status_code == 400
        assert r.json()["error"]["type"] == "invalid_request_error"
        r = c.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")
        assert c.get("/health").status_code == 200


def test_oversized_body_is_refused_unread(tiny_server):
    body = b'{"messages": [{"role": "user", "content": "' + b"a" * (9 << 20) + b'"}]}'
    r = httpx.post(tiny_server.url + CHAT, content=body, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"a" * (1 << 20)
        yield b'"}]}'

    r = httpx.post(tiny_server.url + CHAT, content=chunks(), headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413


@pytest.mark.parametrize("field, value", [
    ("tool_choice", "required"),
    ("response_format", {"type": "json_object"}),
    ("frequency_penalty", 0.5),
    ("presence_penalty", -1),
    ("logit_bias", {"1000": 5}),
])
def test_unsupported_fields_are_refused(tiny_server, field, value):
    r = post(tiny_server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, field: value})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == field and err["type"] == "invalid_request_error"


def test_noop_values_of_unsupported_fields_pass(tiny_server):
    r = post(tiny_server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "frequency_penalty": 0,
                           "presence_penalty": 0, "logit_bias": {}, "response_format": {"type": "text"}})
    assert r.status_code == 200


@pytest.mark.parametrize("body", [
    {"messages": [{"role": "user", "content": "hi"}], "seed": 2**64},
    {"messages": [{"role": "user", "content": "hi"}], "seed": 2**70},
    {"messages": [{"role": "user", "content": ""}]},
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": " "}]},
])
def test_bad_requests_are_400_not_500(tiny_server, body):
    r = post(tiny_server, {**body, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"


class HeaderBackend(ScriptedBackend):
    """Emits a harmony final message with its header, every token with a logprob."""

    def open(self, request, channel):
        tok = get_tokenizer()
        hello, world = tok.encode("Hello")[0], tok.encode(" world")[0]
        final = tok.encode("final")
        events = ([TokenEvent("", None, TOKEN_CHANNEL, True, -0.5)]
                  + [TokenEvent("", "final", t, False, -0.25) for t in final]
                  + [TokenEvent("", "final", TOKEN_MESSAGE, True, -0.5),
                     TokenEvent("Hello", "final", hello, False, -0.1),
                     TokenEvent(" world", "final", world, False, -0.2),
                     TokenEvent("", "final", TOKEN_RETURN, True, -0.3), Finished("stop")])
        for ev in events:
            channel.put(ev)

        class Source(ChannelSource):
            def cancel(self):
                pass

        return Source(channel, self.name, [1, 2, 3])


@pytest.mark.parametrize("streaming", [False, True])
def test_logprobs_list_content_tokens_only(streaming):
    from swallow_stream.server import Settings, build_app

    with serve(build_app(HeaderBackend(), Settings(), ui=False)) as srv:
        body = {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "stream": streaming}
        if not streaming:
            choice = post(srv, body).json()["choices"][0]
            assert choice["message"]["content"] == "Hello world"
            entries = choice["logprobs"]["content"]
        else:
            import json
            entries, text = [], ""
            with httpx.stream("POST", srv.url + CHAT, json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        ch = json.loads(line[6:])["choices"]
                        if ch:
                            text += ch[0]["delta"].get("content") or ""
                            entries += ((ch[0].get("logprobs") or {}).get("content") or [])
            assert text == "Hello world"
    assert [(e["token"], e["logprob"]) for e in entries] == [("Hello", -0.1), (" world", -0.2)]


def test_health_and_metrics_need_the_key_for_details(tiny_auth_server):
    r = httpx.get(tiny_auth_server.url + "/health")
    assert r.status_code == 200 and r.json() == {"status": "ok", "ready": True}
    assert httpx.get(tiny_auth_server.url + "/metrics").status_code == 401
    auth = {"Authorization": "Bearer sekret-key"}
    full = httpx.get(tiny_auth_server.url + "/health", headers=auth).json()
    assert full["model"] == "tiny" and "engine" in full
    assert "swallow_engine_running" in httpx.get(tiny_auth_server.url + "/metrics", headers=auth).text


def test_remote_upstream_url_is_never_shown(remote_server, standin):
    body = httpx.get(remote_server.url + "/health").text
    page = httpx.get(remote_server.url + "/").text
    config = httpx.get(remote_server.url + "/config").text
    host = f"{standin.host}:{standin.port}"
    assert host not in body and host not in page and host not in config


def test_api_key_in_the_url_is_redacted_in_the_access_log(tiny_backend):
    from swallow_stream.server import Settings, build_app

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep()
    loggers = [logging.getLogger(name) for name in ("uvicorn.access", "uvicorn.error")]
    app = build_app(tiny_backend, Settings(api_key="topsecret-123"), ui=False)
    with serve(app, log_level="info", access_log=True) as srv:
        for lg in loggers:  # after uvicorn configured its loggers (which drops their handlers)
            lg.addHandler(handler)
        try:
            httpx.get(srv.url + "/health?api_key=topsecret-123&x=1")
            httpx.get(srv.url + "/v1/models?api_key=topsecret-123")
            from websockets.sync.client import connect
            with connect(srv.ws + "?api_key=topsecret-123") as ws:
                ws.send('{"type": "cancel", "id": "x"}')
                ws.recv(timeout=10)
        finally:
            for lg in loggers:
                lg.removeHandler(handler)
    lines = "\n".join(records)
    assert "/health?api_key=REDACTED&x=1" in lines
    assert "topsecret" not in lines


def test_admission_refuses_what_the_kv_cache_cannot_hold():
    from swallow_stream import load
    from swallow_stream.server import Settings, build_app

    b = load("tiny", make_default=False, max_num_seqs=1, max_model_len=16384, kv_cache_memory=4 << 20)
    try:
        cap = b.engine.kv.max_tokens_alone()
        assert cap < 16384
        with serve(build_app(b, Settings(), ui=False)) as srv:
            r = post(srv, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": cap})
            assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
            assert "KV cache" in r.json()["error"]["message"]
            r = post(srv, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        b.shutdown()


def test_prefix_cache_isolation_through_v1(tiny_backend):
    from swallow_stream.server import Settings, build_app

    template = "Account recovery form. " * 12 + "My PIN is {}. Please confirm it."

    def cached(srv, key, pin):
        r = post(srv, {"messages": [{"role": "user", "content": template.format(pin)}], "max_tokens": 1},
                 headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    with serve(build_app(tiny_backend, Settings(api_key="v-key"), ui=False)) as victim, \
            serve(build_app(tiny_backend, Settings(api_key="a-key"), ui=False)) as attacker:
        cached(victim, "v-key", 5190)
        assert cached(attacker, "a-key", 1000) == 0
        assert cached(attacker, "a-key", 5190) == cached(attacker, "a-key", 2000) > 0


def test_stop_strings_match_the_answer_not_the_reasoning():
    from swallow_stream.server import Settings, build_app

    b = ScriptedBackend(delay=0.0)  # reasoning "think0 think1 …", then the answer "word0 word1 …"
    with serve(build_app(b, Settings(), ui=False)) as srv:
        r = post(srv, {"messages": [{"role": "user", "content": "hi"}], "stop": ["think3", "word2"]}).json()
        msg = r["choices"][0]["message"]
        assert msg["reasoning"] == "".join(f"think{i} " for i in range(6))
        assert msg["content"] == "word0 word1 " and r["choices"][0]["finish_reason"] == "stop"
