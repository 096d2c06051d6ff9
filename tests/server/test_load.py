"""A bounded load test on the tiny engine: 32 concurrent WebSocket clients plus one that does
not read at all until the others are done. Everyone gets exactly the greedy tokens the same
prompt gets alone; the stalled reader holds up neither the engine nor the other clients; the
engine's blocks return to idle afterwards."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
from websockets.asyncio.client import connect

from swallow_stream import stream
from swallow_stream.client import aws_stream

from server_helpers import await_until, engine_idle

pytestmark = pytest.mark.slow  # dozens of concurrent clients

N_CLIENTS = 32
MAX_TOKENS = 24
PROMPTS = ["Tell me about Tokyo.", "東京の観光地は？", "What is a mixture of experts?", "Write a haiku."]


async def test_32_clients_and_a_stalled_reader(tiny_server):
    backend = tiny_server.backend
    params = {"max_tokens": MAX_TOKENS, "temperature": 0}
    refs = {p: stream(p, model=backend, **params).collect().token_ids for p in PROMPTS}
    assert all(len(r) == MAX_TOKENS for r in refs.values())
    assert await await_until(lambda: engine_idle(backend))
    finished_before = backend.stats()["requests_finished_total"]

    # The stalled reader: a small receive buffer, and it reads nothing until the others are done.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", tiny_server.port))
    slow = await connect(tiny_server.ws, sock=sock, max_queue=1)
    slow_prompt = PROMPTS[0]
    await slow.send(json.dumps({"type": "generate", "id": "slow", "prompt": slow_prompt, "params": params}))

    async def fast(i: int):
        prompt = PROMPTS[i % len(PROMPTS)]
        s = await aws_stream(tiny_server.ws, prompt, **params).collect()
        return prompt, s

    peak = 0

    async def monitor():
        nonlocal peak
        while True:
            peak = max(peak, backend.stats()["running"])
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(monitor())
    try:
        results = await asyncio.wait_for(asyncio.gather(*(fast(i) for i in range(N_CLIENTS))), timeout=180)
    finally:
        watcher.cancel()
    assert peak >= N_CLIENTS // 2  # they really ran batched together
    for prompt, s in results:
        assert s.finish_reason == "length"
        assert s.token_ids == refs[prompt], prompt
        assert s.usage.completion_tokens == MAX_TOKENS
    # the stalled reader's request ran to the end in the engine too, while it read nothing
    assert await await_until(lambda: backend.stats()["requests_finished_total"] >= finished_before + N_CLIENTS + 1,
                             timeout=60)
    assert await await_until(lambda: engine_idle(backend), timeout=30)

    frames = []
    while not frames or frames[-1]["type"] not in ("done", "error"):
        frames.append(json.loads(await asyncio.wait_for(slow.recv(), 30)))
    await slow.close()
    assert frames[0]["type"] == "start" and frames[-1]["type"] == "done"
    ids = [t for f in frames if f["type"] == "token" for t in f["token_ids"]]
    assert ids == refs[slow_prompt]
    snap = backend.stats()
    assert snap["running"] == 0 and snap["waiting"] == 0 and snap["kv_blocks_used"] == 0
