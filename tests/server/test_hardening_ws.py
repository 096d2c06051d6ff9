"""/ws under attack (issue #14), against real servers on loopback: Origin allow-list, nested
JSON, bad seeds and empty content, oversized frames, cancel freeing the slot at once, and
prefix-cache isolation between API keys."""

from __future__ import annotations

import asyncio
import json

import pytest
import websockets
from websockets.asyncio.client import connect

from server_helpers import await_until, engine_idle, serve
from test_websocket import recv, until_end

GREEDY = {"max_tokens": 8, "temperature": 0}


async def test_foreign_origin_is_refused(tiny_server):
    with pytest.raises(websockets.exceptions.InvalidStatus) as e:
        async with connect(tiny_server.ws, origin="https://evil.example"):
            pass
    assert e.value.response.status_code == 403
    for origin in (None, "http://localhost:3000", tiny_server.url):
        async with connect(tiny_server.ws, origin=origin) as ws:
            await ws.send(json.dumps({"type": "cancel", "id": "x"}))
            assert (await recv(ws))["code"] == "not_found"


async def test_allowed_origin_flag(tiny_backend):
    from swallow_stream.server import Settings, build_app

    app = build_app(tiny_backend, Settings(ws_allowed_origins=("https://app.example",)), ui=False)
    with serve(app) as srv:
        async with connect(srv.ws, origin="https://app.example") as ws:
            await ws.send(json.dumps({"type": "cancel", "id": "x"}))
            assert (await recv(ws))["code"] == "not_found"
        with pytest.raises(websockets.exceptions.InvalidStatus):
            async with connect(srv.ws, origin="https://other.example"):
                pass


async def test_nested_json_is_invalid_request(tiny_server):
    async with connect(tiny_server.ws, max_size=None) as ws:
        await ws.send("[" * 50_000 + "]" * 50_000)
        f = await recv(ws)
        assert f["type"] == "error" and f["code"] == "invalid_request"
        await ws.send(json.dumps({"type": "generate", "id": "after", "prompt": "hi", "params": GREEDY}))
        assert (await until_end(ws, "after"))[-1]["type"] == "done"


@pytest.mark.parametrize("params, needle", [
    ({"seed": 2**64}, "seed"),
    ({"seed": -1}, "seed"),
    ({"cache_salt": 5}, "cache_salt"),
])
async def test_bad_params_are_refused_before_the_engine(tiny_server, params, needle):
    async with connect(tiny_server.ws) as ws:
        await ws.send(json.dumps({"type": "generate", "id": "s", "prompt": "hi", "params": {**GREEDY, **params}}))
        f = await recv(ws)
        assert f["type"] == "error" and f["code"] == "invalid_request" and needle in f["message"]
        await ws.send(json.dumps({"type": "generate", "id": "ok", "prompt": "hi",
                                  "params": {**GREEDY, "seed": 2**64 - 1}}))
        assert (await until_end(ws, "ok"))[-1]["type"] == "done"


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": ""}],
    [{"role": "user", "content": "   \n"}],
    [{"role": "user", "content": [{"type": "text", "text": ""}]}],
])
async def test_empty_content_is_refused(tiny_server, messages):
    async with connect(tiny_server.ws) as ws:
        await ws.send(json.dumps({"type": "generate", "id": "e", "messages": messages, "params": GREEDY}))
        f = await recv(ws)
        assert f["type"] == "error" and f["code"] == "invalid_request" and "empty" in f["message"]


async def test_frame_over_the_limit_gets_an_error_frame(tiny_server):
    # tiny_server's limit is 64 KiB; 2 MiB is far above it and below the transport's 16 MiB
    async with connect(tiny_server.ws, max_size=None) as ws:
        await ws.send(json.dumps({"type": "generate", "id": "big", "prompt": "x" * (2 << 20)}))
        f = await recv(ws)
        assert f["type"] == "error" and f["code"] == "invalid_request" and "limit" in f["message"]
        await ws.send(json.dumps({"type": "generate", "id": "next", "prompt": "hi", "params": GREEDY}))
        assert (await until_end(ws, "next"))[-1]["type"] == "done"


async def test_frame_over_the_transport_limit_closes_with_1009(tiny_server):
    """What the README says: past the transport's 16 MiB the frame is never read; the close says why."""
    async with connect(tiny_server.ws, max_size=None) as ws:
        await ws.send("x" * (17 << 20))
        with pytest.raises(websockets.exceptions.ConnectionClosed) as e:
            await recv(ws)
    assert e.value.rcvd is not None and e.value.rcvd.code == 1009


