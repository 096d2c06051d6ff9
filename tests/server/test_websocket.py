"""/ws against real servers on loopback: the protocol, every error code, concurrency, cancel,
disconnect freeing the engine's blocks, auth, and the package's client."""

from __future__ import annotations

import asyncio
import json

import pytest
import websockets
from websockets.asyncio.client import connect

from swallow_stream import stream
from swallow_stream.errors import ContextLengthExceededError, InvalidRequestError, OverloadedError
from swallow_stream.harmony import render_prompt

from server_helpers import ScriptedBackend, await_until, engine_idle, serve

GREEDY = {"max_tokens": 40, "temperature": 0}


async def recv(ws, timeout: float = 30.0) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def until_end(ws, gid, frames: list | None = None, timeout: float = 60.0) -> list[dict]:
    """Frames of generation `gid` up to and including its done/error frame."""
    out = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        f = await recv(ws, max(0.1, deadline - loop.time()))
        if frames is not None:
            frames.append(f)
        if f.get("id") != gid:
            continue
        out.append(f)
        if f["type"] in ("done", "error"):
            return out


def reference(backend, prompt, **params):
    s = stream(prompt, model=backend, **params)
    s.collect()
    return s


async def test_generate_full_protocol(tiny_server):
    ref = reference(tiny_server.backend, "Hello there", **GREEDY)
    async with connect(tiny_server.ws) as ws:
        await ws.send(json.dumps({"type": "generate", "id": "g1", "prompt": "Hello there", "params": GREEDY}))
        frames = await until_end(ws, "g1")
    start, tokens, done = frames[0], frames[1:-1], frames[-1]
    assert start == {"type": "start", "id": "g1", "model": "tiny",
                     "prompt_tokens": len(render_prompt("Hello there"))}
    assert tokens and all(f["type"] == "token" for f in tokens)
    assert all(set(f) == {"type", "id", "channel", "text", "token_ids"} for f in tokens)
    ids = [t for f in tokens for t in f["token_ids"]]
    assert ids == ref.token_ids and len(ids) == 40
    assert "".join(f["text"] for f in tokens) == "".join(ev.text for ev in stream("Hello there", model=tiny_server.backend, **GREEDY))
    assert done["type"] == "done" and done["finish_reason"] == "length"
    assert done["usage"]["completion_tokens"] == 40
    assert done["usage"]["prompt_tokens"] == start["prompt_tokens"]
    assert set(done["stats"]) == {"time_to_first_token", "tokens_per_second", "total_time"}
    assert done["stats"]["time_to_first_token"] > 0


async def test_messages_and_channels_with_scripted_backend():
    from swallow_stream.server import Settings, build_app

    b = ScriptedBackend(delay=0.0)
    with serve(build_app(b, Settings(), ui=False)) as srv:
        async with connect(srv.ws) as ws:
            msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
            await ws.send(json.dumps({"type": "generate", "id": 7, "messages": msgs,
                                      "params": {"reasoning_effort": "high", "system": "sys"}}))
            frames = await until_end(ws, 7)
    tokens = [f for f in frames if f["type"] == "token"]
    channels = [f["channel"] for f in tokens]
    # one frame per channel run at least; analysis strictly before final
    assert channels == sorted(channels) and set(channels) == {"analysis", "final"}
    text = {ch: "".join(f["text"] for f in tokens if f["channel"] == ch) for ch in ("analysis", "final")}
    assert text["analysis"] == "".join(f"think{i} " for i in range(6))
    assert text["final"] == "".join(f"word{i} " for i in range(8))
    assert frames[-1]["finish_reason"] == "stop" and frames[-1]["usage"]["completion_tokens"] == 14
    assert frames[-1]["usage"]["reasoning_tokens"] == 6
    assert b.opened[0]["reasoning_effort"] == "high" and b.opened[0]["system"] == "sys"
    assert b.opened[0]["messages"][0] == {"role": "system", "content": "Be brief."}


