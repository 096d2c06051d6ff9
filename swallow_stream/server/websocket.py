"""`/ws`: token streaming over a WebSocket (JSON text frames; protocol in DESIGN.md).

Per connection: a receive loop reads client frames; each generation runs in its own producer
task that drains its stream into the connection's outbox; one sender task turns whatever piled
up in the outbox into frames. A slow client therefore gets fewer, bigger (coalesced) token
frames; the engine, the producers and other connections never wait on its socket.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from dataclasses import dataclass
from typing import Any

from starlette.websockets import WebSocket, WebSocketState

from ..errors import InvalidRequestError, SwallowError
from ..stream import AsyncStream, TokenEvent
from .auth import request_authorized
from .common import cancel_task, check_params, error_code, event_batches, open_stream
from .health import Metrics
from .settings import Settings

log = logging.getLogger("swallow_stream.server.ws")

POLICY_VIOLATION = 1008


@dataclass
class _Generation:
    id: Any
    stream: AsyncStream
    task: asyncio.Task | None = None
    cancel_requested: bool = False
    ended: bool = False  # a done or error frame went out


def _frame(**kw: Any) -> dict:
    return kw


def _merge(items: list[tuple]) -> list[dict]:
    """Outbox items -> frames. Token events of one generation that are not separated by one of its
    control frames become one frame per channel run; order within a generation is kept."""
    frames: list[dict] = []
    open_run: dict[Any, int] = {}  # generation id -> index of its token frame still accepting events
    for item in items:
        if item[0] == "frame":
            frame = item[1]
            if "id" in frame:
                open_run.pop(_key(frame["id"]), None)
            frames.append(frame)
            continue
        _, gid, events = item
        key = _key(gid)
        for ev in events:
            idx = open_run.get(key)
            if idx is not None and frames[idx]["channel"] == ev.channel:
                f = frames[idx]
            else:
                f = {"type": "token", "id": gid, "channel": ev.channel, "text": "", "token_ids": []}
                frames.append(f)
                open_run[key] = len(frames) - 1
            f["text"] += ev.text
            if ev.token_id is not None:
                f["token_ids"].append(ev.token_id)
            if ev.logprob is not None:
                f.setdefault("logprobs", []).append(ev.logprob)
    return frames


def _key(gid: Any) -> Any:
    return (type(gid).__name__, gid)


class WSConnection:
    def __init__(self, ws: WebSocket, backend: Any, settings: Settings, metrics: Metrics):
        self.ws = ws
        self.backend = backend
        self.settings = settings
        self.metrics = metrics
        self.gens: dict[Any, _Generation] = {}
        self._outbox: deque[tuple] = deque()
        self._wake = asyncio.Event()
        self.closed = False

    # -- outbox ------------------------------------------------------------------------------
    def push(self, frame: dict) -> None:
        if self.closed:
            return
        if frame.get("type") == "error":
            self.metrics.count_error("ws", frame.get("code", "internal"))
        self._outbox.append(("frame", frame))
        self._wake.set()

    def push_tokens(self, gid: Any, events: list[TokenEvent]) -> None:
        if self.closed or not events:
            return
        self._outbox.append(("tokens", gid, events))
        self._wake.set()

    def error(self, code: str, message: str, gid: Any = None) -> None:
        frame = {"type": "error", "code": code, "message": message}
        if gid is not None:
            frame = {"type": "error", "id": gid, "code": code, "message": message}
        self.push(frame)

    async def _send_loop(self) -> None:
        while True:
            if not self._outbox:
                self._wake.clear()
                await self._wake.wait()
                continue
            items = list(self._outbox)
            self._outbox.clear()
            for frame in _merge(items):
                await self.ws.send_text(json.dumps(frame, ensure_ascii=False))

    # -- connection ----------------------------------------------------------------------------
    async def run(self) -> None:
        await self.ws.accept()
        if not request_authorized(self.settings.api_key, self.ws.headers, self.ws.query_params):
            self.metrics.count_error("ws", "unauthorized")
            await self.ws.send_text(json.dumps({"type": "error", "code": "unauthorized",
                                                "message": "missing or wrong API key"}))
            await self.ws.close(code=POLICY_VIOLATION, reason="unauthorized")
            return
        self.metrics.ws_connections += 1
        sender = asyncio.create_task(self._send_loop())
        receiver = asyncio.create_task(self._receive_loop())
        try:
            # Whichever ends first (client gone, send failed) ends the connection.
            await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.closed = True
            self.metrics.ws_connections -= 1
            for gen in list(self.gens.values()):
                gen.stream.cancel()  # frees the engine's blocks now, not when the task runs
            await asyncio.gather(*(cancel_task(g.task) for g in list(self.gens.values())))
            await cancel_task(receiver)
            await cancel_task(sender)
            if self.ws.application_state == WebSocketState.CONNECTED:
                try:
                    await self.ws.close()
                except Exception:
                    pass

    async def _receive_loop(self) -> None:
        limit = self.settings.ws_max_frame_bytes
        while True:
            msg = await self.ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            text = msg.get("text")
            if text is None:
                data = msg.get("bytes") or b""
                if len(data) > limit:
                    self.error("invalid_request", f"frame of {len(data)} bytes exceeds the limit of {limit} bytes")
                    continue
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError:
                    self.error("invalid_request", "binary frame is not UTF-8 JSON")
                    continue
            elif len(text) > limit // 4 and len(text.encode("utf-8")) > limit:
                self.error("invalid_request", f"frame exceeds the limit of {limit} bytes")
                continue
            try:
                self._handle(text)
            except Exception as e:  # never let one bad frame end the connection
                log.exception("websocket frame handling failed")
                self.error("internal", f"internal error: {type(e).__name__}")

    def _handle(self, text: str) -> None:
        try:
            msg = json.loads(text)
        except ValueError as e:
            self.error("invalid_request", f"malformed JSON: {e}")
            return
        if not isinstance(msg, dict):
            self.error("invalid_request", "a frame must be a JSON object with a 'type'")
            return
        kind = msg.get("type")
        gid = msg.get("id")
        if gid is not None and (isinstance(gid, bool) or not isinstance(gid, (str, int))):
            self.error("invalid_request", "'id' must be a string or an integer")
            return
        if kind == "generate":
            self._generate(gid, msg)
        elif kind == "cancel":
            self._cancel(gid)
        else:
            self.error("invalid_request", f"unknown message type {kind!r}; use 'generate' or 'cancel'", gid)

    def _generate(self, gid: Any, msg: dict) -> None:
        if gid is None or gid == "":
            self.error("invalid_request", "'generate' needs an 'id'")
            return
        if gid in self.gens:
            self.error("invalid_request", f"generation {gid!r} is already running on this connection", gid)
            return
        if len(self.gens) >= self.settings.ws_max_generations:
            self.error(
                "overloaded",
                f"this connection already runs {len(self.gens)} generations (limit {self.settings.ws_max_generations})",
                gid,
            )
            return
        try:
            has_msgs, has_prompt = "messages" in msg, "prompt" in msg
            if has_msgs == has_prompt:
                raise InvalidRequestError("'generate' needs exactly one of 'messages' or 'prompt'")
            source = msg["messages"] if has_msgs else msg["prompt"]
            if has_prompt and not isinstance(source, str):
                raise InvalidRequestError("'prompt' must be a string")
            params = check_params(msg.get("params"))
            stream = open_stream(self.backend, source, **params)
        except SwallowError as e:
            self.error(e.code, str(e), gid)
            return
        except Exception as e:
            log.exception("opening a generation failed")
            self.error("internal", f"internal error: {type(e).__name__}: {e}", gid)
            return
        gen = _Generation(gid, stream)
        self.gens[gid] = gen
        self.metrics.count_request("ws")
        self.metrics.generations_active += 1
        gen.task = asyncio.create_task(self._produce(gen))
        gen.task.add_done_callback(lambda _t, gen=gen: self._ended(gen))

    def _ended(self, gen: _Generation) -> None:
        # Runs even when the task was cancelled before it started (its body never ran).
        gen.stream.cancel()
        self.metrics.generations_active -= 1
        if self.gens.get(gen.id) is gen:
            del self.gens[gen.id]
        if not gen.ended and gen.cancel_requested:
            self._done(gen)

    def _cancel(self, gid: Any) -> None:
        gen = self.gens.get(gid) if gid is not None else None
        if gen is None:
            self.error("not_found", f"no running generation with id {gid!r}", gid)
            return
        gen.cancel_requested = True
        gen.stream.cancel()
        if gen.task is not None:
            gen.task.cancel()

    async def _produce(self, gen: _Generation) -> None:
        s = gen.stream
        try:
            self.push({"type": "start", "id": gen.id, "model": s.model, "prompt_tokens": len(s.prompt_token_ids)})
            async for batch in event_batches(s):
                self.push_tokens(gen.id, batch)
            self._done(gen)
        except asyncio.CancelledError:
            s.cancel()
            if gen.cancel_requested:
                self._done(gen)
        except SwallowError as e:
            gen.ended = True
            self.error(e.code, str(e), gen.id)
        except Exception as e:
            log.exception("generation %r failed", gen.id)
            gen.ended = True
            self.error(error_code(e), f"generation failed: {e}", gen.id)
        finally:
            s.cancel()

    def _done(self, gen: _Generation) -> None:
        s = gen.stream
        gen.ended = True
        self.metrics.count_finish("ws", s.finish_reason or "cancelled", s.usage)
        self.push({
            "type": "done",
            "id": gen.id,
            "finish_reason": s.finish_reason or "cancelled",
            "usage": s.usage.as_dict(),
            "stats": s.stats.as_dict(),
        })


def make_websocket_endpoint(backend: Any, settings: Settings, metrics: Metrics):
    async def websocket_endpoint(ws: WebSocket) -> None:
        await WSConnection(ws, backend, settings, metrics).run()

    return websocket_endpoint