async def test_cancel_then_generate_is_never_overloaded(limited_server):
    """One engine slot, no queue: each cancel must free it before the very next frame."""
    assert await await_until(lambda: engine_idle(limited_server.backend))
    n = 40
    async with connect(limited_server.ws) as ws:
        for i in range(n):  # back to back, never waiting for a reply
            await ws.send(json.dumps({"type": "generate", "id": i, "prompt": "hi", "params": {"max_tokens": 60}}))
            await ws.send(json.dumps({"type": "cancel", "id": i}))
        ends: dict = {}
        while len(ends) < n:
            f = await recv(ws)
            assert f["type"] != "error", f
            if f["type"] == "done":
                ends[f["id"]] = f["finish_reason"]
        assert set(ends) == set(range(n))
        # the same id again, right after its cancel
        await ws.send(json.dumps({"type": "generate", "id": "same", "prompt": "hi", "params": {"max_tokens": 60}}))
        await ws.send(json.dumps({"type": "cancel", "id": "same"}))
        await ws.send(json.dumps({"type": "generate", "id": "same", "prompt": "hi", "params": {"max_tokens": 4}}))
        seen = []
        while not (seen and seen[-1]["type"] == "done" and seen[-1]["finish_reason"] != "cancelled"):
            seen.append(await recv(ws))
        kinds = [(f["type"], f.get("finish_reason")) for f in seen if f["type"] != "token"]
        assert kinds == [("start", None), ("done", "cancelled"), ("start", None), ("done", "length")]
    assert await await_until(lambda: engine_idle(limited_server.backend))


async def test_cancel_while_opening_frees_the_id(tiny_server):
    """A cancel that arrives while the prompt is still being prepared: the id is free for the
    next frame, and each generation's frames still come start -> done, in order."""
    big = "The quick brown fox jumps over the lazy dog. " * 600  # a few ms of rendering
    async with connect(tiny_server.ws) as ws:
        for _ in range(5):
            await ws.send(json.dumps({"type": "generate", "id": "same", "prompt": big, "params": {"max_tokens": 60}}))
            await ws.send(json.dumps({"type": "cancel", "id": "same"}))
        await ws.send(json.dumps({"type": "generate", "id": "same", "prompt": "hi", "params": {"max_tokens": 3}}))
        kinds = []
        while len(kinds) < 12:
            f = await recv(ws)
            assert f["type"] != "error", f
            if f["type"] != "token":
                kinds.append((f["type"], f.get("finish_reason")))
    assert kinds[:10] == [("start", None), ("done", "cancelled")] * 5
    assert kinds[10] == ("start", None) and kinds[11][0] == "done" and kinds[11][1] != "cancelled"
    assert await await_until(lambda: engine_idle(tiny_server.backend))


async def _cached(ws_url: str, prompt: str, headers: dict | None = None, **params) -> int:
    async with connect(ws_url, additional_headers=headers or {}) as ws:
        await ws.send(json.dumps({"type": "generate", "id": 1, "prompt": prompt,
                                  "params": {"max_tokens": 1, "temperature": 0, **params}}))
        frames = await until_end(ws, 1)
    assert frames[-1]["type"] == "done", frames[-1]
    return frames[-1]["usage"]["cached_tokens"]


# Whole cache blocks follow the PIN, so a repeat of the full prompt caches past it wherever the
# blocks fall (the rendered prompt's header shifts with the date).
TEMPLATE = "Account recovery form. " * 12 + "My PIN is {}. " + "Please confirm it. " * 12


async def test_prefix_cache_is_not_shared_across_api_keys(tiny_backend):
    from swallow_stream.server import Settings, build_app

    victim = TEMPLATE.format(7431)
    # two servers on one engine, each with its own key: two tenants
    with serve(build_app(tiny_backend, Settings(api_key="victim-key"), ui=False)) as a, \
            serve(build_app(tiny_backend, Settings(api_key="attacker-key"), ui=False)) as b:
        va = {"Authorization": "Bearer victim-key"}
        vb = {"Authorization": "Bearer attacker-key"}
        await _cached(a.ws, victim, va)
        assert await _cached(a.ws, victim, va) > 0  # the victim's own tenant does share
        assert await _cached(b.ws, TEMPLATE.format(1111), vb) == 0  # nothing of the victim's
        right = await _cached(b.ws, victim, vb)
        wrong = await _cached(b.ws, TEMPLATE.format(2222), vb)
        assert right == wrong > 0  # the template the attacker sent itself; the guess cannot be told
        # the attacker's own repeated prompt is cached within its tenant, with more tokens than the template
        assert await _cached(b.ws, victim, vb) > wrong


async def test_cache_salt_separates_requests_without_a_key(tiny_server):
    prompt = TEMPLATE.format(2468)
    await _cached(tiny_server.ws, prompt)
    assert await _cached(tiny_server.ws, prompt) > 0  # no key, no salt: one shared cache
    assert await _cached(tiny_server.ws, prompt, cache_salt="tenant-a") == 0
    assert await _cached(tiny_server.ws, prompt, cache_salt="tenant-a") > 0
    assert await _cached(tiny_server.ws, prompt, cache_salt="tenant-b") == 0