async def test_two_concurrent_ids_on_one_connection(tiny_server):
    b = tiny_server.backend
    ref_a = reference(b, "first prompt", **GREEDY)
    ref_b = reference(b, "second prompt", **GREEDY)
    async with connect(tiny_server.ws) as ws:
        await ws.send(json.dumps({"type": "generate", "id": "a", "prompt": "first prompt", "params": GREEDY}))
        await ws.send(json.dumps({"type": "generate", "id": "b", "prompt": "second prompt", "params": GREEDY}))
        # a duplicate of an active id is refused, the original goes on
        await ws.send(json.dumps({"type": "generate", "id": "a", "prompt": "dup", "params": GREEDY}))
        frames: list[dict] = []
        ended = set()
        while len(ended) < 2:
            f = await recv(ws)
            frames.append(f)
            if f["type"] == "done":
                ended.add(f["id"])
    dup = [f for f in frames if f["type"] == "error"]
    assert len(dup) == 1 and dup[0]["id"] == "a" and dup[0]["code"] == "invalid_request"
    for gid, ref in (("a", ref_a), ("b", ref_b)):
        ids = [t for f in frames if f["id"] == gid and f["type"] == "token" for t in f["token_ids"]]
        assert ids == ref.token_ids
    # both were in flight at once: b started before a finished
    order = [(f["type"], f["id"]) for f in frames if f["type"] in ("start", "done")]
    assert order.index(("start", "b")) < order.index(("done", "a"))


async def test_cancel_and_unknown_id(tiny_server):
    async with connect(tiny_server.ws) as ws:
        await ws.send(json.dumps({"type": "cancel", "id": "nope"}))
        f = await recv(ws)
        assert f == {"type": "error", "id": "nope", "code": "not_found", "message": f["message"]}
        await ws.send(json.dumps({"type": "generate", "id": "long", "prompt": "go on", "params": {"max_tokens": 5000}}))
        frames: list[dict] = []
        while not any(x["type"] == "token" and x["token_ids"] for x in frames):
            frames.append(await recv(ws))
        await ws.send(json.dumps({"type": "cancel", "id": "long"}))
        rest = await until_end(ws, "long")
    assert rest[-1]["type"] == "done" and rest[-1]["finish_reason"] == "cancelled"
    assert rest[-1]["usage"]["completion_tokens"] < 5000
    assert await await_until(lambda: engine_idle(tiny_server.backend))


async def test_bad_input_gets_error_frames_and_connection_stays(tiny_server):
    async with connect(tiny_server.ws, max_size=None) as ws:
        cases = [
            ("{not json", None),
            ("[1, 2]", None),
            (json.dumps({"type": "dance", "id": "u"}), "u"),
            (json.dumps({"type": "generate", "id": "p1", "prompt": "x", "params": {"temperature": "hot"}}), "p1"),
            (json.dumps({"type": "generate", "id": "p2", "prompt": "x", "params": {"bogus": 1}}), "p2"),
            (json.dumps({"type": "generate", "id": "p3", "params": {}}), "p3"),
            (json.dumps({"type": "generate", "id": "p4", "prompt": "x", "messages": []}), "p4"),
            (json.dumps({"type": "generate", "id": "p5", "messages": [{"role": "robot", "content": "x"}]}), "p5"),
            (json.dumps({"type": "generate", "id": "p6", "prompt": "x", "params": {"reasoning_effort": "max"}}), "p6"),
            (json.dumps({"type": "generate", "prompt": "no id"}), None),
            (json.dumps({"type": "generate", "id": "big", "prompt": "x" * (70 << 10)}), None),  # > 64 KiB frame limit
        ]
        for text, gid in cases:
            await ws.send(text)
            f = await recv(ws)
            assert f["type"] == "error" and f["code"] == "invalid_request", (text[:60], f)
            assert f.get("id") == gid, (text[:60], f)
            assert f["message"]
        # still usable afterwards
        await ws.send(json.dumps({"type": "generate", "id": "ok", "prompt": "still there?", "params": {"max_tokens": 4}}))
        frames = await until_end(ws, "ok")
        assert frames[-1]["type"] == "done" and frames[-1]["usage"]["completion_tokens"] == 4


async def test_per_connection_generation_limit(tiny_server):
    async with connect(tiny_server.ws) as ws:
        for i in range(3):  # the tiny_server allows 3 per connection
            await ws.send(json.dumps({"type": "generate", "id": f"g{i}", "prompt": "hi", "params": {"max_tokens": 3000}}))
        await ws.send(json.dumps({"type": "generate", "id": "g3", "prompt": "hi", "params": {"max_tokens": 5}}))
        seen = []
        while True:
            f = await recv(ws)
            seen.append(f)
            if f["type"] == "error":
                break
        assert f["id"] == "g3" and f["code"] == "overloaded"
        for i in range(3):
            await ws.send(json.dumps({"type": "cancel", "id": f"g{i}"}))
        done = set()
        while len(done) < 3:
            f = await recv(ws)
            if f["type"] == "done":
                assert f["finish_reason"] == "cancelled"
                done.add(f["id"])
    assert await await_until(lambda: engine_idle(tiny_server.backend))


