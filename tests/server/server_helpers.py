"""Helpers for the server tests (imported by conftest.py and the test modules)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
from typing import Any, Callable

from swallow_stream.server.background import BackgroundServer as ServerThread

ARTIFACTS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "test-artifacts")


# -- servers ------------------------------------------------------------------------------------



@contextlib.contextmanager
def serve(app: Any, **config: Any):
    srv = ServerThread(app, **config).start()
    try:
        yield srv
    finally:
        srv.stop()


def wait_until(cond: Callable[[], bool], timeout: float = 20.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return cond()


async def await_until(cond: Callable[[], bool], timeout: float = 20.0, interval: float = 0.02) -> bool:
    """wait_until for async tests: the event loop keeps running (async generators get finalized)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        await asyncio.sleep(interval)
    return cond()


def engine_idle(backend: Any) -> bool:
    s = backend.stats()
    return s["running"] == 0 and s["waiting"] == 0 and s["kv_blocks_used"] == 0


# -- a scripted backend: chosen channels, chosen pace, cancel recorded ----------------------------


class ScriptedSource:
    def __init__(self, backend: "ScriptedBackend", script: list[tuple[str, str]], delay: float, channel, params):
        self.model = backend.name
        self.prompt_token_ids = [11, 12, 13]
        self._backend = backend
        self._channel = channel
        self._cancel = threading.Event()
        self._done = threading.Lock()
        self._ended = False
        self.sent = 0
        limit = params.max_tokens
        self._script = script[:limit] if limit is not None else script
        self._truncated = limit is not None and limit < len(script)
        self._delay = delay
        threading.Thread(target=self._run, daemon=True).start()

    def _end(self, item) -> bool:
        with self._done:
            if self._ended:
                return False
            self._ended = True
        self._channel.put(item)
        return True

    def _run(self) -> None:
        from swallow_stream.stream import Finished, TokenEvent

        for i, (channel, text) in enumerate(self._script):
            if self._cancel.wait(self._delay):
                return
            with self._done:  # a token is either sent before a cancel or not at all
                if self._cancel.is_set():
                    return
                self._channel.put(TokenEvent(text, channel, 1000 + i))
                self.sent += 1
        if not self._cancel.is_set():
            self._end(Finished("length" if self._truncated else "stop"))
            self._backend.completed += 1

    def get(self, block: bool = True):
        return self._channel.get_all(block)

    async def aget(self):
        return await self._channel.aget_all()

    def cancel(self) -> None:
        from swallow_stream.stream import Finished

        with self._done:
            if self._cancel.is_set():
                return
            self._cancel.set()
        if self._end(Finished("cancelled")):
            self._backend.cancelled.append(self)
            self._backend.cancel_seen.set()


def reasoning_then_answer(n_reasoning: int = 6, n_answer: int = 8) -> list[tuple[str, str]]:
    return [("analysis", f"think{i} ") for i in range(n_reasoning)] + [("final", f"word{i} ") for i in range(n_answer)]


class ScriptedBackend:
    """Implements the Backend protocol with a script of (channel, text) tokens per request."""

    kind = "local"
    max_num_seqs = 16
    max_queued_requests = 64
    closed = False

    def __init__(self, name: str = "scripted-model", script: Callable[[list[dict]], list[tuple[str, str]]] | None = None,
                 delay: float = 0.01, is_tiny: bool = False):
        from swallow_stream.config import GenerationDefaults

        self.name = name
        self.generation = GenerationDefaults(temperature=0.6, top_p=0.95, top_k=20, min_p=0.0)
        self.max_model_len = 4096
        self.is_tiny = is_tiny
        self.delay = delay
        self.script = script or (lambda messages: reasoning_then_answer())
        self.fail_with: Exception | None = None
        self.opened: list[dict] = []
        self.sources: list[ScriptedSource] = []
        self.cancelled: list[ScriptedSource] = []
        self.cancel_seen = threading.Event()
        self.completed = 0

    def open(self, request, channel):
        if self.fail_with is not None:
            raise self.fail_with
        self.opened.append({"messages": request.messages, "reasoning_effort": request.reasoning_effort,
                            "system": request.system, "params": request.params})
        src = ScriptedSource(self, self.script(request.messages), self.delay, channel, request.params)
        self.sources.append(src)
        return src

    def stats(self) -> dict:
        return {"model": self.name, "running": sum(1 for s in self.sources if not s._ended)}

    def describe(self) -> dict:
        return {"backend": self.kind, "model": self.name, "is_tiny": self.is_tiny}

    def shutdown(self) -> None:
        self.closed = True





# -- a vLLM stand-in: streams reasoning chunks, then content chunks --------------------------------

STANDIN_MODEL = "standin/gpt-oss-remote"
STANDIN_REASONING = ["The user ", "wants a ", "greeting."]
STANDIN_ANSWER = ["Hello", ", ", "world", "!"]


def make_standin_app(state: dict):
    """A tiny OpenAI-compatible server in vLLM's shape. `state` records requests and disconnects."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [{"id": STANDIN_MODEL, "object": "model",
                                                         "max_model_len": 8192}]})

    async def chat(request: Request):
        body = await request.json()
        state.setdefault("requests", []).append(body)
        if body.get("model") != STANDIN_MODEL:
            return JSONResponse({"error": {"message": "no such model", "type": "NotFoundError", "code": 404}},
                                status_code=404)
        mode = state.get("mode", "normal")
        if mode == "overloaded":
            return JSONResponse({"error": {"message": "server busy", "type": "rate_limit", "code": 429}},
                                status_code=429)
        slow = mode == "slow"
        rid = "chatcmpl-standin"

        def chunk(delta: dict, finish: str | None = None) -> str:
            c = {"id": rid, "object": "chat.completion.chunk", "model": STANDIN_MODEL,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return f"data: {json.dumps(c)}\n\n"

        async def gen():
            try:
                yield chunk({"role": "assistant", "content": ""})
                # vLLM >= 0.10 says `reasoning`; older ones `reasoning_content`: send both kinds
                for i, piece in enumerate(STANDIN_REASONING):
                    key = "reasoning" if i % 2 == 0 else "reasoning_content"
                    yield chunk({key: piece})
                    await asyncio.sleep(0.01)
                n = 200 if slow else 1
                for _ in range(n):
                    for piece in STANDIN_ANSWER:
                        yield chunk({"content": piece})
                        await asyncio.sleep(0.05 if slow else 0.01)
                yield chunk({}, "stop")
                if (body.get("stream_options") or {}).get("include_usage"):
                    usage = {"prompt_tokens": 21, "completion_tokens": 7, "total_tokens": 28,
                             "completion_tokens_details": {"reasoning_tokens": 3}}
                    yield f"data: {json.dumps({'id': rid, 'object': 'chat.completion.chunk', 'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"
            except asyncio.CancelledError:
                state["disconnected"] = state.get("disconnected", 0) + 1
                raise
            finally:
                state["streams_closed"] = state.get("streams_closed", 0) + 1

        return StreamingResponse(gen(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/models", models), Route("/v1/chat/completions", chat, methods=["POST"])])