async def test_engine_overloaded_and_context_length(limited_server):
    async with connect(limited_server.ws) as ws:
        await ws.send(json.dumps({"type": "generate", "id": "busy", "prompt": "hi", "params": {"max_tokens": 60}}))
        assert (await recv(ws))["type"] == "start"
        # the engine has one slot and no queue: the next request is refused at once
        await ws.send(json.dumps({"type": "generate", "id": "more", "prompt": "hi", "params": {"max_tokens": 5}}))
        frames: list[dict] = []
        err = (await until_end(ws, "more", frames))[-1]
        assert err["type"] == "error" and err["code"] == "overloaded"
        await ws.send(json.dumps({"type": "cancel", "id": "busy"}))
        await until_end(ws, "busy", frames)
        assert await await_until(lambda: engine_idle(limited_server.backend))
        # max_model_len is 128: a long prompt, or room too small for max_tokens
        await ws.send(json.dumps({"type": "generate", "id": "long", "prompt": "word " * 300}))
        err = (await until_end(ws, "long"))[-1]
        assert err["code"] == "context_length_exceeded" and "128" in err["message"]
        await ws.send(json.dumps({"type": "generate", "id": "room", "prompt": "hi", "params": {"max_tokens": 500}}))
        err = (await until_end(ws, "room"))[-1]
        assert err["code"] == "context_length_exceeded"


async def test_internal_error_frame():
    from swallow_stream.server import Settings, build_app

    b = ScriptedBackend()
    b.fail_with = RuntimeError("kaboom")
    with serve(build_app(b, Settings(), ui=False)) as srv:
        async with connect(srv.ws) as ws:
            await ws.send(json.dumps({"type": "generate", "id": "x", "prompt": "hi"}))
            f = await recv(ws)
            assert f["type"] == "error" and f["id"] == "x" and f["code"] == "internal" and "kaboom" in f["message"]
            b.fail_with = None
            await ws.send(json.dumps({"type": "generate", "id": "y", "prompt": "hi"}))
            assert (await until_end(ws, "y"))[-1]["type"] == "done"


async def test_disconnect_cancels_and_frees_blocks(tiny_server):
    backend = tiny_server.backend
    assert await await_until(lambda: engine_idle(backend))
    ws = await connect(tiny_server.ws)
    for gid in ("d1", "d2"):
        await ws.send(json.dumps({"type": "generate", "id": gid, "prompt": "a long story", "params": {"max_tokens": 5000}}))
    while True:
        f = await recv(ws)
        if f["type"] == "token" and f["token_ids"]:
            break
    snap = backend.stats()
    assert snap["running"] >= 1 and snap["kv_blocks_used"] > 0
    await ws.close()
    assert await await_until(lambda: engine_idle(backend), timeout=20)
    assert backend.stats()["generated_tokens_total"] < snap["generated_tokens_total"] + 2 * 5000


async def test_auth_refused_and_accepted(tiny_auth_server):
    srv = tiny_auth_server
    for url, headers in ((srv.ws, None), (srv.ws, {"Authorization": "Bearer wrong"}), (srv.ws + "?api_key=wrong", None)):
        async with connect(url, additional_headers=headers) as ws:
            f = await recv(ws)
            assert f["type"] == "error" and f["code"] == "unauthorized"
            with pytest.raises(websockets.ConnectionClosed) as info:
                await recv(ws)
            assert info.value.rcvd.code == 1008
    for url, headers in ((srv.ws, {"Authorization": "Bearer sekret-key"}), (srv.ws + "?api_key=sekret-key", None)):
        async with connect(url, additional_headers=headers) as ws:
            await ws.send(json.dumps({"type": "generate", "id": "ok", "prompt": "hi", "params": {"max_tokens": 3}}))
            frames = await until_end(ws, "ok")
            assert frames[0]["type"] == "start" and frames[-1]["type"] == "done"


def test_ws_client_sync_matches_stream(tiny_server):
    from swallow_stream.client import ws_stream
    from swallow_stream.stream import TokenEvent

    ref = reference(tiny_server.backend, "client test", **GREEDY)
    s = ws_stream(tiny_server.ws, "client test", **GREEDY)
    events = list(s)
    assert all(isinstance(e, TokenEvent) for e in events)
    assert [e.token_id for e in events if e.token_id is not None] == ref.token_ids
    assert "".join(e.text for e in events) == "".join(ev.text for ev in stream("client test", model=tiny_server.backend, **GREEDY))
    assert s.finish_reason == "length" and s.usage.completion_tokens == 40
    assert s.reasoning == ref.reasoning and s.answer == ref.answer


async def test_ws_client_async_errors_and_break(tiny_server, limited_server, tiny_auth_server):
    from swallow_stream.client import UnauthorizedError, aws_stream, ws_stream

    s = await aws_stream(tiny_server.url, "async client", **GREEDY).collect()  # http:// URL works too
    assert s.finish_reason == "length" and len(s.token_ids) == 40
    with pytest.raises(InvalidRequestError):
        await aws_stream(tiny_server.ws, "x", temperature=-1).collect()
    with pytest.raises(ContextLengthExceededError):
        await aws_stream(limited_server.ws, "word " * 300).collect()
    with pytest.raises(UnauthorizedError):
        ws_stream(tiny_auth_server.ws, "x", max_tokens=3).collect()
    assert ws_stream(tiny_auth_server.ws, "x", api_key="sekret-key", max_tokens=3).collect().finish_reason == "length"
    # leaving the loop early cancels the generation on the server
    backend = tiny_server.backend
    n = 0
    async for _ in aws_stream(tiny_server.ws, "stop me early", max_tokens=5000):
        n += 1
        if n == 3:
            break
    assert await await_until(lambda: engine_idle(backend), timeout=20)
    with pytest.raises(OverloadedError):
        async with connect(limited_server.ws) as ws:
            await ws.send(json.dumps({"type": "generate", "id": "hold", "prompt": "hi", "params": {"max_tokens": 60}}))
            assert (await recv(ws))["type"] == "start"
            try:
                await aws_stream(limited_server.ws, "hi", max_tokens=5).collect()
            finally:
                await ws.send(json.dumps({"type": "cancel", "id": "hold"}))
                await until_end(ws, "hold")


async def test_slow_client_gets_coalesced_frames_and_never_stalls_the_engine(tiny_backend):
    """A client that reads nothing: the engine still finishes (its blocks freed), and when the
    client reads again it gets one token frame per channel run instead of one per token."""
    from starlette.websockets import WebSocketState

    from swallow_stream.server import Settings
    from swallow_stream.server.health import Metrics
    from swallow_stream.server.websocket import WSConnection

    class StuckSocket:
        headers: dict = {}
        query_params: dict = {}
        application_state = WebSocketState.CONNECTED

        def __init__(self):
            self.sent: list[dict] = []
            self.gate = asyncio.Event()
            self.incoming: asyncio.Queue = asyncio.Queue()

        async def accept(self):
            pass

        async def receive(self):
            return await self.incoming.get()

        async def send_text(self, text):
            await self.gate.wait()  # the client's socket is full until the gate opens
            self.sent.append(json.loads(text))

        async def close(self, code=1000, reason=None):
            pass

    ref_events = list(stream("slow reader", model=tiny_backend, **GREEDY))
    runs = 1 + sum(1 for a, b in zip(ref_events, ref_events[1:]) if a.channel != b.channel)
    ws = StuckSocket()
    conn = WSConnection(ws, tiny_backend, Settings(), Metrics())
    task = asyncio.create_task(conn.run())
    before = tiny_backend.stats()["requests_finished_total"]
    ws.incoming.put_nowait({"type": "websocket.receive",
                            "text": json.dumps({"type": "generate", "id": "s", "prompt": "slow reader", "params": GREEDY})})
    assert await await_until(lambda: tiny_backend.stats()["requests_finished_total"] > before and engine_idle(tiny_backend))
    assert ws.sent == []  # nothing could be sent, yet the request ran to the end
    ws.gate.set()
    assert await await_until(lambda: ws.sent and ws.sent[-1]["type"] == "done")
    tokens = [f for f in ws.sent if f["type"] == "token"]
    assert [t for f in tokens for t in f["token_ids"]] == [e.token_id for e in ref_events if e.token_id is not None]
    assert len(tokens) == runs < len(ref_events)
    assert ws.sent[0]["type"] == "start" and ws.sent[-1]["usage"]["completion_tokens"] == 40
    ws.incoming.put_nowait({"type": "websocket.disconnect"})
    await asyncio.wait_for(task, 10)
